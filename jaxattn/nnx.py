"""The jaxattn variants as Flax NNX modules: the same math as the Linen ones, other parameter ownership.

Each class here is named as its Linen twin, takes the same arguments in the same order plus
``rngs=nnx.Rngs(...)``, and calls the same plain function of :mod:`jaxattn` (e.g.
:func:`jaxattn.multihead.multi_head_attention`) with its ``nnx.Linear`` projections and its
call into the core (:func:`jaxattn.base.call_attention`). There is no second copy of the math.

Parameters are ``nnx.Param`` at the Linen paths: ``W_query/kernel``, ``out_proj/bias``,
``heads_0/W_key/kernel`` (the wrapper's heads are attributes ``heads_0 ...``, as Linen names
them), ``q_norm/scale``, ``SelfAttentionV1``'s raw ``W_query``. So
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` equals a Linen module's ``variables["params"]``
and :func:`params_of` / :func:`load_params` move weights between the two.

Modes, as NNX does them:

* dropout on the attention weights (the book's) draws from ``rngs`` (stream ``"dropout"``,
  else ``"default"``), given at construction or to the call; active when ``deterministic`` is
  False (the attribute, set by ``model.train()``/``model.eval()``, or the call's argument);
* ``decode=True``: :meth:`AttentionModule.init_cache` makes ``nnx.Cache`` variables for a
  ``(batch, max_tokens, d_in)`` input; each call appends a chunk and attends to all cached so
  far (Linen's ``'cache'`` collection, the same arithmetic: :func:`jaxattn.base.append_to_cache`);
* nothing is sown: Linen's ``intermediates`` (``attn_weights``, ``context_vec``) are Linen's
  (``Module.sow`` outside ``nnx.capture`` is deprecated in flax 0.12, and ``nnx.capture`` is
  not in 0.11).

Runs under ``nnx.jit``, ``nnx.grad`` and ``nnx.vmap`` on flax 0.11 and 0.12.

The base class, :func:`value_of` and the params I/O live in :mod:`jaxattn.nnx_base` (importable from
here too); the modules themselves here.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike
from jaxtyping import Array, Float

from jaxattn.base import PrecisionLike, check_book_config
from jaxattn.causal import causal_attention, concatenate_heads
from jaxattn.checks import check_input, check_sizes
from jaxattn.gqa import check_gqa_config, grouped_query_attention, rope_tables
from jaxattn.multihead import (
    check_combined_qkv_config,
    check_mha_config,
    check_torch_mha_config,
    combined_qkv_attention,
    multi_head_attention,
    torch_multihead_attention,
)
from jaxattn.nnx_base import AttentionModule, load_params, no_sow, params_of, required_rngs, value_of
from jaxattn.norms import rms_norm
from jaxattn.self_attention import V1_INIT, no_projection, raw_projection, self_attention

__all__ = [
    "VARIANTS",
    "AttentionModule",
    "CausalAttention",
    "GroupedQueryAttention",
    "MultiHeadAttention",
    "MultiHeadAttentionCombinedQKV",
    "MultiHeadAttentionWrapper",
    "RMSNorm",
    "SelfAttentionV1",
    "SelfAttentionV2",
    "SimplifiedSelfAttention",
    "TorchMultiheadAttention",
    "load_params",
    "params_of",
    "value_of",
]


# --- sections 3.3 and 3.4: no core call --------------------------------------------------------------


class SimplifiedSelfAttention(nnx.Module):
    """Section 3.3: ``softmax(x @ x.T) @ x``, no weights (``rngs`` accepted for a uniform signature)."""

    def __init__(self, *, dtype: Any = jnp.float32, precision: PrecisionLike = None, rngs: nnx.Rngs | None = None):
        self.dtype, self.precision = dtype, precision

    def __call__(
        self, x: Float[Array, "*batch tokens d_in"], *, attention_mask: ArrayLike | None = None
    ) -> Float[Array, "*batch tokens d_in"]:
        check_input(type(self).__name__, x.shape, d_in=None, ranks=(2, 3))
        return self_attention(
            x.astype(self.dtype),
            no_projection,
            no_projection,
            no_projection,
            scale=None,
            attention_mask=attention_mask,
            owner=type(self).__name__,
            sow=no_sow,
            precision=self.precision,
        )


class SelfAttentionV1(nnx.Module):
    """Section 3.4.2, v1: raw ``nnx.Param`` matrices ``W_query``, ``W_key``, ``W_value``.

    Each ``(d_in, d_out)``, drawn uniform in [0, 1).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        precision: PrecisionLike = None,
        rngs: nnx.Rngs | None = None,
    ):
        check_sizes(type(self).__name__, d_in=d_in, d_out=d_out)
        rngs = required_rngs(rngs, type(self).__name__)
        self.d_in, self.d_out, self.dtype, self.param_dtype = d_in, d_out, dtype, param_dtype
        self.precision = precision
        self.W_query = nnx.Param(V1_INIT(rngs.params(), (d_in, d_out), param_dtype))
        self.W_key = nnx.Param(V1_INIT(rngs.params(), (d_in, d_out), param_dtype))
        self.W_value = nnx.Param(V1_INIT(rngs.params(), (d_in, d_out), param_dtype))

    def __call__(
        self, x: Float[Array, "*batch tokens d_in"], *, attention_mask: ArrayLike | None = None
    ) -> Float[Array, "*batch tokens d_out"]:
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(2, 3))
        projections = (
            raw_projection(value_of(W), self.dtype, self.precision) for W in (self.W_query, self.W_key, self.W_value)
        )
        return self_attention(
            x.astype(self.dtype),
            *projections,
            scale=self.d_out**-0.5,
            attention_mask=attention_mask,
            owner=type(self).__name__,
            sow=no_sow,
            precision=self.precision,
        )


