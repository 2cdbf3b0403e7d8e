"""The naive kernel: the book's attention with the full ``(T, S)`` weights materialised.

Scores ``(q * scale) @ k.T`` in float32 (or wider; the scale goes on the queries,
see :func:`jaxattn.ops.scale_queries`), the mask (causal, ``q_offset``, the
user's, a ``-inf`` bias entry) filled with ``-inf``, the bias, a softmax that gives a
row with no visible key zeros and any other row IEEE's answer (:func:`jaxattn.ops.safe_softmax`), dropout on the
weights (the book's place for it), weights ``@ v``. The only kernel that returns
the weights and the only one that applies dropout.

Grouped key/value heads: the ``G = N // K`` query heads that read one kv head are
stacked along the query axis, ``(B*K, G*T, H)``, so keys and values are never
repeated and both products are plain 3-D batched matmuls. Masks and bias are
brought to that ``(B*K, G*T, S)`` form before they meet the scores: XLA:CPU fuses
mask, scale and softmax into the matmuls only when nothing reshapes the scores in
between (a 5-D ``(B, K, G, T, S)`` view, or a 4-D one with a size-1 axis, costs a
second ``(T, S)`` buffer and ~25% time, measured at 4 x 12 heads x 1024 tokens).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.lax import Precision
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from jaxattn.ops import accumulation_dtype, dropout, safe_softmax, scale_queries


def naive_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    bias: Float[Array, "#B #N #T #S"] | None = None,
    mask: Bool[Array, "#B #N #T #S"] | None = None,
    *,
    scale: float,
    is_causal: bool = False,
    q_offset=0,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    precision: Precision | None = None,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B N T S"]]:
    """``(context, attn_weights)``; the weights are taken *before* dropout, to compare across frameworks."""
    batch, q_tokens, heads, head_dim = query.shape
    kv_tokens, kv_heads = key.shape[1], key.shape[2]
    group = heads // kv_heads
    acc = accumulation_dtype(query.dtype)
    rows = batch * kv_heads
    stacked = query.reshape(batch, q_tokens, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
    stacked = scale_queries(stacked.reshape(rows, group * q_tokens, head_dim), scale)  # (B*K, G*T, H)
    keys = jnp.swapaxes(key, 1, 2).reshape(rows, kv_tokens, head_dim)  # (B*K, S, H)
    values = jnp.swapaxes(value, 1, 2).reshape(rows, kv_tokens, value.shape[-1])  # (B*K, S, Hv)
    scores = jnp.einsum("rmh,rsh->rms", stacked, keys, preferred_element_type=acc, precision=precision).astype(
        acc
    )  # (B*K, G*T, S)
    visible = _visible(mask, is_causal, q_offset, batch, q_tokens, kv_tokens, kv_heads, group)
    if bias is not None:
        stacked_bias = _stack_heads(bias, batch, kv_heads, group, q_tokens).astype(acc)
        scores = scores + stacked_bias
        attended = stacked_bias != -jnp.inf  # a -inf bias entry masks its key (NaN is no mask: it stays NaN)
        visible = attended if visible is None else visible & attended
    # Masked scores become -inf whatever they held (NaN included): a masked key is never read.
    scores = scores if visible is None else jnp.where(visible, scores, -jnp.inf)
    seen = _seen(visible, mask, bias, is_causal, q_offset, q_tokens, group)
    weights = safe_softmax(scores, seen)  # (B*K, G*T, S)
    # The Bernoulli draw depends only on the element count and order: (B*K, G*T, S) draws what
    # the book's (b, heads, T, T) weights draw.
    dropped = dropout(weights, dropout_rate, dropout_rng, deterministic=dropout_rate == 0.0)
    context = jnp.einsum("rms,rsh->rmh", dropped.astype(value.dtype), values, precision=precision)  # (B*K, G*T, Hv)
    if mask is not None or bias is not None or is_causal:  # a row that sees no key is zeros, even for NaN values
        context = jnp.where(seen, context, jnp.zeros((), context.dtype))
    context = context.reshape(batch, kv_heads, group, q_tokens, value.shape[-1]).transpose(0, 3, 1, 2, 4)
    return (
        context.reshape(batch, q_tokens, heads, value.shape[-1]),  # (B, T, N, Hv)
        weights.reshape(batch, heads, q_tokens, kv_tokens),  # (B, N, T, S)
    )


def _stack_heads(x: Array, batch: int, kv_heads: int, group: int, q_tokens: int) -> Array:
    """A ``(#B, #N, #T, #S)`` mask or bias in the scores' ``(B*K | 1, G*T | 1, #S)`` form.

    Axes that broadcast are spelled out only where the flattening needs it (a mask-sized
    copy, never a scores-sized one for a mask that broadcasts over everything).
    """
    b, n, t, s = x.shape
    if b == 1 and n == 1:
        if t == 1 or group == 1:
            return x.reshape(1, t, s)  # (1, T|1, #S)
        return jnp.broadcast_to(x, (1, group, t, s)).reshape(1, group * t, s)  # (1, G*T, #S)
    # Query heads of a group and query tokens share one axis, batch and kv heads another.
    x = jnp.broadcast_to(x, (batch, kv_heads * group, q_tokens, s))
    return x.reshape(batch * kv_heads, group * q_tokens, s)


def _seen(visible, mask, bias, is_causal: bool, q_offset, q_tokens: int, group: int):
    """Which rows of the ``(B*K | 1, G*T | 1, S)`` scores see a key, ``(..., 1)``: ``True`` where nothing masks.

    Causality alone has a closed form (row ``i`` sees key 0 iff ``q_offset + i >= 0``), kept apart from
    the reduction over a mask or bias that only they need.
    """
    if mask is None and bias is None:
        if not is_causal:
            return jnp.ones((), jnp.bool_)
        rows = jnp.arange(q_tokens) if group == 1 else jnp.arange(group * q_tokens) % q_tokens
        return (jnp.asarray(q_offset) + rows >= 0)[:, None]  # (G*T, 1)
    return jnp.any(visible, axis=-1, keepdims=True)


def _visible(mask, is_causal: bool, q_offset, batch: int, q_tokens: int, kv_tokens: int, kv_heads: int, group: int):
    """Where a query may attend a key, in the ``(B*K | 1, G*T | 1, S)`` form, or ``None`` when everywhere."""
    visible = None if mask is None else _stack_heads(mask, batch, kv_heads, group, q_tokens)
    if is_causal:
        rows = jnp.arange(q_tokens) if group == 1 else jnp.arange(group * q_tokens) % q_tokens  # each row's token
        causal = jnp.arange(kv_tokens)[None, :] <= jnp.asarray(q_offset) + rows[:, None]  # (G*T, S)
        visible = causal if visible is None else visible & causal
    return visible
