"""The building blocks of the ttnn programs: kernel config, stage taps, masks, attention, head layouts.

Every ttnn program (:mod:`crosscheck.tt.programs`, :mod:`crosscheck.tt.gqa_programs`) and decode program
(:mod:`crosscheck.tt.decode_programs`) is written with these, against the real ttnn API: each takes the
``ttnn`` module (the real package or :mod:`crosscheck.tt.host_model`) and, where it sends data, the device.

Pitfalls these helpers avoid (ttnn-notes §7): matmul never tilizes (all operands are TILE); head_dim is
whatever the config gives (1 in the book's toy sizes), so the generic path uses only matmul/linear,
reshape, permute, transpose, slice, add, multiply and softmax; the SDPA path (:func:`sdpa_attention`) is
picked only when head_dim is a multiple of 32 (:func:`select`); there is no unary minus on ttnn tensors
and slice bounds are never negative. The masks are additive (0 = attend, :data:`ADDITIVE_MASK_VALUE` =
masked), built with numpy (:func:`key_visibility`) and sent with ``from_torch``.
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

TILE_SIZE = 32


def select(generic: Callable, sdpa: Callable | None, config) -> Callable:
    """The program to run at ``config`` (a resolved AttnConfig): ``sdpa`` when it exists and every head's
    dim is a multiple of the tile size, else ``generic``."""
    if sdpa is not None and config.resolved_head_dim() % TILE_SIZE == 0:
        return sdpa
    return generic
