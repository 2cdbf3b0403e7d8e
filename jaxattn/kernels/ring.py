"""Ring attention: one sequence split over the devices of a mesh axis, keys and values passed round the ring.

Each of the ``n`` devices on ``axis_name`` keeps its queries; the key/value blocks
travel round the ring with ``jax.lax.ppermute`` (device ``i`` sends to ``i + 1``), so
after ``n`` steps every query block has met every key block while no device ever
held more than two blocks of keys and values: memory per device is ``O(T / n)``.
Each step folds the block that arrived into an online softmax (running maximum
``m``, denominator ``l``, accumulator ``acc``, all float32 or wider, the maximum
subtracted before ``exp``), the loop of :mod:`jaxattn.kernels.blockwise` spread
over devices (Liu et al., "Ring Attention with Blockwise Transformers", 2023;
the ``scan`` + ``ppermute`` structure follows ``haoliuhl/ringattention``).

Token order, for balance under a causal mask. The padded sequence is cut into ``2n``
chunks of ``C`` tokens and device ``d`` holds chunks ``d`` and ``2n - 1 - d`` (the
"zig-zag" order of ``zhuzilin/ring-flash-attention``): then every device has the
same number of visible (query, key) pairs at every ring step, where the plain
order would leave device 0 idle after the first step and device ``n - 1`` busy at
all ``n``. Inputs arrive in the plain order, sharded contiguously along the
tokens; two ``ppermute`` calls per array move the chunks into zig-zag order and
two move the output back, so callers never see the reordering.

Inside a step the ``(2C, 2C)`` block pair is cut into ``(block, block)`` tiles;
a tile whose keys all lie after its last query (causal), or are all padding, is
skipped with ``lax.cond``, so blocks wholly above the causal diagonal cost nothing.

``T`` not divisible by ``2n``: the tokens are padded to ``2n * C`` and padded keys
are masked, padded queries sliced off, so the result is unchanged. Gradients are
JAX's autodiff through ``shard_map``, ``scan``, ``cond`` and ``ppermute`` (whose
transpose sends the cotangents back round the ring); the maximum is held out of
the gradient, as in the blockwise kernel.

Masks and bias (rank 4, broadcastable to ``(B, N, T, S)``) are passed to every
device whole (replicated) and each device gathers its own rows and, per step, the
columns of the block it holds: a key-padding mask ``(B, 1, 1, S)`` costs ``O(S)``,
a full ``(B, N, T, S)`` mask ``O(T x S)`` per device.

This kernel knows arrays and a mesh only; the mesh and axis come from its caller
(:mod:`jaxattn.sharding` supplies them to ``implementation="ring"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.lax import Precision
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float

from jaxattn.kernels.blockwise import online_softmax_step
from jaxattn.ops import accumulation_dtype, scale_queries

#: The largest query/key tile inside a ring step. Scores per tile: (B, N, 512, 512) float32,
#: 1 MiB per (batch x head) row; a chunk of C tokens is cut into ceil(C / 512) evened-out tiles.
MAX_BLOCK = 512


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` (JAX >= 0.6), or ``jax.experimental.shard_map.shard_map`` where that is all there is.

    Replication checking is off: the ring's ``scan``/``cond`` carries mix per-device
    (``axis_index``) and replicated values, which the checker cannot type.
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(f, mesh, in_specs, out_specs, check_rep=False)


def ring_layout(tokens: int, devices: int, max_block: int = MAX_BLOCK) -> tuple[int, int]:
    """``(chunk, block)``: the ``2 * devices`` chunks of ``chunk`` tokens cover ``tokens``, cut in tiles of ``block``.

    The tile is evened out and rounded up to 8 so the padding stays small:
    1000 tokens on 8 devices -> chunks of 64 (1024 padded), one tile each;
    65536 on 8 -> chunks of 4096, tiles of 512.
    """
    per_chunk = max(1, math.ceil(tokens / (2 * devices)))
    tiles = math.ceil(per_chunk / max_block)
    block = -(-math.ceil(per_chunk / tiles) // 8) * 8
    return tiles * block, block


def zigzag_positions(device, devices: int, chunk: int) -> Array:
    """Token positions held by ``device`` in zig-zag order, ``(2 * chunk,)``.

    Chunk ``device``, then chunk ``2n - 1 - device``.
    """
    offsets = jnp.arange(chunk, dtype=jnp.int32)
    device = jnp.asarray(device, jnp.int32)
    return jnp.concatenate([device * chunk + offsets, (2 * devices - 1 - device) * chunk + offsets])


def _owner(chunk_index: int, devices: int) -> int:
    """The device that holds chunk ``chunk_index`` in zig-zag order."""
    return chunk_index if chunk_index < devices else 2 * devices - 1 - chunk_index


def _to_zigzag(x: Array, axis_name: str, devices: int) -> Array:
    """Device ``d``'s contiguous chunks ``(2d, 2d + 1)`` -> its zig-zag chunks ``(d, 2n - 1 - d)``, along axis 1.

    Even chunks all travel by one permutation and odd chunks by another (each is a
    bijection of the devices); an even device receives its first chunk from the
    even permutation, an odd one from the odd permutation.
    """
    chunk = x.shape[1] // 2
    even = lax.ppermute(x[:, :chunk], axis_name, [(d, _owner(2 * d, devices)) for d in range(devices)])
    odd = lax.ppermute(x[:, chunk:], axis_name, [(d, _owner(2 * d + 1, devices)) for d in range(devices)])
    first_is_even = lax.axis_index(axis_name) % 2 == 0
    return jnp.concatenate([jnp.where(first_is_even, even, odd), jnp.where(first_is_even, odd, even)], axis=1)


def _from_zigzag(x: Array, axis_name: str, devices: int) -> Array:
    """The inverse of :func:`_to_zigzag`: zig-zag chunks back to device ``d``'s contiguous ``(2d, 2d + 1)``."""
    chunk = x.shape[1] // 2
    first_is_even = lax.axis_index(axis_name) % 2 == 0
    even = jnp.where(first_is_even, x[:, :chunk], x[:, chunk:])
    odd = jnp.where(first_is_even, x[:, chunk:], x[:, :chunk])
    even = lax.ppermute(even, axis_name, [(_owner(2 * d, devices), d) for d in range(devices)])
    odd = lax.ppermute(odd, axis_name, [(_owner(2 * d + 1, devices), d) for d in range(devices)])
    return jnp.concatenate([even, odd], axis=1)


