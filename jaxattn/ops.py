"""Array primitives of attention: scores, softmax, dropout, head split/merge.

The lowest layer of :mod:`jaxattn`: plain functions of arrays that the kernels
(:mod:`jaxattn.kernels`) and the modules build on. Arrays are *head-agnostic*
here: ``(..., tokens, head_dim)`` with any leading batch / head dimensions.

The book's order of operations (``ch03``): scores ``q @ k.T``, mask filled with
``-inf``, *then* division by ``sqrt(head_dim)``, softmax, dropout on the weights,
weights ``@ v``. Softmax runs in ``softmax_dtype`` (float32 by default) even when
the projections compute in bfloat16/float16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray


def attention_scores(
    query: Float[Array, "*batch q d"], key: Float[Array, "*batch k d"], *, precision=None
) -> Float[Array, "*batch q k"]:
    """Unnormalised scores ``omega = q @ k.T`` (the book's ``attn_scores``); ``precision`` as ``jnp.einsum``'s."""
    return jnp.einsum("...qd,...kd->...qk", query, key, precision=precision)


def masked_softmax(
    scores: Float[Array, "*batch q k"],
    mask: Bool[Array, "*#batch q k"] | None = None,
    *,
    scale: float | None = None,
    softmax_dtype=jnp.float32,
) -> Float[Array, "*batch q k"]:
    """``softmax(masked_fill(scores, ~mask, -inf) * scale)`` computed in ``softmax_dtype``.

    The book's softmax: a row whose every key is masked gives NaN, exactly as in
    torch. :func:`safe_softmax` is the one the attention core uses.
    """
    scores = scores.astype(softmax_dtype)
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    if scale is not None:
        scores = scores * jnp.asarray(scale, softmax_dtype)
    return jax.nn.softmax(scores, axis=-1)


def scale_queries(query: Float[Array, "..."], scale) -> Float[Array, "..."]:
    """``query * scale`` (in float32 or wider, back in ``query``'s dtype): scaling q scales every score.

    Why the kernels scale the queries and not the scores: under ``jit``, XLA may fuse
    ``scores * scale - max`` into one fused multiply-add whose *unrounded* result is
    positive for the maximum itself; at scores ~1e10 that is ``exp(512) = inf`` and
    ``inf / inf = NaN`` for finite input (seen on XLA:CPU with ``jax.nn.softmax``).
    With the scale on ``q``, the scores come straight out of a matmul and nothing
    multiplies next to the subtraction. It costs ``T x H`` multiplies, not ``T x S``.
    """
    acc = accumulation_dtype(query.dtype)
    return (query.astype(acc) * jnp.asarray(scale, acc)).astype(query.dtype)


def safe_softmax(
    logits: Float[Array, "*batch q k"], seen: Bool[Array, "..."] | None = None
) -> Float[Array, "*batch q k"]:
    """Softmax over the last axis where ``-inf`` logits are masked keys and a row of only ``-inf`` gives zeros.

    ``seen``: which rows see a key (broadcastable to ``(..., q, 1)``), when the caller knows it from its
    masks. Then only the unseen rows give zeros, and a seen row follows IEEE arithmetic as ``jax.nn``'s
    softmax: NaN for NaN or ``+inf`` logits and for a row whose visible logits are all ``-inf`` (scores
    that are ``-inf`` by arithmetic, a ``-inf`` query, not by a mask). Without ``seen`` (the book's
    modules) every row whose logits are all ``-inf`` counts as unseen.

    For float32/float64 logits. ``jax.nn.softmax`` and torch give NaN for such a row
    (``exp(-inf - -inf)``); here the row maximum is replaced by 0 when it is not
    finite, so every ``exp`` is 0, and the denominator gets ``eps**2`` added. A row
    with a visible key has a denominator >= 1 (its maximum contributes ``exp(0)``), so
    the addition is below half an ulp and changes nothing; a row without one gives
    ``0 / eps**2 = 0``, and its gradient stays finite (``eps**4`` is still a normal
    number). A ``where`` on the denominator would do the same but keeps XLA:CPU from
    fusing the division: it costs one more ``(q, k)`` buffer (measured: 384 MiB
    instead of 192 MiB of temporaries at 4 x 12 heads x 1024 tokens).
    """
    if logits.shape[-1] == 0:  # no keys at all: nothing to weigh (and max has no identity)
        return logits
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    keep = jnp.isfinite(row_max) if seen is None else seen
    row_max = jax.lax.stop_gradient(jnp.where(keep, row_max, 0.0))
    unnormalised = jnp.exp(logits - row_max)
    tiny = jnp.asarray(jnp.finfo(logits.dtype).eps ** 2, logits.dtype)
    return unnormalised / (unnormalised.sum(axis=-1, keepdims=True) + tiny)


def nonfinite_rows(
    query: Float[Array, "B T N H"], key: Float[Array, "B S K H"], *, causal: bool = False
) -> Bool[Array, "B T N"]:
    """The rows IEEE arithmetic makes NaN whatever their other scores: a query with a non-finite entry, or
    a row whose every visible key has one (every score of such a row is ``+-inf`` or NaN).

    For a kernel whose softmax fills masked scores with a large finite number (cuDNN's causal mask): there
    a row whose visible scores are all ``-inf`` would weigh its *masked* keys instead of giving NaN. Every
    key is visible, or with ``causal`` (top left) the keys ``j <= i``, told from the first finite key
    without a ``(T, S)`` pass.
    """
    batch, q_tokens, heads, _ = query.shape
    kv_tokens, kv_heads = key.shape[1], key.shape[2]
    bad_query = ~jnp.all(jnp.isfinite(query), axis=-1)  # (B, T, N)
    finite_key = jnp.all(jnp.isfinite(key), axis=-1)  # (B, S, K)
    # Query head n reads kv head n // G: (B, S, K) -> (B, N, S).
    finite_key = jnp.broadcast_to(finite_key[..., None], (batch, kv_tokens, kv_heads, heads // kv_heads))
    finite_key = finite_key.reshape(batch, kv_tokens, heads).swapaxes(1, 2)
    if causal:
        first = jnp.where(jnp.any(finite_key, axis=-1), jnp.argmax(finite_key, axis=-1), kv_tokens)  # (B, N)
        sees_finite = first[..., None] <= jnp.arange(q_tokens)  # (B, N, T)
    else:
        sees_finite = jnp.any(finite_key, axis=-1, keepdims=True)  # (B, N, 1)
    return bad_query | ~jnp.broadcast_to(sees_finite, (batch, heads, q_tokens)).swapaxes(1, 2)


def dropout(x: Float[Array, "..."], rate: float, rng: PRNGKeyArray | None, deterministic: bool) -> Float[Array, "..."]:
    """Inverted dropout: zero with probability ``rate``, scale survivors by ``1/(1-rate)``.

    Same draw as ``flax.linen.Dropout`` (a Bernoulli keep-mask from ``rng``).
    """
    if deterministic:
        return x
    if not 0.0 <= rate <= 1.0:  # a negative rate would scale by 1/(1 - rate) < 1; NaN is no rate either
        raise ValueError(f"dropout: rate={rate!r} must be in [0, 1]")
    if rate == 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    if rng is None:
        raise ValueError("dropout with deterministic=False needs an rng (the 'dropout' stream)")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention_weights(
    query: Float[Array, "*batch q d"],
    key: Float[Array, "*batch k d"],
    mask: Bool[Array, "*#batch q k"] | None = None,
    *,
    scale: float | None = None,
    softmax_dtype=jnp.float32,
) -> Float[Array, "*batch q k"]:
    """Normalised weights ``alpha = softmax(q @ k.T / sqrt(d))`` (float, in ``softmax_dtype``)."""
    if scale is None:
        scale = key.shape[-1] ** -0.5
    return masked_softmax(attention_scores(query, key), mask, scale=scale, softmax_dtype=softmax_dtype)


def split_heads(x: Float[Array, "*batch tokens d_out"], num_heads: int) -> Float[Array, "*batch heads tokens head_dim"]:
    """``(b, T, d_out) -> (b, heads, T, head_dim)``: the book's ``view`` + ``transpose(1, 2)``."""
    *batch, tokens, d_out = x.shape
    x = x.reshape(*batch, tokens, num_heads, d_out // num_heads)  # (b, T, H, hd)
    return jnp.swapaxes(x, -3, -2)  # (b, H, T, hd)


def merge_heads(x: Float[Array, "*batch heads tokens head_dim"]) -> Float[Array, "*batch tokens d_out"]:
    """``(b, heads, T, head_dim) -> (b, T, d_out)``: ``transpose(1, 2)`` + ``view``."""
    x = jnp.swapaxes(x, -3, -2)  # (b, T, H, hd)
    *batch, tokens, heads, head_dim = x.shape
    return x.reshape(*batch, tokens, heads * head_dim)  # (b, T, d_out)


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for float32 and narrower inputs, float64 for float64: where scores and softmax are computed.

    (``jnp.promote_types(bfloat16, float32)`` would say the same, but strict dtype
    promotion, which the tests turn on, refuses to be asked.)
    """
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)
