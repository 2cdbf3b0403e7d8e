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

The building blocks (masks, attention, head layouts, the stage taps) and the pitfalls they avoid are
in :mod:`crosscheck.tt.ops`; grouped-query attention's program is in :mod:`crosscheck.tt.gqa_programs`.
Each program is a field of its variant's entry (``Variant.ttnn_forward``, ``ttnn_sdpa``), never looked
up by name. Dropout is the identity: the programs run inference, like the torch reference in ``eval()`` mode.

KV-cache decoding lives in :mod:`crosscheck.tt.decode_programs`.
"""

from __future__ import annotations

from crosscheck.tt.ops import (
    Attend,
    attention,
    compute_kernel_config,
    linear,
    merge_heads,
    sdpa_attention,
    split_fused_qkv,
    split_heads,
    tap,
)

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
