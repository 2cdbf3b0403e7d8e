"""The ttnn KV-cache decode programs: one per causal program of :mod:`crosscheck.tt.programs`.

Decoding (each causal variant's ``Variant.ttnn_decode``, read with :func:`decode_program`): a prefill
runs the prompt's ``P`` tokens like the forward program and writes their keys and values into caches
``(batch, heads, max_tokens, head_dim)`` that live on the device; each step projects one token at
position ``pos``, appends its key and value, and attends to cache positions ``0 .. pos`` (an additive
mask built per step with numpy hides the rest and the padded keys). The caches are written IN PLACE by ttnn's cache
ops, whose rules (tt-metal ``update_cache_device_operation.cpp``) hold for the book's
shapes, head_dim = 1 included, because they compare padded shapes only:

* ``ttnn.fill_cache(cache, k, batch_idx)`` copies one user's ``(1, heads, P, head_dim)``
  tiles at ``update_idx=0`` (a non-zero ``update_idx`` must be a multiple of 32, so the
  prompt always starts at position 0). Whole tiles are copied: the prompt's tile-padding
  rows ``P .. ceil32(P) - 1`` land in cache positions the steps fill later, so they are
  zeroed first with ``ttnn.fill_implicit_tile_padding`` (garbage there would survive the
  additive mask: 0 * NaN is NaN, and a huge finite score outweighs -1e9).
* ``ttnn.update_cache(cache, row, pos)`` writes one row at any ``pos`` for every user; the
  users go along dim -2 of ``row`` ``(1, heads, batch, head_dim)`` (a permute of the step's
  ``(batch, heads, 1, head_dim)`` keys). ``pos`` is a runtime argument of the op (outside
  its program-cache hash). ``ttnn.experimental.paged_update_cache`` would need a
  height-sharded input and a page table; nothing here needs it.

The step attends with the generic matmul/softmax path for every program (SDPA twins too):
``scaled_dot_product_attention_decode`` wants head_dim % 32 == 0 and k-chunked cache lengths.

Grouped-query attention adds two hooks of :class:`CachedAttention`: ``positions`` rotates the
queries and keys at their positions (RoPE at ``0 .. P-1`` in the prefill, a one-row cos/sin
table at ``pos`` in a step) before the keys are cached, and ``expand`` repeats the cached
``config.kv_heads()`` key/value heads for the query heads (``repeat_interleave``) only when
attending: the caches hold the shared heads, not one copy per query head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from crosscheck.tt.gqa_programs import gqa_expand, gqa_qkv, gqa_rope
from crosscheck.tt.ops import attention, key_visibility, masked_attention
from crosscheck.tt.programs import (
    combined_output,
    combined_qkv_heads,
    mha_output,
    mha_qkv,
    single_head_output,
    single_head_qkv,
    torch_mha_output,
    torch_mha_qkv,
)


@dataclass
class KVCache:
    """One attention's keys and values, ``(batch, heads, max_tokens, head_dim)`` bf16 TILE on the device.

    ``keys``/``values`` are written in place by ``ttnn.fill_cache``/``ttnn.update_cache``.
    ``real`` (host numpy ``(batch, max_tokens)``) records which written positions hold real
    tokens, for the padding part of each step's mask.
    """

    keys: Any
    values: Any
    real: np.ndarray

    @property
    def max_tokens(self) -> int:
        return int(self.real.shape[1])


def allocate_cache(ttnn, device, batch: int, num_heads: int, max_tokens: int, head_dim: int) -> KVCache:
    """Zeroed key and value caches (two buffers) on ``device``."""
    zeros = np.zeros((batch, num_heads, max_tokens, head_dim), dtype=np.float32)
    keys = ttnn.from_torch(zeros, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=device)
    values = ttnn.from_torch(zeros, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=device)
    return KVCache(keys, values, np.zeros((batch, max_tokens), dtype=bool))


def _record(cache: KVCache, start: int, stop: int, attention_mask) -> None:
    cache.real[:, start:stop] = True if attention_mask is None else np.asarray(attention_mask).astype(bool)


def write_prompt(ttnn, cache: KVCache, keys, values, attention_mask=None) -> None:
    """Positions ``0 .. P-1`` of every user: ``ttnn.fill_cache`` of ``(1, H, P, hd)``, tile padding zeroed first."""
    batch, num_heads, tokens, head_dim = keys.shape
    for user in range(batch):
        for cached, new in ((cache.keys, keys), (cache.values, values)):
            one = new if batch == 1 else ttnn.slice(new, [user, 0, 0, 0], [user + 1, num_heads, tokens, head_dim])
            one = ttnn.fill_implicit_tile_padding(one, 0.0)  # its padding rows land at positions P .. ceil32(P) - 1
            ttnn.fill_cache(cached, one, user)  # in place, update_idx=0
    _record(cache, 0, tokens, attention_mask)


def write_token(ttnn, cache: KVCache, keys, values, pos: int, attention_mask=None) -> None:
    """Position ``pos`` of every user: ``ttnn.update_cache`` of the step's ``(b, H, 1, hd)`` keys and values."""
    for cached, new in ((cache.keys, keys), (cache.values, values)):
        row = ttnn.permute(new, (2, 1, 0, 3))  # (b, H, 1, hd) -> (1, H, b, hd): users along dim -2
        ttnn.update_cache(cached, row, pos)  # in place
    _record(cache, pos, pos + 1, attention_mask)


