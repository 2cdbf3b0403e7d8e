"""Sections 3.3 and 3.4 of the book: attention without and with trainable weights.

``SimplifiedSelfAttention`` has no parameters; ``SelfAttentionV1`` holds raw
``(d_in, d_out)`` matrices used as ``x @ W``; ``SelfAttentionV2`` uses linear
layers named as the torch ones (``W_query``, ``W_key``, ``W_value``). All three
accept ``(tokens, d_in)`` as in the book, or ``(batch, tokens, d_in)``, and an
``attention_mask`` of ``x.shape[:-1]`` (1 = real token, 0 = padding): padded keys are
invisible, and a row with no visible key (an all-padding sequence) gives zeros; NaN or a ``-inf`` query
gives NaN, as ``jax.nn`` does.

The scores are sown as the book computes them (``q @ k.T``); the weights come from the
queries scaled first (see :func:`jaxattn.ops.scale_queries`: scaling the scores next to
softmax's subtraction let XLA fuse them into an FMA that gave NaN at inputs x1e5) and
a softmax whose all-masked rows are zeros (:func:`jaxattn.ops.safe_softmax`).

The math is :func:`self_attention`, which the NNX modules (:mod:`jaxattn.nnx`) call too.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Float

from jaxattn import ops as core
from jaxattn.base import PrecisionLike, Projection
from jaxattn.checks import check_input, check_sizes


class SimplifiedSelfAttention(nn.Module):
    """Section 3.3: ``softmax(x @ x.T) @ x`` with no weights and no scaling."""

    dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(
        self, x: Float[Array, "*batch tokens d_in"], *, attention_mask: ArrayLike | None = None
    ) -> Float[Array, "*batch tokens d_in"]:
        check_input(type(self).__name__, x.shape, d_in=None, ranks=(2, 3))
        return self_attention(
            x.astype(self.dtype),
            no_projection,
            no_projection,
            no_projection,
            scale=None,  # no 1/sqrt(d): the book's step 1
            attention_mask=attention_mask,
            owner=type(self).__name__,
            sow=self.sow_intermediate,
            precision=self.precision,
        )

    def sow_intermediate(self, name: str, value: Array) -> None:
        self.sow("intermediates", name, value)


class SelfAttentionV1(nn.Module):
    """Section 3.4.2, v1: raw parameter matrices ``W_query``, ``W_key``, ``W_value`` of shape ``(d_in, d_out)``.

    The book initialises them with ``torch.rand`` (uniform in [0, 1)); so do we.
    """

    d_in: int
    d_out: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(
        self, x: Float[Array, "*batch tokens d_in"], *, attention_mask: ArrayLike | None = None
    ) -> Float[Array, "*batch tokens d_out"]:
        check_sizes(type(self).__name__, d_in=self.d_in, d_out=self.d_out)
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(2, 3))
        shape = (self.d_in, self.d_out)
        W_query, W_key, W_value = (
            self.param(n, V1_INIT, shape, self.param_dtype) for n in ("W_query", "W_key", "W_value")
        )
        projections = (raw_projection(W, self.dtype, self.precision) for W in (W_query, W_key, W_value))
        return self_attention(
            x.astype(self.dtype),
            *projections,
            scale=self.d_out**-0.5,
            attention_mask=attention_mask,
            owner=type(self).__name__,
            sow=self.sow_intermediate,
            precision=self.precision,
        )

    def sow_intermediate(self, name: str, value: Array) -> None:
        self.sow("intermediates", name, value)


class SelfAttentionV2(nn.Module):
    """Section 3.4.2, v2: ``nn.Linear``-style projections (torch ``weight`` = our ``kernel.T``)."""

    d_in: int
    d_out: int
    qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(
        self, x: Float[Array, "*batch tokens d_in"], *, attention_mask: ArrayLike | None = None
    ) -> Float[Array, "*batch tokens d_out"]:
        check_sizes(type(self).__name__, d_in=self.d_in, d_out=self.d_out)
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(2, 3))
        dense = lambda name: nn.Dense(  # noqa: E731 - three identical projections
            self.d_out,
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name=name,
        )
        return self_attention(
            x,
            dense("W_query"),
            dense("W_key"),
            dense("W_value"),
            scale=self.d_out**-0.5,
            attention_mask=attention_mask,
            owner=type(self).__name__,
            sow=self.sow_intermediate,
            precision=self.precision,
        )

    def sow_intermediate(self, name: str, value: Array) -> None:
        self.sow("intermediates", name, value)


# --- the math, shared with jaxattn.nnx -----------------------------------------------------------------

#: ``SelfAttentionV1``'s initialiser: the book's ``torch.rand``, uniform in [0, 1).
V1_INIT = nn.initializers.uniform(scale=1.0)


def no_projection(x: Array) -> Array:
    """Section 3.3's "projection": the input itself (queries = keys = values = x)."""
    return x


def raw_projection(W: Array | np.ndarray, dtype, precision: PrecisionLike) -> Projection:
    """``x @ W`` in ``dtype``: the projection of ``SelfAttentionV1``'s raw ``(d_in, d_out)`` matrices."""
    return lambda x: jnp.matmul(x, W.astype(dtype), precision=precision)  # (*b, T, d_out)


def self_attention(
    x: Float[Array, "*batch tokens d_in"],
    W_query: Projection,
    W_key: Projection,
    W_value: Projection,
    *,
    scale: float | None,
    attention_mask: ArrayLike | None,
    owner: str,
    sow: Callable[[str, Array], None],
    precision: PrecisionLike = None,
) -> Float[Array, "*batch tokens dv"]:
    """Sections 3.3-3.4: project, unmasked (or key-padding-masked) attention; ``sow(name, array)`` the scores
    and weights. ``scale=None``: no ``1/sqrt(d)`` (section 3.3)."""
    queries, keys, values = W_query(x), W_key(x), W_value(x)  # (*b, T, d_out) each
    attn_scores = core.attention_scores(queries, keys, precision=precision)  # (*b, T, T), the book's omega
    scaled = queries if scale is None else core.scale_queries(queries, scale)
    logits = core.attention_scores(scaled, keys, precision=precision).astype(core.accumulation_dtype(queries.dtype))
    # Only a fully padded sequence is unseen (zeros); an all -inf row of a seen sequence is arithmetic (a
    # -inf query): NaN, as jax.nn and torch give, never a silent zero.
    seen = jnp.ones((), bool)
    if attention_mask is not None:
        key_mask = _key_mask(owner, attention_mask, queries.shape[:-1])  # (*b, T)
        logits = jnp.where(key_mask[..., None, :], logits, -jnp.inf)
        seen = key_mask.any(axis=-1)[..., None, None]  # (*b, 1, 1)
    attn_weights = core.safe_softmax(logits, seen)  # (*b, T, T)
    sow("attn_scores", attn_scores)
    sow("attn_weights", attn_weights)
    sow("queries", queries)  # crosscheck --stages: the projections, (*b, T, d_out)
    sow("keys", keys)
    sow("values", values)
    return jnp.matmul(attn_weights.astype(values.dtype), values, precision=precision)  # context_vec: (*b, T, dv)


def _key_mask(owner: str, attention_mask: ArrayLike, expected: tuple[int, ...]) -> Array:
    """``attention_mask`` checked against ``x.shape[:-1]`` and made boolean."""
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != tuple(expected):
        raise ValueError(
            f"{owner}: attention_mask must have the input's shape without d_in, "
            f"{tuple(expected)}, got shape {attention_mask.shape}"
        )
    return attention_mask.astype(jnp.bool_)
