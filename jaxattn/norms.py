"""RMS normalisation as the book's ``qwen3.RMSNorm`` computes it (``qwen3_compatible=True``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["rms_norm"]


def rms_norm(
    x: Float[Array, "*batch dim"],
    scale: Float[Array, " dim"],
    eps: float = 1e-6,
    shift: Float[Array, " dim"] | None = None,
) -> Float[Array, "*batch dim"]:
    """``x / sqrt(mean(x**2) + eps) * scale (+ shift)`` over the last axis, in float32, returned in ``x``'s dtype.

    The book's ``RMSNorm(emb_dim, eps, bias=shift is not None, qwen3_compatible=True)``: the input
    is cast to float32 first, ``scale``/``shift`` are applied in float32, then cast back.
    """
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)  # (*batch, 1)
    norm_x = x32 * jax.lax.rsqrt(variance + jnp.float32(eps)) * scale.astype(jnp.float32)
    if shift is not None:
        norm_x = norm_x + shift.astype(jnp.float32)
    return norm_x.astype(x.dtype)
