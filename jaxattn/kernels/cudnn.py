"""The cuDNN kernel: ``jax.nn.dot_product_attention(..., implementation="cudnn")``.

cuDNN's fused flash attention on NVIDIA GPUs, forward and backward, for bfloat16 and
float16 (an earlier GPU report measured it at 1.0-2.9x torch's SDPA forward+backward on an H100). What
it takes, checked before the call so a refusal is a ``ValueError`` saying why, not an
XLA error (see :func:`refusal`): q, k and v of one 16-bit dtype, one head dim for all
three, a multiple of 8 up to :data:`MAX_HEAD_DIM`; grouped kv heads natively (no copies).

Causal attention is cuDNN's own (top-left aligned, ``q_offset = 0``); masks, bias and
``q_offset`` go to the ``xla`` kernel instead: a row that sees no key must give zeros
here (every jaxattn kernel agrees on that) and cuDNN's masked rows do not promise it.
``precision`` is ignored: the products are 16-bit with float32 accumulation by design.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattn.ops import nonfinite_rows

#: cuDNN's flash attention takes head dims that are multiples of 8 up to this (cuDNN 9 on Hopper).
MAX_HEAD_DIM = 128
DTYPES = ("bfloat16", "float16")


def refusal(head_dim: int, value_head_dim: int) -> str | None:
    """Why cuDNN cannot take these head dims (every reason, joined by ``"; "``), or ``None``."""
    reasons = []
    if value_head_dim != head_dim:
        reasons.append(f"cuDNN needs one head dim for q, k and v (got {head_dim} and {value_head_dim})")
    for dim in dict.fromkeys((head_dim, value_head_dim)):
        if dim % 8 or dim > MAX_HEAD_DIM:
            reasons.append(f"cuDNN takes head dims that are multiples of 8 up to {MAX_HEAD_DIM}, not {dim}")
    return "; ".join(reasons) or None


def cudnn_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K H"],
    bias=None,
    mask=None,
    *,
    scale: float,
    is_causal: bool = False,
    q_offset=0,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    precision=None,
) -> tuple[Float[Array, "B T N H"], None]:
    """The kernel behind ``implementation="cudnn"`` (GPU only): ``(context, None)``."""
    if bias is not None or mask is not None or dropout_rate or not (isinstance(q_offset, int) and q_offset == 0):
        raise ValueError("cudnn_attention: no mask, bias, q_offset or dropout (use the xla or naive kernel)")
    if query.shape[1] == 0 or key.shape[1] == 0:  # no query, or no key for any query: zeros
        return jnp.zeros((*query.shape[:3], value.shape[-1]), value.dtype), None
    # The scale goes to cuDNN, which applies it in float32 inside the fused kernel: pre-scaling 16-bit
    # queries (what the XLA-compiled kernels do, jaxattn.ops.scale_queries) would round them once more.
    out = jax.nn.dot_product_attention(
        query, key, value, scale=scale, is_causal=bool(is_causal), implementation="cudnn"
    )
    # cuDNN's causal mask is a large finite fill, as jax.nn's: a row whose visible scores are all -inf
    # would weigh its masked keys. IEEE (and every jaxattn kernel) gives NaN there.
    nan_rows = nonfinite_rows(query, key, causal=bool(is_causal))  # (B, T, N)
    return jnp.where(nan_rows[..., None], jnp.asarray(jnp.nan, out.dtype), out), None
