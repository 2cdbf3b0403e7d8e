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

from jaxattn.base import BookAttention
from jaxattn.checks import check_sizes


class CausalAttention(BookAttention):
    """One causal head: ``W_query``/``W_key``/``W_value`` projections, causal mask, dropout.

    ``CausalAttention(d_in, d_out, context_length, dropout, qkv_bias=False)``, as in the book.
    """

    qkv_bias: bool = False

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch tokens d_in"], *, attention_mask=None, deterministic: bool = True
    ) -> Float[Array, "batch tokens d_out"]:
        self.check_config()
        self.check_input(x)
        b, tokens, _ = x.shape
        # One head: (b, T, d_out) viewed as (b, T, 1, d_out) for the attention core.
        queries = self.dense(self.d_out, self.qkv_bias, "W_query")(x).reshape(b, tokens, 1, self.d_out)
        keys = self.dense(self.d_out, self.qkv_bias, "W_key")(x).reshape(b, tokens, 1, self.d_out)
        values = self.dense(self.d_out, self.qkv_bias, "W_value")(x).reshape(b, tokens, 1, self.d_out)
        context_vec = self.attend(
            queries, keys, values, is_causal=True, rate=self.dropout, deterministic=deterministic,
            attention_mask=attention_mask,
        )  # (b, T, 1, d_out)
        return context_vec.reshape(b, tokens, self.d_out)

    def sown_weights(self, attn_weights):
        """The book's single head: ``(b, T, T)``."""
        return jnp.squeeze(attn_weights, axis=1)

    def sown_context(self, context_vec):
        """The book's single head: ``(b, T, d_out)``."""
        return jnp.squeeze(context_vec, axis=2)


class MultiHeadAttentionWrapper(BookAttention):
    """Section 3.6.1: ``num_heads`` independent ``CausalAttention`` heads, concatenated.

    ``MultiHeadAttentionWrapper(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False)``.
    Each head maps ``d_in -> d_out``, so the output has ``num_heads * d_out``
    features, as in the book. Submodules are ``heads_0 ... heads_{n-1}`` (torch ``heads.0`` ...).
    """

    num_heads: int
    qkv_bias: bool = False

    def check_config(self) -> None:
        super().check_config()
        check_sizes(type(self).__name__, num_heads=self.num_heads)

    def setup(self):
        self.check_config()  # setup runs on the first call, at trace time
        self.heads = [
            CausalAttention(
                self.d_in, self.d_out, self.context_length, self.dropout, self.qkv_bias,
                attention_impl=self.attention_impl, attention_fn=self.attention_fn,
                dtype=self.dtype, param_dtype=self.param_dtype, decode=self.decode,
            )
            for _ in range(self.num_heads)
        ]

    def __call__(
        self, x: Float[Array, "batch tokens d_in"], *, attention_mask=None, deterministic: bool = True
    ) -> Float[Array, "batch tokens num_heads_times_d_out"]:
        return jnp.concatenate(
            [head(x, attention_mask=attention_mask, deterministic=deterministic) for head in self.heads], axis=-1
        )
