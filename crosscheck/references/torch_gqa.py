# Copyright (c) Sebastian Raschka under Apache License 2.0 (see LICENSE.txt).
# Source for "Build a Large Language Model From Scratch"
#   - https://www.manning.com/books/build-a-large-language-model-from-scratch
# Code: https://github.com/rasbt/LLMs-from-scratch
#
# Copied from the llms-from-scratch 1.0.19 wheel (llms_from_scratch/llama3.py and qwen3.py):
# the two GroupedQueryAttention classes (renamed Llama3GroupedQueryAttention and
# Qwen3GroupedQueryAttention; code and state-dict keys unchanged), qwen3's RMSNorm, and
# llama3's compute_rope_params / apply_rope (qwen3's are the same without freq_config).
# Only padding_mask and causal_forward at the end are ours.
"""Torch float32 references for grouped-query attention with RoPE: the book's code as it is.

RoPE layout: split halves (``rotated = cat(-x2, x1)``), as Hugging Face's ``rotate_half``,
not Meta's interleaved pairs. KV groups are expanded with ``repeat_interleave`` along the heads,
so query head ``h`` reads kv group ``h // (num_heads // num_kv_groups)``.

State-dict keys: ``W_query.weight``, ``W_key.weight``, ``W_value.weight``, ``out_proj.weight``
and, for ``Qwen3GroupedQueryAttention(qk_norm=True)``, ``q_norm.scale`` and ``k_norm.scale``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from crosscheck.references.torch_ref import check_attention_mask


class Llama3GroupedQueryAttention(nn.Module):
    def __init__(self, d_in, d_out, num_heads, num_kv_groups, dtype=None):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        assert num_heads % num_kv_groups == 0, "num_heads must be divisible by num_kv_groups"

        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads

        self.W_key = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * self.head_dim, bias=False, dtype=dtype)
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups

        self.W_query = nn.Linear(d_in, d_out, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(d_out, d_out, bias=False, dtype=dtype)

    def forward(self, x, mask, cos, sin):
        b, num_tokens, d_in = x.shape

        queries = self.W_query(x)  # Shape: (b, num_tokens, d_out)
        keys = self.W_key(x)  # Shape: (b, num_tokens, num_kv_groups * head_dim)
        values = self.W_value(x)  # Shape: (b, num_tokens, num_kv_groups * head_dim)

        # Reshape queries, keys, and values
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim)
        keys = keys.view(b, num_tokens, self.num_kv_groups, self.head_dim)
        values = values.view(b, num_tokens, self.num_kv_groups, self.head_dim)

        # Transpose keys, values, and queries
        keys = keys.transpose(1, 2)  # Shape: (b, num_kv_groups, num_tokens, head_dim)
        values = values.transpose(1, 2)  # Shape: (b, num_kv_groups, num_tokens, head_dim)
        queries = queries.transpose(1, 2)  # Shape: (b, num_heads, num_tokens, head_dim)

        # Apply RoPE
        keys = apply_rope(keys, cos, sin)
        queries = apply_rope(queries, cos, sin)

        # Expand keys and values to match the number of heads
        # Shape: (b, num_heads, num_tokens, head_dim)
        keys = keys.repeat_interleave(self.group_size, dim=1)  # Shape: (b, num_heads, num_tokens, head_dim)
        values = values.repeat_interleave(self.group_size, dim=1)  # Shape: (b, num_heads, num_tokens, head_dim)
        # For example, before repeat_interleave along dim=1 (query groups):
        #   [K1, K2]
        # After repeat_interleave (each query group is repeated group_size times):
        #   [K1, K1, K2, K2]
        # If we used regular repeat instead of repeat_interleave, we'd get:
        #   [K1, K2, K1, K2]

        # Compute scaled dot-product attention (aka self-attention) with a causal mask
        # Shape: (b, num_heads, num_tokens, num_tokens)
        attn_scores = queries @ keys.transpose(2, 3)  # Dot product for each head

        # Use the mask to fill attention scores
        attn_scores = attn_scores.masked_fill(mask[:num_tokens, :num_tokens], -torch.inf)

        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        assert keys.shape[-1] == self.head_dim

        # Shape: (b, num_tokens, num_heads, head_dim)
        context_vec = (attn_weights @ values).transpose(1, 2)

        # Combine heads, where self.d_out = self.num_heads * self.head_dim
        context_vec = context_vec.reshape(b, num_tokens, self.d_out)
        context_vec = self.out_proj(context_vec)  # optional projection

        return context_vec


class Qwen3GroupedQueryAttention(nn.Module):
    def __init__(self, d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False, dtype=None):
        super().__init__()
        assert num_heads % num_kv_groups == 0, "num_heads must be divisible by num_kv_groups"

        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups

        if head_dim is None:
            assert d_in % num_heads == 0, "`d_in` must be divisible by `num_heads` if `head_dim` is not set"
            head_dim = d_in // num_heads

        self.head_dim = head_dim
        self.d_out = num_heads * head_dim

        self.W_query = nn.Linear(d_in, self.d_out, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)

        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)

        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=1e-6)
            self.k_norm = RMSNorm(head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None  # type: ignore[assignment]  # the book's code, kept as copied

    def forward(self, x, mask, cos, sin):
        b, num_tokens, _ = x.shape

        # Apply projections
        queries = self.W_query(x)  # (b, num_tokens, num_heads * head_dim)
        keys = self.W_key(x)  # (b, num_tokens, num_kv_groups * head_dim)
        values = self.W_value(x)  # (b, num_tokens, num_kv_groups * head_dim)

        # Reshape
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)

        # Optional normalization
        if self.q_norm:
            queries = self.q_norm(queries)
        if self.k_norm:
            keys = self.k_norm(keys)

        # Apply RoPE
        queries = apply_rope(queries, cos, sin)
        keys = apply_rope(keys, cos, sin)

        # Expand K and V to match number of heads
        keys = keys.repeat_interleave(self.group_size, dim=1)
        values = values.repeat_interleave(self.group_size, dim=1)

        # Attention
        attn_scores = queries @ keys.transpose(2, 3)
        attn_scores = attn_scores.masked_fill(mask, -torch.inf)
        attn_weights = torch.softmax(attn_scores / self.head_dim**0.5, dim=-1)

        context = (attn_weights @ values).transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


class RMSNorm(nn.Module):
    def __init__(self, emb_dim, eps=1e-6, bias=False, qwen3_compatible=True):
        super().__init__()
        self.eps = eps
        self.qwen3_compatible = qwen3_compatible
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x):
        input_dtype = x.dtype

        if self.qwen3_compatible:
            x = x.to(torch.float32)

        variance = x.pow(2).mean(dim=-1, keepdim=True)
        norm_x = x * torch.rsqrt(variance + self.eps)
        norm_x = norm_x * self.scale

        if self.shift is not None:
            norm_x = norm_x + self.shift

        return norm_x.to(input_dtype)


def compute_rope_params(head_dim, theta_base=10_000, context_length=4096, freq_config=None, dtype=torch.float32):
    assert head_dim % 2 == 0, "Embedding dimension must be even"

    # Compute the inverse frequencies
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=dtype)[: (head_dim // 2)].float() / head_dim))

    # Frequency adjustments
    if freq_config is not None:
        low_freq_wavelen = freq_config["original_context_length"] / freq_config["low_freq_factor"]
        high_freq_wavelen = freq_config["original_context_length"] / freq_config["high_freq_factor"]

        wavelen = 2 * torch.pi / inv_freq

        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / freq_config["factor"], inv_freq)

        smooth_factor = (freq_config["original_context_length"] / wavelen - freq_config["low_freq_factor"]) / (
            freq_config["high_freq_factor"] - freq_config["low_freq_factor"]
        )

        smoothed_inv_freq = (1 - smooth_factor) * (inv_freq / freq_config["factor"]) + smooth_factor * inv_freq

        is_medium_freq = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
        inv_freq_llama = torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
        inv_freq = inv_freq_llama

    # Generate position indices
    positions = torch.arange(context_length, dtype=dtype)

    # Compute the angles
    angles = positions[:, None] * inv_freq[None, :]  # Shape: (context_length, head_dim // 2)

    # Expand angles to match the head_dim
    angles = torch.cat([angles, angles], dim=1)  # Shape: (context_length, head_dim)

    # Precompute sine and cosine
    cos = torch.cos(angles)
    sin = torch.sin(angles)

    return cos, sin


def apply_rope(x, cos, sin):
    # x: (batch_size, num_heads, seq_len, head_dim)
    batch_size, num_heads, seq_len, head_dim = x.shape
    assert head_dim % 2 == 0, "Head dimension must be even"

    # Split x into first half and second half
    x1 = x[..., : head_dim // 2]  # First half
    x2 = x[..., head_dim // 2 :]  # Second half

    # Adjust sin and cos shapes
    cos = cos[:seq_len, :].unsqueeze(0).unsqueeze(0)  # Shape: (1, 1, seq_len, head_dim)
    sin = sin[:seq_len, :].unsqueeze(0).unsqueeze(0)

    # Apply the rotary transformation
    rotated = torch.cat((-x2, x1), dim=-1)
    x_rotated = (x * cos) + (rotated * sin)

    # It's ok to use lower-precision after applying cos and sin rotation
    return x_rotated.to(dtype=x.dtype)


# --- ours -------------------------------------------------------------------------------------


def padding_mask(attention_mask: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, row_visible)`` for the book's ``forward(x, mask, cos, sin)`` with padded keys hidden.

    ``attention_mask``: ``(b, T)`` bool, True = real token. ``mask`` is ``(b, 1, T, T)`` bool, True =
    masked: the book's ``triu(ones(T, T), diagonal=1)`` or a padded key. ``row_visible`` is
    ``(b, T, 1)``: whether query ``t`` of row ``b`` sees any key. A row that sees none is left
    unmasked in ``mask`` (so the book's ``-inf`` fill never makes an all ``-inf`` softmax, i.e. NaN);
    the caller zeroes its output (:func:`causal_forward`).
    """
    causal = torch.triu(
        torch.ones(num_tokens, num_tokens, device=attention_mask.device, dtype=torch.bool), diagonal=1
    )  # (T, T)
    hidden = causal | ~attention_mask[:, None, None, :]  # (b, 1, T, T): (T, T) | (b, 1, 1, T)
    row_visible = (~hidden).any(dim=-1, keepdim=True)  # (b, 1, T, 1)
    return hidden & row_visible, row_visible[:, 0]  # (b, 1, T, T), (b, T, 1)


