"""Blockwise ("flash"-style) causal attention in pure JAX.

The naive path materialises the full ``(tokens, tokens)`` weights: at 16384
tokens, 12 heads that is ~13 GB of float32 scores, half of them masked to zero.
Here the sequence is cut into blocks of ``block_size`` tokens:

* query block ``i`` only meets key blocks ``j <= i``; blocks wholly above the
  diagonal are never computed (the causal mask would zero them anyway);
* the softmax is *online*: a running row maximum ``m``, running denominator
  ``l`` and unnormalised accumulator ``acc`` are rescaled as each key block
  arrives, so no row of weights ever exists in full;
* the loops are ``lax.scan``/``lax.map`` (not a Python unroll), so compile time
  does not grow with the token count, and live memory is ``O(tokens x block_size)``;
* the ``(batch x head)`` rows go through the loops a few at a time
  (:data:`HEAD_GROUP`), which keeps each step's scores in cache.

Two schedules share that idea (``method``):

* ``"prefix"``: query block ``i`` meets its whole key prefix ``[0, (i+1) * block)``
  at once — the off-diagonal part unmasked, the diagonal block masked — with one
  exact softmax per query block. The query blocks are unrolled in Python, so it
  is used up to :data:`PREFIX_MAX_BLOCKS` blocks (4096 tokens); it is the fastest
  schedule measured on the GPT-2-small shape.
* ``"online"``: ``lax.scan`` over key blocks with an online softmax, for any length.

``method="auto"`` picks ``"prefix"`` when it fits, else ``"online"``.

The book's semantics are kept: scores ``q @ k.T`` cast to ``softmax_dtype``,
causal mask, the ``1/sqrt(head_dim)`` scale, softmax, weights ``@ v``; the scale is
applied to the queries (:func:`jaxattn.ops.scale_queries` says why).
Dropout is not implemented per block: with dropout active (training mode with a
non-zero rate) the modules run the table's dropout implementation
(:func:`jaxattn.implementations.for_dropout`), so dropout masks are
bit-identical whichever implementation is chosen for inference.

Gradients come from JAX's autodiff through ``scan``/``cond``; the backward pass
keeps per-block residuals (it is not the memory-lean flash backward).

The kernel entry :func:`blockwise_attention` takes the general call of
:func:`jaxattn.dot_product_attention` (``(B, T, N, H)`` layout, grouped kv heads,
masks, bias, ``q_offset``, causal or not). Plain causal self-attention (square,
``q_offset=0``, no mask or bias, as many kv heads as query heads) goes to the two
schedules above; everything else to :func:`general_blockwise_attention`, an
online softmax over key blocks whose per-step scores keep every query head (no
row grouping), reading grouped kv heads through a ``(B, K, G, T, H)`` view of
the queries and slicing the mask and bias block by block where they are not
broadcast. A row that sees no key gives zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
from jax import lax
from jax.lax import Precision
from jaxtyping import Array, Bool, Float

from jaxattn.ops import accumulation_dtype, scale_queries

#: Key/query block size of the online schedule (the one used beyond 4096 tokens). Attention core
#: alone, (12, T, 64) float32, 2-core CPU, medians of 3: T=8192: 256 -> 1.15 s, 512 -> 0.72 s,
#: 1024 -> 0.70 s; T=16384: 256 -> 4.57 s, 512 -> 2.75 s, 1024 -> 2.59 s. 512 keeps most of the gain
#: at half the per-step scores of 1024.
DEFAULT_BLOCK_SIZE = 512

#: At most this many (batch x head) rows go through the block loops together (see below).
HEAD_GROUP = 8

#: The prefix schedule's query block and the most blocks it unrolls. Attention core alone,
#: (48, 1024, 64) float32, 2-core CPU, medians of 9 (runs differ by up to 20%): block 128 with
#: 2 rows per step 104-128 ms, block 256 132 ms, 4 rows 147 ms, 1 row 111-136 ms, two
#: independent row chains 143 ms; the online schedule 230 ms; torch SDPA's core 97 ms.
PREFIX_BLOCK_SIZE = 128
PREFIX_ROW_GROUP = 2
PREFIX_MAX_BLOCKS = 32


def _pad_tokens(x: Float[Array, "n t d"], padded: int) -> Float[Array, "n padded d"]:
    """Zero-pad the token axis at the end: causal attention keeps trailing padding invisible to real tokens."""
    extra = padded - x.shape[-2]
    return x if extra == 0 else jnp.pad(x, ((0, 0), (0, extra), (0, 0)))


def blockwise_causal_attention(
    query: Float[Array, "*batch tokens d"],
    key: Float[Array, "*batch tokens d"],
    value: Float[Array, "*batch tokens dv"],
    *,
    scale: float | None = None,
    block_size: int | None = None,
    softmax_dtype=jnp.float32,
    method: str = "auto",
    precision: Precision | None = None,
) -> Float[Array, "*batch tokens dv"]:
    """Causal self-attention ``softmax(mask(q @ k.T) * scale) @ v`` without the ``(tokens, tokens)`` weights.

    ``tokens`` need not be a multiple of ``block_size`` (the tail is zero-padded
    and sliced off). ``method`` is ``"prefix"``, ``"online"`` or ``"auto"`` (see the
    module docstring); ``block_size`` defaults to :data:`PREFIX_BLOCK_SIZE` for the
    prefix schedule and :data:`DEFAULT_BLOCK_SIZE` for the online one. Returns the
    context vectors in ``value.dtype``.
    """
    if method not in ("auto", "prefix", "online"):
        raise ValueError(f"blockwise_causal_attention: method must be 'auto', 'prefix' or 'online', got {method!r}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"blockwise_causal_attention: block_size must be >= 1, got {block_size}")
    *batch, tokens, head_dim = query.shape
    if method == "auto":
        prefix_block = block_size or PREFIX_BLOCK_SIZE
        method = "prefix" if math.ceil(tokens / prefix_block) <= PREFIX_MAX_BLOCKS else "online"
    if block_size is None:
        block_size = PREFIX_BLOCK_SIZE if method == "prefix" else DEFAULT_BLOCK_SIZE
    if key.shape[-2] != tokens or value.shape[-2] != tokens:
        raise ValueError(
            "blockwise_causal_attention: causal self-attention needs as many keys as queries, got "
            f"query {query.shape}, key {key.shape}, value {value.shape}"
        )
    if scale is None:
        scale = head_dim**-0.5
    dv = value.shape[-1]
    if tokens == 0 or math.prod(batch) == 0:  # nothing to attend: (*batch, 0, dv), and no blocks to cut
        return jnp.zeros((*batch, tokens, dv), value.dtype)
    # As many blocks as block_size asks for, but evened out (rounded up to a multiple of 8) so
    # the zero-padded tail stays small: 768 tokens -> 2 blocks of 384, not 2 of 512.
    num_blocks = math.ceil(tokens / block_size)
    block = min(block_size, _round_up(math.ceil(tokens / num_blocks), 8))
    num_blocks = math.ceil(tokens / block)
    padded = num_blocks * block
    n = math.prod(batch)
    # A few (batch, head) rows at a time: each step's (group, block, block) scores then stay in
    # cache; measured ~25% faster than all 48 rows of the GPT-2-small shape at once.
    most = PREFIX_ROW_GROUP if method == "prefix" else HEAD_GROUP
    group = max(g for g in range(1, min(n, most) + 1) if n % g == 0)
    rows_fn: Callable[..., Array] = _prefix_rows if method == "prefix" else _blockwise_rows

    def flat(x):  # (*batch, T, d) -> (n // group, group, padded, d)
        x = _pad_tokens(x.reshape(n, tokens, x.shape[-1]), padded)
        return x.reshape(n // group, group, padded, x.shape[-1])

    def attend(qkv):
        return rows_fn(*qkv, num_blocks, block, jnp.asarray(scale, softmax_dtype), softmax_dtype, precision)

    out = lax.map(attend, (flat(query), flat(key), flat(value)))  # (n // group, group, padded, dv)
    return out.reshape(n, padded, dv)[:, :tokens].reshape(*batch, tokens, dv)


def _blockwise_rows(query, key, value, num_blocks: int, block: int, scale, softmax_dtype, precision=None):
    """The online-softmax loops on ``(rows, num_blocks * block, d)`` arrays -> ``(rows, num_blocks * block, dv)``."""
    rows, padded, _ = query.shape
    dv = value.shape[-1]

    def blocks(x):  # (rows, padded, d) -> (num_blocks, rows, block, d)
        return x.reshape(rows, num_blocks, block, x.shape[-1]).swapaxes(0, 1)

    q_blocks, k_blocks, v_blocks = blocks(scale_queries(query, scale)), blocks(key), blocks(value)
    diagonal = jnp.tril(jnp.ones((block, block), dtype=jnp.bool_))  # within the diagonal block

    def scores(q, k):  # (rows, block, d) x (rows, block, d) -> (rows, block, block) in softmax_dtype
        return jnp.einsum("nqd,nkd->nqk", q, k, preferred_element_type=softmax_dtype, precision=precision)

    def update(carry, s, v):
        """Online-softmax step: fold one key block's (already scaled/masked) scores ``s`` into the carry."""
        m, l, acc = carry  # (rows, block), (rows, block), (rows, block, dv)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])  # (rows, block, block)
        correction = jnp.exp(m - m_new)
        l_new = l * correction + p.sum(axis=-1)
        acc_new = acc * correction[..., None] + jnp.einsum(
            "nqk,nkd->nqd", p.astype(v.dtype), v, preferred_element_type=softmax_dtype, precision=precision
        )
        return m_new, l_new, acc_new

    def query_block(i, q):
        # The diagonal block first: every row has key 0 <= its own index, so m is finite from here on.
        s = jnp.where(diagonal, scores(q, k_blocks[i]), -jnp.inf)
        m = s.max(axis=-1)
        p = jnp.exp(s - m[..., None])
        pv = jnp.einsum(
            "nqk,nkd->nqd",
            p.astype(value.dtype),
            v_blocks[i],
            preferred_element_type=softmax_dtype,
            precision=precision,
        )
        carry = (m, p.sum(axis=-1), pv)

        def key_block(carry, kv):
            j, k, v = kv
            # Blocks above the diagonal (j >= i) are skipped, not computed-and-masked.
            carry = lax.cond(j < i, lambda c: update(c, scores(q, k), v), lambda c: c, carry)
            return carry, None

        carry, _ = lax.scan(key_block, carry, (jnp.arange(num_blocks), k_blocks, v_blocks))
        _, l, acc = carry
        return (acc / l[..., None]).astype(value.dtype)  # (rows, block, dv)

    out = lax.map(lambda args: query_block(*args), (jnp.arange(num_blocks), q_blocks))  # (nb, rows, block, dv)
    return out.swapaxes(0, 1).reshape(rows, padded, dv)