def _always(config) -> bool:
    return True


def _no_positions(ttnn, device, queries, keys, config, start: int):
    return queries, keys


def _same_heads(ttnn, t, config):
    return t


@dataclass(frozen=True)
class CachedAttention:
    """A causal program as projections around one attention over heads: its prefill and its step.

    ``project(ttnn, x, parameters, config)`` -> ``(queries, keys, values)``: queries ``(b, H, T, hd)``,
    keys/values ``(b, G, T, hd)`` (``G = H`` but for grouped-query attention);
    ``output(ttnn, context_vec, parameters, config)`` -> the program's ``(b, T, d_out)``;
    ``heads(config)`` -> ``(G, hd)``, the cache's shape; ``decodes(config)``: whether it is causal there;
    ``positions(ttnn, device, queries, keys, config, start)`` -> ``(queries, keys)`` at positions
    ``start .. start + T - 1`` (RoPE; default: unchanged), applied before the keys are cached;
    ``expand(ttnn, keys_or_values, config)`` -> ``(b, H, T, hd)``, the ``G`` cached heads for the ``H``
    query heads, applied only when attending (default: unchanged).
    """

    project: Callable
    output: Callable
    heads: Callable
    decodes: Callable = _always
    positions: Callable = _no_positions
    expand: Callable = _same_heads

    def allocate(self, ttnn, device, config, batch: int, max_tokens: int) -> KVCache:
        num_heads, head_dim = self.heads(config)
        return allocate_cache(ttnn, device, batch, num_heads, max_tokens, head_dim)

    def prefill(self, ttnn, device, x, *, parameters, config, cache: KVCache, attention_mask=None):
        """The first ``P`` tokens ``(b, P, d_in)``: their context vectors, their keys/values into ``cache``."""
        queries, keys, values = self.project(ttnn, x, parameters, config)  # (b, H, P, hd); (b, G, P, hd)
        queries, keys = self.positions(ttnn, device, queries, keys, config, 0)  # positions 0 .. P-1
        write_prompt(ttnn, cache, keys, values, attention_mask)  # G heads
        keys, values = self.expand(ttnn, keys, config), self.expand(ttnn, values, config)  # (b, H, P, hd)
        context_vec = attention(ttnn, device, queries, keys, values, causal=True, attention_mask=attention_mask)
        return self.output(ttnn, context_vec, parameters, config)  # (b, P, d_out)

    def step(self, ttnn, device, x, *, parameters, config, cache: KVCache, pos: int, attention_mask=None):
        """One token ``(b, 1, d_in)`` at position ``pos``: append its key/value, attend to cache positions 0..pos."""
        if not 0 <= pos < cache.max_tokens:
            raise ValueError(f"decode position {pos} is outside the cache's {cache.max_tokens} positions")
        queries, keys, values = self.project(ttnn, x, parameters, config)  # (b, H, 1, hd); (b, G, 1, hd)
        queries, keys = self.positions(ttnn, device, queries, keys, config, pos)  # position pos
        write_token(ttnn, cache, keys, values, pos, attention_mask)
        visible = key_visibility(cache.real, 1, cache.max_tokens, causal=True, q_offset=pos)  # (b, 1, max_tokens)
        keys = self.expand(ttnn, cache.keys, config)  # (b, G, max_tokens, hd) -> (b, H, max_tokens, hd)
        values = self.expand(ttnn, cache.values, config)
        context_vec = masked_attention(ttnn, device, queries, keys, values, visible)  # (b, H, 1, hd)
        return self.output(ttnn, context_vec, parameters, config)  # (b, 1, d_out)


