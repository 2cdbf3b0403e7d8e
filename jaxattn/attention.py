"""``dot_product_attention``: the one attention core under every jaxattn layer.

Same argument names, layout and semantics as ``jax.nn.dot_product_attention``, so
one can be swapped for the other; the work is done by an implementation from
:mod:`jaxattn.implementations`. This module checks the call, fills in the
defaults, picks the implementation and calls it; it computes nothing itself but
what a kernel that skips causal blocks leaves out (:func:`_values_every_row_reads`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from jaxattn import implementations
from jaxattn.checks import check_at_run_time, known_range

QOffset = int | Int[Array, ""]
#: ``jax.lax.Precision``, one of its names, or ``None`` (JAX's default for the backend).
PrecisionLike = str | jax.lax.Precision | None


def dot_product_attention(
    query: Float[Array, "*B T N H"],
    key: Float[Array, "*B S K H"],
    value: Float[Array, "*B S K Hv"],
    bias: Float[Array, "..."] | None = None,
    mask: Bool[Array, "..."] | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    q_offset: QOffset = 0,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    precision: PrecisionLike = None,
) -> Float[Array, "*B T N Hv"]:
    """Scaled dot-product attention, ``softmax(q @ k.T * scale + bias, where=mask) @ v``.

    Args:
      query: ``(batch, T, N, H)``, or ``(T, N, H)`` without a batch axis.
      key: ``(batch, S, K, H)``; ``K`` may be fewer heads than ``N`` (grouped-query
        attention, ``N % K == 0``): query head ``i`` reads kv head ``i // (N // K)``,
        the order of torch's ``repeat_interleave``. Keys and values are never
        copied per query head.
      value: ``(batch, S, K, Hv)``.
      bias: added to the scaled logits; broadcastable to ``(batch, N, T, S)``.
      mask: boolean, ``True`` = attend; broadcastable to ``(batch, N, T, S)``.
      scale: multiplies the logits; default ``1 / sqrt(H)``.
      is_causal: query ``i`` attends keys ``j <= q_offset + i`` only.
      q_offset: the position of the first query among the keys (an ``int`` or a
        traced integer scalar): what a KV cache needs, where ``T`` new queries
        follow ``S - T`` cached keys. Not in ``jax.nn``; ``0`` is its behaviour.
      implementation: a name from :func:`jaxattn.implementations.names`
        (``"naive"``, ``"blockwise"``, ``"xla"``, or one registered later), or
        ``None``/``"auto"`` to pick by platform, dtype and length. A named
        implementation that cannot serve the call raises ``ValueError`` saying why.
      dropout_rate, dropout_rng: dropout on the attention weights (Flax's names),
        served by implementations that materialise the weights (``naive``).
      precision: the matmul precision of both products (``q @ k.T`` and ``weights @ v``),
        as ``jax.lax.Precision`` or its names (``"default"``, ``"high"``, ``"highest"``), the
        Flax convention. ``None`` follows ``jax_default_matmul_precision``, which on a GPU
        means TF32 for float32 (a 10-bit mantissa): pass ``"highest"`` for float32 products.
        Kernels that call a library (``cudnn``) ignore it: cuDNN runs bf16/fp16 only.

    Returns:
      ``(batch, T, N, Hv)`` (or ``(T, N, Hv)``), in ``value``'s dtype.

    Edge shapes, the same from every implementation: ``T = 0`` gives an empty
    ``(batch, 0, N, Hv)``; ``S = 0`` gives zeros ``(batch, T, N, Hv)`` (no row sees
    a key); ``T = S = 1`` (causal or not) gives the value itself.

    Non-finite numbers, the same from every implementation: NaN in, NaN out, by IEEE arithmetic as
    ``jax.nn`` computes it. A row sees the keys its mask, causality (with ``q_offset``) and bias leave
    it; a ``-inf`` bias entry masks its key. (1) A row that sees no key returns **zeros**, whatever the
    inputs hold. (2) A masked score is never read (a NaN key or bias entry at a masked position does
    not reach the row), but every value is multiplied by its weight, 0 for a masked key, and ``0 x NaN``
    is NaN: a non-finite ``value[..., j, h, d]`` makes column ``d`` NaN in every row (that sees a key)
    of the heads reading kv head ``h``, masked ``j`` or not. (3) Otherwise the softmax over the seen
    scores is IEEE's: NaN in the row's query or in a key or bias entry it sees, a ``+inf`` score, or
    scores that are all ``-inf`` (a ``-inf`` query row: ``-inf * k`` is ``-inf``, ``+inf`` or NaN) give
    a NaN row; a ``-inf`` score beside finite ones gets weight 0.

    Differences from ``jax.nn.dot_product_attention``: a query row that sees no
    key (every key masked, or a ``-inf`` bias on all of them) returns **zeros**,
    never NaN and never the mean of the values; a row whose seen scores are all
    ``-inf`` is NaN (jax.nn's finite fill of masked scores gives the mean of the
    masked values); ``value`` may have its own head dim and dtype where the
    implementation allows; there is ``q_offset`` and dropout; the logits and
    softmax are computed in ``promote_types(dtype, float32)``.

    ``q_offset`` must keep the queries among the keys: ``0 <= q_offset`` and ``q_offset + T <= S``
    (``0`` is always allowed, jax.nn's top-left alignment, also for ``T > S``); a static one is checked
    at once, a traced one when the program runs (``ValueError``; under ``jit`` see
    :class:`jaxattn.checks.clean_errors`). ``head_dim``, the value head dim and both head counts must
    be at least 1.
    """
    return attention_with_weights(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        q_offset=q_offset,
        implementation=implementation,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        precision=precision,
    )[0]


def attention_with_weights(
    query: Float[Array, "*B T N H"],
    key: Float[Array, "*B S K H"],
    value: Float[Array, "*B S K Hv"],
    bias: Float[Array, "..."] | None = None,
    mask: Bool[Array, "..."] | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    q_offset: QOffset = 0,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    precision: PrecisionLike = None,
) -> tuple[Float[Array, "*B T N Hv"], Float[Array, "*B N T S"] | None]:
    """:func:`dot_product_attention` plus the attention weights (before dropout) when the implementation has them.

    The modules call this to sow ``attn_weights``; the weights are ``None`` for the
    implementations that never materialise them.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    unbatched = _check_qkv(query, key, value)
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    batch, q_tokens, heads, head_dim = query.shape
    kv_tokens, kv_heads = key.shape[1], key.shape[2]
    target = (batch, heads, q_tokens, kv_tokens)
    bias = None if bias is None else _as_rank4(jnp.asarray(bias), "bias", target)
    mask = None if mask is None else _as_rank4(jnp.asarray(mask), "mask", target)
    if mask is not None and mask.dtype != jnp.bool_:
        raise ValueError(f"dot_product_attention: mask must be boolean (True = attend), got dtype {mask.dtype}")
    q_offset = _check_q_offset(q_offset, q_tokens, kv_tokens)
    scale = _check_scale(scale, head_dim)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dot_product_attention: dropout_rate must be in [0, 1), got {dropout_rate}")
    dropout = dropout_rate > 0.0
    if dropout and dropout_rng is None:
        raise ValueError("dot_product_attention: dropout_rate > 0 needs a dropout_rng (the 'dropout' stream)")
    call = implementations.Call(
        platform=_platform(query),
        dtype=str(query.dtype),
        batch=batch,
        q_tokens=q_tokens,
        kv_tokens=kv_tokens,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        value_head_dim=value.shape[-1],
        has_mask=mask is not None,
        has_bias=bias is not None,
        is_causal=bool(is_causal),
        q_offset=not (isinstance(q_offset, int) and q_offset == 0),
        dropout=dropout,
        same_dtypes=query.dtype == key.dtype == value.dtype,
    )
    chosen = implementations.select(implementation, call)
    out, weights = chosen.kernel(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=bool(is_causal),
        q_offset=q_offset,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        precision=_check_precision(precision),
    )
    if is_causal and not chosen.every_value:
        seen = _rows_seeing_a_key(bias, mask, bool(is_causal), q_offset, target)
        out = _values_every_row_reads(out, value, seen)
    if unbatched:
        out, weights = out[0], None if weights is None else weights[0]
    return out, weights


def _platform(query) -> str:
    """Where the call runs, for ``auto`` and the platform checks: ``"cpu"``, ``"gpu"``, ``"tpu"``.

    A concrete array's device; inside ``jit``, ``jax.default_device`` where one is set (arrays put on the
    host of a GPU machine must not get a GPU kernel), else JAX's default backend.
    """
    if isinstance(query, jax.Array) and not isinstance(query, jax.core.Tracer):
        return next(iter(query.devices())).platform
    device = jax.config.jax_default_device  # type: ignore[attr-defined]  # a dynamic option jax's stubs omit
    if device is None:
        return jax.default_backend()
    platform = device if isinstance(device, str) else device.platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def _check_qkv(query, key, value) -> bool:
    """Raise ``ValueError`` naming the shapes unless they fit; ``True`` when unbatched (rank 3)."""
    shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
    if not query.ndim == key.ndim == value.ndim or query.ndim not in (3, 4):
        raise ValueError(
            "dot_product_attention: query, key and value must all be (batch, tokens, heads, head_dim) "
            f"or all (tokens, heads, head_dim); got {shapes}"
        )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"dot_product_attention: key and value must agree on (batch, tokens, kv_heads); got {shapes}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"dot_product_attention: query and key must share head_dim; got {shapes}")
    if query.ndim == 4 and query.shape[0] != key.shape[0]:
        raise ValueError(f"dot_product_attention: query and key must share the batch size; got {shapes}")
    heads, kv_heads = query.shape[-2], key.shape[-2]
    # Each is a divisor (the scale is head_dim ** -0.5, the group is heads // kv_heads) or an empty axis
    # that no kernel can tile: a ZeroDivisionError or an empty result is no answer.
    for name, size in (("head_dim", query.shape[-1]), ("query heads", heads), ("key/value heads", kv_heads)):
        if size < 1:
            raise ValueError(f"dot_product_attention: {name} must be >= 1, got {size}; got {shapes}")
    if value.shape[-1] < 1:
        raise ValueError(f"dot_product_attention: value head_dim must be >= 1, got {value.shape[-1]}; got {shapes}")
    if heads % kv_heads:
        raise ValueError(
            f"dot_product_attention: query heads ({heads}) must be a multiple of key/value heads ({kv_heads}); "
            f"got {shapes}"
        )
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"dot_product_attention: {name} must be floating point, got dtype {x.dtype}")
    return query.ndim == 3


def _as_rank4(x: Array, name: str, target: tuple[int, int, int, int]) -> Array:
    """``x`` with leading axes added up to rank 4, checked to broadcast to ``target`` (batch, N, T, S)."""
    if x.ndim > 4:
        raise ValueError(f"dot_product_attention: {name} must have rank <= 4, got shape {x.shape}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if any(d not in (1, t) for d, t in zip(x.shape, target, strict=True)):
        raise ValueError(
            f"dot_product_attention: {name} of shape {x.shape} does not broadcast to "
            f"(batch, heads, q_tokens, kv_tokens) = {target}"
        )
    return x


def _check_q_offset(q_offset: QOffset, q_tokens: int, kv_tokens: int) -> QOffset:
    """``q_offset`` checked against the call's ``T`` queries and ``S`` keys: ``0 <= q_offset <= max(S - T, 0)``.

    The queries are positions ``q_offset .. q_offset + T - 1`` among the keys, so an offset must keep them
    there (``q_offset + T <= S``); ``0`` is always allowed, as jax.nn's causal alignment (top left, also
    for ``T > S``). A static offset is checked now; a traced one when the program runs
    (:func:`jaxattn.checks.check_at_run_time`), unless a KV cache's check already bounds it.
    """
    high = max(kv_tokens - q_tokens, 0)

    def problem(offset) -> str | None:
        offset = np.asarray(offset)
        where = f"T={q_tokens} query tokens at positions q_offset .. q_offset + T - 1 among S={kv_tokens} keys"
        if np.any(offset < 0):
            return f"dot_product_attention: q_offset must be >= 0, got {offset.min()} ({where})"
        if np.any(offset > high):
            return (
                f"dot_product_attention: q_offset={offset.max()} puts the last query at position "
                f"{offset.max() + q_tokens - 1}, past the S={kv_tokens} keys: q_offset + T must be <= S, "
                f"or q_offset 0 ({where})"
            )
        return None

    if isinstance(q_offset, (int, np.integer)) and not isinstance(q_offset, bool):
        message = problem(q_offset)
        if message is not None:
            raise ValueError(message)
        return int(q_offset)
    checked = known_range(q_offset)
    offset = jnp.asarray(q_offset)
    if offset.ndim != 0 or not jnp.issubdtype(offset.dtype, jnp.integer):
        raise ValueError(
            f"dot_product_attention: q_offset must be an integer scalar, got {offset.dtype} {offset.shape}"
        )
    if checked is not None and checked[0] >= 0 and checked[1] <= high:
        return q_offset  # a KV cache's index, already checked to leave room for these queries
    return check_at_run_time(offset, problem)


def _check_scale(scale: float | None, head_dim: int) -> float:
    """``scale``, default ``1 / sqrt(head_dim)``; a NaN or infinite one is a ``ValueError`` (it makes every score
    non-finite: NaN out of finite input)."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, (int, float, np.number)) and not np.isfinite(scale):
        raise ValueError(f"dot_product_attention: scale must be finite, got {scale}")
    return scale


def _values_every_row_reads(out: Array, value: Array, seen: Array) -> Array:
    """``out`` with NaN in the columns where a value is non-finite, for the rows that see a key.

    jax.nn (and IEEE arithmetic) multiplies every value by its weight, a masked key's weight 0 included,
    and ``0 x NaN`` or ``0 x inf`` is NaN: a non-finite ``value[b, j, h, d]`` makes column ``d`` of every row
    of the heads reading kv head ``h`` NaN. A kernel that skips the key blocks a causal mask hides never
    multiplies those values; this puts back what the product would have given. One read of ``value``
    (``O(S x Hv)``), only for such kernels (:attr:`jaxattn.implementations.Implementation.every_value`).
    """
    batch, q_tokens, heads, value_dim = out.shape
    kv_heads = value.shape[2]
    bad = ~jnp.all(jnp.isfinite(value), axis=1)  # (B, K, Hv): a column with a non-finite entry
    bad = jnp.broadcast_to(bad[:, :, None, :], (batch, kv_heads, heads // kv_heads, value_dim))
    bad = bad.reshape(batch, 1, heads, value_dim)  # query head n reads kv head n // G
    return jnp.where(bad & seen[..., None], jnp.asarray(jnp.nan, out.dtype), out)


def _rows_seeing_a_key(bias, mask, is_causal: bool, q_offset, shape: tuple[int, int, int, int]) -> Array:
    """``(B, T, N)`` or broadcastable: which query rows see at least one key (the others give zeros).

    Every row sees key 0 under causality alone (``q_offset >= 0`` is checked), so only a mask or a bias
    needs the ``(T, S)`` reduction.
    """
    batch, heads, q_tokens, kv_tokens = shape
    if kv_tokens == 0:
        return jnp.zeros((), jnp.bool_)
    if mask is None and bias is None:
        return jnp.ones((), jnp.bool_)
    visible = jnp.ones((1, 1, 1, 1), jnp.bool_) if mask is None else mask
    if bias is not None:
        visible = visible & (bias != -jnp.inf)
    if is_causal:
        visible = visible & (jnp.arange(kv_tokens) <= jnp.asarray(q_offset) + jnp.arange(q_tokens)[:, None])
    seen = jnp.any(visible, axis=-1)  # (#B, #N, #T)
    return jnp.broadcast_to(seen, (batch, heads, q_tokens)).swapaxes(1, 2)  # (B, T, N)


def _check_precision(precision: PrecisionLike) -> jax.lax.Precision | None:
    """``precision`` as a ``jax.lax.Precision`` (or ``None``); a ``ValueError`` naming the choices otherwise."""
    if precision is None or isinstance(precision, jax.lax.Precision):
        return precision
    if isinstance(precision, str):
        try:
            return jax.lax.Precision(precision.lower())
        except ValueError:
            pass
    raise ValueError(
        f"dot_product_attention: precision must be None, a jax.lax.Precision or one of "
        f"'default', 'high', 'highest'; got {precision!r}"
    )
