"""The flash kernel: FlashAttention-2 in Pallas, forward and a ``custom_vjp`` backward.

What it is for: float32 attention on a GPU (cuDNN runs bf16/fp16 only) and whatever
cuDNN refuses, without the ``(T, S)`` scores (the ``xla`` kernel holds them: 18.5 GB at
16384 tokens, 12 heads) and without a ``lax`` loop per block (the ``blockwise`` kernel,
4.65 ms against torch's 0.17 ms at 8 x 1024 tokens on an H200, from an earlier GPU report).

The algorithm (Dao, "FlashAttention-2", 2023), as in JAX's own Triton example
(``jax/experimental/pallas/ops/gpu/attention.py``), written for reading:

* **forward**, one program per ``(batch, head, query block)``: the query block stays
  put while the key/value blocks stream past; an online softmax keeps the running row
  maximum ``m``, denominator ``l`` and unnormalised output ``acc`` (all float32); with
  ``is_causal`` the loop stops at the last key block the block's last query can see
  (blocks above the diagonal, shifted by ``q_offset``, are skipped, not masked). It also writes the row
  log-sum-exp ``lse = m + log(l)``, the one residual the backward needs besides q, k, v, o.
* **backward**, two kernels that recompute the weights ``p = exp(q k^T - lse)`` block by
  block instead of storing them: ``dq`` per query block (streaming key blocks), ``dk, dv``
  per key block (streaming the query blocks that can see it, for every query head that
  reads this kv head: grouped-query attention needs no copies of k and v).
  ``delta = rowsum(o * do)`` comes first, in plain JAX. With a bias, a third kernel over
  the bias's own blocks gives ``dbias``: ``ds`` summed over the axes the bias broadcasts along.

The kernel reads its blocks with plain ``ref[...]`` indexing, so one source serves the
GPU (Pallas lowers it to Triton) and the CPU (``interpret=True``, how the tests run it).
The wrapper pads the tokens to whole blocks (padded keys are masked, padded queries sliced
off) and the head dims to a power of two >= 16 (zeros change no score; Triton's ``dot``
wants such sizes). The scale goes on the queries before the kernel, as in every jaxattn
kernel (:func:`jaxattn.ops.scale_queries`), so the kernel itself never scales.

Supported: causal or not, with a ``q_offset`` (static or traced: it is a ``(1,)`` array
input, and causal block skipping follows it), a boolean mask and an additive bias (with its
gradient), each broadcastable to ``(B, N, T, S)`` and read tile by tile through its own
BlockSpecs (size-1 axes at index 0, so a ``(B, 1, 1, S)`` key-padding mask is never
broadcast), grouped kv heads, a value head dim of its own. A row with no visible key gives
zeros and zero gradients (``lse = +inf``); any other row IEEE's answer, NaN included. Not supported:
dropout (``naive``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxtyping import Array, Bool, Float

from jaxattn.ops import scale_queries

#: The longest query and key blocks on a GPU (JAX's Triton example uses 128 x 128 forward); the
#: tests pass small blocks to cover several blocks in interpret mode.
BLOCK_Q = 128
BLOCK_K = 128
#: The longest blocks of the backward kernels (JAX's example: 32 x 32 keeps dk, dv and a q block in registers).
BLOCK_Q_BACKWARD = 64
BLOCK_K_BACKWARD = 64
#: The bytes one ``(block, head dim)`` tile may take, forward and backward: Triton stages the dot's
#: operands in shared memory (228 KB per SM on an H100, NVIDIA's figure), twice over with two pipeline
#: stages, and the backward keeps dk and dv in registers. 128 x 64 float32 (d=768, 12 heads) is 32 KiB,
#: JAX's example.
TILE_BYTES = 32 * 1024
TILE_BYTES_BACKWARD = 16 * 1024
#: The largest head dim taken: a query block and a key/value block must fit in on-chip memory.
MAX_HEAD_DIM = 256


def flash_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    bias: Float[Array, "#B #N #T #S"] | None = None,
    mask: Bool[Array, "#B #N #T #S"] | None = None,
    *,
    scale: float,
    is_causal: bool = False,
    q_offset=0,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    precision: lax.Precision | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    backward_blocks: tuple[int, int] | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T N Hv"], None]:
    """The kernel behind ``implementation="flash"`` (GPU): ``(context, None)``.

    ``mask`` (``True`` = attend) and ``bias`` (added to the scaled scores) are rank 4 and
    broadcastable to ``(B, N, T, S)``; their size-1 axes stay size 1 (the kernels read them
    at index 0), so a ``(B, 1, 1, S)`` key-padding mask is never copied out to the scores'
    shape. ``q_offset`` (an int or a traced scalar) shifts the causal diagonal: query ``i``
    sits at position ``q_offset + i`` among the keys; it enters the kernels as a ``(1,)``
    array, so one compiled kernel serves every decode step. ``interpret=True`` runs the
    same kernel through Pallas' interpreter on any backend (correct on a CPU, and slow:
    how the tests check it, not a way to run fast).

    ``block_q``, ``block_k`` and ``backward_blocks`` (powers of two >= 16) default to
    :func:`default_blocks` of the padded head dim and the dtype.
    """
    if dropout_rate:
        raise ValueError("flash_attention: no dropout (use the naive kernel)")
    defaults = default_blocks(_pow2_at_least(max(query.shape[-1], value.shape[-1])), jnp.dtype(query.dtype).itemsize)
    block_q = defaults[0] if block_q is None else block_q
    block_k = defaults[1] if block_k is None else block_k
    backward_blocks = defaults[2] if backward_blocks is None else backward_blocks
    for name, size in (
        ("block_q", block_q),
        ("block_k", block_k),
        ("backward_blocks", backward_blocks[0]),
        ("backward_blocks", backward_blocks[1]),
    ):
        if size < 16 or size & (size - 1):  # Triton's dot wants powers of two >= 16; so do the block divisions
            raise ValueError(f"flash_attention: {name} must be powers of two >= 16, got {size}")
    batch, q_tokens, heads, head_dim = query.shape
    kv_tokens, value_dim = key.shape[1], value.shape[-1]
    full_shape = (batch, heads, q_tokens, kv_tokens)
    for what, x in (("mask", mask), ("bias", bias)):
        if x is not None and (
            x.ndim != 4 or any(m not in (1, full) for m, full in zip(x.shape, full_shape, strict=True))
        ):
            raise ValueError(
                f"flash_attention: {what} must be rank 4 and broadcastable to {full_shape}, got shape {x.shape}"
            )
    if q_tokens == 0 or kv_tokens == 0:  # no query, or no key for any query: zeros (no blocks to cut)
        return jnp.zeros((batch, q_tokens, heads, value_dim), value.dtype), None
    bq = min(block_q, _pow2_at_least(q_tokens))
    bk = min(block_k, _pow2_at_least(kv_tokens))
    # The backward blocks divide the forward ones' padded lengths: every padding is a multiple of both.
    bq_bwd, bk_bwd = min(backward_blocks[0], bq), min(backward_blocks[1], bk)
    padded_q, padded_kv = _round_up(q_tokens, bq), _round_up(kv_tokens, bk)
    q = _pad(scale_queries(query, scale), padded_q)  # (B, T', N, H'), scaled
    k, v = _pad(key, padded_kv), _pad(value, padded_kv)  # (B, S', K, H'), (B, S', K, Hv')
    mask_full = bias_full = None
    if mask is not None:
        mask_full = _spelled_out(mask.shape)  # which axes the mask spells out
        # int8, not bool: Triton loads bytes; padded positions are masked (the T padding is sliced off).
        mask = _pad_tokens(mask.astype(jnp.int8), mask_full, padded_q, padded_kv)
    if bias is not None:
        bias_full = _spelled_out(bias.shape)
        bias = _pad_tokens(bias, bias_full, padded_q, padded_kv)
    offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    config = _Config(
        causal=bool(is_causal),
        kv_tokens=kv_tokens,
        block_q=bq,
        block_k=bk,
        block_q_bwd=bq_bwd,
        block_k_bwd=bk_bwd,
        precision=precision,
        interpret=bool(interpret),
        mask=mask_full,
        bias=bias_full,
    )
    out = _flash(q, k, v, bias, mask, offset, config)  # (B, T', N, Hv')
    return out[:, :q_tokens, :, :value_dim], None


def _spelled_out(shape: tuple[int, ...]) -> tuple[bool, bool, bool, bool]:
    """Per ``(B, N, T, S)`` axis of a rank-4 mask or bias: spelled out (else size 1)."""
    b, n, t, s = (m != 1 for m in shape)
    return b, n, t, s


@dataclass(frozen=True)
class _Config:
    """The static choices of one call (hashable: ``custom_vjp`` holds it as a non-differentiable argument)."""

    causal: bool
    kv_tokens: int  # keys at and past this position are padding
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    precision: lax.Precision | None
    interpret: bool
    mask: tuple[bool, bool, bool, bool] | None = None  # per (B, N, T, S) axis: spelled out (else size 1)
    bias: tuple[bool, bool, bool, bool] | None = None  # the same for the bias


def default_blocks(head_dim: int, itemsize: int) -> tuple[int, int, tuple[int, int]]:
    """``(block_q, block_k, backward_blocks)`` whose ``(block, head_dim)`` tiles fit :data:`TILE_BYTES`.

    float32: 128 / 64 at head dim 64, 64 / 32 at 128, 32 / 16 at 256; bfloat16 twice that, at most
    :data:`BLOCK_Q` / :data:`BLOCK_Q_BACKWARD`.
    """

    def fit(limit: int, budget: int) -> int:
        return max(16, min(limit, _pow2_at_most(budget // (head_dim * itemsize))))

    forward, backward = fit(BLOCK_Q, TILE_BYTES), fit(BLOCK_Q_BACKWARD, TILE_BYTES_BACKWARD)
    return (forward, min(BLOCK_K, forward), (backward, min(BLOCK_K_BACKWARD, backward)))


def _pow2_at_most(n: int) -> int:
    return 1 << max(n, 1).bit_length() - 1


def _pow2_at_least(n: int, smallest: int = 16) -> int:
    return max(smallest, 1 << (n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(x: Array, tokens: int) -> Array:
    """``(B, t, K, d)`` zero-padded to ``(B, tokens, K, d')``, ``d'`` a power of two >= 16."""
    dim = _pow2_at_least(x.shape[-1])
    return jnp.pad(x, ((0, 0), (0, tokens - x.shape[1]), (0, 0), (0, dim - x.shape[-1])))


def _pad_tokens(x: Array, full, padded_q: int, padded_kv: int) -> Array:
    """A ``(#B, #N, #T, #S)`` mask or bias zero-padded to whole blocks along its spelled-out T and S axes."""
    return jnp.pad(
        x, ((0, 0), (0, 0), (0, padded_q - x.shape[2] if full[2] else 0), (0, padded_kv - x.shape[3] if full[3] else 0))
    )


def _dot(a, b, precision, *, trans_b: bool = False, trans_a: bool = False):
    """``a @ b`` (``a.T``/``b.T`` on request) with float32 accumulation at ``precision``."""
    contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _visible(q_pos, k_pos, offset, mask_tile, config: _Config):
    """``(bq, bk)``: where query positions ``q_pos`` may attend key positions ``k_pos``.

    ``mask_tile`` is the user's mask for these positions, ``(bq | 1, bk | 1)`` int8, or ``None``.
    """
    visible = (k_pos < config.kv_tokens)[None, :]  # padded keys never count
    if config.causal:
        visible = visible & (k_pos[None, :] <= offset + q_pos[:, None])
    if mask_tile is not None:
        visible = visible & (mask_tile != 0)
    return visible


def _scores(s, q_pos, k_pos, offset, mask_tile, bias_tile, config: _Config):
    """``(s, visible)``: the scores plus the bias, invisible ones (a ``-inf`` bias entry's too) at ``-inf``.

    A masked score is replaced, not added to: whatever it held (NaN included) is never read.
    """
    visible = _visible(q_pos, k_pos, offset, mask_tile, config)
    if bias_tile is not None:
        bias_tile = bias_tile.astype(jnp.float32)
        s = s + bias_tile
        visible = visible & (bias_tile != -jnp.inf)  # NaN is no mask: it stays in its row
    return jnp.where(visible, s, -jnp.inf), visible


def _key_blocks_seen(q_block_end, block_k: int, num_kv_blocks: int, causal: bool, offset=0):
    """How many key blocks a query block ending (exclusive) at ``q_block_end`` meets: all, or up to the diagonal.

    With ``causal`` the block's last query sits at ``offset + q_block_end - 1`` and sees keys up to there.
    """
    if not causal:
        return num_kv_blocks
    keys_seen = jnp.maximum(offset + q_block_end, 0)  # a query before every key (offset < 0) sees none
    return jnp.minimum(lax.div(keys_seen + block_k - 1, block_k), num_kv_blocks)


def _first_query_block(key_block_start, block_q: int, causal: bool, offset=0):
    """The first query block that sees a key starting at ``key_block_start``: 0, or the diagonal's."""
    if not causal:
        return 0
    # Query position q (offset + q) sees the key iff q >= key_block_start - offset.
    return lax.div(jnp.maximum(key_block_start - offset, 0), block_q)


def _tile_spec(full, rows: int, cols: int, row_index, col_index):
    """A mask's or bias's BlockSpec for a grid ``(b, n, x)``: spelled-out axes follow the indices, size-1 ones at 0.

    ``full``: which of its ``(B, N, T, S)`` axes are spelled out; ``rows``/``cols``: the block
    lengths of T and S where they are; ``row_index``/``col_index``: ``(b, n, x) -> block index``.
    """
    full_b, full_n, full_t, full_s = full
    return pl.BlockSpec(
        (None, None, rows if full_t else None, cols if full_s else None),
        lambda b, n, x: (
            b if full_b else 0,
            n if full_n else 0,
            row_index(b, n, x) if full_t else 0,
            col_index(b, n, x) if full_s else 0,
        ),
    )


def _group_tile_spec(full, group: int, padded_q: int, bk: int):
    """The dk/dv kernel's ``(G | -, T' | -, bk | -)`` block of key block j, kv head h: query heads h*G .. h*G+G-1."""
    full_b, full_n, full_t, full_s = full
    return pl.BlockSpec(
        (None, group if full_n else None, padded_q if full_t else None, bk if full_s else None),
        lambda b, h, j: (b if full_b else 0, h if full_n else 0, 0, j if full_s else 0),
    )


def _tile(ref, rows, cols, full, head=()):
    """``(bq | 1, bk | 1)`` of a squeezed ``(T' | -, S' | -)`` block: ``rows``/``cols`` slice the spelled-out axes.

    ``head``: ``(g,)`` to pick one head of a ``(G, ...)`` block first.
    """
    if ref is None:
        return None
    _, _, full_t, full_s = full
    if full_t and full_s:
        return ref[(*head, rows, cols)]
    if full_t:
        return ref[(*head, rows)][:, None]
    if full_s:
        return ref[(*head, cols)][None, :]
    if head:
        return ref[head].reshape(1, 1)
    return ref[...].reshape(1, 1)


def _split(refs, config: _Config):
    """``(mask_ref or None, bias_ref or None, outputs)`` from a kernel's trailing refs."""
    refs = list(refs)
    mask_ref = refs.pop(0) if config.mask else None
    bias_ref = refs.pop(0) if config.bias else None
    return mask_ref, bias_ref, refs


def _extras(mask, bias, config: _Config):
    """The optional inputs, in the order :func:`_split` takes them."""
    return [x for x, used in ((mask, config.mask), (bias, config.bias)) if used]


_OFFSET_SPEC = pl.BlockSpec((1,), lambda b, n, x: (0,))


def _triton(head_dim: int, value_dim: int) -> pltriton.CompilerParams:
    """Triton, named: JAX 0.10 lowers a ``pallas_call`` without compiler params to Mosaic GPU on CUDA
    (``jax_pallas_use_mosaic_gpu`` is on by default), which refuses these kernels (it copies whole
    blocks to shared memory in warpgroup-sized units: "Got bytes=4" for the ``(1,)`` offset).

    Warps as JAX's own Triton attention: 4 up to head dim 64, else 8; two pipeline stages.
    """
    return pltriton.CompilerParams(num_warps=4 if max(head_dim, value_dim) <= 64 else 8, num_stages=2)


# --- forward ------------------------------------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, offset_ref, *refs, config: _Config):
    """One ``(batch, head, query block)``: ``q_ref (bq, H)``, ``k_ref (S', H)``, ``v_ref (S', Hv)``.

    ``refs``: the mask and bias blocks (when given: ``(bq | -, S' | -)``), then ``o_ref``, ``lse_ref``.
    """
    mask_ref, bias_ref, (o_ref, lse_ref) = _split(refs, config)
    bq, bk = config.block_q, config.block_k
    i = pl.program_id(2)
    offset = offset_ref[0]
    q = q_ref[...]  # (bq, H)
    q_pos = i * bq + jnp.arange(bq)

    def step(j, carry):
        m, l, acc, seen = carry  # (bq,), (bq,), (bq, Hv), (bq,) float32; seen: 1 once a visible key met
        k = k_ref[pl.ds(j * bk, bk), :]  # (bk, H)
        v = v_ref[pl.ds(j * bk, bk), :]  # (bk, Hv)
        cols = pl.ds(j * bk, bk)
        s, visible = _scores(
            _dot(q, k, config.precision, trans_b=True),
            q_pos,
            j * bk + jnp.arange(bk),
            offset,
            _tile(mask_ref, slice(None), cols, config.mask),
            _tile(bias_ref, slice(None), cols, config.bias),
            config,
        )  # (bq, bk)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # A row that has seen no key yet has m = -inf: exp against 0 keeps its p and correction 0, not NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        correction = jnp.exp(m - m_safe)
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, config.precision)
        met = jnp.where(jnp.broadcast_to(visible, s.shape), 1.0, 0.0)  # floats, not bools: Triton reduces them
        seen = jnp.maximum(seen, met.max(axis=-1))
        return m_new, l * correction + p.sum(axis=-1), acc, seen

    carry = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    num_kv = k_ref.shape[0] // bk
    m, l, acc, seen = lax.fori_loop(0, _key_blocks_seen((i + 1) * bq, bk, num_kv, config.causal, offset), step, carry)
    # A row with no visible key gives zeros (as every jaxattn kernel) and lse = +inf, so its p is 0 in the
    # backward. Any other row keeps IEEE's answer: NaN for a NaN (l NaN) and for visible scores that were
    # all -inf (l = 0: 0 / 0), which l alone could not tell from a row that saw nothing.
    seen = seen > 0
    o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _forward(q, k, v, bias, mask, offset, config: _Config):
    """``(o (B, T', N, Hv'), lse (B, N, T') float32)`` from padded, scaled ``q`` and padded ``k``, ``v``."""
    batch, padded_q, heads, head_dim = q.shape
    padded_kv, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    bq = config.block_q
    in_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda b, n, i: (b, i, n, 0)),
        # Query head n reads kv head n // group: grouped heads are an index map, not a copy.
        pl.BlockSpec((None, padded_kv, None, head_dim), lambda b, n, i: (b, 0, n // group, 0)),
        pl.BlockSpec((None, padded_kv, None, value_dim), lambda b, n, i: (b, 0, n // group, 0)),
        _OFFSET_SPEC,
    ]
    for full in (config.mask, config.bias):
        if full:
            in_specs.append(_tile_spec(full, bq, padded_kv, lambda b, n, i: i, lambda b, n, i: 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, config=config),
        grid=(batch, heads, padded_q // bq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, value_dim), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, padded_q, heads, value_dim), v.dtype),
            jax.ShapeDtypeStruct((batch, heads, padded_q), jnp.float32),
        ],
        interpret=config.interpret,
        compiler_params=_triton(head_dim, value_dim),
        name="jaxattn_flash_forward",
    )(q, k, v, offset, *_extras(mask, bias, config))


# --- backward -----------------------------------------------------------------------------------


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, offset_ref, *refs, config: _Config):
    """``dq`` of one ``(batch, head, query block)``, streaming the key blocks it sees."""
    mask_ref, bias_ref, (dq_ref,) = _split(refs, config)
    bq, bk = config.block_q_bwd, config.block_k_bwd
    i = pl.program_id(2)
    offset = offset_ref[0]
    q, do = q_ref[...], do_ref[...]  # (bq, H), (bq, Hv)
    lse, delta = lse_ref[...], delta_ref[...]  # (bq,), (bq,)
    q_pos = i * bq + jnp.arange(bq)

    def step(j, dq):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        cols = pl.ds(j * bk, bk)
        s, visible = _scores(
            _dot(q, k, config.precision, trans_b=True),
            q_pos,
            j * bk + jnp.arange(bk),
            offset,
            _tile(mask_ref, slice(None), cols, config.mask),
            _tile(bias_ref, slice(None), cols, config.bias),
            config,
        )  # (bq, bk)
        p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, v, config.precision, trans_b=True)  # (bq, bk)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, config.precision)

    num_kv = k_ref.shape[0] // bk
    dq = lax.fori_loop(
        0, _key_blocks_seen((i + 1) * bq, bk, num_kv, config.causal, offset), step, jnp.zeros(q.shape, jnp.float32)
    )
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, offset_ref, *refs, config: _Config):
    """``dk, dv`` of one ``(batch, kv head, key block)``: ``q_ref (T', G, H)`` holds the group's query heads.

    The mask and bias blocks are ``(G | -, T' | -, bk | -)``: the group's heads where they have heads.
    """
    mask_ref, bias_ref, (dk_ref, dv_ref) = _split(refs, config)
    bq, bk = config.block_q_bwd, config.block_k_bwd
    j = pl.program_id(2)
    offset = offset_ref[0]
    k, v = k_ref[...], v_ref[...]  # (bk, H), (bk, Hv)
    k_pos = j * bk + jnp.arange(bk)
    num_q = q_ref.shape[0] // bq
    # With is_causal the query blocks that end before this key block's first key see none of it.
    first = jnp.minimum(_first_query_block(j * bk, bq, config.causal, offset), num_q)

    def step(i, grads, g):
        dk, dv = grads
        q = q_ref[pl.ds(i * bq, bq), g, :]  # (bq, H)
        do = do_ref[pl.ds(i * bq, bq), g, :]  # (bq, Hv)
        lse, delta = lse_ref[g, pl.ds(i * bq, bq)], delta_ref[g, pl.ds(i * bq, bq)]  # (bq,)
        rows = pl.ds(i * bq, bq)
        mask_tile = _tile(mask_ref, rows, slice(None), config.mask, head=(g,) if config.mask and config.mask[1] else ())
        bias_tile = _tile(bias_ref, rows, slice(None), config.bias, head=(g,) if config.bias and config.bias[1] else ())
        s, visible = _scores(
            _dot(q, k, config.precision, trans_b=True),
            i * bq + jnp.arange(bq),
            k_pos,
            offset,
            mask_tile,
            bias_tile,
            config,
        )  # (bq, bk)
        p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, config.precision, trans_a=True)  # (bk, Hv)
        dp = _dot(do, v, config.precision, trans_b=True)  # (bq, bk)
        ds = p * (dp - delta[:, None])
        return dk + _dot(ds.astype(q.dtype), q, config.precision, trans_a=True), dv  # (bk, H)

    grads = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for g in range(q_ref.shape[1]):  # the query heads reading this kv head (static: G is small)
        grads = lax.fori_loop(first, num_q, functools.partial(lambda i, c, g: step(i, c, g), g=g), grads)
    dk_ref[...] = grads[0].astype(dk_ref.dtype)
    dv_ref[...] = grads[1].astype(dv_ref.dtype)


