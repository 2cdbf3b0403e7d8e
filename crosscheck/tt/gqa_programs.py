"""The ttnn program of grouped-query attention (the book's Llama 3 / Qwen3 ``GroupedQueryAttention``).

Written like :mod:`crosscheck.tt.programs`, with three more ops: ``concat`` for RoPE's half rotation,
``rms_norm`` for Qwen3's q/k norm and ``repeat_interleave`` for the shared key/value heads. The decode
program (:mod:`crosscheck.tt.decode_programs`) reuses :func:`gqa_qkv`, :func:`gqa_rope` and :func:`gqa_expand`.
"""

from __future__ import annotations

import numpy as np

from crosscheck.tt.ops import attention, compute_kernel_config, linear, split_heads, tap
from crosscheck.tt.programs import mha_output

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