def causal_forward(
    module: Llama3GroupedQueryAttention | Qwen3GroupedQueryAttention,
    x: torch.Tensor,
    *,
    rope_theta: float = 10_000.0,
    freq_config: Mapping[str, float] | None = None,
    context_length: int = 4096,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``module(x, mask, cos, sin)`` as the book's model calls it, for positions ``0 .. T-1``.

    ``module`` is a :class:`Llama3GroupedQueryAttention` or :class:`Qwen3GroupedQueryAttention`;
    ``x`` is ``(batch, tokens, d_in)``. The mask is the book's ``triu(ones(T, T), diagonal=1)``
    (True = masked) and ``cos``/``sin`` come from :func:`compute_rope_params` with
    ``module.head_dim``, ``rope_theta``, ``context_length`` and ``freq_config`` (the book's keys:
    ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_context_length``; ``None``
    for no Llama 3 scaling).

    ``attention_mask`` (ours, as in Hugging Face): ``(batch, tokens)``, 1/True = real token. Padded
    keys are hidden on top of the causal mask (:func:`padding_mask`, a ``(b, 1, T, T)`` mask the
    book's classes take unchanged) and a query that sees no key gets what a zero context gives
    (zero attention weights): ``out_proj``'s bias, none in both book classes, so zero. RoPE
    positions stay ``0 .. T-1`` in every row (scores depend only on distances, so a padded row's
    real tokens equal the sequence run alone). With ``attention_mask=None`` the ops are the book's.
    """
    tokens = x.shape[1]
    if tokens > context_length:
        raise ValueError(f"causal_forward: tokens={tokens} exceeds context_length={context_length}")
    cos, sin = compute_rope_params(
        module.head_dim,
        theta_base=rope_theta,
        context_length=context_length,
        freq_config=None if freq_config is None else dict(freq_config),
    )
    cos, sin = cos.to(x.device), sin.to(x.device)
    if attention_mask is None:
        mask = torch.triu(torch.ones(tokens, tokens, device=x.device, dtype=torch.bool), diagonal=1)
        return module(x, mask, cos, sin)
    real = check_attention_mask(type(module).__name__, attention_mask, x.shape[:-1], what="(batch, tokens)")
    mask, row_visible = padding_mask(real.to(x.device), tokens)
    # Llama3GroupedQueryAttention slices ``mask[:num_tokens, :num_tokens]``, which on a (b, 1, T, T)
    # mask cuts the batch to T rows: run at most T rows at a time (rows are independent).
    outs = [
        module(x[i : i + tokens], mask[i : i + tokens], cos, sin) for i in range(0, x.shape[0], tokens)
    ]  # each (<= T, T, d_out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    bias = module.out_proj.bias  # None in both book classes: a zero context gives a zero output
    zero_context = torch.zeros((), dtype=out.dtype, device=out.device) if bias is None else bias
    return torch.where(row_visible, out, zero_context)
