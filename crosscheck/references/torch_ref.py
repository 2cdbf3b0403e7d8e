"""Torch reference modules: the book's chapter-3 classes, keys and semantics unchanged.

A state dict saved from the book's own code loads into these (``W_query.weight``,
``heads.0.W_key.weight``, ``out_proj.bias``, the ``mask`` buffer), and they are
the float32 ground truth every other backend is compared with.
``torch.nn.MultiheadAttention`` needs no copy: it is used as it is.

Padding masks: every ``forward`` takes ``attention_mask`` of shape ``x.shape[:-1]``,
1/True = a real token, 0 = padding. Padded keys are invisible to every query (on top of the
causal mask where the class has one), and a query that sees no key at all gets zero attention
weights, so a zero context vector (after ``out_proj``: its bias), never NaN. With
``attention_mask=None`` (the default) the ops are the book's, bit for bit. The attention step
itself lives in :func:`masked_attention`, shared with the KV-cache classes of
:mod:`crosscheck.references.torch_kv_cache`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def check_attention_mask(
    owner: str, attention_mask: torch.Tensor, expected: Sequence[int], what: str = "x.shape[:-1]"
) -> torch.Tensor:
    """``attention_mask`` checked against the shape ``expected`` (named ``what``) and made boolean.

    Accepts bool (True = real token) or a numeric mask holding only 0 and 1 (1 = real token, as in
    Hugging Face). An additive mask (0 / -inf) or any other value raises ``ValueError``.
    """
    attention_mask = torch.as_tensor(attention_mask)
    if tuple(attention_mask.shape) != tuple(expected):
        raise ValueError(
            f"{owner}: attention_mask must have shape {what} = {tuple(expected)} "
            f"(1/True = real token, 0 = padding), got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(
                f"{owner}: a {attention_mask.dtype} attention_mask must hold only 0 (padding) and 1 (real token); "
                "an additive mask (0 / -inf) is not accepted"
            )
        attention_mask = attention_mask != 0
    return attention_mask


def masked_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    causal_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    scaled: bool = True,
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The book's attention step: ``softmax(masked_fill(q @ k.T, mask, -inf) / sqrt(d_k)) @ v``.

    Shapes: ``queries`` ``(*batch, T, d_k)``, ``keys`` ``(*batch, S, d_k)``, ``values`` ``(*batch, S, d_v)``
    (``*batch`` is ``(b,)`` or ``(b, heads)``, or empty for unbatched input); returns ``(*batch, T, d_v)``.

    ``causal_mask``: ``(T, S)`` bool, True = hidden (the book's ``triu`` slice; with a KV cache its rows
    ``start_pos .. start_pos + T - 1``). ``attention_mask``: ``(b, S)`` (or ``(S,)`` for unbatched input)
    bool, True = real key; padded keys are hidden from every query. A query row with no visible key is
    left unmasked for the softmax (finite, no NaN) and its weights are then set to zero. With
    ``attention_mask=None`` the ops are exactly the book's. ``scaled=False`` skips the ``1/sqrt(d_k)``
    (section 3.3's simplified attention); ``dropout`` acts on the weights, as in the book.
    """
    attn_scores = queries @ keys.transpose(-2, -1)  # (*batch, T, S)
    hidden = causal_mask
    row_visible = None
    if attention_mask is not None:
        # (b, S) -> (b, 1, [1,] S): one row of key flags shared by every head and query
        ones = (1,) * (attn_scores.ndim - attention_mask.ndim)
        key_shape = attention_mask.shape[:-1] + ones + attention_mask.shape[-1:]
        padded = ~attention_mask.to(attn_scores.device).reshape(key_shape)
        hidden = padded if hidden is None else hidden | padded  # (*batch, T, S)
        row_visible = (~hidden).any(dim=-1, keepdim=True)  # (*batch, T, 1): the query sees some key
        hidden = hidden & row_visible  # a row that sees nothing stays unmasked: no all -inf softmax
    if hidden is not None:
        attn_scores = attn_scores.masked_fill(hidden, -torch.inf)
    if scaled:
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
    else:
        attn_weights = torch.softmax(attn_scores, dim=-1)
    if row_visible is not None:
        attn_weights = torch.where(row_visible, attn_weights, 0.0)  # no visible key: zero weights
    if dropout is not None:
        attn_weights = dropout(attn_weights)
    return attn_weights @ values


class SimplifiedSelfAttention(nn.Module):
    """Section 3.3: ``softmax(x @ x.T) @ x``; no weights, no scaling."""

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            attention_mask = check_attention_mask(type(self).__name__, attention_mask, x.shape[:-1])
        return masked_attention(x, x, x, attention_mask=attention_mask, scaled=False)


