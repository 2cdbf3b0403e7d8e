"""The ttnn programs: one per variant, written once against the real ttnn API.

Each program takes the ``ttnn`` module and an opened ``device`` as arguments (the
real package on a Tenstorrent device or ttsim, or :mod:`crosscheck.tt.host_model`
on the CPU; see :mod:`crosscheck.tt.runtime`) plus ``x``, a bfloat16 TILE tensor
on the device, and ``parameters`` from :func:`crosscheck.tt.port.preprocess_parameters`
(``parameters.W_query.weight`` is ``(in, out)``, biases are ``(1, out)``). Every
program mirrors its torch class in :mod:`crosscheck.references.torch_ref` line by line and
returns the context vectors as a ttnn tensor. ``attention_mask`` (numpy, ``x.shape[:-1]``,
1 = real token, 0 = padding, or ``None``: no padding, today's computation bit for bit)
hides padded keys with the additive mask, combined with the causal one; a query that
sees no key at all gets a zero context vector (not the mean of the values, not NaN).

Pitfalls these programs avoid (ttnn-notes §7): matmul never tilizes (all operands
are TILE); head_dim is whatever the config gives (1 in the book's toy sizes), so
the generic programs use only matmul/linear, reshape, permute, transpose, slice,
add, multiply and softmax (plus, for grouped-query attention, concat for RoPE's
half rotation, ``rms_norm`` for Qwen3's q/k norm and ``repeat_interleave`` for the
shared key/value heads); the SDPA programs are picked only when head_dim is a
multiple of 32; there is no unary minus on ttnn tensors and slice bounds are never
negative. The masks are additive (0 = attend, :data:`ADDITIVE_MASK_VALUE` =
masked), built with numpy (:func:`key_visibility`) and sent with ``from_torch``. Dropout is
the identity: the programs run inference, like the torch reference in ``eval()`` mode.

KV-cache decoding lives in :mod:`crosscheck.tt.decode_programs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np

#: Masked score, added before the scaling as the book fills with -inf before dividing.
#: Same value as ``jaxattn.masks.ADDITIVE_MASK_VALUE`` (not imported: that module needs JAX).
#: In bfloat16 it is stored as -998244352; any score this low gives exp(...) == 0.
ADDITIVE_MASK_VALUE = -1.0e9


def compute_kernel_config(ttnn):
    """HiFi4 products, exact exp, fp32 accumulation: the device's most accurate setting, and the host model's math.

    ttnn uses a passed config verbatim, so ``math_fidelity`` is always explicit
    (the defaults are HiFi2 for matmul and ``MathFidelity.Invalid`` in a fresh config).
    On Wormhole, ttnn warns that HiFi4 with fp32 accumulation can rarely be off
    by a power of two; the cross-check would report such an element as a mismatch.
    """
    return ttnn.WormholeComputeKernelConfig(
        math_fidelity=ttnn.MathFidelity.HiFi4,
        math_approx_mode=False,
        fp32_dest_acc_en=True,
        packer_l1_acc=False,
    )


# --- stage taps (crosscheck --stages) --------------------------------------------------------------
#
# ``crosscheck --stages`` compares the programs' intermediates with torch's and Flax's. A program
# names each intermediate with :func:`tap`, which records it only inside :func:`recording_stages`
# (the decode programs share the helpers and never record); the tensors stay ttnn tensors, read
# back by the caller while the device is open.

_STAGES: ContextVar[dict | None] = ContextVar("crosscheck_tt_stages", default=None)


@contextmanager
def recording_stages() -> Iterator[dict]:
    """Within the block, :func:`tap` appends to the yielded ``{stage name: [ttnn tensors]}`` (one per head or call)."""
    stages: dict = {}
    token = _STAGES.set(stages)
    try:
        yield stages
    finally:
        _STAGES.reset(token)


def tap(name: str, tensor):
    """``tensor``, recorded as stage ``name`` when a :func:`recording_stages` block is active."""
    stages = _STAGES.get()
    if stages is not None:
        stages.setdefault(name, []).append(tensor)
    return tensor


# --- masks ----------------------------------------------------------------------------------------


def key_visibility(
    attention_mask: np.ndarray | None,
    q_tokens: int,
    kv_tokens: int | None = None,
    *,
    causal: bool,
    q_offset: int = 0,
) -> np.ndarray | None:
    """Which keys each query sees: bool ``([batch,] q_tokens, kv_tokens)``, or ``None`` when every query sees every key.

    ``attention_mask``: ``([batch,] kv_tokens)``, 1 = real key, 0 = padding, or ``None``.
    ``causal``: query ``i`` sits at position ``q_offset + i`` and sees keys ``0 .. q_offset + i``.
    """
    kv_tokens = q_tokens if kv_tokens is None else kv_tokens
    if attention_mask is None and not causal:
        return None
    visible = np.ones((q_tokens, kv_tokens), dtype=bool)
    if causal:
        visible &= np.arange(kv_tokens)[None, :] <= (q_offset + np.arange(q_tokens))[:, None]
    if attention_mask is not None:
        real = np.asarray(attention_mask).astype(bool)
        if real.shape[-1] != kv_tokens:
            raise ValueError(f"attention_mask covers {real.shape[-1]} keys, expected {kv_tokens} (shape {real.shape})")
        visible = visible & real[..., None, :]  # ([b,] q_tokens, kv_tokens)
    return visible


def mask_tensors(ttnn, device, visible: np.ndarray, rank: int):
    """``(additive mask, row visibility)`` of ``visible`` as bf16 TILE tensors of ``rank`` dims on ``device``.

    ``visible`` ``([batch,] q, k)`` becomes ``(batch|1, 1, ..., q, k)`` (0 = attend,
    :data:`ADDITIVE_MASK_VALUE` = masked) and ``(batch|1, 1, ..., q, 1)`` (1 = the query
    sees a key, 0 = it sees none); the second is ``None`` when every query sees a key.
    """
    lead = visible.shape[:-2]
    if rank - 2 < len(lead):
        raise ValueError(f"a ([batch,] q, k) mask of shape {visible.shape} does not fit rank-{rank} scores")

    def shaped(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32).reshape((*lead, *((1,) * (rank - 2 - len(lead))), *a.shape[-2:]))

    def send(a: np.ndarray):
        return ttnn.from_torch(shaped(a), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=device)

    additive = send(np.where(visible, np.float32(0.0), np.float32(ADDITIVE_MASK_VALUE)))
    rows = np.asarray(visible.any(axis=-1, keepdims=True))  # ([b,] q, 1)
    return additive, (None if rows.all() else send(rows))


def causal_mask(ttnn, device, tokens: int, rank: int):
    """Additive causal mask ``(1, ..., 1, tokens, tokens)`` of ``rank`` dims, bf16 TILE on ``device``."""
    visible = key_visibility(None, tokens, causal=True)
    assert visible is not None  # causal: not every query sees every key
    return mask_tensors(ttnn, device, visible, rank)[0]


# --- building blocks -------------------------------------------------------------------------------


def linear(ttnn, x, parameters):
    """``nn.Linear``: ``x @ weight (+ bias)`` with ``weight`` already ``(in, out)``."""
    return ttnn.linear(
        x, parameters.weight, bias=parameters.get("bias"), compute_kernel_config=compute_kernel_config(ttnn)
    )


def masked_attention(ttnn, device, queries, keys, values, visible: np.ndarray | None, *, scaled: bool = True):
    """The book's attention on ``(..., tokens, head_dim)`` tensors; ``visible`` (numpy or ``None``): who sees whom."""
    config = compute_kernel_config(ttnn)
    rank = len(queries.shape)
    head_dim = keys.shape[-1]
    attn_scores = ttnn.matmul(queries, ttnn.transpose(keys, -2, -1), compute_kernel_config=config)  # (..., Tq, Tk)
    tap("scores", attn_scores)
    rows = None
    if visible is not None:
        additive, rows = mask_tensors(ttnn, device, visible, rank)
        attn_scores = ttnn.add(attn_scores, additive)
    if scaled:
        attn_scores = ttnn.multiply(attn_scores, 1.0 / math.sqrt(head_dim))
    attn_weights = tap("weights", ttnn.softmax(attn_scores, dim=-1, compute_kernel_config=config))
    context_vec = ttnn.matmul(attn_weights, values, compute_kernel_config=config)  # (..., Tq, head_dim)
    if rows is not None:
        context_vec = ttnn.multiply(context_vec, rows)  # a query that sees no key: 0, not the mean of the values
    return tap("context", context_vec)


