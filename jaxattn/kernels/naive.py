"""The naive kernel: the book's attention with the full ``(T, S)`` weights materialised.

Scores ``q @ k.T`` in float32 (or wider), the mask (causal, ``q_offset``, the
user's) filled with ``-inf``, *then* the scale, the bias, a softmax that gives a
row with no visible key zeros (:func:`jaxattn.ops.safe_softmax`), dropout on the
weights (the book's place for it), weights ``@ v``. Grouped key/value heads are
read through a ``(B, T, K, G, H)`` view of the queries: keys and values are never
repeated per query head. The only kernel that returns the weights and the only
one that applies dropout.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from jaxattn.masks import make_offset_causal_mask
from jaxattn.ops import accumulation_dtype, dropout, safe_softmax


def naive_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    bias: Optional[Float[Array, "#B #N #T #S"]] = None,
    mask: Optional[Bool[Array, "#B #N #T #S"]] = None,
    *,
    scale: float,
    is_causal: bool = False,
    q_offset=0,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[PRNGKeyArray] = None,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B N T S"]]:
    """``(context, attn_weights)``; the weights are taken *before* dropout, to compare across frameworks."""
    batch, q_tokens, heads, head_dim = query.shape
    kv_tokens, kv_heads = key.shape[1], key.shape[2]
    group = heads // kv_heads
    acc = accumulation_dtype(query.dtype)
    grouped = query.reshape(batch, q_tokens, kv_heads, group, head_dim)  # (B, T, K, G, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", grouped, key, preferred_element_type=acc).astype(acc)  # (B, K, G, T, S)
    visible = _visible(mask, is_causal, q_offset, q_tokens, kv_tokens, kv_heads, group)
    if visible is not None:
        scores = jnp.where(visible, scores, -jnp.inf)
    scores = scores * jnp.asarray(scale, acc)
    if bias is not None:
        scores = scores + _grouped(bias, kv_heads, group).astype(acc)
    weights = safe_softmax(scores).reshape(batch, heads, q_tokens, kv_tokens)  # (B, N, T, S)
    # Drawn on the (B, N, T, S) weights, as the book draws it on its (b, heads, T, T) ones.
    dropped = dropout(weights, dropout_rate, dropout_rng, deterministic=dropout_rate == 0.0)
    dropped = dropped.reshape(batch, kv_heads, group, q_tokens, kv_tokens)  # (B, K, G, T, S)
    context = jnp.einsum("bkgts,bskh->btkgh", dropped.astype(value.dtype), value)  # (B, T, K, G, Hv)
    return context.reshape(batch, q_tokens, heads, value.shape[-1]), weights


def _grouped(x: Array, kv_heads: int, group: int) -> Array:
    """``(#B, #N, #T, #S)`` -> ``(#B, #K, #G, #T, #S)``: the head axis split as the queries' is."""
    b, n, t, s = x.shape
    return x.reshape(b, 1, 1, t, s) if n == 1 else x.reshape(b, kv_heads, group, t, s)


def _visible(mask, is_causal: bool, q_offset, q_tokens: int, kv_tokens: int, kv_heads: int, group: int):
    """Where a query may attend a key, ``(#B, #K, #G, T|1, S|1)``, or ``None`` when everywhere."""
    visible = None if mask is None else _grouped(mask, kv_heads, group)
    if is_causal:
        causal = make_offset_causal_mask(q_tokens, kv_tokens, q_offset)  # (T, S)
        visible = causal if visible is None else visible & causal
    return visible