def _prefix_rows(query, key, value, num_blocks: int, block: int, scale, softmax_dtype, precision=None):
    """Query block ``i`` against its key prefix, one exact softmax each.

    ``(rows, padded, d)`` -> ``(rows, padded, dv)``.

    The prefix splits into the off-diagonal keys ``[0, i * block)``, which need no
    mask, and the diagonal block, which does; both share the row maximum and
    denominator, and the output is normalised once, after ``@ v``.
    """
    diagonal = jnp.tril(jnp.ones((block, block), dtype=jnp.bool_))
    query = query.astype(softmax_dtype) * scale  # scaling q is scaling every score, at T x d cost

    def scores(q, k):  # (rows, block, d) x (rows, keys, d) -> (rows, block, keys)
        return jnp.einsum(
            "nqd,nkd->nqk", q.astype(k.dtype), k, preferred_element_type=softmax_dtype, precision=precision
        )

    def weighted(p, v):  # (rows, block, keys) x (rows, keys, dv) -> (rows, block, dv)
        return jnp.einsum(
            "nqk,nkd->nqd", p.astype(v.dtype), v, preferred_element_type=softmax_dtype, precision=precision
        )

    outs = []
    for i in range(num_blocks):  # unrolled: each block has its own prefix length
        q = query[:, i * block : (i + 1) * block]
        diag = slice(i * block, (i + 1) * block)
        s_diag = jnp.where(diagonal, scores(q, key[:, diag]), -jnp.inf)  # (rows, block, block)
        m = s_diag.max(axis=-1, keepdims=True)
        if i > 0:
            s_past = scores(q, key[:, : i * block])  # (rows, block, i * block), all visible
            m = jnp.maximum(m, s_past.max(axis=-1, keepdims=True))
        p_diag = jnp.exp(s_diag - m)
        l, acc = p_diag.sum(axis=-1, keepdims=True), weighted(p_diag, value[:, diag])
        if i > 0:
            p_past = jnp.exp(s_past - m)
            l, acc = l + p_past.sum(axis=-1, keepdims=True), acc + weighted(p_past, value[:, : i * block])
        outs.append((acc / l).astype(value.dtype))  # (rows, block, dv)
    return jnp.concatenate(outs, axis=1)  # (rows, padded, dv)


