"""Sections 3.5 and 3.6.1: causal attention with dropout, and stacked heads.

Batched input ``(batch, tokens, d_in)``; ``tokens`` may not exceed
``context_length`` (the book's mask buffer has that size). Dropout acts on the
attention weights with inverted scaling and draws from the ``'dropout'`` RNG
stream when ``deterministic=False``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattn import core
from jaxattn.checks import check_input


class CausalAttention(nn.Module):
    """One causal head: ``W_query``/``W_key``/``W_value`` projections, causal mask, dropout."""

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    qkv_bias: bool = False
    attention_impl: core.AttentionImpl = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch tokens d_in"], *, deterministic: bool = True
    ) -> Float[Array, "batch tokens d_out"]:
        check_input(
            type(self).__name__, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length
        )
        dense = lambda name: nn.Dense(  # noqa: E731 - three identical projections
            self.d_out, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        queries = dense("W_query")(x)  # (b, T, d_out)
        keys = dense("W_key")(x)
        values = dense("W_value")(x)
        return attend_causal(self, queries, keys, values, self.dropout, deterministic, self.attention_impl)


class MultiHeadAttentionWrapper(nn.Module):
    """Section 3.6.1: ``num_heads`` independent ``CausalAttention`` heads, concatenated.

    Each head maps ``d_in -> d_out``, so the output has ``num_heads * d_out``
    features, as in the book. Submodules are ``heads_0 ... heads_{n-1}`` (torch ``heads.0`` ...).
    """

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False
    attention_impl: core.AttentionImpl = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        if self.num_heads < 1:
            raise ValueError(f"{type(self).__name__}: num_heads must be >= 1, got {self.num_heads}")
        self.heads = [
            CausalAttention(
                self.d_in,
                self.d_out,
                self.context_length,
                self.dropout,
                self.qkv_bias,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
            for _ in range(self.num_heads)
        ]

    def __call__(
        self, x: Float[Array, "batch tokens d_in"], *, deterministic: bool = True
    ) -> Float[Array, "batch tokens num_heads_times_d_out"]:
        return jnp.concatenate([head(x, deterministic=deterministic) for head in self.heads], axis=-1)


def attend_causal(module: nn.Module, queries, keys, values, rate: float, deterministic: bool, impl):
    """Causal attention for one module call: picks the dropout key, sows intermediates.

    ``queries``/``keys``/``values`` are ``(..., T, head_dim)``; returns ``(..., T, head_dim)``.
    """
    rng = None if deterministic or rate == 0.0 else module.make_rng("dropout")
    context_vec, attn_weights = core.causal_attention(
        queries,
        keys,
        values,
        dropout_rate=rate,
        dropout_rng=rng,
        deterministic=deterministic,
        impl=impl,
    )
    if attn_weights is not None:
        module.sow("intermediates", "attn_weights", attn_weights)
    module.sow("intermediates", "context_vec", context_vec)
    return context_vec
