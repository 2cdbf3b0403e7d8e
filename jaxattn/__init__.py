"""jaxattn: the attention layers of *LLMs from scratch*, chapter 3, as pure Flax Linen modules.

Depends on JAX and Flax only. Layers, bottom up:

* :mod:`jaxattn.ops` and :mod:`jaxattn.masks`: array primitives and mask conventions;
* :mod:`jaxattn.kernels`: one file per attention kernel (naive, blockwise, xla), arrays only;
* :mod:`jaxattn.implementations`: the open table of kernels and what each supports;
  :mod:`jaxattn.sharding` (a mesh, shard modes) adds its ``ring`` row;
* :func:`dot_product_attention` (:mod:`jaxattn.attention`): the one attention core,
  ``jax.nn.dot_product_attention``'s signature plus ``q_offset``; :mod:`jaxattn.core`
  gathers the functional core in one import;
* :mod:`jaxattn.rope` and :mod:`jaxattn.norms`: RoPE and RMS-norm as plain functions;
* the Linen modules: own parameters (named as the torch ones), project, call the core;
  :class:`GroupedQueryAttention` (Llama 3 / Qwen3) adds RoPE and QK-norm;
* :mod:`jaxattn.nnx` (imported on its own: ``import jaxattn.nnx``): the same modules in Flax NNX,
  over the same math functions.
"""

from jaxattn import core, implementations, masks, sharding, tolerance  # sharding registers the "ring" row
from jaxattn.attention import dot_product_attention
from jaxattn.base import AttentionModule
from jaxattn.causal import CausalAttention, MultiHeadAttentionWrapper
from jaxattn.gqa import GroupedQueryAttention
from jaxattn.multihead import MultiHeadAttention, MultiHeadAttentionCombinedQKV, TorchMultiheadAttention
from jaxattn.self_attention import SelfAttentionV1, SelfAttentionV2, SimplifiedSelfAttention

__version__ = "0.2.0"  # pyproject.toml reads it (setuptools dynamic version)

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

__all__ = [cls.__name__ for cls in VARIANTS] + [
    "AttentionModule",
    "VARIANTS",
    "core",
    "dot_product_attention",
    "implementations",
    "masks",
    "sharding",
    "tolerance",
    "GroupedQueryAttention",  # beyond chapter 3, so not in VARIANTS
]
