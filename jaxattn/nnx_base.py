"""What the NNX modules of :mod:`jaxattn.nnx` share: their base class, variable access and the Linen params.

:class:`AttentionModule` is the NNX twin of :class:`jaxattn.base.AttentionModule` (keyword options,
the core call, the KV cache); :func:`params_of` / :func:`load_params` move weights between a Linen
``variables["params"]`` and an NNX module's ``nnx.Param`` state (the same paths).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike
from jaxtyping import Array, Float

from jaxattn.attention import dot_product_attention
from jaxattn.base import (
    KVCache,
    PrecisionLike,
    append_to_cache,
    call_attention,
    check_cache_length,
    check_cache_shape,
    check_dropout_supported,
    key_mask,
)
from jaxattn.checks import check_input


def required_rngs(rngs: nnx.Rngs | None, owner: str) -> nnx.Rngs:
    """``rngs``, or a ``ValueError`` naming ``owner`` when there are none (a module must initialise its parameters)."""
    if rngs is None:
        raise ValueError(f"{owner}: needs rngs=nnx.Rngs(seed) to initialise its parameters")
    return rngs


def no_sow(name: str, value: Array) -> None:
    """The NNX modules sow nothing (see the module docstring)."""


def value_of(variable: nnx.Variable) -> Array:
    """A variable's array: ``get_value()`` (flax 0.12, where ``.value`` is deprecated) or ``.value`` (0.11)."""
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _assign(variable: nnx.Variable, value: Array) -> None:
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


# --- the base of the variants that call the attention core ------------------------------------------