def attention(ttnn, device, queries, keys, values, *, causal: bool, scaled: bool = True, attention_mask=None):
    """The book's attention: scores, mask (causal and/or padding), scale, softmax, @ values."""
    visible = key_visibility(attention_mask, queries.shape[-2], keys.shape[-2], causal=causal)
    return masked_attention(ttnn, device, queries, keys, values, visible, scaled=scaled)


def sdpa_attention(ttnn, device, queries, keys, values, *, causal: bool, scaled: bool = True, attention_mask=None):
    """The same through ``ttnn.transformer.scaled_dot_product_attention`` (4-D, head_dim % 32 == 0).

    With padding, the op's ``attn_mask`` (``[b, 1, Sq, Sk]``, additive, exclusive with
    ``is_causal``) carries the causal and the padding mask together; the op adds it after
    scaling. Queries that see no key get the uniform mean from the op and are zeroed after.
    """
    head_dim = keys.shape[-1]
    if attention_mask is None:
        return ttnn.transformer.scaled_dot_product_attention(
            queries,
            keys,
            values,
            is_causal=causal,
            scale=1.0 / math.sqrt(head_dim) if scaled else 1.0,
            compute_kernel_config=compute_kernel_config(ttnn),
        )
    visible = key_visibility(attention_mask, queries.shape[-2], keys.shape[-2], causal=causal)
    assert visible is not None  # an attention mask always gives one
    additive, rows = mask_tensors(ttnn, device, visible, 4)
    context_vec = ttnn.transformer.scaled_dot_product_attention(
        queries,
        keys,
        values,
        attn_mask=additive,
        is_causal=False,
        scale=1.0 / math.sqrt(head_dim) if scaled else 1.0,
        compute_kernel_config=compute_kernel_config(ttnn),
    )
    return context_vec if rows is None else ttnn.multiply(context_vec, rows)


