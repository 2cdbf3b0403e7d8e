"""Sections 3.3 and 3.4 of the book: attention without and with trainable weights.

``SimplifiedSelfAttention`` has no parameters; ``SelfAttentionV1`` holds raw
``(d_in, d_out)`` matrices used as ``x @ W``; ``SelfAttentionV2`` uses linear
layers named as the torch ones (``W_query``, ``W_key``, ``W_value``). All three
accept ``(tokens, d_in)`` as in the book, or ``(batch, tokens, d_in)``, and an
``attention_mask`` of ``x.shape[:-1]`` (1 = real token, 0 = padding): padded keys are
invisible, and a row with no visible key (an all-padding sequence) gives zeros.

The scores are sown as the book computes them (``q @ k.T``); the weights come from the
queries scaled first (see :func:`jaxattn.ops.scale_queries`: scaling the scores next to
softmax's subtraction let XLA fuse them into an FMA that gave NaN at inputs x1e5) and
a softmax whose all-masked rows are zeros (:func:`jaxattn.ops.safe_softmax`).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import ArrayLike
from jaxtyping import Array, Float

from jaxattn import ops as core
from jaxattn.checks import check_input, check_sizes


class SimplifiedSelfAttention(nn.Module):
    """Section 3.3: ``softmax(x @ x.T) @ x`` with no weights and no scaling."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "*batch tokens d_in"], *, attention_mask: Optional[ArrayLike] = None
    ) -> Float[Array, "*batch tokens d_in"]:
        check_input(type(self).__name__, x.shape, d_in=None, ranks=(2, 3))
        x = x.astype(self.dtype)
        return _attend(self, x, x, x, attention_mask, scale=None)  # no 1/sqrt(d): the book's step 1


class SelfAttentionV1(nn.Module):
    """Section 3.4.2, v1: raw parameter matrices ``W_query``, ``W_key``, ``W_value`` of shape ``(d_in, d_out)``.

    The book initialises them with ``torch.rand`` (uniform in [0, 1)); so do we.
    """

    d_in: int
    d_out: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "*batch tokens d_in"], *, attention_mask: Optional[ArrayLike] = None
    ) -> Float[Array, "*batch tokens d_out"]:
        check_sizes(type(self).__name__, d_in=self.d_in, d_out=self.d_out)
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(2, 3))
        shape = (self.d_in, self.d_out)
        init = nn.initializers.uniform(scale=1.0)
        W_query = self.param("W_query", init, shape, self.param_dtype)
        W_key = self.param("W_key", init, shape, self.param_dtype)
        W_value = self.param("W_value", init, shape, self.param_dtype)
        x = x.astype(self.dtype)
        queries = x @ W_query.astype(self.dtype)  # (*b, T, d_out)
        keys = x @ W_key.astype(self.dtype)
        values = x @ W_value.astype(self.dtype)
        return _attend(self, queries, keys, values, attention_mask, scale=self.d_out**-0.5)


class SelfAttentionV2(nn.Module):
    """Section 3.4.2, v2: ``nn.Linear``-style projections (torch ``weight`` = our ``kernel.T``)."""

    d_in: int
    d_out: int
    qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "*batch tokens d_in"], *, attention_mask: Optional[ArrayLike] = None
    ) -> Float[Array, "*batch tokens d_out"]:
        check_sizes(type(self).__name__, d_in=self.d_in, d_out=self.d_out)
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(2, 3))
        dense = lambda name: nn.Dense(  # noqa: E731 - three identical projections
            self.d_out, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        queries = dense("W_query")(x)  # (*b, T, d_out)
        keys = dense("W_key")(x)
        values = dense("W_value")(x)
        return _attend(self, queries, keys, values, attention_mask, scale=self.d_out**-0.5)


def _attend(
    module: nn.Module,
    queries: Float[Array, "*batch tokens d"],
    keys: Float[Array, "*batch tokens d"],
    values: Float[Array, "*batch tokens dv"],
    attention_mask: Optional[ArrayLike],
    *,
    scale: Optional[float],
) -> Float[Array, "*batch tokens dv"]:
    """Unmasked (or key-padding-masked) attention shared by the three classes; sows the intermediates."""
    attn_scores = core.attention_scores(queries, keys)  # (*b, T, T), the book's omega
    scaled = queries if scale is None else core.scale_queries(queries, scale)
    logits = core.attention_scores(scaled, keys).astype(core.accumulation_dtype(queries.dtype))
    if attention_mask is not None:
        logits = jnp.where(_key_mask(module, attention_mask, queries.shape[:-1])[..., None, :], logits, -jnp.inf)
    attn_weights = core.safe_softmax(logits)  # (*b, T, T)
    module.sow("intermediates", "attn_scores", attn_scores)
    module.sow("intermediates", "attn_weights", attn_weights)
    return attn_weights.astype(values.dtype) @ values  # context_vec: (*b, T, dv)


def _key_mask(module: nn.Module, attention_mask: ArrayLike, expected: tuple[int, ...]) -> Array:
    """``attention_mask`` checked against ``x.shape[:-1]`` and made boolean."""
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != tuple(expected):
        raise ValueError(
            f"{type(module).__name__}: attention_mask must have the input's shape without d_in, "
            f"{tuple(expected)}, got shape {attention_mask.shape}"
        )
    return attention_mask.astype(jnp.bool_)
