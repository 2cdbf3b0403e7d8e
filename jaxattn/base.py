"""What the multi-head variants share: the keyword fields, the book's leading fields, the call into the core.

* :class:`AttentionModule`: keyword-only ``attention_impl``, ``attention_fn``,
  ``dtype``, ``param_dtype`` and :meth:`~AttentionModule.attend`, for every variant
  that calls the attention core (``TorchMultiheadAttention`` included).
* :class:`BookAttention`: plus the book's positional ``(d_in, d_out,
  context_length, dropout)``, which ``CausalAttention``, ``MultiHeadAttentionWrapper``
  and ``MultiHeadAttention`` all start with.

The book's positional orders are kept, so a field goes into a base only where every
class under it has it at the same place: ``qkv_bias`` comes after ``num_heads`` in
``MultiHeadAttention(d_in, d_out, context_length, dropout, num_heads, qkv_bias)`` but
not in ``CausalAttention``, and ``MultiHeadAttentionCombinedQKV(d_in, d_out,
num_heads, context_length, ...)`` has its own order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxattn.attention import attention_with_weights, dot_product_attention
from jaxattn.checks import check_input


class AttentionModule(nn.Module):
    """Base of the multi-head variants: ``attention_impl``, ``attention_fn``, ``dtype``, ``param_dtype``.

    ``attention_fn`` follows ``nn.MultiHeadDotProductAttention``: the function that
    turns projected queries, keys and values ``(batch, tokens, heads, head_dim)``
    into context vectors. It is called as ``attention_fn(query, key, value,
    bias=None, mask=None, is_causal=...)``, the signature of
    ``jax.nn.dot_product_attention``, which can be passed as it is. The default,
    :func:`jaxattn.dot_product_attention`, uses ``attention_impl`` (``"auto"`` or a
    name from :func:`jaxattn.implementations.names`) and sows ``attn_weights`` when
    the chosen implementation has them. With dropout active (``deterministic=False``,
    rate > 0) the default runs the naive kernel, whose dropout on the weights is the
    book's; a custom ``attention_fn`` then also receives ``dropout_rate`` and
    ``dropout_rng`` (Flax's names).
    """

    _: dataclasses.KW_ONLY
    attention_impl: str = "auto"
    attention_fn: Callable[..., Any] = dot_product_attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def dense(self, features: int, use_bias: bool, name: str) -> nn.Dense:
        """An ``nn.Linear``-like projection named as the torch submodule (kernel = torch ``weight.T``)."""
        return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def attend(
        self,
        queries: Float[Array, "batch q_tokens heads head_dim"],
        keys: Float[Array, "batch kv_tokens kv_heads head_dim"],
        values: Float[Array, "batch kv_tokens kv_heads v_dim"],
        *,
        is_causal: bool,
        rate: float,
        deterministic: bool,
    ) -> Float[Array, "batch q_tokens heads v_dim"]:
        """Context vectors through ``attention_fn``; sows ``attn_weights`` (if any) and ``context_vec``."""
        dropout_active = not deterministic and rate > 0.0
        rng = self.make_rng("dropout") if dropout_active else None
        if self.attention_fn is dot_product_attention:
            implementation = "naive" if dropout_active else (None if self.attention_impl == "auto" else self.attention_impl)
            context_vec, attn_weights = attention_with_weights(
                queries, keys, values, is_causal=is_causal, implementation=implementation,
                dropout_rate=rate if dropout_active else 0.0, dropout_rng=rng,
            )  # (b, T, H, hd), (b, H, T, S) or None
            if attn_weights is not None:
                self.sow("intermediates", "attn_weights", self.sown_weights(attn_weights))
        else:
            if self.attention_impl != "auto":
                raise ValueError(
                    f"{type(self).__name__}: attention_impl={self.attention_impl!r} chooses among "
                    "jaxattn.dot_product_attention's implementations; with a custom attention_fn, choose inside it"
                )
            extra = {"dropout_rate": rate, "dropout_rng": rng} if dropout_active else {}
            context_vec = self.attention_fn(queries, keys, values, bias=None, mask=None, is_causal=is_causal, **extra)
        self.sow("intermediates", "context_vec", self.sown_context(context_vec))
        return context_vec

    def sown_weights(self, attn_weights: Float[Array, "b heads q k"]) -> Array:
        """``attn_weights`` as sown: ``(b, heads, T, S)``, the book's layout."""
        return attn_weights

    def sown_context(self, context_vec: Float[Array, "b q heads d"]) -> Array:
        """``context_vec`` as sown: head-first ``(b, heads, T, head_dim)``, the book's layout before merging heads."""
        return jnp.swapaxes(context_vec, 1, 2)


class BookAttention(AttentionModule):
    """The book's ``(d_in, d_out, context_length, dropout)``, and the input check they imply."""

    d_in: int
    d_out: int
    context_length: int
    dropout: float

    def check_input(self, x: Array) -> None:
        """``x`` must be ``(batch, tokens, d_in)`` with ``tokens <= context_length`` (the book's mask size)."""
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)
