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

Below the Linen classes, the plain functions both shells (these Linen modules and the NNX
modules of :mod:`jaxattn.nnx`) call, so the two APIs share one copy of the logic:
:func:`call_attention` (the call into the core), :func:`append_to_cache` (the KV cache
arithmetic) and :func:`key_mask`. A shell only keeps state: parameters, the cache, RNGs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike
from jaxtyping import Array, Float

from jaxattn import implementations
from jaxattn.attention import attention_with_weights, dot_product_attention
from jaxattn.checks import check_at_run_time, check_input, check_rate, check_sizes, mark_range
from jaxattn.masks import make_offset_causal_mask

#: A projection as the variants' math functions take it: ``nn.Dense``, ``nnx.Linear``, any ``(..., n_in) -> (..., n)``.
Projection = Callable[[Array], Array]
#: A matmul precision as Flax takes it: ``jax.lax.Precision``, its name, or ``None`` (the backend's default).
PrecisionLike = str | lax.Precision | None


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
    rate > 0) the default runs the table's dropout implementation
    (:func:`jaxattn.implementations.for_dropout`: naive, whose dropout on the weights is the
    book's); a custom ``attention_fn`` then also receives ``dropout_rate`` and
    ``dropout_rng`` (Flax's names).
    """

    _: dataclasses.KW_ONLY
    attention_impl: str = "auto"
    attention_fn: Callable[..., Any] = dot_product_attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    #: Flax's KV-cache convention (``nn.MultiHeadDotProductAttention(decode=True)``): ``init`` on an input
    #: of the maximum length makes the ``'cache'`` collection; each ``apply(..., mutable=["cache"])``
    #: appends a chunk (a prompt, then one token at a time) and attends to everything cached so far.
    decode: bool = False
    #: Matmul precision of every projection and of the attention call (Flax's convention, as
    #: ``nn.MultiHeadDotProductAttention(precision=...)``); ``None``: JAX's default for the backend.
    precision: PrecisionLike = None

    def dense(self, features: int, use_bias: bool, name: str) -> nn.Dense:
        """An ``nn.Linear``-like projection named as the torch submodule (kernel = torch ``weight.T``)."""
        return nn.Dense(
            features,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name=name,
        )

    def attend(
        self,
        queries: Float[Array, "batch q_tokens heads head_dim"],
        keys: Float[Array, "batch kv_tokens kv_heads head_dim"],
        values: Float[Array, "batch kv_tokens kv_heads v_dim"],
        *,
        is_causal: bool,
        rate: float,
        deterministic: bool,
        attention_mask: ArrayLike | None = None,
    ) -> Float[Array, "batch q_tokens heads v_dim"]:
        """Context vectors through ``attention_fn``; sows ``attn_weights`` (if any) and ``context_vec``.

        ``attention_mask``: ``(batch, tokens)``, 1/True = a real token, 0 = padding; padded keys are
        invisible to every query, and a query that sees no real key gets zeros. With ``decode`` the keys,
        values and this mask are appended to the cache and the queries sit at ``q_offset = cache_index``.
        The work is :func:`call_attention`'s; this shell supplies the cache, the RNG and the sowing.
        """
        owner = type(self).__name__
        mask = None if attention_mask is None else key_mask(owner, attention_mask, keys.shape[:2])
        q_offset = 0
        if self.decode:
            keys, values, mask, q_offset = self.update_cache(keys, values, mask)
        dropout_active = not deterministic and rate > 0.0
        if dropout_active:  # before the RNG is drawn: the same refusal with or without a 'dropout' stream
            check_dropout_supported(owner, self.attention_impl, rate)
        context_vec, attn_weights = call_attention(
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
            dropout_rng=self.make_rng("dropout") if dropout_active else None,
        )
        if attn_weights is not None:
            self.sow("intermediates", "attn_weights", self.sown_weights(attn_weights))
        self.sow("intermediates", "context_vec", self.sown_context(context_vec))
        if self.is_mutable_collection("intermediates"):
            self.sow_stages(queries, keys, values)
        return context_vec

    def sow_stages(self, queries, keys, values) -> None:
        """For ``crosscheck --stages``: what enters the core, head-first ``(b, heads, T, hd)``, and the
        book's omega ``q @ k.T`` ``(b, heads, T, S)`` (unscaled, unmasked; kv groups shared as the core does)."""
        b, tokens, heads, head_dim = queries.shape
        kv_tokens, kv_heads = keys.shape[1], keys.shape[2]
        grouped = queries.reshape(b, tokens, kv_heads, heads // kv_heads, head_dim)  # (b, T, K, G, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", grouped, keys, precision=self.precision)  # (b, K, G, T, S)
        for name, value in (("queries", queries), ("keys", keys), ("values", values)):
            self.sow("intermediates", name, jnp.swapaxes(value, 1, 2))
        self.sow("intermediates", "attn_scores", scores.reshape(b, heads, tokens, kv_tokens))

    def cache_offset(self):
        """Position of this call's first token: the cached ``cache_index`` with ``decode``, else 0.

        Read before :meth:`attend` appends the chunk (a module that rotates keys by position, such
        as RoPE, needs it first). During ``init``, or before the cache exists, it is 0, as in
        :meth:`update_cache`. Reads only; creates no variable.
        """
        if not self.decode or not self.has_variable("cache", "cached_key"):
            return 0
        return self.get_variable("cache", "cache_index")

    def update_cache(self, keys, values, key_mask):
        """Append this chunk's keys, values and key mask to the ``'cache'`` collection.

        Returns ``(all cached keys, values, key mask, index of the chunk's first token)``. During
        ``init`` the cache is created at the input's length and the chunk attends to itself only.
        """
        initialised = self.has_variable("cache", "cached_key")
        owner = type(self).__name__
        if initialised:  # a cache made elsewhere (another module's init, a checkpoint) must fit this module
            check_cache_length(owner, self.get_variable("cache", "cached_key").shape[1], self.context_limit())
        else:  # init sizes the cache by its input, already checked as (batch, tokens <= context_length, d_in)
            check_cache_shape(owner, keys.shape[:2])
        cached_key = self.variable("cache", "cached_key", jnp.zeros, keys.shape, keys.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, values.shape, values.dtype)
        cached_mask = self.variable("cache", "cached_mask", jnp.ones, keys.shape[:2], jnp.bool_)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not initialised:
            return keys, values, key_mask, 0
        cache = KVCache(cached_key.value, cached_value.value, cached_mask.value, cache_index.value)
        cache, index = append_to_cache(owner, cache, keys, values, key_mask)
        cached_key.value, cached_value.value, cached_mask.value, cache_index.value = cache
        return cache.key, cache.value, cache.mask, index

    def context_limit(self) -> int | None:
        """The most tokens this module takes: ``context_length`` (the book's mask, GQA's RoPE table), if any."""
        return getattr(self, "context_length", None)

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

    def check_config(self) -> None:
        """Positive ``d_in``, ``d_out``, ``context_length`` and ``dropout`` in [0, 1); at trace time (all static)."""
        check_book_config(self)

    def check_input(self, x: Array) -> None:
        """``x`` must be ``(batch, tokens, d_in)`` with ``tokens <= context_length`` (the book's mask size)."""
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)


def check_book_config(module) -> None:
    """The book's ``(d_in, d_out, context_length, dropout)`` of a Linen or NNX ``module``: sizes and rate."""
    owner = type(module).__name__
    check_sizes(owner, d_in=module.d_in, d_out=module.d_out, context_length=module.context_length)
    check_rate(owner, "dropout", module.dropout)


# --- the functional core of the shells: Linen (above) and NNX (jaxattn.nnx) call these --------------


def check_cache_shape(owner: str, batch_tokens: tuple[int, ...]) -> None:
    """A KV cache holds at least one row of at least one token: an empty one could never take a chunk.

    Called on the ``(batch, max_tokens)`` a cache is made for (Linen's ``init`` input, NNX's
    ``init_cache`` shape), after the module's own input check (rank, ``d_in``, ``context_length``).
    """
    batch, max_tokens = (int(n) for n in batch_tokens)
    if batch < 1 or max_tokens < 1:
        raise ValueError(
            f"{owner}: a KV cache needs batch >= 1 and max_tokens >= 1, got (batch, max_tokens) = "
            f"({batch}, {max_tokens})"
        )


def check_cache_length(owner: str, max_tokens: int, context_length: int | None) -> None:
    """Refuse a KV cache longer than ``context_length``: its later positions are past the module's mask
    and, in grouped-query attention, past the RoPE table (whose rows would be clamped: a wrong angle)."""
    if context_length is not None and max_tokens > context_length:
        raise ValueError(
            f"{owner}: the KV cache holds max_tokens={max_tokens}, more than context_length={context_length} "
            "(the module's mask and RoPE table end there); make the cache for at most context_length tokens"
        )


def check_dropout_supported(owner: str, attention_impl: str, rate: float) -> None:
    """Refuse active dropout where the chosen implementation is ring attention.

    With dropout active the default core otherwise runs :func:`jaxattn.implementations.for_dropout` (one
    that forms the weights dropout acts on); for ``"ring"`` that would gather the whole sequence on every device,
    the opposite of what sequence sharding is for, so it is refused on every path (Linen, NNX,
    ``shard(...).apply`` and ``.call``, under ``jit`` or not).
    """
    if attention_impl == "ring":
        raise ValueError(
            f"{owner}: dropout={rate} is active (deterministic=False) but attention_impl='ring' (ring attention, "
            "shard mode 'sequence') has no dropout: it never forms the attention weights dropout acts on; "
            "run with deterministic=True, or unsharded for dropout"
        )


class KVCache(NamedTuple):
    """A KV cache's arrays: ``key``/``value`` ``(batch, max_tokens, kv_heads, head_dim)``, ``mask`` ``(batch,
    max_tokens)`` (False = padding), ``index`` (int32 scalar, the number of tokens cached)."""

    key: Array
    value: Array
    mask: Array
    index: Array  # type: ignore[assignment]  # shadows tuple.index; the field's name is public API


def key_mask(owner: str, attention_mask: ArrayLike, expected: tuple[int, ...]) -> Array:
    """``attention_mask`` checked against ``(batch, tokens)`` and made boolean."""
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != tuple(expected):
        raise ValueError(
            f"{owner}: attention_mask must be (batch, tokens) = {tuple(expected)}, got shape {attention_mask.shape}"
        )
    return attention_mask.astype(jnp.bool_) if attention_mask.dtype != jnp.bool_ else attention_mask


def append_to_cache(
    owner: str,
    cache: KVCache,
    keys: Float[Array, "batch chunk kv_heads head_dim"],
    values: Float[Array, "batch chunk kv_heads v_dim"],
    chunk_mask: Array | None,
) -> tuple[KVCache, Array]:
    """``(the cache with the chunk written at its index, the chunk's first position)``; a full cache raises."""
    batch, max_tokens, kv_heads, head_dim = cache.key.shape
    chunk = keys.shape[1]
    if keys.shape[0] != batch or keys.shape[2:] != (kv_heads, head_dim) or chunk > max_tokens:
        raise ValueError(
            f"{owner}: a chunk of keys {keys.shape} does not fit the cache "
            f"{cache.key.shape} (batch, max_tokens, kv_heads, head_dim)"
        )
    index = _check_room(cache.index, chunk, max_tokens, owner)
    if chunk_mask is None:
        chunk_mask = jnp.ones((batch, chunk), jnp.bool_)
    new = KVCache(
        lax.dynamic_update_slice(cache.key, keys.astype(cache.key.dtype), (0, index, 0, 0)),
        lax.dynamic_update_slice(cache.value, values.astype(cache.value.dtype), (0, index, 0, 0)),
        lax.dynamic_update_slice(cache.mask, chunk_mask, (0, index)),
        index + chunk,
    )
    return new, index


def call_attention(
    owner: str,
    queries: Float[Array, "batch q_tokens heads head_dim"],
    keys: Float[Array, "batch kv_tokens kv_heads head_dim"],
    values: Float[Array, "batch kv_tokens kv_heads v_dim"],
    *,
    key_mask: Array | None,
    is_causal: bool,
    q_offset,
    attention_fn: Callable[..., Any],
    attention_impl: str,
    precision: PrecisionLike,
    dropout_rate: float,
    dropout_rng,
) -> tuple[Float[Array, "batch q_tokens heads v_dim"], Float[Array, "batch heads q_tokens kv_tokens"] | None]:
    """``(context_vec, attn_weights or None)``: the attention call every multi-head shell makes.

    ``key_mask``: ``(batch, kv_tokens)``, True = a real key. ``dropout_rate > 0`` means dropout is
    active (then the default core runs :func:`jaxattn.implementations.for_dropout`, whose dropout is the
    book's). ``precision`` is passed on only when set, so ``jax.nn.dot_product_attention`` still works as
    ``attention_fn``.
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (b, 1, 1, S)
    extra: dict[str, Any] = {} if precision is None else {"precision": precision}
    if attention_fn is dot_product_attention:
        implementation = implementations.requested(attention_impl, dropout=dropout_rate > 0.0)
        return attention_with_weights(
            queries,
            keys,
            values,
            mask=mask,
            is_causal=is_causal,
            q_offset=q_offset,
            implementation=implementation,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            **extra,
        )  # (b, T, H, hd), (b, H, T, S) or None
    if attention_impl != "auto":
        raise ValueError(
            f"{owner}: attention_impl={attention_impl!r} chooses among "
            "jaxattn.dot_product_attention's implementations; with a custom attention_fn, choose inside it"
        )
    if is_causal and not (isinstance(q_offset, int) and q_offset == 0):
        # jax.nn's signature has no q_offset: the causal mask says it
        causal = make_offset_causal_mask(queries.shape[1], keys.shape[1], q_offset)[None, None]
        mask, is_causal = (causal if mask is None else mask & causal), False
    if dropout_rate > 0.0:
        extra.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return attention_fn(queries, keys, values, bias=None, mask=mask, is_causal=is_causal, **extra), None


def _check_room(index, chunk: int, max_tokens: int, owner: str):
    """``index``, checked to leave room for ``chunk`` more tokens: a full cache raises ``ValueError``.

    Eagerly the index is known and checked at once. Under ``jit`` or ``lax.scan`` it is traced and the check
    runs on the host as the step runs (:func:`jaxattn.checks.check_at_run_time`): a full cache stops the
    step instead of overwriting the cache (``dynamic_update_slice`` would clamp the write into its last
    slots), and ``jaxattn.checks.clean_errors`` raises it as the same ``ValueError``. A negative index
    (a cache written by hand) is refused too: the write would clamp to slot 0.
    """

    def problem(i):
        i = np.asarray(i)
        if np.any(i < 0):
            return f"{owner}: KV cache index {i.min()} is negative (the number of tokens cached starts at 0)"
        if np.any(i + chunk > max_tokens):
            return (
                f"{owner}: KV cache full: {i.max()} tokens cached + {chunk} new > max_tokens={max_tokens} "
                "(init the cache on a longer input)"
            )
        return None

    checked = check_at_run_time(index, problem)
    mark_range(checked, 0, max_tokens - chunk)  # the attention call's q_offset: checked once, here
    return checked