# --- the general kernel: masks, bias, q_offset, grouped kv heads, T != S --------------------------

#: Query and key block sizes of :func:`general_blockwise_attention`. Its per-step scores hold every
#: (batch, head) row at once: (B, N, 128, 512) float32 is 24 MiB at B x N = 96.
GENERAL_QUERY_BLOCK = 128
GENERAL_KEY_BLOCK = 512


def blockwise_attention(
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
    precision: Precision | None = None,
) -> tuple[Float[Array, "B T N Hv"], None]:
    """The blockwise kernel behind ``implementation="blockwise"``; never materialises the weights."""
    if dropout_rate:
        raise ValueError("blockwise_attention: dropout needs the full attention weights (use the naive kernel)")
    batch, q_tokens, heads, head_dim = query.shape
    kv_tokens, kv_heads = key.shape[1], key.shape[2]
    plain_causal = (
        is_causal
        and isinstance(q_offset, int)
        and q_offset == 0
        and q_tokens == kv_tokens
        and bias is None
        and mask is None
        and kv_heads == heads
    )
    if plain_causal:

        def heads_first(x):  # (B, T, N, d) -> (B, N, T, d)
            return jnp.swapaxes(x, 1, 2)

        out = blockwise_causal_attention(
            heads_first(query), heads_first(key), heads_first(value), scale=scale, precision=precision
        )
        return heads_first(out), None
    out = general_blockwise_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal, q_offset=q_offset, precision=precision
    )
    return out, None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block_len(tokens: int, block: int) -> int:
    """``block``, or ``tokens`` rounded up to 8 when that is shorter (a decode step is one query)."""
    return min(block, _round_up(tokens, 8))