def _grouped(x: Array | None, kv_heads: int, group: int) -> Array | None:
    """A ``(#B, #N, #T, #S)`` mask or bias as ``(#B, #K, #G, #T, #S)``, matching the grouped queries."""
    if x is None:
        return None
    b, n, t, s = x.shape
    return x.reshape(b, 1, 1, t, s) if n == 1 else x.reshape(b, kv_heads, group, t, s)


def _take(x: Array | None, positions: Array, axis: int, size: int) -> Array | None:
    """``x`` at ``positions`` (clamped to the real tokens) along ``axis``, unless ``x`` broadcasts there."""
    if x is None or x.shape[axis] == 1:
        return x
    return jnp.take(x, jnp.minimum(positions, size - 1), axis=axis)


def _tile(x: Array | None, axis: int, start, size: int) -> Array | None:
    if x is None or x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _fold(carry, q, k, v, q_pos, k_pos, mask, bias, *, tokens: int, is_causal: bool, block: int, precision=None):
    """Fold one key/value block into the online softmax of every local query, tile by tile.

    ``q``: ``(B, K, G, L, H)`` scaled queries; ``k``/``v``: ``(B, K, L, H)``/``(B, K, L, Hv)``;
    ``q_pos``/``k_pos``: ``(L,)`` token positions; ``mask``/``bias``: ``(#B, #K, #G, #L, #L)``
    for this block pair or ``None``. ``carry`` = ``(m, l, acc, seen)``: ``(B, K, G, L)`` twice and
    ``(B, K, G, L, Hv)`` in the accumulation dtype, and ``seen`` ``(B, K, G, L)`` bool: the row has met a
    visible key (what tells a row that saw nothing, zeros, from one whose visible scores were all
    ``-inf``, NaN: both end with ``l = 0``).
    """
    m_all, l_all, acc_all, seen_all = carry
    local = q.shape[3]
    tiles = local // block

    def query_tile(i):
        start = i * block
        q_i = lax.dynamic_slice_in_dim(q, start, block, axis=3)  # (B, K, G, bq, H)
        qp = lax.dynamic_slice_in_dim(q_pos, start, block)  # (bq,)
        mask_i, bias_i = _tile(mask, 3, start, block), _tile(bias, 3, start, block)
        tile_carry = tuple(lax.dynamic_slice_in_dim(c, start, block, axis=3) for c in (m_all, l_all, acc_all, seen_all))

        def step(c, j):
            kstart = j * block
            k_j = lax.dynamic_slice_in_dim(k, kstart, block, axis=2)  # (B, K, bk, H)
            v_j = lax.dynamic_slice_in_dim(v, kstart, block, axis=2)
            kp = lax.dynamic_slice_in_dim(k_pos, kstart, block)  # (bk,)
            m_j, b_j = _tile(mask_i, 4, kstart, block), _tile(bias_i, 4, kstart, block)
            return online_softmax_step(
                c, q_i, k_j, v_j, qp, kp, m_j, b_j, kv_tokens=tokens, is_causal=is_causal, precision=precision
            )

        def maybe_step(c, j):
            kp = lax.dynamic_slice_in_dim(k_pos, j * block, block)
            # A tile of only padded keys, or (causal) only keys after the tile's last query, changes nothing.
            run = kp.min() < tokens
            if is_causal:
                run = run & (kp.min() <= qp.max())
            return lax.cond(run, step, lambda c, _: c, c, j), None

        out, _ = lax.scan(maybe_step, tile_carry, jnp.arange(tiles))
        return out

    m, l, acc, seen = lax.map(query_tile, jnp.arange(tiles))  # (tiles, B, K, G, bq), ..., (tiles, B, K, G, bq, Hv)

    def untile(x):  # (tiles, B, K, G, bq, ...) -> (B, K, G, tiles * bq, ...)
        x = jnp.moveaxis(x, 0, 3)
        return x.reshape(*x.shape[:3], local, *x.shape[5:])

    return untile(m), untile(l), untile(acc), untile(seen)


