"""Section 3.6.2 and the two torch formats users bring: fused multi-head attention.

* ``MultiHeadAttention``: the book's class (``W_query``/``W_key``/``W_value`` + ``out_proj``).
* ``MultiHeadAttentionCombinedQKV``: the book's bonus layout, one ``qkv`` projection
  ``d_in -> 3 * d_out`` viewed as ``(3, heads, head_dim)``, and ``proj``.
* ``TorchMultiheadAttention``: the math and parameter layout of
  ``torch.nn.MultiheadAttention`` (``in_proj`` holds q, k, v stacked along the
  output, ``out_proj``), self-attention, ``batch_first``, optional causal mask.
  No torch is imported; only the layout is shared.

All three project to ``(batch, tokens, heads, head_dim)`` and call the attention
core through :meth:`jaxattn.base.AttentionModule.attend`. The math of each is a plain function
below the classes, which the NNX modules (:mod:`jaxattn.nnx`) call too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattn.base import AttentionModule, BookAttention, Projection, check_book_config
from jaxattn.checks import check_divisible, check_input, check_rate, check_sizes


class MultiHeadAttention(BookAttention):
    """The book's fused multi-head causal attention with an output projection.

    ``MultiHeadAttention(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False)``.
    """

    num_heads: int
    qkv_bias: bool = False

    def check_config(self) -> None:
        check_mha_config(self)

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch tokens d_in"], *, attention_mask=None, deterministic: bool = True
    ) -> Float[Array, "batch tokens d_out"]:
        self.check_config()
        self.check_input(x)
        W_query, W_key, W_value = (self.dense(self.d_out, self.qkv_bias, n) for n in ("W_query", "W_key", "W_value"))
        attend = partial(self.attend, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask)
        return multi_head_attention(
            x, W_query, W_key, W_value, self.dense(self.d_out, True, "out_proj"), attend, num_heads=self.num_heads
        )


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
        check_combined_qkv_config(self)
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)
        attend = partial(self.attend, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask)
        return combined_qkv_attention(
            x,
            self.dense(3 * self.d_out, self.qkv_bias, "qkv"),
            self.dense(self.d_out, True, "proj"),
            attend,
            num_heads=self.num_heads,
        )


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
        check_torch_mha_config(self)
        check_input(type(self).__name__, x.shape, d_in=self.embed_dim, ranks=(3,))
        attend = partial(self.attend, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask)
        return torch_multihead_attention(
            x,
            self.dense(3 * self.embed_dim, self.bias, "in_proj"),
            self.dense(self.embed_dim, self.bias, "out_proj"),
            attend,
            num_heads=self.num_heads,
            causal=self.causal,
        )


# --- the math, shared with jaxattn.nnx: projections and the attention call come in as callables -----
# ``attend(queries, keys, values, is_causal=...)`` is the shell's call into the core (mask, dropout, cache).


def multi_head_attention(
    x: Float[Array, "batch tokens d_in"],
    W_query: Projection,
    W_key: Projection,
    W_value: Projection,
    out_proj: Projection,
    attend: Callable[..., Array],
    *,
    num_heads: int,
) -> Float[Array, "batch tokens d_out"]:
    """The book's ``MultiHeadAttention.forward``: project, split heads, causal attention, merge, ``out_proj``."""
    b, tokens, _ = x.shape

    def heads(proj):  # (b, T, d_out) -> (b, T, H, hd): the book's view(b, T, H, hd)
        y = proj(x)
        return y.reshape(b, tokens, num_heads, y.shape[-1] // num_heads)

    context_vec = attend(heads(W_query), heads(W_key), heads(W_value), is_causal=True)  # (b, T, H, hd)
    return out_proj(context_vec.reshape(b, tokens, num_heads * context_vec.shape[-1]))  # (b, T, d_out)


def combined_qkv_attention(
    x: Float[Array, "batch tokens d_in"],
    qkv: Projection,
    proj: Projection,
    attend: Callable[..., Array],
    *,
    num_heads: int,
) -> Float[Array, "batch tokens d_out"]:
    """The book's bonus ``MultiHeadAttentionCombinedQKV.forward``: one ``qkv`` projection viewed as ``(3, H, hd)``."""
    b, tokens, _ = x.shape
    fused = qkv(x)  # (b, T, 3 * d_out)
    fused = fused.reshape(b, tokens, 3, num_heads, fused.shape[-1] // (3 * num_heads))  # (b, T, 3, H, hd)
    context_vec = attend(fused[:, :, 0], fused[:, :, 1], fused[:, :, 2], is_causal=True)  # (b, T, H, hd)
    return proj(context_vec.reshape(b, tokens, num_heads * context_vec.shape[-1]))  # (b, T, d_out)


def torch_multihead_attention(
    x: Float[Array, "batch tokens embed_dim"],
    in_proj: Projection,
    out_proj: Projection,
    attend: Callable[..., Array],
    *,
    num_heads: int,
    causal: bool,
) -> Float[Array, "batch tokens embed_dim"]:
    """``torch.nn.MultiheadAttention`` as self-attention: ``in_proj`` holds q, k, v stacked along the output."""
    b, tokens, embed_dim = x.shape
    qkv = in_proj(x)  # (b, T, 3 * E)
    head_dim = embed_dim // num_heads
    q, k, v = (t.reshape(b, tokens, num_heads, head_dim) for t in jnp.split(qkv, 3, axis=-1))  # (b, T, H, hd)
    context_vec = attend(q, k, v, is_causal=causal)  # (b, T, H, hd)
    return out_proj(context_vec.reshape(b, tokens, embed_dim))  # (b, T, E)


# --- config checks of a Linen or NNX module (read its fields only) -----------------------------------


def check_mha_config(module) -> None:
    """``MultiHeadAttention``'s sizes, rate, and ``d_out`` split into ``num_heads``."""
    check_book_config(module)
    check_sizes(type(module).__name__, num_heads=module.num_heads)
    check_divisible(type(module).__name__, module.d_out, module.num_heads)


def check_combined_qkv_config(module) -> None:
    owner = type(module).__name__
    check_sizes(
        owner, d_in=module.d_in, d_out=module.d_out, num_heads=module.num_heads, context_length=module.context_length
    )
    check_rate(owner, "dropout", module.dropout)
    check_divisible(owner, module.d_out, module.num_heads)


def check_torch_mha_config(module) -> None:
    owner = type(module).__name__
    check_sizes(owner, embed_dim=module.embed_dim, num_heads=module.num_heads)
    check_rate(owner, "dropout", module.dropout)
    check_divisible(owner, module.embed_dim, module.num_heads, "embed_dim")
    if getattr(module, "decode", False) and not module.causal:
        # With a cache a chunk sees only the tokens before it (and the cache's unwritten slots are not
        # keys): that is the causal layer's output, never the non-causal forward's.
        raise ValueError(
            f"{owner}: decode=True needs causal=True: a KV cache gives each chunk the tokens before it only, "
            "which a non-causal layer (every token sees every token) does not compute"
        )
