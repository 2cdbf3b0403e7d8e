"""Sections 3.5 and 3.6.1: causal attention with dropout, and stacked heads.

Batched input ``(batch, tokens, d_in)``; ``tokens`` may not exceed
``context_length`` (the book's mask buffer has that size). Dropout acts on the
attention weights with inverted scaling and draws from the ``'dropout'`` RNG
stream when ``deterministic=False``.

The math is in :func:`causal_attention` and :func:`concatenate_heads`; the Linen classes
here and the NNX ones in :mod:`jaxattn.nnx` only own the parameters and call them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattn.base import BookAttention, Projection
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
        W_query, W_key, W_value = (self.dense(self.d_out, self.qkv_bias, n) for n in ("W_query", "W_key", "W_value"))
        attend = partial(self.attend, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask)
        return causal_attention(x, W_query, W_key, W_value, attend, d_out=self.d_out)

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
                self.d_in,
                self.d_out,
                self.context_length,
                self.dropout,
                self.qkv_bias,
                attention_impl=self.attention_impl,
                attention_fn=self.attention_fn,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                decode=self.decode,
                precision=self.precision,
            )
            for _ in range(self.num_heads)
        ]

    def __call__(
        self, x: Float[Array, "batch tokens d_in"], *, attention_mask=None, deterministic: bool = True
    ) -> Float[Array, "batch tokens num_heads_times_d_out"]:
        return concatenate_heads(x, self.heads, attention_mask=attention_mask, deterministic=deterministic)


# --- the math, shared with jaxattn.nnx: projections and the attention call come in as callables -----


def causal_attention(
    x: Float[Array, "batch tokens d_in"],
    W_query: Projection,
    W_key: Projection,
    W_value: Projection,
    attend: Callable[..., Array],
    *,
    d_out: int,
) -> Float[Array, "batch tokens d_out"]:
    """The book's ``CausalAttention.forward``: project, one causal head, no output projection.

    ``W_*``: ``(b, T, d_in) -> (b, T, d_out)``; ``attend(queries, keys, values, is_causal=...)``:
    the shell's call into the core (mask, dropout, cache), ``(b, T, 1, d_out)`` each way.
    """
    b, tokens, _ = x.shape
    # One head: (b, T, d_out) viewed as (b, T, 1, d_out) for the attention core.
    queries = W_query(x).reshape(b, tokens, 1, d_out)
    keys = W_key(x).reshape(b, tokens, 1, d_out)
    values = W_value(x).reshape(b, tokens, 1, d_out)
    context_vec = attend(queries, keys, values, is_causal=True)  # (b, T, 1, d_out)
    return context_vec.reshape(b, tokens, d_out)


def concatenate_heads(
    x: Float[Array, "batch tokens d_in"], heads: Sequence[Callable[..., Array]], **kwargs
) -> Float[Array, "batch tokens num_heads_times_d_out"]:
    """Section 3.6.1: ``torch.cat([head(x) for head in self.heads], dim=-1)``; ``kwargs`` go to every head."""
    return jnp.concatenate([head(x, **kwargs) for head in heads], axis=-1)