def _grouped_blocks(x: Array, kv_heads: int, group: int, padded_q: int, padded_kv: int, fill) -> Array:
    """A ``(#B, #N, #T, #S)`` mask or bias as ``(#B, #K, #G, #T', #S')``, padded where it is not broadcast."""
    b, n, t, s = x.shape
    x = x.reshape(b, 1, 1, t, s) if n == 1 else x.reshape(b, kv_heads, group, t, s)
    pad_t = 0 if t == 1 else padded_q - t
    pad_s = 0 if s == 1 else padded_kv - s
    if pad_t or pad_s:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad_t), (0, pad_s)), constant_values=fill)
    return x


def _block(x: Array | None, axis: int, start, size: int) -> Array | None:
    """``x[..., start:start + size, ...]`` on ``axis`` unless ``x`` broadcasts there (size 1)."""
    if x is None or x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _padded_heads_first(query, key, value, scale: float, group: int, padded_q: int, padded_kv: int):
    """``q`` ``(B, K, G, T', H)`` scaled, ``k`` ``(B, K, S', H)``, ``v`` ``(B, K, S', Hv)``, zero-padded to blocks."""
    batch, q_tokens, _, head_dim = query.shape
    kv_tokens, kv_heads = key.shape[1], key.shape[2]
    q = scale_queries(query, scale).reshape(batch, q_tokens, kv_heads, group, head_dim)
    q = q.transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, padded_q - q_tokens), (0, 0)))
    k = jnp.pad(jnp.swapaxes(key, 1, 2), ((0, 0), (0, 0), (0, padded_kv - kv_tokens), (0, 0)))  # (B, K, S', H)
    v = jnp.pad(jnp.swapaxes(value, 1, 2), ((0, 0), (0, 0), (0, padded_kv - kv_tokens), (0, 0)))  # (B, K, S', Hv)
    return q, k, v