def split_heads(ttnn, t, num_heads: int):
    """``(b, T, d_out)`` -> ``(b, H, T, head_dim)`` as the book's ``view(...).transpose(1, 2)``."""
    b, tokens, d_out = t.shape
    t = ttnn.reshape(t, (b, tokens, num_heads, d_out // num_heads))  # (b, T, H, hd)
    return ttnn.permute(t, (0, 2, 1, 3))  # (b, H, T, hd)


def merge_heads(ttnn, t):
    """``(b, H, T, head_dim)`` -> ``(b, T, H * head_dim)``."""
    b, num_heads, tokens, head_dim = t.shape
    t = ttnn.permute(t, (0, 2, 1, 3))  # (b, T, H, hd)
    return ttnn.reshape(t, (b, tokens, num_heads * head_dim))  # (b, T, d_out)


def split_fused_qkv(ttnn, qkv, num_heads: int):
    """``(b, T, 3 * d_out)`` with ``[q | k | v]`` blocks -> three ``(b, H, T, head_dim)`` tensors."""
    b, tokens, three_d = qkv.shape
    head_dim = three_d // 3 // num_heads
    qkv = ttnn.reshape(qkv, (b, tokens, 3, num_heads, head_dim))  # (b, T, 3, H, hd)
    qkv = ttnn.permute(qkv, (2, 0, 3, 1, 4))  # (3, b, H, T, hd)
    end = [b, num_heads, tokens, head_dim]
    parts = [ttnn.slice(qkv, [i, 0, 0, 0, 0], [i + 1, *end]) for i in range(3)]  # each (1, b, H, T, hd)
    return [ttnn.reshape(p, tuple(end)) for p in parts]  # queries, keys, values


Attend = Callable[..., Any]


# --- projections: x -> (queries, keys, values) heads, and context heads -> output -------------------
#
# Each takes ``(ttnn, x | context_vec, parameters, config)``; heads are ``(b, H, T, head_dim)``. The
# forward programs and the decode programs share them, so both run the same ops around attention.


def single_head_qkv(ttnn, x, parameters, config):
    """CausalAttention's projections as one head ``(b, 1, T, d_out)`` (the cache layout)."""
    keys = split_heads(ttnn, linear(ttnn, x, parameters.W_key), 1)  # (b, 1, T, d_out)
    queries = split_heads(ttnn, linear(ttnn, x, parameters.W_query), 1)
    values = split_heads(ttnn, linear(ttnn, x, parameters.W_value), 1)
    return queries, keys, values


def single_head_output(ttnn, context_vec, parameters, config):
    return merge_heads(ttnn, context_vec)  # (b, T, d_out)


def mha_qkv(ttnn, x, parameters, config):
    keys = split_heads(ttnn, linear(ttnn, x, parameters.W_key), config.num_heads)  # (b, H, T, hd)
    queries = split_heads(ttnn, linear(ttnn, x, parameters.W_query), config.num_heads)
    values = split_heads(ttnn, linear(ttnn, x, parameters.W_value), config.num_heads)
    return tap("queries", queries), tap("keys", keys), tap("values", values)


def mha_output(ttnn, context_vec, parameters, config):
    return linear(ttnn, merge_heads(ttnn, context_vec), parameters.out_proj)  # (b, T, d_out)


def combined_qkv_heads(ttnn, x, parameters, config):
    qkv = linear(ttnn, x, parameters.qkv)  # (b, T, 3 * d_out)
    return _tap_qkv(split_fused_qkv(ttnn, qkv, config.num_heads))  # each (b, H, T, hd)


def combined_output(ttnn, context_vec, parameters, config):
    return linear(ttnn, merge_heads(ttnn, context_vec), parameters.proj)  # (b, T, d_out)


def torch_mha_qkv(ttnn, x, parameters, config):
    # torch keeps in_proj as bare parameters; the port gives them the nn.Linear shape (weight, bias).
    qkv = linear(ttnn, x, parameters.in_proj)  # (b, T, 3 * E), [q | k | v] as torch's in_proj_weight rows
    return _tap_qkv(split_fused_qkv(ttnn, qkv, config.num_heads))


def _tap_qkv(qkv):
    queries, keys, values = qkv
    return [tap("queries", queries), tap("keys", keys), tap("values", values)]


def torch_mha_output(ttnn, context_vec, parameters, config):
    return linear(ttnn, merge_heads(ttnn, context_vec), parameters.out_proj)  # (b, T, E)


# --- one program per variant ----------------------------------------------------------------------


def simplified_self_attention(ttnn, device, x, *, parameters, config, attention_mask=None):
    """Section 3.3: ``softmax(x @ x.T) @ x``, no weights, no scaling."""
    return attention(ttnn, device, x, x, x, causal=False, scaled=False, attention_mask=attention_mask)


def self_attention_v1(ttnn, device, x, *, parameters, config, attention_mask=None):
    """Section 3.4 ``SelfAttention_v1``: raw ``(d_in, d_out)`` matrices."""
    mm = lambda a, b: ttnn.matmul(a, b, compute_kernel_config=compute_kernel_config(ttnn))  # noqa: E731
    keys = tap("keys", mm(x, parameters.W_key))
    queries = tap("queries", mm(x, parameters.W_query))
    values = tap("values", mm(x, parameters.W_value))
    return attention(ttnn, device, queries, keys, values, causal=False, attention_mask=attention_mask)


def self_attention_v2(ttnn, device, x, *, parameters, config, attention_mask=None):
    """Section 3.4 ``SelfAttention_v2``: ``nn.Linear`` projections."""
    keys = tap("keys", linear(ttnn, x, parameters.W_key))
    queries = tap("queries", linear(ttnn, x, parameters.W_query))
    values = tap("values", linear(ttnn, x, parameters.W_value))
    return attention(ttnn, device, queries, keys, values, causal=False, attention_mask=attention_mask)


def causal_attention(ttnn, device, x, *, parameters, config, attention_mask=None):
    """Section 3.5.3: projections, causal mask, scale, softmax (dropout: identity)."""
    keys = tap("keys", linear(ttnn, x, parameters.W_key))  # (b, T, d_out)
    queries = tap("queries", linear(ttnn, x, parameters.W_query))
    values = tap("values", linear(ttnn, x, parameters.W_value))
    return attention(ttnn, device, queries, keys, values, causal=True, attention_mask=attention_mask)


def multi_head_attention_wrapper(ttnn, device, x, *, parameters, config, attention_mask=None):
    """Section 3.6.1: ``torch.cat([head(x) for head in heads], dim=-1)``."""
    heads = [
        causal_attention(ttnn, device, x, parameters=head, config=config, attention_mask=attention_mask)
        for head in parameters.heads
    ]
    return heads[0] if len(heads) == 1 else ttnn.concat(heads, dim=-1)  # (b, T, H * d_out)


def _multi_head_attention(ttnn, device, x, *, parameters, config, attend: Attend, attention_mask=None):
    queries, keys, values = mha_qkv(ttnn, x, parameters, config)  # (b, H, T, hd)
    context_vec = attend(ttnn, device, queries, keys, values, causal=True, attention_mask=attention_mask)
    return mha_output(ttnn, context_vec, parameters, config)  # (b, T, d_out)


def multi_head_attention(ttnn, device, x, *, parameters, config, attention_mask=None):
    """Section 3.6.2: fused heads, causal, ``out_proj``."""
    return _multi_head_attention(
        ttnn, device, x, parameters=parameters, config=config, attend=attention, attention_mask=attention_mask
    )


def multi_head_attention_sdpa(ttnn, device, x, *, parameters, config, attention_mask=None):
    """:func:`multi_head_attention` with the fused SDPA kernel (head_dim % 32 == 0)."""
    return _multi_head_attention(
        ttnn, device, x, parameters=parameters, config=config, attend=sdpa_attention, attention_mask=attention_mask
    )


def _combined_qkv(ttnn, device, x, *, parameters, config, attend: Attend, attention_mask=None):
    queries, keys, values = combined_qkv_heads(ttnn, x, parameters, config)  # each (b, H, T, hd)
    context_vec = attend(ttnn, device, queries, keys, values, causal=True, attention_mask=attention_mask)
    return combined_output(ttnn, context_vec, parameters, config)  # (b, T, d_out)


def multi_head_attention_combined_qkv(ttnn, device, x, *, parameters, config, attention_mask=None):
    """The book's bonus class: one ``qkv`` linear viewed as ``(3, heads, head_dim)``, then ``proj``."""
    return _combined_qkv(
        ttnn, device, x, parameters=parameters, config=config, attend=attention, attention_mask=attention_mask
    )


def multi_head_attention_combined_qkv_sdpa(ttnn, device, x, *, parameters, config, attention_mask=None):
    return _combined_qkv(
        ttnn, device, x, parameters=parameters, config=config, attend=sdpa_attention, attention_mask=attention_mask
    )


def _torch_mha(ttnn, device, x, *, parameters, config, attend: Attend, attention_mask=None):
    queries, keys, values = torch_mha_qkv(ttnn, x, parameters, config)  # each (b, H, T, hd)
    context_vec = attend(ttnn, device, queries, keys, values, causal=config.causal, attention_mask=attention_mask)
    return torch_mha_output(ttnn, context_vec, parameters, config)  # (b, T, E)


def torch_multihead_attention(ttnn, device, x, *, parameters, config, attention_mask=None):
    """``nn.MultiheadAttention(batch_first=True)`` self-attention, causal if ``config.causal``."""
    return _torch_mha(
        ttnn, device, x, parameters=parameters, config=config, attend=attention, attention_mask=attention_mask
    )


def torch_multihead_attention_sdpa(ttnn, device, x, *, parameters, config, attention_mask=None):
    return _torch_mha(
        ttnn, device, x, parameters=parameters, config=config, attend=sdpa_attention, attention_mask=attention_mask
    )


# --- grouped-query attention (the book's Llama 3 / Qwen3 GroupedQueryAttention) ----------------------
#
# RoPE pairs dimensions as split halves (the book's and HF's ``rotate_half``: dim ``i`` with
# ``i + head_dim/2``), not interleaved (Meta's original). Positions are ``0 .. tokens-1`` for every
# sequence, as in the book (padding does not shift them). Key/value heads are expanded as the book's
# ``repeat_interleave(group_size, dim=1)``: kv head ``g`` serves query heads ``g*group_size .. (g+1)*group_size-1``.


def compute_rope_params(
    head_dim: int, theta_base: float = 10_000.0, context_length: int = 4096, freq_config: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The book's ``compute_rope_params`` (llama3.py, incl. the Llama 3 frequency scaling) in numpy float32.

    Returns ``(cos, sin)``, each ``(context_length, head_dim)``: angle ``p * inv_freq[j]`` in
    column ``j`` and again in column ``j + head_dim/2``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    f32 = np.float32
    inv_freq = f32(1.0) / (f32(theta_base) ** (np.arange(0, head_dim, 2, dtype=f32)[: head_dim // 2] / f32(head_dim)))
    if freq_config is not None:
        factor, low, high = (f32(freq_config[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        original = f32(freq_config["original_context_length"])
        low_freq_wavelen, high_freq_wavelen = original / low, original / high
        wavelen = f32(2 * np.pi) / inv_freq
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (original / wavelen - low) / (high - low)
        smoothed_inv_freq = (f32(1) - smooth_factor) * (inv_freq / factor) + smooth_factor * inv_freq
        is_medium_freq = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
        inv_freq = np.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama).astype(f32)
    positions = np.arange(context_length, dtype=f32)
    angles = positions[:, None] * inv_freq[None, :]  # (context_length, head_dim // 2)
    angles = np.concatenate([angles, angles], axis=1)  # (context_length, head_dim)
    return np.cos(angles).astype(f32), np.sin(angles).astype(f32)


def rope_tables(ttnn, device, tokens: int, config, start: int = 0):
    """``(cos, sin)`` for positions ``start .. start+tokens-1`` as ``(1, 1, tokens, head_dim)`` bf16 TILE tensors
    on ``device``.

    Row ``p`` does not depend on ``start`` or on the table's length (each angle is the float32
    product ``p * inv_freq[j]``), so a decode step's one-row table at ``pos`` is the forward's row ``pos``.
    """
    cos, sin = compute_rope_params(config.resolved_head_dim(), config.rope_theta, start + tokens, config.freq_config())

    def send(a: np.ndarray):
        return ttnn.from_torch(
            np.ascontiguousarray(a[start:][None, None]), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=device
        )

    return send(cos), send(sin)


def apply_rope(ttnn, x, cos, sin):
    """The book's ``apply_rope`` on ``(b, H, T, head_dim)``: ``x * cos + cat(-x2, x1) * sin``."""
    b, heads, tokens, head_dim = x.shape
    half = head_dim // 2
    x1 = ttnn.slice(x, [0, 0, 0, 0], [b, heads, tokens, half])  # (b, H, T, hd/2), first half
    x2 = ttnn.slice(x, [0, 0, 0, half], [b, heads, tokens, head_dim])  # second half
    rotated = ttnn.concat([ttnn.multiply(x2, -1.0), x1], dim=-1)  # (b, H, T, hd); no unary minus in ttnn
    return ttnn.add(ttnn.multiply(x, cos), ttnn.multiply(rotated, sin))


def rms_norm(ttnn, x, parameters):
    """The book's ``RMSNorm(head_dim, eps=1e-6)`` over the last dim; ``parameters.scale`` is ``(1, head_dim)``."""
    return ttnn.rms_norm(x, epsilon=1e-6, weight=parameters.scale, compute_kernel_config=compute_kernel_config(ttnn))


def gqa_qkv(ttnn, x, parameters, config):
    """Projections, heads, optional q/k RMSNorm.

    Queries ``(b, H, T, hd)``, keys/values ``(b, G, T, hd)`` (before RoPE).
    """
    if config.num_heads % config.kv_heads():
        raise ValueError(f"num_heads={config.num_heads} must be a multiple of kv_heads={config.kv_heads()}")
    queries = split_heads(ttnn, linear(ttnn, x, parameters.W_query), config.num_heads)  # (b, H, T, hd)
    keys = split_heads(ttnn, linear(ttnn, x, parameters.W_key), config.kv_heads())  # (b, G, T, hd)
    values = split_heads(ttnn, linear(ttnn, x, parameters.W_value), config.kv_heads())  # (b, G, T, hd)
    queries, keys, values = tap("queries", queries), tap("keys", keys), tap("values", values)
    if config.qk_norm:  # Qwen3
        queries = tap("queries_normed", rms_norm(ttnn, queries, parameters.q_norm))
        keys = tap("keys_normed", rms_norm(ttnn, keys, parameters.k_norm))
    return queries, keys, values


def gqa_rope(ttnn, device, queries, keys, config, start: int = 0):
    """RoPE on queries ``(b, H, T, hd)`` and keys ``(b, G, T, hd)`` at positions ``start .. start + T - 1``."""
    cos, sin = rope_tables(ttnn, device, queries.shape[-2], config, start)  # (1, 1, T, hd)
    return tap("queries_rope", apply_rope(ttnn, queries, cos, sin)), tap("keys_rope", apply_rope(ttnn, keys, cos, sin))


def expand_kv_heads(ttnn, t, group_size: int):
    """``(b, G, T, hd)`` -> ``(b, G * group_size, T, hd)`` as the book's ``repeat_interleave(group_size, dim=1)``."""
    return t if group_size == 1 else ttnn.repeat_interleave(t, group_size, 1)


def gqa_expand(ttnn, t, config):
    """Shared key/value heads ``(b, G, T, hd)`` -> one per query head ``(b, H, T, hd)`` (at attention time only)."""
    return expand_kv_heads(ttnn, t, config.num_heads // config.kv_heads())


def grouped_query_attention(ttnn, device, x, *, parameters, config, attention_mask=None):
    """The book's ``GroupedQueryAttention`` (Llama 3; Qwen3 with ``config.qk_norm``): RoPE, shared K/V heads, causal.

    Reads ``parameters.W_query.weight`` ``(d_in, H * hd)``, ``W_key``/``W_value.weight``
    ``(d_in, G * hd)``, ``out_proj.weight`` ``(H * hd, out)`` (each with an optional ``(1, n)``
    ``bias``) and, with ``config.qk_norm``, ``q_norm.scale``/``k_norm.scale`` ``(1, hd)``;
    ``H = config.num_heads``, ``G = config.kv_heads()``, ``hd = config.resolved_head_dim()``.
    """
    queries, keys, values = gqa_qkv(ttnn, x, parameters, config)  # (b, H, T, hd); (b, G, T, hd)
    queries, keys = gqa_rope(ttnn, device, queries, keys, config)  # positions 0 .. T-1
    keys = gqa_expand(ttnn, keys, config)  # (b, H, T, hd)
    values = gqa_expand(ttnn, values, config)  # (b, H, T, hd)
    context_vec = attention(ttnn, device, queries, keys, values, causal=True, attention_mask=attention_mask)
    return mha_output(ttnn, context_vec, parameters, config)  # (b, T, out)


#: ``Variant.ttnn_program`` -> program.
PROGRAMS: dict[str, Callable] = {
    f.__name__: f
    for f in (
        simplified_self_attention,
        self_attention_v1,
        self_attention_v2,
        causal_attention,
        multi_head_attention_wrapper,
        multi_head_attention,
        multi_head_attention_combined_qkv,
        torch_multihead_attention,
        grouped_query_attention,
    )
}

#: Programs with an SDPA twin, used when every head's dim is a multiple of the tile size.
SDPA_PROGRAMS: dict[str, Callable] = {
    "multi_head_attention": multi_head_attention_sdpa,
    "multi_head_attention_combined_qkv": multi_head_attention_combined_qkv_sdpa,
    "torch_multihead_attention": torch_multihead_attention_sdpa,
}

TILE_SIZE = 32


def head_dim(program: str, config) -> int:
    """The per-head dim ``program`` attends over under ``config`` (a resolved AttnConfig)."""
    return config.resolved_head_dim()


def select(program: str, config) -> tuple[str, Callable]:
    """``(name, program)`` to run: the SDPA twin when it exists and head_dim % 32 == 0."""
    if program not in PROGRAMS:
        raise KeyError(f"unknown ttnn program {program!r}; known: {', '.join(PROGRAMS)}")
    if program in SDPA_PROGRAMS and head_dim(program, config) % TILE_SIZE == 0:
        fn = SDPA_PROGRAMS[program]
        return fn.__name__, fn
    return program, PROGRAMS[program]
