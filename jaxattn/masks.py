"""Attention masks, one helper per convention, converted at the boundary.

Three conventions meet in a cross-check:

* **Flax / Equinox (ours):** a boolean mask, ``True`` = *attend*, broadcast to
  ``(..., q_tokens, k_tokens)``.
* **The book (torch):** ``torch.triu(ones, diagonal=1)`` stored as a float
  buffer named ``mask``; ``1`` = *masked*, scores are filled with ``-inf``.
* **ttnn:** an *additive* mask (``0`` = attend, a large negative = masked) that
  is added to the scores before softmax.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

#: Additive value for masked positions that survives bfloat16: -1e9 is not
#: representable there (it becomes -998244352), and -finfo(float32).min
#: overflows to -inf. Any value this negative gives exp(...) == 0 in float32.
ADDITIVE_MASK_VALUE = -1.0e9


def make_causal_mask(tokens: int) -> Bool[Array, "tokens tokens"]:
    """Boolean causal mask, ``True`` where query ``i`` may attend key ``j <= i``."""
    return jnp.tril(jnp.ones((tokens, tokens), dtype=jnp.bool_))


def book_causal_mask(context_length: int) -> Float[Array, "context_length context_length"]:
    """The book's ``mask`` buffer: ``triu(ones, diagonal=1)``, ``1.0`` = masked."""
    return jnp.triu(jnp.ones((context_length, context_length), dtype=jnp.float32), k=1)


def from_book_mask(mask: Float[Array, "q k"]) -> Bool[Array, "q k"]:
    """Book convention (1 = masked) to ours (True = attend)."""
    return jnp.logical_not(mask.astype(jnp.bool_))


def to_book_mask(mask: Bool[Array, "q k"]) -> Float[Array, "q k"]:
    """Ours (True = attend) to the book convention (1.0 = masked)."""
    return jnp.logical_not(mask).astype(jnp.float32)


def to_additive_mask(mask: Bool[Array, "*batch q k"], value: float = ADDITIVE_MASK_VALUE) -> Float[Array, "*batch q k"]:
    """Ours (True = attend) to an additive mask (0 = attend, ``value`` = masked), as ttnn adds it."""
    return jnp.where(mask, 0.0, value).astype(jnp.float32)


def from_additive_mask(mask: Float[Array, "*batch q k"]) -> Bool[Array, "*batch q k"]:
    """Additive mask back to ours: anything below zero counts as masked."""
    return mask >= 0


def make_offset_causal_mask(q_tokens: int, kv_tokens: int, q_offset=0) -> Bool[Array, "q_tokens kv_tokens"]:
    """Boolean causal mask when the queries sit at positions ``q_offset ... q_offset + q_tokens - 1`` among the keys.

    Query ``i`` may attend key ``j`` iff ``j <= q_offset + i`` (a KV cache's view:
    the new tokens see the cached prefix and themselves). ``q_offset`` may be a
    traced integer scalar. With ``q_offset=0`` and ``q_tokens == kv_tokens`` this is
    :func:`make_causal_mask`.
    """
    q_positions = jnp.asarray(q_offset) + jnp.arange(q_tokens)[:, None]  # (q, 1)
    return jnp.arange(kv_tokens)[None, :] <= q_positions  # (q, kv)
