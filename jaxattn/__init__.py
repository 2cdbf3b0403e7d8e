"""jaxattn: the attention layers of *LLMs from scratch*, chapter 3, as pure Flax Linen modules.

Depends on JAX and Flax only. The math lives in :mod:`jaxattn.core`; the
modules own parameters (named as the torch ones) and call it.
"""

from jaxattn import core, masks
from jaxattn.causal import CausalAttention, MultiHeadAttentionWrapper
from jaxattn.multihead import MultiHeadAttention, MultiHeadAttentionCombinedQKV, TorchMultiheadAttention
from jaxattn.self_attention import SelfAttentionV1, SelfAttentionV2, SimplifiedSelfAttention

__version__ = "0.1.0"

#: The six chapter-3 variants and the two extra torch layouts, in teaching order.
VARIANTS = (
    SimplifiedSelfAttention,
    SelfAttentionV1,
    SelfAttentionV2,
    CausalAttention,
    MultiHeadAttentionWrapper,
    MultiHeadAttention,
    MultiHeadAttentionCombinedQKV,
    TorchMultiheadAttention,
)

__all__ = [cls.__name__ for cls in VARIANTS] + ["core", "masks", "VARIANTS"]