class AttentionModule(nnx.Module):
    """NNX twin of :class:`jaxattn.base.AttentionModule`: keyword options, the core call, the KV cache.

    Options (keyword-only in every subclass): ``attention_impl``, ``attention_fn``, ``dtype``,
    ``param_dtype``, ``precision``, ``decode``, ``deterministic`` (default True: inference, as the
    Linen call's default; ``model.train()`` turns dropout on), ``rngs``.
    """

    def _options(
        self,
        *,
        attention_impl: str = "auto",
        attention_fn: Callable[..., Any] = dot_product_attention,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        precision: PrecisionLike = None,
        decode: bool = False,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> nnx.Rngs:
        self.attention_impl, self.attention_fn = attention_impl, attention_fn
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self.decode, self.deterministic = decode, deterministic
        rngs = required_rngs(rngs, type(self).__name__)
        #: Kept for dropout: its ``dropout`` (or ``default``) stream advances on every active call.
        self.rngs = rngs
        return rngs

    def linear(self, in_features: int, out_features: int, use_bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
        """An ``nn.Linear``-like projection (kernel = torch ``weight.T``), in the module's dtypes and precision."""
        return nnx.Linear(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            rngs=rngs,
        )

    def kv_shape(self) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of the keys this module caches."""
        raise NotImplementedError(f"{type(self).__name__} has no KV cache")

    #: Set by every subclass with that argument (not ``TorchMultiheadAttention``: :meth:`input_features`).
    d_in: int

    def input_features(self) -> int:
        """The last dimension of this module's input (``d_in``; ``embed_dim`` for ``TorchMultiheadAttention``)."""
        return self.d_in

    def context_limit(self) -> int | None:
        """The most tokens this module takes: ``context_length`` (the book's mask, GQA's RoPE table), if any."""
        return getattr(self, "context_length", None)

    def check_cache_request(self, input_shape: Any, dtype: Any) -> tuple[int, int]:
        """``(batch, max_tokens)`` of an :meth:`init_cache` request, refused as Linen's ``init`` refuses
        its input (same messages: rank, ``d_in``, ``tokens`` over ``context_length``), and also an empty
        cache, a module that does not decode, a dtype that is not floating."""
        owner = type(self).__name__
        if not self.decode:
            raise ValueError(
                f"{owner}: init_cache makes the KV cache that decode=True reads; this module has decode=False "
                "(construct it with decode=True)"
            )
        try:
            shape = tuple(operator.index(n) for n in input_shape)
        except TypeError:
            raise ValueError(
                f"{owner}: init_cache takes the input shape (batch, max_tokens, d_in) as integers, got {input_shape!r}"
            ) from None
        check_input(owner, shape, d_in=self.input_features(), ranks=(3,), context_length=self.context_limit())
        check_cache_shape(owner, shape[:2])
        if dtype is not None:
            try:
                floating = jnp.issubdtype(dtype, jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise ValueError(f"{owner}: init_cache dtype must be a floating dtype, got {dtype!r}")
        return shape[0], shape[1]

    def init_cache(self, input_shape: tuple[int, ...], dtype: Any = None) -> None:
        """Make (or reset) the KV cache for inputs ``(batch, max_tokens, d_in)``: ``nnx.Cache`` variables
        ``cached_key``, ``cached_value``, ``cached_mask``, ``cache_index``, as Linen's ``'cache'`` collection.

        Refused as Linen's ``init`` refuses its input: rank 3, ``d_in`` last, ``max_tokens <=
        context_length``; and at least one row of one token, ``decode=True``, a floating ``dtype``.
        """
        batch, max_tokens = self.check_cache_request(input_shape, dtype)
        dtype = self.dtype if dtype is None else dtype
        shape = (batch, max_tokens, *self.kv_shape())
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_mask = nnx.Cache(jnp.ones((batch, max_tokens), jnp.bool_))
        self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

    def cache_offset(self):
        """Position of this call's first token: ``cache_index`` with ``decode``, else 0."""
        return self._cache().index if self.decode else 0

    def _cache(self) -> KVCache:
        if not hasattr(self, "cached_key"):
            raise ValueError(
                f"{type(self).__name__}: decode=True needs init_cache((batch, max_tokens, d_in)) before the first call"
            )
        cache = KVCache(
            *(value_of(v) for v in (self.cached_key, self.cached_value, self.cached_mask, self.cache_index))
        )
        # the cache may have been replaced since init_cache (nnx.update, a checkpoint): it must still fit
        check_cache_length(type(self).__name__, cache.key.shape[1], self.context_limit())
        return cache

    def attend(
        self,
        queries: Float[Array, "batch q_tokens heads head_dim"],
        keys: Float[Array, "batch kv_tokens kv_heads head_dim"],
        values: Float[Array, "batch kv_tokens kv_heads v_dim"],
        *,
        is_causal: bool,
        rate: float,
        deterministic: bool | None,
        attention_mask: ArrayLike | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "batch q_tokens heads v_dim"]:
        """Context vectors through :func:`jaxattn.base.call_attention`; this shell supplies the cache and the RNG."""
        owner = type(self).__name__
        mask = None if attention_mask is None else key_mask(owner, attention_mask, keys.shape[:2])
        q_offset: int | Array = 0
        if self.decode:
            cache, q_offset = append_to_cache(owner, self._cache(), keys, values, mask)
            for variable, value in zip(
                (self.cached_key, self.cached_value, self.cached_mask, self.cache_index), cache, strict=True
            ):
                _assign(variable, value)
            keys, values, mask = cache.key, cache.value, cache.mask
        deterministic = self.deterministic if deterministic is None else deterministic
        dropout_active = not deterministic and rate > 0.0
        rng = None
        if dropout_active:
            check_dropout_supported(owner, self.attention_impl, rate)
            rngs = self.rngs if rngs is None else rngs
            rng = rngs.dropout()  # falls back to the "default" stream when there is no "dropout" one
        context_vec, _ = call_attention(
            owner,
            queries,
            keys,
            values,
            key_mask=mask,
            is_causal=is_causal,
            q_offset=q_offset,
            attention_fn=self.attention_fn,
            attention_impl=self.attention_impl,
            precision=self.precision,
            dropout_rate=rate if dropout_active else 0.0,
            dropout_rng=rng,
        )
        return context_vec


# --- Linen params <-> NNX state ------------------------------------------------------------------------


def params_of(model) -> dict:
    """The parameters of an NNX ``model`` (or its ``nnx.State``) as Linen's ``variables["params"]``: a nested
    dict of arrays at the same paths."""
    state = model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param)
    return _plain(nnx.to_pure_dict(state))


def _plain(tree):
    """A pure dict with string keys (NNX may key by int); arrays at the leaves."""
    if isinstance(tree, Mapping):
        return {str(k): _plain(v) for k, v in tree.items()}
    return tree


def load_params(model: nnx.Module, params: Mapping, *, keep_dtype: bool = False) -> nnx.Module:
    """Put Linen-layout ``params`` (``variables["params"]``) into ``model`` in place, checking the paths and
    shapes match exactly; returns ``model``. Raises ``ValueError`` naming each missing, unexpected or
    mis-shaped path. Each array is cast to the parameter's dtype, unless ``keep_dtype`` (as
    :func:`crosscheck.porting.port.load_state_dict` gives them: exact, float64 included)."""
    state = nnx.state(model, nnx.Param)
    expected = _flat(nnx.to_pure_dict(state))
    given = _flat(params)
    problems = [f"missing parameter {p}" for p in expected if p not in given]
    problems += [f"unexpected parameter {p}" for p in given if p not in expected]
    problems += [
        f"parameter {p}: expected shape {tuple(expected[p].shape)}, found {tuple(jnp.shape(given[p]))}"
        for p in expected
        if p in given and tuple(expected[p].shape) != tuple(jnp.shape(given[p]))
    ]
    if problems:
        raise ValueError(f"{type(model).__name__}: params do not fit:\n  " + "\n  ".join(problems))
    pure = nnx.to_pure_dict(state)
    _fill(pure, params, (lambda old, new: new) if keep_dtype else (lambda old, new: jnp.asarray(new, dtype=old.dtype)))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


def _fill(pure: dict, params: Mapping, convert) -> None:
    """Replace ``pure``'s leaves by ``params``' (same paths; ``pure`` may key by int where params say str)."""
    for key in list(pure):
        if isinstance(pure[key], Mapping):
            _fill(pure[key], params[str(key)], convert)
        else:
            pure[key] = convert(pure[key], params[str(key)])