class SelfAttentionV2(nnx.Module):
    """Section 3.4.2, v2: ``nnx.Linear`` projections ``W_query``, ``W_key``, ``W_value``.

    Each kernel is torch's ``weight.T``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        qkv_bias: bool = False,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        precision: PrecisionLike = None,
        rngs: nnx.Rngs | None = None,
    ):
        check_sizes(type(self).__name__, d_in=d_in, d_out=d_out)
        rngs = required_rngs(rngs, type(self).__name__)
        self.d_in, self.d_out, self.qkv_bias = d_in, d_out, qkv_bias
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        linear = partial(
            nnx.Linear,
            d_in,
            d_out,
            use_bias=qkv_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )
        self.W_query, self.W_key, self.W_value = linear(), linear(), linear()

    def __call__(
        self, x: Float[Array, "*batch tokens d_in"], *, attention_mask: ArrayLike | None = None
    ) -> Float[Array, "*batch tokens d_out"]:
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(2, 3))
        return self_attention(
            x,
            self.W_query,
            self.W_key,
            self.W_value,
            scale=self.d_out**-0.5,
            attention_mask=attention_mask,
            owner=type(self).__name__,
            sow=no_sow,
            precision=self.precision,
        )


# --- the variants that call the attention core -------------------------------------------------------


class CausalAttention(AttentionModule):
    """Section 3.5: ``CausalAttention(d_in, d_out, context_length, dropout, qkv_bias=False, *, rngs)``."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False, **options):
        self.d_in, self.d_out, self.context_length, self.dropout, self.qkv_bias = (
            d_in,
            d_out,
            context_length,
            dropout,
            qkv_bias,
        )
        check_book_config(self)
        rngs = self._options(**options)
        self.W_query, self.W_key, self.W_value = (self.linear(d_in, d_out, qkv_bias, rngs) for _ in range(3))

    def kv_shape(self) -> tuple[int, int]:
        return 1, self.d_out

    def __call__(
        self,
        x: Float[Array, "batch tokens d_in"],
        *,
        attention_mask=None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "batch tokens d_out"]:
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)
        attend = partial(
            self.attend, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask, rngs=rngs
        )
        return causal_attention(x, self.W_query, self.W_key, self.W_value, attend, d_out=self.d_out)


