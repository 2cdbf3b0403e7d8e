"""The functional core: attention as plain functions of arrays.

Every Linen module in :mod:`jaxattn` projects its input and calls these
functions; nothing here owns parameters or state. Arrays are *head-agnostic*:
``(..., tokens, head_dim)`` with any leading batch / head dimensions.

The order of operations follows the book (``ch03``): scores ``q @ k.T``, mask
filled with ``-inf``, *then* division by ``sqrt(head_dim)``, softmax, dropout on
the weights, weights ``@ v``. Softmax always runs in ``softmax_dtype``
(float32 by default) even when the projections compute in bfloat16/float16.
"""

from __future__ import annotations

from typing import Literal, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from jaxattn import blockwise
from jaxattn.masks import make_causal_mask

AttentionImpl = Literal["naive", "blockwise", "xla", "auto"]


def attention_scores(
    query: Float[Array, "*batch q d"], key: Float[Array, "*batch k d"]
) -> Float[Array, "*batch q k"]:
    """Unnormalised scores ``omega = q @ k.T`` (the book's ``attn_scores``)."""
    return jnp.einsum("...qd,...kd->...qk", query, key)


def masked_softmax(
    scores: Float[Array, "*batch q k"],
    mask: Optional[Bool[Array, "*#batch q k"]] = None,
    *,
    scale: Optional[float] = None,
    softmax_dtype=jnp.float32,
) -> Float[Array, "*batch q k"]:
    """``softmax(masked_fill(scores, ~mask, -inf) * scale)`` computed in ``softmax_dtype``.

    A row whose every key is masked gives NaN, exactly as in torch.
    """
    scores = scores.astype(softmax_dtype)
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    if scale is not None:
        scores = scores * jnp.asarray(scale, softmax_dtype)
    return jax.nn.softmax(scores, axis=-1)


def dropout(
    x: Float[Array, "..."], rate: float, rng: Optional[PRNGKeyArray], deterministic: bool
) -> Float[Array, "..."]:
    """Inverted dropout: zero with probability ``rate``, scale survivors by ``1/(1-rate)``.

    Same draw as ``flax.linen.Dropout`` (a Bernoulli keep-mask from ``rng``).
    """
    if deterministic or rate == 0.0:
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
    mask: Optional[Bool[Array, "*#batch q k"]] = None,
    *,
    scale: Optional[float] = None,
    softmax_dtype=jnp.float32,
) -> Float[Array, "*batch q k"]:
    """Normalised weights ``alpha = softmax(q @ k.T / sqrt(d))`` (float, in ``softmax_dtype``)."""
    if scale is None:
        scale = key.shape[-1] ** -0.5
    return masked_softmax(attention_scores(query, key), mask, scale=scale, softmax_dtype=softmax_dtype)


def naive_attention(
    query: Float[Array, "*batch q d"],
    key: Float[Array, "*batch k d"],
    value: Float[Array, "*batch k dv"],
    mask: Optional[Bool[Array, "*#batch q k"]] = None,
    *,
    scale: Optional[float] = None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[PRNGKeyArray] = None,
    deterministic: bool = True,
    softmax_dtype=jnp.float32,
) -> tuple[Float[Array, "*batch q dv"], Float[Array, "*batch q k"]]:
    """The book's attention, materialising the full ``(q, k)`` weights.

    Returns ``(context_vec, attn_weights)``; ``attn_weights`` is taken *before*
    dropout so it can be compared across frameworks.
    """
    weights = attention_weights(query, key, mask, scale=scale, softmax_dtype=softmax_dtype)
    dropped = dropout(weights, dropout_rate, dropout_rng, deterministic)
    context_vec = jnp.einsum("...qk,...kd->...qd", dropped.astype(value.dtype), value)
    return context_vec, weights


def causal_attention(
    query: Float[Array, "*batch q d"],
    key: Float[Array, "*batch k d"],
    value: Float[Array, "*batch k dv"],
    *,
    scale: Optional[float] = None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[PRNGKeyArray] = None,
    deterministic: bool = True,
    softmax_dtype=jnp.float32,
    impl: AttentionImpl = "naive",
) -> tuple[Float[Array, "*batch q dv"], Optional[Float[Array, "*batch q k"]]]:
    """Causal self-attention through the chosen implementation.

    * ``"naive"``: the book's path, full ``(q, k)`` weights (returned).
    * ``"blockwise"``: :func:`jaxattn.blockwise.blockwise_causal_attention`, online
      softmax over key blocks, ``O(tokens x block)`` memory; weights are ``None``.
    * ``"xla"``: ``jax.nn.dot_product_attention(..., is_causal=True)``; weights are ``None``.
    * ``"auto"``: ``"blockwise"`` from
      :data:`jaxattn.blockwise.AUTO_BLOCKWISE_MIN_TOKENS` tokens on, else ``"naive"``.

    With dropout active (``deterministic=False`` and ``dropout_rate > 0``) every
    implementation runs the naive path, so the dropout draw is the same as the
    book's (dropout on the full weights, inverted scaling) whatever ``impl`` says.

    Returns ``(context_vec, attn_weights)``; ``attn_weights`` is ``None`` for
    implementations that never materialise them.
    """
    if impl not in ("naive", "blockwise", "xla", "auto"):
        raise ValueError(f"causal_attention: impl must be 'naive', 'blockwise', 'xla' or 'auto', got {impl!r}")
    tokens = query.shape[-2]
    if impl == "auto":
        impl = "blockwise" if tokens >= blockwise.AUTO_BLOCKWISE_MIN_TOKENS else "naive"
    dropout_active = not deterministic and dropout_rate > 0.0
    if impl == "blockwise" and not dropout_active:
        context_vec = blockwise.blockwise_causal_attention(
            query, key, value, scale=scale, softmax_dtype=softmax_dtype
        )
        return context_vec, None
    if impl == "xla" and not dropout_active:
        return blockwise.xla_causal_attention(query, key, value, scale=scale), None
    mask = make_causal_mask(tokens)
    return naive_attention(
        query,
        key,
        value,
        mask,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        deterministic=deterministic,
        softmax_dtype=softmax_dtype,
    )


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