def _empty_rows(shape: tuple[int, ...], dv: int, acc_dtype) -> tuple[Array, Array, Array, Array]:
    """The online softmax's start for query rows ``shape``: ``(m, l, acc, seen)`` = ``-inf``, 0, 0 ``(*shape, dv)``,
    and False (seen: the row has met a visible key)."""
    return (
        jnp.full(shape, -jnp.inf, acc_dtype),
        jnp.zeros(shape, acc_dtype),
        jnp.zeros((*shape, dv), acc_dtype),
        jnp.zeros(shape, jnp.bool_),
    )


def online_softmax_step(carry, q_i, k_j, v_j, q_pos, k_pos, m_j, b_j, *, kv_tokens: int, is_causal: bool, precision):
    """Fold key block ``j`` into the online softmax of query block ``i`` (here, and one ring step of
    :mod:`jaxattn.kernels.ring`).

    ``carry`` = ``(m, l, acc, seen)`` ``(B, K, G, bq)`` (``acc`` ``(B, K, G, bq, Hv)``, accumulation dtype);
    ``q_i`` ``(B, K, G, bq, H)`` scaled; ``k_j``/``v_j`` ``(B, K, bk, H)``/``(B, K, bk, Hv)``; ``q_pos``/``k_pos``
    token positions; ``m_j``/``b_j`` this block pair's mask and bias (broadcastable) or ``None``.
    """
    m, l, acc, seen = carry
    acc_dtype = acc.dtype
    s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=acc_dtype, precision=precision).astype(
        acc_dtype
    )
    visible = (k_pos < kv_tokens)[None, :]  # padded keys never count
    if is_causal:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])  # (bq, bk)
    visible = visible if m_j is None else visible & m_j
    if b_j is not None:
        s = s + b_j.astype(acc_dtype)
        visible = visible & (b_j != -jnp.inf)  # a -inf bias entry masks its key; NaN stays NaN
    s = jnp.where(visible, s, -jnp.inf)  # a masked score is never read, whatever it held
    seen = seen | jnp.any(visible, axis=-1)
    m_new = jnp.maximum(m, lax.stop_gradient(s.max(axis=-1)))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])  # (B, K, G, bq, bk)
    correction = jnp.exp(m - m_safe)
    l_new = l * correction + p.sum(axis=-1)
    pv = jnp.einsum(
        "bkgqs,bksh->bkgqh", p.astype(v_j.dtype), v_j, preferred_element_type=acc_dtype, precision=precision
    )
    return (m_new, l_new, acc * correction[..., None] + pv.astype(acc_dtype), seen)