@dataclass(frozen=True)
class StackedHeads:
    """MultiHeadAttentionWrapper: one :class:`CachedAttention` (and cache) per ``parameters.heads[i]``, concatenated."""

    head: CachedAttention

    def decodes(self, config) -> bool:
        return self.head.decodes(config)

    def allocate(self, ttnn, device, config, batch: int, max_tokens: int) -> list[KVCache]:
        return [self.head.allocate(ttnn, device, config, batch, max_tokens) for _ in range(config.num_heads)]

    def _cat(self, ttnn, heads):
        return heads[0] if len(heads) == 1 else ttnn.concat(heads, dim=-1)  # (b, T, H * d_out)

    def prefill(self, ttnn, device, x, *, parameters, config, cache, attention_mask=None):
        return self._cat(
            ttnn,
            [
                self.head.prefill(ttnn, device, x, parameters=p, config=config, cache=c, attention_mask=attention_mask)
                for p, c in zip(parameters.heads, cache, strict=True)
            ],
        )

    def step(self, ttnn, device, x, *, parameters, config, cache, pos: int, attention_mask=None):
        return self._cat(
            ttnn,
            [
                self.head.step(
                    ttnn, device, x, parameters=p, config=config, cache=c, pos=pos, attention_mask=attention_mask
                )
                for p, c in zip(parameters.heads, cache, strict=True)
            ],
        )


def _split_heads_shape(config) -> tuple[int, int]:
    return config.num_heads, config.d_out // config.num_heads


def _kv_heads_shape(config) -> tuple[int, int]:
    return config.kv_heads(), config.resolved_head_dim()


# --- the decode programs, each the ``Variant.ttnn_decode`` of the entries whose forward program it mirrors ---

#: ``causal_attention``: one head ``(1, d_out)``.
CAUSAL_DECODE = CachedAttention(single_head_qkv, single_head_output, heads=lambda c: (1, c.d_out))
#: ``multi_head_attention_wrapper``: one cache per head.
WRAPPER_DECODE = StackedHeads(CAUSAL_DECODE)
#: ``multi_head_attention``.
MHA_DECODE = CachedAttention(mha_qkv, mha_output, heads=_split_heads_shape)
#: ``multi_head_attention_combined_qkv``.
COMBINED_QKV_DECODE = CachedAttention(combined_qkv_heads, combined_output, heads=_split_heads_shape)
#: ``torch_multihead_attention``: causal only when ``config.causal``.
TORCH_MHA_DECODE = CachedAttention(
    torch_mha_qkv, torch_mha_output, heads=_split_heads_shape, decodes=lambda c: bool(c.causal)
)
#: ``grouped_query_attention``: RoPE at the positions, ``kv_heads`` heads cached.
GQA_DECODE = CachedAttention(gqa_qkv, mha_output, heads=_kv_heads_shape, positions=gqa_rope, expand=gqa_expand)


def decode_program(variant, config):
    """``variant``'s KV-cache decode (its ``ttnn_decode``) at ``config`` (a resolved AttnConfig), or ``None``
    where it has none (not causal).

    The result has ``allocate(ttnn, device, config, batch, max_tokens) -> cache``,
    ``prefill(ttnn, device, x, *, parameters, config, cache, attention_mask=None)`` and
    ``step(ttnn, device, x, *, parameters, config, cache, pos, attention_mask=None)``.
    """
    decoder = variant.ttnn_decode
    return decoder if decoder is not None and decoder.decodes(config) else None
