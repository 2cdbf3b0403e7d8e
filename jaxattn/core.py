"""The functional core as one import: the primitives, the attention core and the book's head-first helpers.

* :func:`dot_product_attention` (:mod:`jaxattn.attention`): the one attention
  function under every layer, in ``jax.nn``'s ``(batch, tokens, heads, head_dim)``
  layout, with its implementations in :mod:`jaxattn.implementations`.
* The array primitives of :mod:`jaxattn.ops`: scores, the book's masked softmax,
  dropout, head split/merge.
* RoPE (:mod:`jaxattn.rope`: :func:`compute_rope_params`, :func:`apply_rope`,
  :func:`freq_config_from_rope_scaling`) and :func:`rms_norm` (:mod:`jaxattn.norms`).
* :func:`naive_attention` and :func:`causal_attention`: chapter 3's head-first
  layout ``(..., tokens, head_dim)`` (any leading batch/head axes), kept for the
  code written against it; both go through :func:`dot_product_attention`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from jaxattn import implementations
from jaxattn.attention import attention_with_weights, dot_product_attention
from jaxattn.norms import rms_norm
from jaxattn.ops import (
    attention_scores,
    attention_weights,
    dropout,
    masked_softmax,
    merge_heads,
    safe_softmax,
    split_heads,
)
from jaxattn.rope import apply_rope, compute_rope_params, freq_config_from_rope_scaling

__all__ = [
    "apply_rope",
    "attention_scores",
    "attention_weights",
    "attention_with_weights",
    "causal_attention",
    "compute_rope_params",
    "dot_product_attention",
    "dropout",
    "freq_config_from_rope_scaling",
    "masked_softmax",
    "merge_heads",
    "naive_attention",
    "rms_norm",
    "safe_softmax",
    "split_heads",
]


def naive_attention(
    query: Float[Array, "*batch q d"],
    key: Float[Array, "*batch k d"],
    value: Float[Array, "*batch k dv"],
    mask: Bool[Array, "*#batch q k"] | None = None,
    *,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    deterministic: bool = True,
    softmax_dtype=jnp.float32,
) -> tuple[Float[Array, "*batch q dv"], Float[Array, "*batch q k"]]:
    """The book's attention, materialising the full ``(q, k)`` weights.

    Returns ``(context_vec, attn_weights)``; ``attn_weights`` is taken *before*
    dropout so it can be compared across frameworks. A row whose every key is
    masked gives NaN, as in torch (the book's softmax, :func:`masked_softmax`).
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
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    deterministic: bool = True,
    softmax_dtype=jnp.float32,
    impl: str = "naive",
) -> tuple[Float[Array, "*batch q dv"], Float[Array, "*batch q k"] | None]:
    """Causal self-attention in the book's head-first layout, through :func:`dot_product_attention`.

    ``impl`` is ``"auto"`` or a registered implementation (``"naive"``,
    ``"blockwise"``, ``"xla"``, ...). With dropout active (``deterministic=False``
    and ``dropout_rate > 0``) the table's dropout implementation runs whatever ``impl``
    says (:func:`jaxattn.implementations.requested`), so the dropout draw is the book's
    (on the full weights, inverted scaling).
    ``softmax_dtype`` must be float32 or wider: the core's softmax runs in
    ``promote_types(dtype, float32)``.

    Returns ``(context_vec, attn_weights)``; ``attn_weights`` is ``None`` for
    implementations that never materialise them.
    """
    if impl != "auto" and impl not in implementations.names():
        known = ", ".join(repr(n) for n in ("auto", *implementations.names()))
        raise ValueError(f"causal_attention: impl must be one of {known}, got {impl!r}")
    if jnp.finfo(softmax_dtype).bits < 32:
        raise ValueError(f"causal_attention: softmax_dtype must be float32 or wider, got {jnp.dtype(softmax_dtype)}")
    dropout_active = not deterministic and dropout_rate > 0.0
    *batch, tokens, head_dim = query.shape

    def one_head(x):  # (*batch, T, d) -> (n, T, 1, d): each leading row its own batch entry
        return x.reshape(-1, x.shape[-2], 1, x.shape[-1])

    context_vec, weights = attention_with_weights(
        one_head(query),
        one_head(key),
        one_head(value),
        scale=scale,
        is_causal=True,
        implementation=implementations.requested(impl, dropout=dropout_active),
        dropout_rate=dropout_rate if dropout_active else 0.0,
        dropout_rng=dropout_rng,
    )  # (n, T, 1, dv), (n, 1, T, T) or None
    context_vec = context_vec.reshape(*batch, tokens, value.shape[-1])
    if weights is not None:
        weights = weights.reshape(*batch, tokens, key.shape[-2])
    return context_vec, weights
