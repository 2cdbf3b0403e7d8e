"""Section 3.6.2 and the two torch formats users bring: fused multi-head attention.

* ``MultiHeadAttention``: the book's class (``W_query``/``W_key``/``W_value`` + ``out_proj``).
* ``MultiHeadAttentionCombinedQKV``: the book's bonus layout, one ``qkv`` projection
  ``d_in -> 3 * d_out`` viewed as ``(3, heads, head_dim)``, and ``proj``.
* ``TorchMultiheadAttention``: the math and parameter layout of
  ``torch.nn.MultiheadAttention`` (``in_proj`` holds q, k, v stacked along the
  output, ``out_proj``), self-attention, ``batch_first``, optional causal mask.
  No torch is imported; only the layout is shared.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattn import core
from jaxattn.causal import attend_causal
from jaxattn.checks import check_divisible, check_input
from jaxattn.masks import make_causal_mask


class MultiHeadAttention(nn.Module):
    """The book's fused multi-head causal attention with an output projection."""

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False
    attention_impl: core.AttentionImpl = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch tokens d_in"], *, deterministic: bool = True
    ) -> Float[Array, "batch tokens d_out"]:
        owner = type(self).__name__
        check_divisible(owner, self.d_out, self.num_heads)
        check_input(owner, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)
        dense = lambda name, bias: nn.Dense(  # noqa: E731 - four projections alike
            self.d_out, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        queries = core.split_heads(dense("W_query", self.qkv_bias)(x), self.num_heads)  # (b, H, T, hd)
        keys = core.split_heads(dense("W_key", self.qkv_bias)(x), self.num_heads)
        values = core.split_heads(dense("W_value", self.qkv_bias)(x), self.num_heads)
        context_vec = attend_causal(
            self, queries, keys, values, self.dropout, deterministic, self.attention_impl
        )  # (b, H, T, hd)
        return dense("out_proj", True)(core.merge_heads(context_vec))  # (b, T, d_out)


class MultiHeadAttentionCombinedQKV(nn.Module):
    """The book's bonus ``MultiHeadAttentionCombinedQKV``: ``qkv`` and ``proj`` linears.

    Argument order follows the book's class: ``(d_in, d_out, num_heads, context_length, dropout, qkv_bias)``.
    """

    d_in: int
    d_out: int
    num_heads: int
    context_length: int
    dropout: float = 0.0
    qkv_bias: bool = False
    attention_impl: core.AttentionImpl = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch tokens d_in"], *, deterministic: bool = True
    ) -> Float[Array, "batch tokens d_out"]:
        owner = type(self).__name__
        check_divisible(owner, self.d_out, self.num_heads)
        check_input(owner, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)
        b, tokens, _ = x.shape
        head_dim = self.d_out // self.num_heads
        qkv = nn.Dense(
            3 * self.d_out, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv"
        )(x)  # (b, T, 3 * d_out)
        qkv = qkv.reshape(b, tokens, 3, self.num_heads, head_dim)  # (b, T, 3, H, hd)
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # (3, b, H, T, hd)
        queries, keys, values = qkv[0], qkv[1], qkv[2]
        context_vec = attend_causal(
            self, queries, keys, values, self.dropout, deterministic, self.attention_impl
        )  # (b, H, T, hd)
        return nn.Dense(self.d_out, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(
            core.merge_heads(context_vec)
        )  # (b, T, d_out)


class TorchMultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, batch_first=True)`` as self-attention.

    ``in_proj`` maps ``embed_dim -> 3 * embed_dim`` (q, k, v stacked, as torch's
    ``in_proj_weight``); ``out_proj`` maps back. ``causal=True`` applies the mask
    torch gets from ``attn_mask=nn.Transformer.generate_square_subsequent_mask(T)``.
    """

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    bias: bool = True
    causal: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch tokens embed_dim"], *, deterministic: bool = True
    ) -> Float[Array, "batch tokens embed_dim"]:
        owner = type(self).__name__
        check_divisible(owner, self.embed_dim, self.num_heads, "embed_dim")
        check_input(owner, x.shape, d_in=self.embed_dim, ranks=(3,))
        qkv = nn.Dense(
            3 * self.embed_dim, use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype, name="in_proj"
        )(x)  # (b, T, 3 * E)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # each (b, T, E)
        queries = core.split_heads(q, self.num_heads)  # (b, H, T, hd)
        keys = core.split_heads(k, self.num_heads)
        values = core.split_heads(v, self.num_heads)
        mask = make_causal_mask(x.shape[-2]) if self.causal else None
        rng = None if deterministic or self.dropout == 0.0 else self.make_rng("dropout")
        context_vec, attn_weights = core.naive_attention(
            queries, keys, values, mask, dropout_rate=self.dropout, dropout_rng=rng, deterministic=deterministic
        )  # (b, H, T, hd)
        self.sow("intermediates", "attn_weights", attn_weights)
        return nn.Dense(
            self.embed_dim, use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj"
        )(core.merge_heads(context_vec))  # (b, T, E)