def _dbias_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, offset_ref, *refs, config: _Config, group: int):
    """One ``(bq | 1, bk | 1)`` block of ``dbias`` (grid: the bias's ``(#B, #N, blocks)``).

    ``dbias = ds = p * (dp - delta)`` summed over the axes the bias broadcasts along: the
    program loops over every batch, head, query block and key block its block stands for
    (one of each along a spelled-out axis), so no ``(B, N, T, S)`` buffer is ever written.
    The q, k, v, do, lse, delta and mask blocks are whole arrays (read at dynamic indices);
    the bias block is this program's own.
    """
    mask_ref, bias_ref, (dbias_ref,) = _split(refs, config)
    bq, bk = config.block_q_bwd, config.block_k_bwd
    assert config.bias is not None  # this kernel runs only for a bias
    full_b, full_n, full_t, full_s = config.bias
    batch, padded_q, heads, _ = q_ref.shape
    num_q, num_kv = padded_q // bq, k_ref.shape[1] // bk
    offset = offset_ref[0]
    blocks_s = num_kv if full_s else 1
    x = pl.program_id(2)
    counts = (1 if full_b else batch, 1 if full_n else heads, 1 if full_t else num_q, 1 if full_s else num_kv)
    starts = (
        pl.program_id(0) if full_b else 0,
        pl.program_id(1) if full_n else 0,
        lax.div(x, blocks_s) if full_t else 0,
        lax.rem(x, blocks_s) if full_s else 0,
    )
    bias_tile = bias_ref[...]  # (bq | 1, bk | 1)

    def step(flat, acc):
        steps = []  # flat -> steps along (b, n, i, j), the last axis fastest
        for count in reversed(counts):
            steps.append(lax.rem(flat, count))
            flat = lax.div(flat, count)
        b, n, i, j = (start + step_ for start, step_ in zip(starts, reversed(steps), strict=True))
        rows, cols = pl.ds(i * bq, bq), pl.ds(j * bk, bk)
        q, do = q_ref[b, rows, n, :], do_ref[b, rows, n, :]  # (bq, H), (bq, Hv)
        k, v = k_ref[b, cols, n // group, :], v_ref[b, cols, n // group, :]  # (bk, H), (bk, Hv)
        lse, delta = lse_ref[b, n, rows], delta_ref[b, n, rows]  # (bq,)
        mask_tile = None
        if mask_ref is not None:
            assert config.mask is not None  # a mask ref is passed only with a mask
            mb, mn, mt, ms = config.mask
            mask_tile = mask_ref[
                b if mb else 0, n if mn else 0, rows if mt else pl.ds(0, 1), cols if ms else pl.ds(0, 1)
            ]  # (bq | 1, bk | 1)
        s, visible = _scores(
            _dot(q, k, config.precision, trans_b=True),
            i * bq + jnp.arange(bq),
            j * bk + jnp.arange(bk),
            offset,
            mask_tile,
            bias_tile,
            config,
        )  # (bq, bk)
        p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, v, config.precision, trans_b=True)  # (bq, bk)
        ds = jnp.where(visible, p * (dp - delta[:, None]), 0.0)  # where: a skipped causal block may hold NaN
        if not full_t:
            ds = ds.sum(axis=0, keepdims=True)
        if not full_s:
            ds = ds.sum(axis=1, keepdims=True)
        return acc + ds

    total = counts[0] * counts[1] * counts[2] * counts[3]
    acc = lax.fori_loop(0, total, step, jnp.zeros(dbias_ref.shape, jnp.float32))
    dbias_ref[...] = acc.astype(dbias_ref.dtype)


