"""Section 3.6.2 and the two torch formats users bring: fused multi-head attention.

* ``MultiHeadAttention``: the book's class (``W_query``/``W_key``/``W_value`` + ``out_proj``).
* ``MultiHeadAttentionCombinedQKV``: the book's bonus layout, one ``qkv`` projection
  ``d_in -> 3 * d_out`` viewed as ``(3, heads, head_dim)``, and ``proj``.
* ``TorchMultiheadAttention``: the math and parameter layout of
  ``torch.nn.MultiheadAttention`` (``in_proj`` holds q, k, v stacked along the
  output, ``out_proj``), self-attention, ``batch_first``, optional causal mask.
  No torch is imported; only the layout is shared.

All three project to ``(batch, tokens, heads, head_dim)`` and call the attention
core through :meth:`jaxattn.base.AttentionModule.attend`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattn.base import AttentionModule, BookAttention
from jaxattn.checks import check_divisible, check_input, check_rate, check_sizes


class MultiHeadAttention(BookAttention):
    """The book's fused multi-head causal attention with an output projection.

    ``MultiHeadAttention(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False)``.
    """

    num_heads: int
    qkv_bias: bool = False

    def check_config(self) -> None:
        super().check_config()
        check_sizes(type(self).__name__, num_heads=self.num_heads)
        check_divisible(type(self).__name__, self.d_out, self.num_heads)

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch tokens d_in"], *, attention_mask=None, deterministic: bool = True
    ) -> Float[Array, "batch tokens d_out"]:
        self.check_config()
        self.check_input(x)
        b, tokens, _ = x.shape
        head_dim = self.d_out // self.num_heads

        def heads(name):  # (b, T, d_out) -> (b, T, H, hd): the book's view(b, T, H, hd)
            return self.dense(self.d_out, self.qkv_bias, name)(x).reshape(b, tokens, self.num_heads, head_dim)

        context_vec = self.attend(
            heads("W_query"), heads("W_key"), heads("W_value"),
            is_causal=True, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask,
        )  # (b, T, H, hd)
        return self.dense(self.d_out, True, "out_proj")(context_vec.reshape(b, tokens, self.d_out))  # (b, T, d_out)


class MultiHeadAttentionCombinedQKV(AttentionModule):
    """The book's bonus ``MultiHeadAttentionCombinedQKV``: ``qkv`` and ``proj`` linears.

    Argument order follows the book's class: ``(d_in, d_out, num_heads, context_length, dropout, qkv_bias)``.
    """

    d_in: int
    d_out: int
    num_heads: int
    context_length: int
    dropout: float = 0.0
    qkv_bias: bool = False

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch tokens d_in"], *, attention_mask=None, deterministic: bool = True
    ) -> Float[Array, "batch tokens d_out"]:
        owner = type(self).__name__
        check_sizes(owner, d_in=self.d_in, d_out=self.d_out, num_heads=self.num_heads, context_length=self.context_length)
        check_rate(owner, "dropout", self.dropout)
        check_divisible(owner, self.d_out, self.num_heads)
        check_input(owner, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)
        b, tokens, _ = x.shape
        head_dim = self.d_out // self.num_heads
        qkv = self.dense(3 * self.d_out, self.qkv_bias, "qkv")(x)  # (b, T, 3 * d_out)
        qkv = qkv.reshape(b, tokens, 3, self.num_heads, head_dim)  # (b, T, 3, H, hd)
        context_vec = self.attend(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
            is_causal=True, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask,
        )  # (b, T, H, hd)
        return self.dense(self.d_out, True, "proj")(context_vec.reshape(b, tokens, self.d_out))  # (b, T, d_out)


class TorchMultiheadAttention(AttentionModule):
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

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch tokens embed_dim"], *, attention_mask=None, deterministic: bool = True
    ) -> Float[Array, "batch tokens embed_dim"]:
        owner = type(self).__name__
        check_sizes(owner, embed_dim=self.embed_dim, num_heads=self.num_heads)
        check_rate(owner, "dropout", self.dropout)
        check_divisible(owner, self.embed_dim, self.num_heads, "embed_dim")
        check_input(owner, x.shape, d_in=self.embed_dim, ranks=(3,))
        b, tokens, _ = x.shape
        head_dim = self.embed_dim // self.num_heads
        qkv = self.dense(3 * self.embed_dim, self.bias, "in_proj")(x)  # (b, T, 3 * E)
        q, k, v = (t.reshape(b, tokens, self.num_heads, head_dim) for t in jnp.split(qkv, 3, axis=-1))  # (b, T, H, hd)
        context_vec = self.attend(
            q, k, v, is_causal=self.causal, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask
        )
        return self.dense(self.embed_dim, self.bias, "out_proj")(context_vec.reshape(b, tokens, self.embed_dim))