class MultiHeadAttentionWrapper(AttentionModule):
    """Section 3.6.1: ``num_heads`` ``CausalAttention`` heads as attributes ``heads_0 ...``, concatenated.

    ``MultiHeadAttentionWrapper(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, *, rngs)``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        **options,
    ):
        self.d_in, self.d_out, self.context_length, self.dropout = d_in, d_out, context_length, dropout
        self.num_heads, self.qkv_bias = num_heads, qkv_bias
        check_book_config(self)
        check_sizes(type(self).__name__, num_heads=num_heads)
        self._options(**options)
        for i in range(num_heads):  # attributes, not a list: the Linen paths heads_0/W_query/kernel ...
            setattr(self, f"heads_{i}", CausalAttention(d_in, d_out, context_length, dropout, qkv_bias, **options))

    @property
    def heads(self) -> list[CausalAttention]:
        return [getattr(self, f"heads_{i}") for i in range(self.num_heads)]

    def init_cache(self, input_shape: tuple[int, ...], dtype: Any = None) -> None:
        """Each head's cache (each head decodes on its own, as in Linen); refused as a head refuses it."""
        if not self.decode or not all(head.decode for head in self.heads):
            raise ValueError(
                f"{type(self).__name__}: init_cache makes the KV caches that decode=True reads; decode is "
                f"{self.decode} here and {[head.decode for head in self.heads]} in heads_0.. (construct it with "
                "decode=True, or set decode on the wrapper and every head)"
            )
        for head in self.heads:
            head.init_cache(input_shape, dtype)

    def __call__(
        self,
        x: Float[Array, "batch tokens d_in"],
        *,
        attention_mask=None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "batch tokens num_heads_times_d_out"]:
        return concatenate_heads(x, self.heads, attention_mask=attention_mask, deterministic=deterministic, rngs=rngs)


class MultiHeadAttention(AttentionModule):
    """Section 3.6.2.

    ``MultiHeadAttention(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, *, rngs)``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        **options,
    ):
        self.d_in, self.d_out, self.context_length, self.dropout = d_in, d_out, context_length, dropout
        self.num_heads, self.qkv_bias = num_heads, qkv_bias
        check_mha_config(self)
        rngs = self._options(**options)
        self.W_query, self.W_key, self.W_value = (self.linear(d_in, d_out, qkv_bias, rngs) for _ in range(3))
        self.out_proj = self.linear(d_out, d_out, True, rngs)

    def kv_shape(self) -> tuple[int, int]:
        return self.num_heads, self.d_out // self.num_heads

    def __call__(
        self,
        x: Float[Array, "batch tokens d_in"],
        *,
        attention_mask=None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "batch tokens d_out"]:
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)
        attend = partial(
            self.attend, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask, rngs=rngs
        )
        return multi_head_attention(
            x, self.W_query, self.W_key, self.W_value, self.out_proj, attend, num_heads=self.num_heads
        )


class MultiHeadAttentionCombinedQKV(AttentionModule):
    """The bonus layout: ``(d_in, d_out, num_heads, context_length, dropout=0.0, qkv_bias=False, *, rngs)``;
    ``qkv`` and ``proj``."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_heads: int,
        context_length: int,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        **options,
    ):
        self.d_in, self.d_out, self.num_heads, self.context_length = d_in, d_out, num_heads, context_length
        self.dropout, self.qkv_bias = dropout, qkv_bias
        check_combined_qkv_config(self)
        rngs = self._options(**options)
        self.qkv = self.linear(d_in, 3 * d_out, qkv_bias, rngs)
        self.proj = self.linear(d_out, d_out, True, rngs)

    def kv_shape(self) -> tuple[int, int]:
        return self.num_heads, self.d_out // self.num_heads

    def __call__(
        self,
        x: Float[Array, "batch tokens d_in"],
        *,
        attention_mask=None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "batch tokens d_out"]:
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)
        attend = partial(
            self.attend, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask, rngs=rngs
        )
        return combined_qkv_attention(x, self.qkv, self.proj, attend, num_heads=self.num_heads)


class TorchMultiheadAttention(AttentionModule):
    """``torch.nn.MultiheadAttention`` as self-attention: ``(embed_dim, num_heads, dropout=0.0, bias=True,
    causal=False, *, rngs)``; ``in_proj`` (q, k, v stacked) and ``out_proj``."""

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, causal: bool = False, **options
    ):
        self.embed_dim, self.num_heads, self.dropout, self.bias, self.causal = (
            embed_dim,
            num_heads,
            dropout,
            bias,
            causal,
        )
        rngs = self._options(**options)
        check_torch_mha_config(self)
        self.in_proj = self.linear(embed_dim, 3 * embed_dim, bias, rngs)
        self.out_proj = self.linear(embed_dim, embed_dim, bias, rngs)

    def kv_shape(self) -> tuple[int, int]:
        return self.num_heads, self.embed_dim // self.num_heads

    def input_features(self) -> int:
        return self.embed_dim

    def init_cache(self, input_shape: tuple[int, ...], dtype: Any = None) -> None:
        check_torch_mha_config(self)  # decode may have been set after construction: causal is still needed
        super().init_cache(input_shape, dtype)

    def __call__(
        self,
        x: Float[Array, "batch tokens embed_dim"],
        *,
        attention_mask=None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "batch tokens embed_dim"]:
        check_input(type(self).__name__, x.shape, d_in=self.embed_dim, ranks=(3,))
        attend = partial(
            self.attend, rate=self.dropout, deterministic=deterministic, attention_mask=attention_mask, rngs=rngs
        )
        return torch_multihead_attention(
            x, self.in_proj, self.out_proj, attend, num_heads=self.num_heads, causal=self.causal
        )