def general_blockwise_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K Hv"],
    bias: Float[Array, "#B #N #T #S"] | None = None,
    mask: Bool[Array, "#B #N #T #S"] | None = None,
    *,
    scale: float,
    is_causal: bool = False,
    q_offset=0,
    query_block: int = GENERAL_QUERY_BLOCK,
    key_block: int = GENERAL_KEY_BLOCK,
    precision: Precision | None = None,
) -> Float[Array, "B T N Hv"]:
    """Online-softmax attention over key blocks for any call :func:`jaxattn.dot_product_attention` accepts.

    Query block ``i`` scans the key blocks with a running maximum ``m``, denominator
    ``l`` and accumulator ``acc``; with ``is_causal`` a key block that starts after
    the block's last query position (``q_offset + (i + 1) * bq - 1``) is skipped
    (``lax.cond``, so ``q_offset`` may be traced). Padded keys are masked, padded
    queries sliced off. The maximum is held out of the gradient (the result does
    not depend on it). A row that met no visible key (tracked apart from the scores)
    gives 0; any other row IEEE's answer, NaN included.
    """
    batch, q_tokens, heads, _ = query.shape
    kv_tokens, kv_heads = key.shape[1], key.shape[2]
    group = heads // kv_heads
    dv = value.shape[-1]
    if q_tokens == 0 or kv_tokens == 0:  # no query, or no key for any query: zeros (no blocks to cut)
        return jnp.zeros((batch, q_tokens, heads, dv), value.dtype)
    acc_dtype = accumulation_dtype(query.dtype)
    bq, bk = _block_len(q_tokens, query_block), _block_len(kv_tokens, key_block)
    padded_q, padded_kv = _round_up(q_tokens, bq), _round_up(kv_tokens, bk)
    num_q, num_kv = padded_q // bq, padded_kv // bk

    q, k, v = _padded_heads_first(query, key, value, scale, group, padded_q, padded_kv)
    mask5 = None if mask is None else _grouped_blocks(mask, kv_heads, group, padded_q, padded_kv, False)
    bias5 = None if bias is None else _grouped_blocks(bias, kv_heads, group, padded_q, padded_kv, 0)
    offset = jnp.asarray(q_offset)

    def query_block_out(i):
        q_i = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)  # (B, K, G, bq, H)
        q_pos = offset + i * bq + jnp.arange(bq)  # (bq,)
        mask_i, bias_i = _block(mask5, 3, i * bq, bq), _block(bias5, 3, i * bq, bq)
        carry = _empty_rows((batch, kv_heads, group, bq), dv, acc_dtype)

        def step(carry, j):
            k_j = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)  # (B, K, bk, H)
            v_j = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
            k_pos = j * bk + jnp.arange(bk)  # (bk,)
            m_j, b_j = _block(mask_i, 4, j * bk, bk), _block(bias_i, 4, j * bk, bk)
            return online_softmax_step(
                carry,
                q_i,
                k_j,
                v_j,
                q_pos,
                k_pos,
                m_j,
                b_j,
                kv_tokens=kv_tokens,
                is_causal=is_causal,
                precision=precision,
            )

        def maybe_step(carry, j):
            if not is_causal:
                return step(carry, j), None
            first_key, last_query = j * bk, offset + (i + 1) * bq - 1
            return lax.cond(first_key <= last_query, step, lambda c, _: c, carry, j), None

        (_, l, acc, seen), _ = lax.scan(maybe_step, carry, jnp.arange(num_kv))
        # A row that saw no key gives zeros; one that did keeps IEEE's answer, NaN included (l is NaN, or
        # 0 when its visible scores were all -inf: 0 / 0). Zeros from l alone (l > 0) would swallow NaN.
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        return out.astype(value.dtype)  # (B, K, G, bq, Hv)

    out = lax.map(query_block_out, jnp.arange(num_q))  # (num_q, B, K, G, bq, Hv)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, padded_q, heads, dv)  # (B, T', N, Hv)
    return out[:, :q_tokens]