@dataclass(frozen=True)
class _Ring:
    """What every device of one ring call knows: the mesh axis, the zig-zag layout and the call's options."""

    axis_name: str
    devices: int
    chunk: int  # tokens per zig-zag chunk: each device holds chunks d and 2n - 1 - d
    block: int  # key block of the per-device fold
    tokens: int  # the real (unpadded) sequence length
    scale: float
    is_causal: bool
    precision: Precision | None
    kv_heads: int
    group: int  # query heads per kv head
    acc_dtype: Any


def _ring_device(ring: _Ring, q, k, v, mask, bias):
    """One device: ``q``/``k``/``v`` ``(B, 2C, h, d)``, chunks ``2d`` and ``2d + 1``; mask/bias whole.

    Folds its own keys, then the ``n - 1`` key chunks passed around the ring; returns its context rows.
    """
    batch, _, heads, head_dim = q.shape
    dv = v.shape[-1]
    devices, chunk, tokens, kv_heads, group = ring.devices, ring.chunk, ring.tokens, ring.kv_heads, ring.group
    me = lax.axis_index(ring.axis_name)
    q, k, v = (_to_zigzag(x, ring.axis_name, devices) for x in (q, k, v))
    q_pos = zigzag_positions(me, devices, chunk)  # (2C,)
    q = scale_queries(q, ring.scale).reshape(batch, 2 * chunk, kv_heads, group, head_dim)
    q = q.transpose(0, 2, 3, 1, 4)  # (B, K, G, 2C, H)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (B, K, 2C, H), (B, K, 2C, Hv)
    mask_rows = _take(_grouped(mask, kv_heads, group), q_pos, 3, tokens)  # (#B, #K, #G, #2C, #T)
    bias_rows = _take(_grouped(bias, kv_heads, group), q_pos, 3, tokens)

    def fold(carry, k, v, source):
        k_pos = zigzag_positions(source, devices, chunk)
        return _fold(
            carry,
            q,
            k,
            v,
            q_pos,
            k_pos,
            _take(mask_rows, k_pos, 4, tokens),
            _take(bias_rows, k_pos, 4, tokens),
            tokens=tokens,
            is_causal=ring.is_causal,
            block=ring.block,
            precision=ring.precision,
        )

    carry = fold(_empty_carry((batch, kv_heads, group, 2 * chunk), dv, ring.acc_dtype), k, v, me)
    neighbours = [(d, (d + 1) % devices) for d in range(devices)]

    def ring_step(state, s):
        carry, k, v = state
        k, v = lax.ppermute(k, ring.axis_name, neighbours), lax.ppermute(v, ring.axis_name, neighbours)
        return (fold(carry, k, v, (me - s) % devices), k, v), None

    (carry, _, _), _ = lax.scan(ring_step, (carry, k, v), jnp.arange(1, devices))
    _, l, acc, seen = carry
    # Zeros for a row that saw no key; IEEE's answer (NaN included: l NaN, or 0 / 0) for any other.
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0).astype(v.dtype)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, 2 * chunk, heads, dv)  # (B, 2C, N, Hv)
    return _from_zigzag(out, ring.axis_name, devices)


