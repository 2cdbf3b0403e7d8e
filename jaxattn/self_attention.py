"""Sections 3.3 and 3.4 of the book: attention without and with trainable weights.

``SimplifiedSelfAttention`` has no parameters; ``SelfAttentionV1`` holds raw
``(d_in, d_out)`` matrices used as ``x @ W``; ``SelfAttentionV2`` uses linear
layers named as the torch ones (``W_query``, ``W_key``, ``W_value``). All three
accept ``(tokens, d_in)`` as in the book, or ``(batch, tokens, d_in)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattn import ops as core
from jaxattn.checks import check_input


class SimplifiedSelfAttention(nn.Module):
    """Section 3.3: ``softmax(x @ x.T) @ x`` with no weights and no scaling."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "*batch tokens d_in"]) -> Float[Array, "*batch tokens d_in"]:
        check_input(type(self).__name__, x.shape, d_in=None, ranks=(2, 3))
        x = x.astype(self.dtype)
        attn_scores = core.attention_scores(x, x)  # (*b, T, T)
        attn_weights = core.masked_softmax(attn_scores)  # no 1/sqrt(d): the book's step 1
        self.sow("intermediates", "attn_scores", attn_scores)
        self.sow("intermediates", "attn_weights", attn_weights)
        return attn_weights.astype(x.dtype) @ x  # (*b, T, d_in)


class SelfAttentionV1(nn.Module):
    """Section 3.4.2, v1: raw parameter matrices ``W_query``, ``W_key``, ``W_value`` of shape ``(d_in, d_out)``.

    The book initialises them with ``torch.rand`` (uniform in [0, 1)); so do we.
    """

    d_in: int
    d_out: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "*batch tokens d_in"]) -> Float[Array, "*batch tokens d_out"]:
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
        return _attend(self, queries, keys, values)


class SelfAttentionV2(nn.Module):
    """Section 3.4.2, v2: ``nn.Linear``-style projections (torch ``weight`` = our ``kernel.T``)."""

    d_in: int
    d_out: int
    qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "*batch tokens d_in"]) -> Float[Array, "*batch tokens d_out"]:
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(2, 3))
        dense = lambda name: nn.Dense(  # noqa: E731 - three identical projections
            self.d_out, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        queries = dense("W_query")(x)  # (*b, T, d_out)
        keys = dense("W_key")(x)
        values = dense("W_value")(x)
        return _attend(self, queries, keys, values)


def _attend(module: nn.Module, queries, keys, values):
    """Scaled, unmasked attention shared by v1 and v2; sows the intermediates."""
    attn_scores = core.attention_scores(queries, keys)  # (*b, T, T)
    attn_weights = core.masked_softmax(attn_scores, scale=keys.shape[-1] ** -0.5)
    module.sow("intermediates", "attn_scores", attn_scores)
    module.sow("intermediates", "attn_weights", attn_weights)
    return attn_weights.astype(values.dtype) @ values  # context_vec: (*b, T, d_out)