def _backward(q, k, v, bias, mask, offset, o, lse, do, config: _Config):
    batch, padded_q, heads, head_dim = q.shape
    padded_kv, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    bq, bk = config.block_q_bwd, config.block_k_bwd
    delta = jnp.swapaxes((o.astype(jnp.float32) * do.astype(jnp.float32)).sum(axis=-1), 1, 2)  # (B, N, T')
    common: dict[str, Any] = dict(interpret=config.interpret, compiler_params=_triton(head_dim, value_dim))
    inputs = [q, k, v, do, lse, delta, offset]
    extras = _extras(mask, bias, config)
    dq_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda b, n, i: (b, i, n, 0)),
        pl.BlockSpec((None, padded_kv, None, head_dim), lambda b, n, i: (b, 0, n // group, 0)),
        pl.BlockSpec((None, padded_kv, None, value_dim), lambda b, n, i: (b, 0, n // group, 0)),
        pl.BlockSpec((None, bq, None, value_dim), lambda b, n, i: (b, i, n, 0)),
        pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        _OFFSET_SPEC,
    ]
    dq_specs += [
        _tile_spec(full, bq, padded_kv, lambda b, n, i: i, lambda b, n, i: 0)
        for full in (config.mask, config.bias)
        if full
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, config=config),
        grid=(batch, heads, padded_q // bq),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((None, bq, None, head_dim), lambda b, n, i: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="jaxattn_flash_dq",
        **common,
    )(*inputs, *extras)
    dkdv_specs = [
        pl.BlockSpec((None, padded_q, group, head_dim), lambda b, h, j: (b, 0, h, 0)),
        pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0)),
        pl.BlockSpec((None, bk, None, value_dim), lambda b, h, j: (b, j, h, 0)),
        pl.BlockSpec((None, padded_q, group, value_dim), lambda b, h, j: (b, 0, h, 0)),
        pl.BlockSpec((None, group, padded_q), lambda b, h, j: (b, h, 0)),
        pl.BlockSpec((None, group, padded_q), lambda b, h, j: (b, h, 0)),
        _OFFSET_SPEC,
    ]
    dkdv_specs += [_group_tile_spec(full, group, padded_q, bk) for full in (config.mask, config.bias) if full]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, config=config),
        grid=(batch, kv_heads, padded_kv // bk),
        in_specs=dkdv_specs,
        out_specs=[
            pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0)),
            pl.BlockSpec((None, bk, None, value_dim), lambda b, h, j: (b, j, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="jaxattn_flash_dkdv",
        **common,
    )(*inputs, *extras)
    dbias = None if bias is None else _dbias(inputs, mask, bias, config, group)
    return dq, dk, dv, dbias


def _dbias(inputs, mask, bias, config: _Config, group: int):
    """``dbias`` in ``bias``'s own (padded) shape, from a kernel over the bias's blocks."""
    bq, bk = config.block_q_bwd, config.block_k_bwd
    assert config.bias is not None  # called only for a bias
    full_b, full_n, full_t, full_s = config.bias
    rows, cols = (bq if full_t else 1), (bk if full_s else 1)
    blocks_t, blocks_s = bias.shape[2] // rows, bias.shape[3] // cols

    def whole(x):
        return pl.BlockSpec(x.shape, lambda b, n, x_, nd=x.ndim: (0,) * nd)

    specs = [whole(x) for x in inputs[:6]] + [_OFFSET_SPEC]
    if config.mask:
        specs.append(whole(mask))
    bias_spec = pl.BlockSpec((None, None, rows, cols), lambda b, n, x: (b, n, x // blocks_s, x % blocks_s))
    specs.append(bias_spec)
    return pl.pallas_call(
        functools.partial(_dbias_kernel, config=config, group=group),
        grid=(bias.shape[0], bias.shape[1], blocks_t * blocks_s),
        in_specs=specs,
        out_specs=bias_spec,
        out_shape=jax.ShapeDtypeStruct(bias.shape, jnp.float32),
        interpret=config.interpret,
        compiler_params=_triton(inputs[0].shape[-1], inputs[2].shape[-1]),
        name="jaxattn_flash_dbias",
    )(*inputs, *_extras(mask, bias, config)).astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, bias, mask, offset, config: _Config):
    return _forward(q, k, v, bias, mask, offset, config)[0]


def _flash_fwd(q, k, v, bias, mask, offset, config: _Config):
    o, lse = _forward(q, k, v, bias, mask, offset, config)
    return o, (q, k, v, bias, mask, offset, o, lse)


def _flash_bwd(config: _Config, residuals, do):
    q, k, v, bias, mask, offset, o, lse = residuals
    dq, dk, dv, dbias = _backward(q, k, v, bias, mask, offset, o, lse, do, config)
    # The mask and the offset are integers: no cotangent (None is JAX's zero for them).
    return dq, dk, dv, dbias, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