def _empty_carry(shape: tuple[int, ...], dv: int, acc_dtype):
    """The online softmax's start for rows ``shape``: max -inf, sum 0, accumulator 0 ``(*shape, dv)``, nothing seen."""
    return (
        jnp.full(shape, -jnp.inf, acc_dtype),
        jnp.zeros(shape, acc_dtype),
        jnp.zeros((*shape, dv), acc_dtype),
        jnp.zeros(shape, jnp.bool_),
    )


def ring_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B T K H"],
    value: Float[Array, "B T K Hv"],
    bias: Float[Array, "#B #N #T #T"] | None = None,
    mask: Bool[Array, "#B #N #T #T"] | None = None,
    *,
    scale: float,
    is_causal: bool = False,
    mesh: Mesh,
    axis_name: str,
    max_block: int = MAX_BLOCK,
    precision: Precision | None = None,
) -> Float[Array, "B T N Hv"]:
    """Self-attention over one sequence sharded along ``axis_name`` of ``mesh``: ``softmax(q k^T * scale + bias) v``.

    Same semantics as :func:`jaxattn.kernels.blockwise.general_blockwise_attention` for
    ``T == S`` and ``q_offset = 0`` (grouped kv heads, boolean mask with True = attend,
    additive bias, causal or not; a row with no visible key gives zeros). The result is
    sharded like the queries (tokens along ``axis_name``). ``precision`` goes to both products.
    """
    if axis_name not in mesh.shape:
        raise ValueError(f"ring_attention: axis {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    batch, tokens, heads, head_dim = query.shape
    kv_heads, dv = key.shape[2], value.shape[-1]
    if key.shape[1] != tokens:
        raise ValueError(
            f"ring_attention: self-attention over one sharded sequence needs as many keys as queries, "
            f"got query {query.shape}, key {key.shape}"
        )
    if tokens == 0:
        return jnp.zeros((batch, 0, heads, dv), value.dtype)
    devices = int(mesh.shape[axis_name])
    chunk, block = ring_layout(tokens, devices, max_block)
    padded = 2 * devices * chunk
    group = heads // kv_heads
    acc_dtype = accumulation_dtype(query.dtype)

    def pad(x):  # (B, T, h, d) -> (B, padded, h, d)
        return jnp.pad(x, ((0, 0), (0, padded - tokens), (0, 0), (0, 0)))

    ring = _Ring(axis_name, devices, chunk, block, tokens, scale, is_causal, precision, kv_heads, group, acc_dtype)
    has_mask, has_bias = mask is not None, bias is not None

    def local(q, k, v, *extra):
        rest = list(extra)
        mask = rest.pop(0) if has_mask else None
        bias = rest.pop(0) if has_bias else None
        return _ring_device(ring, q, k, v, mask, bias)

    tokens_spec = PartitionSpec(None, axis_name, None, None)
    whole = [x for x in (mask, bias) if x is not None]  # replicated: each device gathers its rows and columns
    run = shard_map(local, mesh, in_specs=(tokens_spec,) * 3 + (PartitionSpec(),) * len(whole), out_specs=tokens_spec)
    return run(pad(query), pad(key), pad(value), *whole)[:, :tokens]


__all__ = ["MAX_BLOCK", "ring_attention", "ring_layout", "shard_map", "zigzag_positions"]
