"""The ttnn programs: one per variant, written once against the real ttnn API.

Each program takes the ``ttnn`` module and an opened ``device`` as arguments (the
real package on a Tenstorrent device or ttsim, or :mod:`crosscheck.tt.host_model`
on the CPU; see :mod:`crosscheck.tt.runtime`) plus ``x``, a bfloat16 TILE tensor
on the device, and ``parameters`` from :func:`crosscheck.tt.port.preprocess_parameters`
(``parameters.W_query.weight`` is ``(in, out)``, biases are ``(1, out)``). Every
program mirrors its torch class in :mod:`crosscheck.torch_ref` line by line and
returns the context vectors as a ttnn tensor.

Pitfalls these programs avoid (ttnn-notes §7): matmul never tilizes (all operands
are TILE); head_dim is whatever the config gives (1 in the book's toy sizes), so
the generic programs use only matmul/linear, reshape, permute, transpose, slice,
add, multiply and softmax; the SDPA programs are picked only when head_dim is a
multiple of 32; there is no unary minus on ttnn tensors and slice bounds are never
negative. The causal mask is additive (0 = attend, :data:`ADDITIVE_MASK_VALUE` =
masked), built with numpy and sent with ``from_torch``. Dropout is the identity:
the programs run inference, like the torch reference in ``eval()`` mode.
"""

from __future__ import annotations

import math
from typing import Any, Callable

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


# --- building blocks -------------------------------------------------------------------------------


def causal_mask(ttnn, device, tokens: int, rank: int):
    """Additive causal mask ``(1, ..., 1, tokens, tokens)`` of ``rank`` dims, bf16 TILE on ``device``."""
    mask = np.triu(np.full((tokens, tokens), ADDITIVE_MASK_VALUE, dtype=np.float32), k=1)
    mask = mask.reshape((1,) * (rank - 2) + (tokens, tokens))
    return ttnn.from_torch(mask, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=device)


def linear(ttnn, x, parameters):
    """``nn.Linear``: ``x @ weight (+ bias)`` with ``weight`` already ``(in, out)``."""
    return ttnn.linear(
        x, parameters.weight, bias=parameters.get("bias"), compute_kernel_config=compute_kernel_config(ttnn)
    )


def attention(ttnn, device, queries, keys, values, *, causal: bool, scaled: bool = True):
    """The book's attention on ``(..., tokens, head_dim)`` tensors: scores, mask, scale, softmax, @ values."""
    config = compute_kernel_config(ttnn)
    rank = len(queries.shape)
    tokens, head_dim = queries.shape[-2], keys.shape[-1]
    attn_scores = ttnn.matmul(queries, ttnn.transpose(keys, -2, -1), compute_kernel_config=config)  # (..., T, T)
    if causal:
        attn_scores = ttnn.add(attn_scores, causal_mask(ttnn, device, tokens, rank))
    if scaled:
        attn_scores = ttnn.multiply(attn_scores, 1.0 / math.sqrt(head_dim))
    attn_weights = ttnn.softmax(attn_scores, dim=-1, compute_kernel_config=config)
    return ttnn.matmul(attn_weights, values, compute_kernel_config=config)  # (..., T, head_dim)


def sdpa_attention(ttnn, device, queries, keys, values, *, causal: bool, scaled: bool = True):
    """The same through ``ttnn.transformer.scaled_dot_product_attention`` (4-D, head_dim % 32 == 0)."""
    head_dim = keys.shape[-1]
    return ttnn.transformer.scaled_dot_product_attention(
        queries,
        keys,
        values,
        is_causal=causal,
        scale=1.0 / math.sqrt(head_dim) if scaled else 1.0,
        compute_kernel_config=compute_kernel_config(ttnn),
    )


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


# --- one program per variant ----------------------------------------------------------------------


def simplified_self_attention(ttnn, device, x, *, parameters, config):
    """Section 3.3: ``softmax(x @ x.T) @ x``, no weights, no scaling."""
    return attention(ttnn, device, x, x, x, causal=False, scaled=False)


def self_attention_v1(ttnn, device, x, *, parameters, config):
    """Section 3.4 ``SelfAttention_v1``: raw ``(d_in, d_out)`` matrices."""
    mm = lambda a, b: ttnn.matmul(a, b, compute_kernel_config=compute_kernel_config(ttnn))  # noqa: E731
    keys = mm(x, parameters.W_key)
    queries = mm(x, parameters.W_query)
    values = mm(x, parameters.W_value)
    return attention(ttnn, device, queries, keys, values, causal=False)


def self_attention_v2(ttnn, device, x, *, parameters, config):
    """Section 3.4 ``SelfAttention_v2``: ``nn.Linear`` projections."""
    keys = linear(ttnn, x, parameters.W_key)
    queries = linear(ttnn, x, parameters.W_query)
    values = linear(ttnn, x, parameters.W_value)
    return attention(ttnn, device, queries, keys, values, causal=False)


