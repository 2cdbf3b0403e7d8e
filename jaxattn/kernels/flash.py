"""The flash kernel: FlashAttention-2 in Pallas, forward and a ``custom_vjp`` backward.

What it is for: float32 attention on a GPU (cuDNN runs bf16/fp16 only) and whatever
cuDNN refuses, without the ``(T, S)`` scores (the ``xla`` kernel holds them: 18.5 GB at
16384 tokens, 12 heads) and without a ``lax`` loop per block (the ``blockwise`` kernel,
4.65 ms against torch's 0.17 ms at 8 x 1024 tokens on an H200, issue 11).

The algorithm (Dao, "FlashAttention-2", 2023), as in JAX's own Triton example
(``jax/experimental/pallas/ops/gpu/attention.py``), written for reading:

* **forward**, one program per ``(batch, head, query block)``: the query block stays
  put while the key/value blocks stream past; an online softmax keeps the running row
  maximum ``m``, denominator ``l`` and unnormalised output ``acc`` (all float32); with
  ``is_causal`` the loop stops at the last key block the block's last query can see
  (blocks above the diagonal are skipped, not masked). It also writes the row
  log-sum-exp ``lse = m + log(l)``, the one residual the backward needs besides q, k, v, o.
* **backward**, two kernels that recompute the weights ``p = exp(q k^T - lse)`` block by
  block instead of storing them: ``dq`` per query block (streaming key blocks), ``dk, dv``
  per key block (streaming the query blocks that can see it, for every query head that
  reads this kv head: grouped-query attention needs no copies of k and v).
  ``delta = rowsum(o * do)`` comes first, in plain JAX.

The kernel reads its blocks with plain ``ref[...]`` indexing, so one source serves the
GPU (Pallas lowers it to Triton) and the CPU (``interpret=True``, how the tests run it).
The wrapper pads the tokens to whole blocks (padded keys are masked, padded queries sliced
off) and the head dims to a power of two >= 16 (zeros change no score; Triton's ``dot``
wants such sizes). The scale goes on the queries before the kernel, as in every jaxattn
kernel (:func:`jaxattn.ops.scale_queries`), so the kernel itself never scales.

Supported: causal (``q_offset = 0``) or not, grouped kv heads, a value head dim of its
own; not masks, bias, ``q_offset`` or dropout (those calls go to ``xla``/``naive``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from jaxattn.ops import scale_queries

#: Query and key block lengths on a GPU (JAX's Triton example uses 128 x 128 forward); the
#: tests pass small blocks to cover several blocks in interpret mode.
BLOCK_Q = 128
BLOCK_K = 128
#: Blocks of the backward kernels (JAX's example: 32 x 32 keeps dk, dv and a q block in registers).
BLOCK_Q_BACKWARD = 64
BLOCK_K_BACKWARD = 64
#: The largest head dim taken: a query block and a key/value block must fit in on-chip memory.
MAX_HEAD_DIM = 256


def flash_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    bias=None,
    mask=None,
    *,
    scale: float,
    is_causal: bool = False,
    q_offset=0,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    precision: Optional[lax.Precision] = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    backward_blocks: tuple[int, int] = (BLOCK_Q_BACKWARD, BLOCK_K_BACKWARD),
    interpret: bool = False,
) -> tuple[Float[Array, "B T N Hv"], None]:
    """The kernel behind ``implementation="flash"`` (GPU): ``(context, None)``.

    ``interpret=True`` runs the same kernel through Pallas' interpreter on any backend
    (correct on a CPU, and slow: how the tests check it, not a way to run fast).
    """
    if bias is not None or mask is not None or dropout_rate or not (isinstance(q_offset, int) and q_offset == 0):
        raise ValueError("flash_attention: no mask, bias, q_offset or dropout (use the xla or naive kernel)")
    for name, size in (("block_q", block_q), ("block_k", block_k), ("backward_blocks", backward_blocks[0]),
                       ("backward_blocks", backward_blocks[1])):
        if size < 16 or size & (size - 1):  # Triton's dot wants powers of two >= 16; so do the block divisions
            raise ValueError(f"flash_attention: {name} must be powers of two >= 16, got {size}")
    batch, q_tokens, heads, head_dim = query.shape
    kv_tokens, value_dim = key.shape[1], value.shape[-1]
    if q_tokens == 0 or kv_tokens == 0:  # no query, or no key for any query: zeros (no blocks to cut)
        return jnp.zeros((batch, q_tokens, heads, value_dim), value.dtype), None
    bq = min(block_q, _pow2_at_least(q_tokens))
    bk = min(block_k, _pow2_at_least(kv_tokens))
    # The backward blocks divide the forward ones' padded lengths: every padding is a multiple of both.
    bq_bwd, bk_bwd = min(backward_blocks[0], bq), min(backward_blocks[1], bk)
    padded_q, padded_kv = _round_up(q_tokens, bq), _round_up(kv_tokens, bk)
    q = _pad(scale_queries(query, scale), padded_q)  # (B, T', N, H'), scaled
    k, v = _pad(key, padded_kv), _pad(value, padded_kv)  # (B, S', K, H'), (B, S', K, Hv')
    config = _Config(
        causal=bool(is_causal), kv_tokens=kv_tokens, block_q=bq, block_k=bk,
        block_q_bwd=bq_bwd, block_k_bwd=bk_bwd, precision=precision, interpret=bool(interpret),
    )
    out = _flash(q, k, v, config)  # (B, T', N, Hv')
    return out[:, :q_tokens, :, :value_dim], None


@dataclass(frozen=True)
class _Config:
    """The static choices of one call (hashable: ``custom_vjp`` holds it as a non-differentiable argument)."""

    causal: bool
    kv_tokens: int  # keys at and past this position are padding
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    precision: Optional[lax.Precision]
    interpret: bool


def _pow2_at_least(n: int, smallest: int = 16) -> int:
    return max(smallest, 1 << (n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(x: Array, tokens: int) -> Array:
    """``(B, t, K, d)`` zero-padded to ``(B, tokens, K, d')``, ``d'`` a power of two >= 16."""
    dim = _pow2_at_least(x.shape[-1])
    return jnp.pad(x, ((0, 0), (0, tokens - x.shape[1]), (0, 0), (0, dim - x.shape[-1])))


def _dot(a, b, precision, *, trans_b: bool = False, trans_a: bool = False):
    """``a @ b`` (``a.T``/``b.T`` on request) with float32 accumulation at ``precision``."""
    contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _visible(q_pos, k_pos, config: _Config):
    """``(bq, bk)``: where query positions ``q_pos`` may attend key positions ``k_pos``."""
    visible = (k_pos < config.kv_tokens)[None, :]  # padded keys never count
    if config.causal:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    return visible


def _key_blocks_seen(q_block_end, block_k: int, num_kv_blocks: int, causal: bool):
    """How many key blocks a query block ending (exclusive) at ``q_block_end`` meets: all, or up to the diagonal."""
    if not causal:
        return num_kv_blocks
    return jnp.minimum(lax.div(q_block_end + block_k - 1, block_k), num_kv_blocks)


# --- forward ------------------------------------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, config: _Config):
    """One ``(batch, head, query block)``: ``q_ref (bq, H)``, ``k_ref (S', H)``, ``v_ref (S', Hv)``."""
    bq, bk = config.block_q, config.block_k
    i = pl.program_id(2)
    q = q_ref[...]  # (bq, H)
    q_pos = i * bq + jnp.arange(bq)

    def step(j, carry):
        m, l, acc = carry  # (bq,), (bq,), (bq, Hv) float32
        k = k_ref[pl.ds(j * bk, bk), :]  # (bk, H)
        v = v_ref[pl.ds(j * bk, bk), :]  # (bk, Hv)
        s = _dot(q, k, config.precision, trans_b=True)  # (bq, bk)
        s = jnp.where(_visible(q_pos, j * bk + jnp.arange(bk), config), s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))  # finite from block 0 on: every row sees key 0
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, config.precision)
        return m_new, l * correction + p.sum(axis=-1), acc

    carry = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
    )
    num_kv = k_ref.shape[0] // bk
    m, l, acc = lax.fori_loop(0, _key_blocks_seen((i + 1) * bq, bk, num_kv, config.causal), step, carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _forward(q, k, v, config: _Config):
    """``(o (B, T', N, Hv'), lse (B, N, T') float32)`` from padded, scaled ``q`` and padded ``k``, ``v``."""
    batch, padded_q, heads, head_dim = q.shape
    padded_kv, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    bq = config.block_q
    return pl.pallas_call(
        functools.partial(_forward_kernel, config=config),
        grid=(batch, heads, padded_q // bq),
        in_specs=[
            pl.BlockSpec((None, bq, None, head_dim), lambda b, n, i: (b, i, n, 0)),
            # Query head n reads kv head n // group: grouped heads are an index map, not a copy.
            pl.BlockSpec((None, padded_kv, None, head_dim), lambda b, n, i: (b, 0, n // group, 0)),
            pl.BlockSpec((None, padded_kv, None, value_dim), lambda b, n, i: (b, 0, n // group, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, value_dim), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, padded_q, heads, value_dim), v.dtype),
            jax.ShapeDtypeStruct((batch, heads, padded_q), jnp.float32),
        ],
        interpret=config.interpret,
        name="jaxattn_flash_forward",
    )(q, k, v)


# --- backward -----------------------------------------------------------------------------------


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, config: _Config):
    """``dq`` of one ``(batch, head, query block)``, streaming the key blocks it sees."""
    bq, bk = config.block_q_bwd, config.block_k_bwd
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]  # (bq, H), (bq, Hv)
    lse, delta = lse_ref[...], delta_ref[...]  # (bq,), (bq,)
    q_pos = i * bq + jnp.arange(bq)

    def step(j, dq):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _dot(q, k, config.precision, trans_b=True)  # (bq, bk)
        p = jnp.where(_visible(q_pos, j * bk + jnp.arange(bk), config), jnp.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, v, config.precision, trans_b=True)  # (bq, bk)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, config.precision)

    num_kv = k_ref.shape[0] // bk
    dq = lax.fori_loop(0, _key_blocks_seen((i + 1) * bq, bk, num_kv, config.causal), step,
                       jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, config: _Config):
    """``dk, dv`` of one ``(batch, kv head, key block)``: ``q_ref (T', G, H)`` holds the group's query heads."""
    bq, bk = config.block_q_bwd, config.block_k_bwd
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]  # (bk, H), (bk, Hv)
    k_pos = j * bk + jnp.arange(bk)
    num_q = q_ref.shape[0] // bq
    # With is_causal the query blocks that end before this key block's first key see none of it.
    first = lax.div(j * bk, bq) if config.causal else 0

    def step(i, grads, g):
        dk, dv = grads
        q = q_ref[pl.ds(i * bq, bq), g, :]  # (bq, H)
        do = do_ref[pl.ds(i * bq, bq), g, :]  # (bq, Hv)
        lse, delta = lse_ref[g, pl.ds(i * bq, bq)], delta_ref[g, pl.ds(i * bq, bq)]  # (bq,)
        s = _dot(q, k, config.precision, trans_b=True)  # (bq, bk)
        p = jnp.where(_visible(i * bq + jnp.arange(bq), k_pos, config), jnp.exp(s - lse[:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, config.precision, trans_a=True)  # (bk, Hv)
        dp = _dot(do, v, config.precision, trans_b=True)  # (bq, bk)
        ds = p * (dp - delta[:, None])
        return dk + _dot(ds.astype(q.dtype), q, config.precision, trans_a=True), dv  # (bk, H)

    grads = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for g in range(q_ref.shape[1]):  # the query heads reading this kv head (static: G is small)
        grads = lax.fori_loop(first, num_q, functools.partial(lambda i, c, g: step(i, c, g), g=g), grads)
    dk_ref[...] = grads[0].astype(dk_ref.dtype)
    dv_ref[...] = grads[1].astype(dv_ref.dtype)


def _backward(q, k, v, o, lse, do, config: _Config):
    batch, padded_q, heads, head_dim = q.shape
    padded_kv, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    bq, bk = config.block_q_bwd, config.block_k_bwd
    delta = jnp.swapaxes((o.astype(jnp.float32) * do.astype(jnp.float32)).sum(axis=-1), 1, 2)  # (B, N, T')
    common = dict(interpret=config.interpret)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, config=config),
        grid=(batch, heads, padded_q // bq),
        in_specs=[
            pl.BlockSpec((None, bq, None, head_dim), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, padded_kv, None, head_dim), lambda b, n, i: (b, 0, n // group, 0)),
            pl.BlockSpec((None, padded_kv, None, value_dim), lambda b, n, i: (b, 0, n // group, 0)),
            pl.BlockSpec((None, bq, None, value_dim), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
            pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, head_dim), lambda b, n, i: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="jaxattn_flash_dq", **common,
    )(q, k, v, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, config=config),
        grid=(batch, kv_heads, padded_kv // bk),
        in_specs=[
            pl.BlockSpec((None, padded_q, group, head_dim), lambda b, h, j: (b, 0, h, 0)),
            pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0)),
            pl.BlockSpec((None, bk, None, value_dim), lambda b, h, j: (b, j, h, 0)),
            pl.BlockSpec((None, padded_q, group, value_dim), lambda b, h, j: (b, 0, h, 0)),
            pl.BlockSpec((None, group, padded_q), lambda b, h, j: (b, h, 0)),
            pl.BlockSpec((None, group, padded_q), lambda b, h, j: (b, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0)),
            pl.BlockSpec((None, bk, None, value_dim), lambda b, h, j: (b, j, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="jaxattn_flash_dkdv", **common,
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, config: _Config):
    return _forward(q, k, v, config)[0]


def _flash_fwd(q, k, v, config: _Config):
    o, lse = _forward(q, k, v, config)
    return o, (q, k, v, o, lse)


def _flash_bwd(config: _Config, residuals, do):
    return _backward(*residuals, do, config)


_flash.defvjp(_flash_fwd, _flash_bwd)

