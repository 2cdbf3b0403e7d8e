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
causal mask, *then* the ``1/sqrt(head_dim)`` scale, softmax, weights ``@ v``.
Dropout is not implemented per block: :func:`jaxattn.core.causal_attention`
falls back to the naive path whenever dropout is active (training mode with a
non-zero rate), so dropout masks are bit-identical across implementations.

Gradients come from JAX's autodiff through ``scan``/``cond``; the backward pass
keeps per-block residuals (it is not the memory-lean flash backward).

Also here: :func:`xla_causal_attention` (``attention_impl="xla"``) and a faster
inference path for ``MultiHeadAttention`` weights with Q/K/V fused into one
matmul (:func:`fuse_qkv_params`, :func:`fused_mha`), used by ``crosscheck bench``.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

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
    scale: Optional[float] = None,
    block_size: Optional[int] = None,
    softmax_dtype=jnp.float32,
    method: str = "auto",
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
    # As many blocks as block_size asks for, but evened out (rounded up to a multiple of 8) so
    # the zero-padded tail stays small: 768 tokens -> 2 blocks of 384, not 2 of 512.
    num_blocks = math.ceil(tokens / block_size)
    block = min(block_size, -(-math.ceil(tokens / num_blocks) // 8) * 8)
    num_blocks = math.ceil(tokens / block)
    padded = num_blocks * block
    n = math.prod(batch)
    # A few (batch, head) rows at a time: each step's (group, block, block) scores then stay in
    # cache; measured ~25% faster than all 48 rows of the GPT-2-small shape at once.
    most = PREFIX_ROW_GROUP if method == "prefix" else HEAD_GROUP
    group = max(g for g in range(1, min(n, most) + 1) if n % g == 0)
    rows_fn = _prefix_rows if method == "prefix" else _blockwise_rows

    def flat(x):  # (*batch, T, d) -> (n // group, group, padded, d)
        x = _pad_tokens(x.reshape(n, tokens, x.shape[-1]), padded)
        return x.reshape(n // group, group, padded, x.shape[-1])

    def attend(qkv):
        return rows_fn(*qkv, num_blocks, block, jnp.asarray(scale, softmax_dtype), softmax_dtype)

    out = lax.map(attend, (flat(query), flat(key), flat(value)))  # (n // group, group, padded, dv)
    return out.reshape(n, padded, dv)[:, :tokens].reshape(*batch, tokens, dv)


def _blockwise_rows(query, key, value, num_blocks: int, block: int, scale, softmax_dtype):
    """The online-softmax loops on ``(rows, num_blocks * block, d)`` arrays -> ``(rows, num_blocks * block, dv)``."""
    rows, padded, _ = query.shape
    dv = value.shape[-1]

    def blocks(x):  # (rows, padded, d) -> (num_blocks, rows, block, d)
        return x.reshape(rows, num_blocks, block, x.shape[-1]).swapaxes(0, 1)

    q_blocks, k_blocks, v_blocks = blocks(query), blocks(key), blocks(value)
    diagonal = jnp.tril(jnp.ones((block, block), dtype=jnp.bool_))  # within the diagonal block

    def scores(q, k):  # (rows, block, d) x (rows, block, d) -> (rows, block, block) in softmax_dtype
        return jnp.einsum("nqd,nkd->nqk", q, k).astype(softmax_dtype)

    def update(carry, s, v):
        """Online-softmax step: fold one key block's (already scaled/masked) scores ``s`` into the carry."""
        m, l, acc = carry  # (rows, block), (rows, block), (rows, block, dv)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])  # (rows, block, block)
        correction = jnp.exp(m - m_new)
        l_new = l * correction + p.sum(axis=-1)
        acc_new = acc * correction[..., None] + jnp.einsum("nqk,nkd->nqd", p.astype(v.dtype), v).astype(
            softmax_dtype
        )
        return m_new, l_new, acc_new

    def query_block(i, q):
        # The diagonal block first: every row has key 0 <= its own index, so m is finite from here on.
        s = jnp.where(diagonal, scores(q, k_blocks[i]), -jnp.inf) * scale
        m = s.max(axis=-1)
        p = jnp.exp(s - m[..., None])
        pv = jnp.einsum("nqk,nkd->nqd", p.astype(value.dtype), v_blocks[i]).astype(softmax_dtype)
        carry = (m, p.sum(axis=-1), pv)

        def key_block(carry, kv):
            j, k, v = kv
            # Blocks above the diagonal (j >= i) are skipped, not computed-and-masked.
            carry = lax.cond(j < i, lambda c: update(c, scores(q, k) * scale, v), lambda c: c, carry)
            return carry, None

        carry, _ = lax.scan(key_block, carry, (jnp.arange(num_blocks), k_blocks, v_blocks))
        _, l, acc = carry
        return (acc / l[..., None]).astype(value.dtype)  # (rows, block, dv)

    out = lax.map(lambda args: query_block(*args), (jnp.arange(num_blocks), q_blocks))  # (nb, rows, block, dv)
    return out.swapaxes(0, 1).reshape(rows, padded, dv)


def _prefix_rows(query, key, value, num_blocks: int, block: int, scale, softmax_dtype):
    """Query block ``i`` against its key prefix, one exact softmax each: ``(rows, padded, d)`` -> ``(rows, padded, dv)``.

    The prefix splits into the off-diagonal keys ``[0, i * block)``, which need no
    mask, and the diagonal block, which does; both share the row maximum and
    denominator, and the output is normalised once, after ``@ v``.
    """
    diagonal = jnp.tril(jnp.ones((block, block), dtype=jnp.bool_))
    query = query.astype(softmax_dtype) * scale  # scaling q is scaling every score, at T x d cost

    def scores(q, k):  # (rows, block, d) x (rows, keys, d) -> (rows, block, keys)
        return jnp.einsum("nqd,nkd->nqk", q.astype(k.dtype), k).astype(softmax_dtype)

    def weighted(p, v):  # (rows, block, keys) x (rows, keys, dv) -> (rows, block, dv)
        return jnp.einsum("nqk,nkd->nqd", p.astype(v.dtype), v).astype(softmax_dtype)

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


def xla_causal_attention(
    query: Float[Array, "*batch q d"],
    key: Float[Array, "*batch k d"],
    value: Float[Array, "*batch k dv"],
    *,
    scale: Optional[float] = None,
) -> Float[Array, "*batch q dv"]:
    """``jax.nn.dot_product_attention`` wants ``(batch, tokens, heads, head_dim)``: leading dims become heads."""
    *batch, tokens, head_dim = query.shape

    def to_bthd(x):  # (*batch, T, d) -> (1, T, prod(batch), d)
        return jnp.swapaxes(x.reshape(-1, tokens, x.shape[-1]), 0, 1)[None]

    out = jax.nn.dot_product_attention(
        to_bthd(query), to_bthd(key), to_bthd(value), scale=scale, is_causal=True
    )  # (1, T, n, dv)
    return jnp.swapaxes(out[0], 0, 1).reshape(*batch, tokens, value.shape[-1])


#: ``attention_impl="auto"`` switches from the naive path to the blockwise one at
#: this many tokens (see the performance section of the README for the sweep).
AUTO_BLOCKWISE_MIN_TOKENS = 256


# --- a faster multi-head path: one fused Q/K/V matmul + blockwise attention -------------------------


def fuse_qkv_params(params: dict) -> dict:
    """``MultiHeadAttention`` params -> ``{"W_qkv": {"kernel", ["bias"]}, "out_proj": ...}``.

    The three ``(d_in, d_out)`` kernels are concatenated along the output into one
    ``(d_in, 3 * d_out)`` kernel (the book's ``MultiHeadAttentionCombinedQKV`` layout):
    one larger matmul instead of three. Done once, outside the jitted forward.
    """
    names = ("W_query", "W_key", "W_value")
    fused = {"kernel": jnp.concatenate([params[n]["kernel"] for n in names], axis=-1)}  # (d_in, 3 d_out)
    if "bias" in params["W_query"]:
        fused["bias"] = jnp.concatenate([params[n]["bias"] for n in names], axis=-1)  # (3 d_out,)
    return {"W_qkv": fused, "out_proj": dict(params["out_proj"])}


def fused_mha(
    fused: dict,
    x: Float[Array, "batch tokens d_in"],
    *,
    num_heads: int,
    impl: str = "blockwise",
) -> Float[Array, "batch tokens d_out"]:
    """``MultiHeadAttention.apply`` with fused Q/K/V params (from :func:`fuse_qkv_params`), inference only."""
    from jaxattn import core  # core imports this module

    b, tokens, _ = x.shape
    qkv = x @ fused["W_qkv"]["kernel"]  # (b, T, 3 d_out)
    if "bias" in fused["W_qkv"]:
        qkv = qkv + fused["W_qkv"]["bias"]
    d_out = qkv.shape[-1] // 3
    qkv = qkv.reshape(b, tokens, 3, num_heads, d_out // num_heads)  # (b, T, 3, H, hd)
    qkv = qkv.transpose(2, 0, 3, 1, 4)  # (3, b, H, T, hd)
    context_vec, _ = core.causal_attention(qkv[0], qkv[1], qkv[2], impl=impl)  # (b, H, T, hd)
    context_vec = core.merge_heads(context_vec)  # (b, T, d_out)
    return context_vec @ fused["out_proj"]["kernel"] + fused["out_proj"]["bias"]
