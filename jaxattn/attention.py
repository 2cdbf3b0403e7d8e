"""``dot_product_attention``: the one attention core under every jaxattn layer.

Same argument names, layout and semantics as ``jax.nn.dot_product_attention``, so
one can be swapped for the other; the work is done by an implementation from
:mod:`jaxattn.implementations`. This module checks the call, fills in the
defaults, picks the implementation and calls it; it computes nothing itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from jaxattn import implementations

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

    Differences from ``jax.nn.dot_product_attention``: a query row that sees no
    key (every key masked, or a ``-inf`` bias on all of them) returns **zeros**,
    never NaN and never the mean of the values; ``value`` may have its own head
    dim and dtype where the implementation allows; there is ``q_offset`` and
    dropout; the logits and softmax are computed in ``promote_types(dtype, float32)``.
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
    q_offset = _check_q_offset(q_offset)
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
        scale=head_dim**-0.5 if scale is None else scale,
        is_causal=bool(is_causal),
        q_offset=q_offset,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        precision=_check_precision(precision),
    )
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
    if kv_heads < 1 or heads % kv_heads:
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


def _check_q_offset(q_offset: QOffset) -> QOffset:
    if isinstance(q_offset, (int, np.integer)) and not isinstance(q_offset, bool):
        if q_offset < 0:
            raise ValueError(f"dot_product_attention: q_offset must be >= 0, got {q_offset}")
        return int(q_offset)
    offset = jnp.asarray(q_offset)
    if offset.ndim != 0 or not jnp.issubdtype(offset.dtype, jnp.integer):
        raise ValueError(
            f"dot_product_attention: q_offset must be an integer scalar, got {offset.dtype} {offset.shape}"
        )
    return offset


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
