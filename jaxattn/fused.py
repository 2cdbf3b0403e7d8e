"""A faster inference path for ``MultiHeadAttention`` weights: Q/K/V fused into one matmul.

Used by ``crosscheck bench`` (``jax-fused-blockwise``): the three ``(d_in, d_out)``
kernels become one ``(d_in, 3 * d_out)`` kernel (the book's ``MultiHeadAttentionCombinedQKV``
layout), so one larger matmul replaces three; attention goes through
:func:`jaxattn.dot_product_attention`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattn.attention import dot_product_attention


def fuse_qkv_params(params: dict) -> dict:
    """``MultiHeadAttention`` params -> ``{"W_qkv": {"kernel", ["bias"]}, "out_proj": ...}``, done once, outside jit."""
    names = ("W_query", "W_key", "W_value")
    fused = {"kernel": jnp.concatenate([params[n]["kernel"] for n in names], axis=-1)}  # (d_in, 3 d_out)
    if "bias" in params["W_query"]:
        fused["bias"] = jnp.concatenate([params[n]["bias"] for n in names], axis=-1)  # (3 d_out,)
    return {"W_qkv": fused, "out_proj": dict(params["out_proj"])}


def fused_mha(
    fused: dict,
    x: Float[Array, "batch tokens d_in"],
    *,
    num_heads: int,
    impl: str = "blockwise",
) -> Float[Array, "batch tokens d_out"]:
    """``MultiHeadAttention.apply`` with fused Q/K/V params (from :func:`fuse_qkv_params`), inference only."""
    b, tokens, _ = x.shape
    qkv = x @ fused["W_qkv"]["kernel"]  # (b, T, 3 d_out)
    if "bias" in fused["W_qkv"]:
        qkv = qkv + fused["W_qkv"]["bias"]
    d_out = qkv.shape[-1] // 3
    qkv = qkv.reshape(b, tokens, 3, num_heads, d_out // num_heads)  # (b, T, 3, H, hd)
    context_vec = dot_product_attention(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True, implementation=None if impl == "auto" else impl
    )  # (b, T, H, hd)
    context_vec = context_vec.reshape(b, tokens, d_out)  # (b, T, d_out)
    return context_vec @ fused["out_proj"]["kernel"] + fused["out_proj"]["bias"]