class SelfAttentionV1(nn.Module):
    """Section 3.4.2 ``SelfAttention_v1``: raw ``(d_in, d_out)`` parameters."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            attention_mask = check_attention_mask(type(self).__name__, attention_mask, x.shape[:-1])
        keys = x @ self.W_key
        queries = x @ self.W_query
        values = x @ self.W_value
        return masked_attention(queries, keys, values, attention_mask=attention_mask)


class SelfAttentionV2(nn.Module):
    """Section 3.4.2 ``SelfAttention_v2``: ``nn.Linear`` projections."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            attention_mask = check_attention_mask(type(self).__name__, attention_mask, x.shape[:-1])
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        return masked_attention(queries, keys, values, attention_mask=attention_mask)


class CausalAttention(nn.Module):
    """Section 3.5.3: causal mask buffer, dropout on the weights, batched input."""

    mask: torch.Tensor  # the buffer registered in __init__

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, num_tokens, d_in = x.shape
        if attention_mask is not None:
            attention_mask = check_attention_mask(type(self).__name__, attention_mask, x.shape[:-1])
        keys = self.W_key(x)  # (b, num_tokens, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        return masked_attention(
            queries,
            keys,
            values,
            causal_mask=self.mask.bool()[:num_tokens, :num_tokens],
            attention_mask=attention_mask,
            dropout=self.dropout,
        )


class MultiHeadAttentionWrapper(nn.Module):
    """Section 3.6.1: stacked ``CausalAttention`` heads, concatenated on the last dim."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            attention_mask = check_attention_mask(type(self).__name__, attention_mask, x.shape[:-1])
        return torch.cat([head(x, attention_mask=attention_mask) for head in self.heads], dim=-1)


class MultiHeadAttention(nn.Module):
    """Section 3.6.2: fused heads plus ``out_proj``."""

    mask: torch.Tensor  # the buffer registered in __init__

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, num_tokens, d_in = x.shape
        if attention_mask is not None:
            attention_mask = check_attention_mask(type(self).__name__, attention_mask, x.shape[:-1])
        # (b, num_tokens, d_out) -> (b, num_tokens, num_heads, head_dim) -> (b, num_heads, num_tokens, head_dim)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        context_vec = masked_attention(
            queries, keys, values, causal_mask=mask_bool, attention_mask=attention_mask, dropout=self.dropout
        ).transpose(1, 2)  # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)


class MultiHeadAttentionCombinedQKV(nn.Module):
    """The book's bonus class: one ``qkv`` linear viewed as ``(3, heads, head_dim)``, then ``proj``."""

    mask: torch.Tensor  # the buffer registered in __init__

    def __init__(self, d_in, d_out, num_heads, context_length, dropout=0.0, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "embed_dim is indivisible by num_heads"
        self.num_heads = num_heads
        self.context_length = context_length
        self.head_dim = d_out // num_heads
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch_size, num_tokens, embed_dim = x.shape
        if attention_mask is not None:
            attention_mask = check_attention_mask(type(self).__name__, attention_mask, x.shape[:-1])
        qkv = self.qkv(x).view(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, b, num_heads, num_tokens, head_dim)
        queries, keys, values = qkv.unbind(0)
        context_vec = masked_attention(
            queries,
            keys,
            values,
            causal_mask=self.mask.bool()[:num_tokens, :num_tokens],
            attention_mask=attention_mask,
            dropout=self.dropout,
        ).transpose(1, 2)  # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(batch_size, num_tokens, self.num_heads * self.head_dim)
        return self.proj(context_vec)


def torch_multihead_forward(
    module: nn.MultiheadAttention, x: torch.Tensor, causal: bool, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Self-attention through ``nn.MultiheadAttention`` (``batch_first``), optionally causal.

    ``attention_mask`` (shape ``x.shape[:-1]``, 1/True = real token) becomes the module's own
    ``key_padding_mask`` (True = ignore), next to a boolean causal ``attn_mask``. A query that sees
    no key (left padding under the causal mask, an all-padding row) gets what a zero context gives,
    ``out_proj.bias`` (0 without bias): ``nn.MultiheadAttention`` itself returns NaN there on some
    paths (e.g. its fast path under ``no_grad``) and zeros on others.
    """
    if attention_mask is None:
        mask = None
        if causal:
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[-2], dtype=x.dtype)
        out, _ = module(x, x, x, attn_mask=mask, need_weights=False)
        return out
    real = check_attention_mask("torch_multihead_forward", attention_mask, x.shape[:-1]).to(x.device)
    num_tokens = x.shape[-2]
    causal_mask = torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=x.device), diagonal=1)
    out, _ = module(
        x, x, x, key_padding_mask=~real, attn_mask=causal_mask if causal else None, need_weights=False
    )  # (*b, T, E)
    hidden = ~real.unsqueeze(-2)  # (*b, 1, S)
    if causal:
        hidden = hidden | causal_mask  # (*b, T, S)
    row_visible = (~hidden).any(dim=-1, keepdim=True)  # (*b, T, 1)
    bias = module.out_proj.bias
    zero_context = torch.zeros((), dtype=out.dtype, device=out.device) if bias is None else bias
    return torch.where(row_visible, out, zero_context)