class RMSNorm(nnx.Module):
    """The book's ``qwen3.RMSNorm(emb_dim, eps)``: ``scale`` ``(emb_dim,)``, ones."""

    def __init__(self, emb_dim: int, eps: float = 1e-6, param_dtype: Any = jnp.float32):
        check_sizes(type(self).__name__, emb_dim=emb_dim)
        self.emb_dim, self.eps = emb_dim, eps
        self.scale = nnx.Param(jnp.ones((emb_dim,), param_dtype))

    def __call__(self, x: Float[Array, "*batch emb_dim"]) -> Float[Array, "*batch emb_dim"]:
        return rms_norm(x, value_of(self.scale), self.eps)


class GroupedQueryAttention(AttentionModule):
    """Causal grouped-query attention with RoPE and optional QK-norm, as :class:`jaxattn.GroupedQueryAttention`.

    ``GroupedQueryAttention(d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False,
    context_length=4096, rope_theta=10_000.0, freq_config=None, qkv_bias=False, out_bias=False,
    out_features=None, *, rngs)``.
    """

    def __init__(
        self,
        d_in: int,
        num_heads: int,
        num_kv_groups: int,
        head_dim: int | None = None,
        qk_norm: bool = False,
        context_length: int = 4096,
        rope_theta: float = 10_000.0,
        freq_config: tuple[tuple[str, float], ...] | Mapping[str, float] | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        out_features: int | None = None,
        **options,
    ):
        self.d_in, self.num_heads, self.num_kv_groups, self.head_dim = d_in, num_heads, num_kv_groups, head_dim
        self.qk_norm, self.context_length, self.rope_theta = qk_norm, context_length, rope_theta
        # a sorted tuple of pairs, as the Linen module keeps it (hashable, static)
        self.freq_config = None if freq_config is None else tuple(sorted(dict(freq_config).items()))
        self.qkv_bias, self.out_bias, self.out_features = qkv_bias, out_bias, out_features
        check_gqa_config(self)
        rngs = self._options(**options)
        hd = self.resolved_head_dim
        self.W_query = self.linear(d_in, num_heads * hd, qkv_bias, rngs)
        self.W_key = self.linear(d_in, num_kv_groups * hd, qkv_bias, rngs)
        self.W_value = self.linear(d_in, num_kv_groups * hd, qkv_bias, rngs)
        self.out_proj = self.linear(num_heads * hd, d_in if out_features is None else out_features, out_bias, rngs)
        if qk_norm:
            self.q_norm = RMSNorm(hd, 1e-6, self.param_dtype)
            self.k_norm = RMSNorm(hd, 1e-6, self.param_dtype)

    @property
    def resolved_head_dim(self) -> int:
        return self.d_in // self.num_heads if self.head_dim is None else self.head_dim

    def kv_shape(self) -> tuple[int, int]:
        return self.num_kv_groups, self.resolved_head_dim

    def __call__(
        self,
        x: Float[Array, "batch tokens d_in"],
        *,
        attention_mask: ArrayLike | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "batch tokens out_features"]:
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)
        offset = self.cache_offset()  # first: a missing or misfit cache is refused before any work
        return grouped_query_attention(
            x,
            self.W_query,
            self.W_key,
            self.W_value,
            self.out_proj,
            partial(self.attend, rate=0.0, deterministic=deterministic, attention_mask=attention_mask, rngs=rngs),
            q_norm=self.q_norm if self.qk_norm else None,
            k_norm=self.k_norm if self.qk_norm else None,
            num_heads=self.num_heads,
            num_kv_groups=self.num_kv_groups,
            rope=rope_tables(self, tokens=x.shape[1]),
            offset=offset,
        )


#: The NNX twins of :data:`jaxattn.VARIANTS`, in the same order.
VARIANTS = (
    SimplifiedSelfAttention,
    SelfAttentionV1,
    SelfAttentionV2,
    CausalAttention,
    MultiHeadAttentionWrapper,
    MultiHeadAttention,
    MultiHeadAttentionCombinedQKV,
    TorchMultiheadAttention,
)