def causal_attention(ttnn, device, x, *, parameters, config):
    """Section 3.5.3: projections, causal mask, scale, softmax (dropout: identity)."""
    keys = linear(ttnn, x, parameters.W_key)  # (b, T, d_out)
    queries = linear(ttnn, x, parameters.W_query)
    values = linear(ttnn, x, parameters.W_value)
    return attention(ttnn, device, queries, keys, values, causal=True)


def multi_head_attention_wrapper(ttnn, device, x, *, parameters, config):
    """Section 3.6.1: ``torch.cat([head(x) for head in heads], dim=-1)``."""
    heads = [causal_attention(ttnn, device, x, parameters=head, config=config) for head in parameters.heads]
    return heads[0] if len(heads) == 1 else ttnn.concat(heads, dim=-1)  # (b, T, H * d_out)


def _multi_head_attention(ttnn, device, x, *, parameters, config, attend: Attend):
    keys = split_heads(ttnn, linear(ttnn, x, parameters.W_key), config.num_heads)  # (b, H, T, hd)
    queries = split_heads(ttnn, linear(ttnn, x, parameters.W_query), config.num_heads)
    values = split_heads(ttnn, linear(ttnn, x, parameters.W_value), config.num_heads)
    context_vec = attend(ttnn, device, queries, keys, values, causal=True)  # (b, H, T, hd)
    return linear(ttnn, merge_heads(ttnn, context_vec), parameters.out_proj)  # (b, T, d_out)


def multi_head_attention(ttnn, device, x, *, parameters, config):
    """Section 3.6.2: fused heads, causal, ``out_proj``."""
    return _multi_head_attention(ttnn, device, x, parameters=parameters, config=config, attend=attention)


def multi_head_attention_sdpa(ttnn, device, x, *, parameters, config):
    """:func:`multi_head_attention` with the fused SDPA kernel (head_dim % 32 == 0)."""
    return _multi_head_attention(ttnn, device, x, parameters=parameters, config=config, attend=sdpa_attention)


def _combined_qkv(ttnn, device, x, *, parameters, config, attend: Attend):
    qkv = linear(ttnn, x, parameters.qkv)  # (b, T, 3 * d_out)
    queries, keys, values = split_fused_qkv(ttnn, qkv, config.num_heads)  # each (b, H, T, hd)
    context_vec = attend(ttnn, device, queries, keys, values, causal=True)
    return linear(ttnn, merge_heads(ttnn, context_vec), parameters.proj)  # (b, T, d_out)


def multi_head_attention_combined_qkv(ttnn, device, x, *, parameters, config):
    """The book's bonus class: one ``qkv`` linear viewed as ``(3, heads, head_dim)``, then ``proj``."""
    return _combined_qkv(ttnn, device, x, parameters=parameters, config=config, attend=attention)


def multi_head_attention_combined_qkv_sdpa(ttnn, device, x, *, parameters, config):
    return _combined_qkv(ttnn, device, x, parameters=parameters, config=config, attend=sdpa_attention)


def _torch_mha(ttnn, device, x, *, parameters, config, attend: Attend):
    # torch keeps in_proj as bare parameters; the port gives them the nn.Linear shape (weight, bias).
    qkv = linear(ttnn, x, parameters.in_proj)  # (b, T, 3 * E), [q | k | v] as torch's in_proj_weight rows
    queries, keys, values = split_fused_qkv(ttnn, qkv, config.num_heads)
    context_vec = attend(ttnn, device, queries, keys, values, causal=config.causal)
    return linear(ttnn, merge_heads(ttnn, context_vec), parameters.out_proj)  # (b, T, E)


def torch_multihead_attention(ttnn, device, x, *, parameters, config):
    """``nn.MultiheadAttention(batch_first=True)`` self-attention, causal if ``config.causal``."""
    return _torch_mha(ttnn, device, x, parameters=parameters, config=config, attend=attention)


def torch_multihead_attention_sdpa(ttnn, device, x, *, parameters, config):
    return _torch_mha(ttnn, device, x, parameters=parameters, config=config, attend=sdpa_attention)


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
    return config.d_out // config.num_heads


def select(program: str, config) -> tuple[str, Callable]:
    """``(name, program)`` to run: the SDPA twin when it exists and head_dim % 32 == 0."""
    if program not in PROGRAMS:
        raise KeyError(f"unknown ttnn program {program!r}; known: {', '.join(PROGRAMS)}")
    if program in SDPA_PROGRAMS and head_dim(program, config) % TILE_SIZE == 0:
        fn = SDPA_PROGRAMS[program]
        return fn.__name__, fn
    return program, PROGRAMS[program]
