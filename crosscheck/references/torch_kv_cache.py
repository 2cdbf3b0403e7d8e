"""Torch references with a KV cache: the causal classes of :mod:`crosscheck.references.torch_ref`, decoding.

Follows the book's package, ``llms_from_scratch.kv_cache.gpt2.MultiHeadAttention``
(llms-from-scratch 1.0.19):

* ``forward(x, use_cache=False, start_pos=0, cache=None) -> (context_vec, next_cache)``;
* ``cache`` / ``next_cache`` is ``(keys, values)`` with the tokens on dim ``-2``:
  ``(b, num_heads, tokens, head_dim)`` for the multi-head classes, ``(b, tokens, d_out)`` for
  ``CausalAttention`` (it has no heads dim), and a tuple of per-head caches for the wrapper;
* with ``use_cache=True`` the chunk's keys and values are appended to the cache
  (``torch.cat`` on the tokens dim) and the queries attend to all of them; ``next_cache`` is
  ``None`` with ``use_cache=False``.

What differs from the book's package:

* Each class has exactly the constructor and state-dict keys of its :mod:`~crosscheck.references.torch_ref`
  class (it subclasses it, or for the wrapper builds the same heads), the persistent ``mask`` buffer
  included (the book's cached class drops it), so
  ``load_state_dict(..., strict=True)`` works both ways and book checkpoints port unchanged.
  ``MultiheadAttention`` has ``torch.nn.MultiheadAttention``'s keys and reproduces its math.
* The causal mask of a chunk is rows ``start_pos .. start_pos + num_tokens - 1`` of the ``mask``
  buffer (the rows of ``triu(ones(S, S), 1)``, ``S = start_pos + num_tokens``). The book's
  package slices ``triu(ones(S, S), 1)[:, -num_tokens:]`` (columns, shape ``(S, num_tokens)``),
  which is right only when ``S == num_tokens``: in 1.0.19 a one-token step after a longer
  prefill fails with a broadcast error (pinned in ``tests/crosscheck/test_torch_cache.py``).
* Checks that fail loudly: ``start_pos`` must equal the cached length, a ``cache`` passed with
  ``use_cache=False`` is an error (the book ignores it silently), and ``start_pos + num_tokens``
  must fit ``context_length`` (the mask buffer).
* ``attention_mask``, as in Hugging Face, covers all keys so far: shape
  ``(batch, start_pos + num_tokens)``, 1/True = real token, 0 = padding. Padded keys are
  invisible to every query, and a query that sees no key gets zero attention weights, so a zero
  context (after the output projection: its bias), never NaN. For a left-padded batch, pass the
  prompt's mask at prefill and append a column of ones for every decoded token.

With ``use_cache=False`` every class runs the same ops as its ``torch_ref`` class (through the
shared :func:`crosscheck.references.torch_ref.masked_attention`), so the outputs are equal bit for bit.

:class:`GroupedQueryAttention` is the book's ``kv_cache.qwen3.GroupedQueryAttention`` on
:class:`crosscheck.references.torch_gqa.Qwen3GroupedQueryAttention` (its constructor, plus the RoPE settings,
and its state-dict keys): keys are cached after the k-norm and RoPE, one per kv group, never
repeated. The book's ``kv_cache`` llama3/qwen3 models slice their causal mask right
(``triu(ones(S, S), 1)[start_pos:S, :S]``), unlike its gpt2 class; so does this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crosscheck.references import torch_gqa, torch_ref
from crosscheck.references.torch_ref import check_attention_mask, masked_attention

KVCache = tuple[torch.Tensor, torch.Tensor]  # (keys, values), tokens on dim -2


def extend_cache(
    owner: str,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    use_cache: bool,
    start_pos: int,
    cache: KVCache | None,
) -> tuple[torch.Tensor, torch.Tensor, KVCache | None]:
    """``(keys, values, next_cache)``: the chunk's keys and values after the cached ones (dim ``-2``).

    ``start_pos`` must equal the cached length (0 without a cache); ``next_cache`` is ``None``
    unless ``use_cache``.
    """
    if cache is None:
        if start_pos != 0:
            raise ValueError(f"{owner}: start_pos={start_pos} without a cache; the first chunk starts at 0")
    else:
        if not use_cache:
            raise ValueError(f"{owner}: a cache was passed with use_cache=False; pass use_cache=True to decode")
        cached_keys, cached_values = cache
        if start_pos != cached_keys.shape[-2]:
            raise ValueError(
                f"{owner}: start_pos={start_pos} must equal the cached length {cached_keys.shape[-2]} "
                f"(cached keys {tuple(cached_keys.shape)}, tokens on dim -2)"
            )
        expected = (*keys.shape[:-2], start_pos, *keys.shape[-1:])
        if cached_keys.shape != expected or cached_values.shape != (*values.shape[:-2], start_pos, *values.shape[-1:]):
            raise ValueError(
                f"{owner}: cached keys {tuple(cached_keys.shape)} / values {tuple(cached_values.shape)} "
                f"do not fit this chunk's keys {tuple(keys.shape)} / values {tuple(values.shape)}"
            )
        keys = torch.cat([cached_keys, keys], dim=-2)  # (..., start_pos + num_tokens, head_dim)
        values = torch.cat([cached_values, values], dim=-2)
    next_cache = (keys, values) if use_cache else None
    return keys, values, next_cache


def causal_rows(owner: str, mask: torch.Tensor, start_pos: int, num_tokens: int) -> torch.Tensor:
    """Rows ``start_pos .. start_pos + num_tokens - 1`` of the book's ``triu`` buffer: ``(num_tokens, S)`` bool."""
    end = start_pos + num_tokens
    if end > mask.shape[0]:
        raise ValueError(
            f"{owner}: start_pos={start_pos} + num_tokens={num_tokens} = {end} tokens exceed "
            f"context_length={mask.shape[0]} (the mask buffer {tuple(mask.shape)})"
        )
    return mask.bool()[start_pos:end, :end]


def check_chunk_mask(
    owner: str, attention_mask: torch.Tensor | None, batch: int, start_pos: int, num_tokens: int
) -> torch.Tensor | None:
    """``attention_mask`` over all keys so far, ``(batch, start_pos + num_tokens)``, as bool (or ``None``)."""
    if attention_mask is None:
        return None
    return check_attention_mask(
        owner, attention_mask, (batch, start_pos + num_tokens), what="(batch, start_pos + num_tokens)"
    )


class CausalAttention(torch_ref.CausalAttention):
    """``torch_ref.CausalAttention`` with a KV cache; ``cache`` is ``(keys, values)``, each ``(b, tokens, d_out)``."""

    def forward(  # type: ignore[override]  # the book's cached forward: (context, cache), more arguments
        self,
        x: torch.Tensor,
        use_cache: bool = False,
        start_pos: int = 0,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        owner = type(self).__name__
        b, num_tokens, d_in = x.shape
        attention_mask = check_chunk_mask(owner, attention_mask, b, start_pos, num_tokens)
        keys = self.W_key(x)  # (b, num_tokens, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        keys, values, next_cache = extend_cache(  # New: (b, start_pos + num_tokens, d_out)
            owner, keys, values, use_cache=use_cache, start_pos=start_pos, cache=cache
        )
        context_vec = masked_attention(
            queries,
            keys,
            values,
            causal_mask=causal_rows(owner, self.mask, start_pos, num_tokens),
            attention_mask=attention_mask,
            dropout=self.dropout,
        )
        return context_vec, next_cache


class MultiHeadAttentionWrapper(nn.Module):
    """``torch_ref.MultiHeadAttentionWrapper`` with a KV cache: ``cache`` is a tuple of per-head caches."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(
        self,
        x: torch.Tensor,
        use_cache: bool = False,
        start_pos: int = 0,
        cache: tuple[KVCache, ...] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[KVCache, ...] | None]:
        if cache is not None and len(cache) != len(self.heads):
            raise ValueError(
                f"{type(self).__name__}: cache holds {len(cache)} per-head caches, "
                f"the module has {len(self.heads)} heads"
            )
        attention_mask = check_chunk_mask(type(self).__name__, attention_mask, x.shape[0], start_pos, x.shape[1])
        outputs = [
            head(x, use_cache, start_pos, None if cache is None else cache[i], attention_mask)
            for i, head in enumerate(self.heads)
        ]
        context_vec = torch.cat([context for context, _ in outputs], dim=-1)
        next_cache = tuple(head_cache for _, head_cache in outputs) if use_cache else None
        return context_vec, next_cache


class MultiHeadAttention(torch_ref.MultiHeadAttention):
    """``torch_ref.MultiHeadAttention`` with a KV cache (the book's ``kv_cache.gpt2`` class, plus the mask buffer)."""

    def forward(  # type: ignore[override]  # the book's cached forward: (context, cache), more arguments
        self,
        x: torch.Tensor,
        use_cache: bool = False,
        start_pos: int = 0,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        owner = type(self).__name__
        b, num_tokens, d_in = x.shape
        attention_mask = check_chunk_mask(owner, attention_mask, b, start_pos, num_tokens)
        # (b, num_tokens, d_out) -> (b, num_tokens, num_heads, head_dim) -> (b, num_heads, num_tokens, head_dim)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys, values, next_cache = extend_cache(  # New: (b, num_heads, start_pos + num_tokens, head_dim)
            owner, keys, values, use_cache=use_cache, start_pos=start_pos, cache=cache
        )
        mask_bool = causal_rows(owner, self.mask, start_pos, num_tokens)
        context_vec = masked_attention(
            queries, keys, values, causal_mask=mask_bool, attention_mask=attention_mask, dropout=self.dropout
        ).transpose(1, 2)  # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec), next_cache


class MultiHeadAttentionCombinedQKV(torch_ref.MultiHeadAttentionCombinedQKV):
    """``torch_ref.MultiHeadAttentionCombinedQKV`` with a KV cache: ``(b, num_heads, tokens, head_dim)``."""

    def forward(  # type: ignore[override]  # the book's cached forward: (context, cache), more arguments
        self,
        x: torch.Tensor,
        use_cache: bool = False,
        start_pos: int = 0,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        owner = type(self).__name__
        batch_size, num_tokens, embed_dim = x.shape
        attention_mask = check_chunk_mask(owner, attention_mask, batch_size, start_pos, num_tokens)
        qkv = self.qkv(x).view(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, b, num_heads, num_tokens, head_dim)
        queries, keys, values = qkv.unbind(0)
        keys, values, next_cache = extend_cache(  # New: (b, num_heads, start_pos + num_tokens, head_dim)
            owner, keys, values, use_cache=use_cache, start_pos=start_pos, cache=cache
        )
        context_vec = masked_attention(
            queries,
            keys,
            values,
            causal_mask=causal_rows(owner, self.mask, start_pos, num_tokens),
            attention_mask=attention_mask,
            dropout=self.dropout,
        ).transpose(1, 2)  # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(batch_size, num_tokens, self.num_heads * self.head_dim)
        return self.proj(context_vec), next_cache


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, batch_first=True)`` self-attention
    with a KV cache; ``causal`` chooses the causal mask (as ``torch_multihead_forward``'s argument).

    State-dict keys are ``nn.MultiheadAttention``'s (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj.weight``, ``out_proj.bias``; no biases with ``bias=False``) and so is the initialisation.
    The math is its own: one packed ``F.linear`` split into q, k, v; scores scaled by
    ``1/sqrt(head_dim)``; dropout ``p=dropout`` on the weights in training; ``out_proj``.
    ``cache`` is ``(keys, values)``, each ``(b, num_heads, tokens, head_dim)``. Without ``causal``, a
    decoded token attends to every key so far.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, causal: bool = True):
        super().__init__()
        assert embed_dim % num_heads == 0, "embed_dim must be divisible by num_heads"
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout  # a float, as in nn.MultiheadAttention
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention._reset_parameters
        if bias:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(
        self,
        x: torch.Tensor,
        use_cache: bool = False,
        start_pos: int = 0,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        owner = type(self).__name__
        b, num_tokens, embed_dim = x.shape
        attention_mask = check_chunk_mask(owner, attention_mask, b, start_pos, num_tokens)
        queries, keys, values = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (b, T, E)
        # (b, num_tokens, embed_dim) -> (b, num_tokens, num_heads, head_dim) -> (b, num_heads, num_tokens, head_dim)
        queries = queries.reshape(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = keys.reshape(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.reshape(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys, values, next_cache = extend_cache(
            owner, keys, values, use_cache=use_cache, start_pos=start_pos, cache=cache
        )
        causal_mask = None
        if self.causal:
            num_keys = start_pos + num_tokens
            causal_mask = torch.triu(torch.ones(num_keys, num_keys, dtype=torch.bool, device=x.device), diagonal=1)
            causal_mask = causal_mask[start_pos:]  # (num_tokens, num_keys): this chunk's rows
        context_vec = masked_attention(
            queries,
            keys,
            values,
            causal_mask=causal_mask,
            attention_mask=attention_mask,
            dropout=lambda w: F.dropout(w, p=self.dropout, training=self.training),
        ).transpose(1, 2)  # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.reshape(b, num_tokens, embed_dim)
        return self.out_proj(context_vec), next_cache


class GroupedQueryAttention(torch_gqa.Qwen3GroupedQueryAttention):
    """The book's GQA (Llama 3 / Qwen3) with a KV cache, as ``llms_from_scratch.kv_cache.qwen3``.

    Constructor: :class:`~crosscheck.references.torch_gqa.Qwen3GroupedQueryAttention`'s, plus the RoPE
    settings the book's model keeps outside the layer (``rope_theta``, ``freq_config`` with the
    book's Llama 3 keys or ``None``, ``context_length``: the cos/sin tables' length, so the most
    tokens the cache can hold). The tables are non-persistent buffers: the state-dict keys are
    the parent's. ``cache`` is ``(keys, values)``, each ``(b, num_kv_groups, tokens, head_dim)``;
    a chunk's queries and keys are rotated at positions ``start_pos .. start_pos + T - 1``.
    ``use_cache=False`` runs the ops of :func:`crosscheck.references.torch_gqa.causal_forward` (positions
    ``0 .. T-1``), so equals it bit for bit, ``attention_mask`` included.
    """

    cos: torch.Tensor  # the RoPE tables, buffers registered in __init__
    sin: torch.Tensor

    def __init__(
        self,
        d_in,
        num_heads,
        num_kv_groups,
        head_dim=None,
        qk_norm=False,
        dtype=None,
        *,
        rope_theta: float = 10_000.0,
        freq_config=None,
        context_length: int = 4096,
    ):
        super().__init__(d_in, num_heads, num_kv_groups, head_dim=head_dim, qk_norm=qk_norm, dtype=dtype)
        self.context_length = context_length
        cos, sin = torch_gqa.compute_rope_params(
            self.head_dim,
            theta_base=rope_theta,
            context_length=context_length,
            freq_config=None if freq_config is None else dict(freq_config),
        )  # (context_length, head_dim) each
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        use_cache: bool = False,
        start_pos: int = 0,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        owner = type(self).__name__
        b, num_tokens, _ = x.shape
        end = start_pos + num_tokens
        if end > self.context_length:
            raise ValueError(
                f"{owner}: start_pos={start_pos} + num_tokens={num_tokens} = {end} tokens exceed "
                f"context_length={self.context_length} (the RoPE tables {tuple(self.cos.shape)})"
            )
        attention_mask = check_chunk_mask(owner, attention_mask, b, start_pos, num_tokens)
        queries = self.W_query(x)  # (b, num_tokens, num_heads * head_dim)
        keys = self.W_key(x)  # (b, num_tokens, num_kv_groups * head_dim)
        values = self.W_value(x)
        # (b, num_tokens, heads, head_dim) -> (b, heads, num_tokens, head_dim)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm:
            queries = self.q_norm(queries)
        if self.k_norm:
            keys = self.k_norm(keys)
        cos, sin = self.cos[start_pos:end], self.sin[start_pos:end]  # New: positions start_pos .. end - 1
        queries = torch_gqa.apply_rope(queries, cos, sin)
        keys = torch_gqa.apply_rope(keys, cos, sin)
        keys, values, next_cache = extend_cache(  # New: (b, num_kv_groups, start_pos + num_tokens, head_dim)
            owner, keys, values, use_cache=use_cache, start_pos=start_pos, cache=cache
        )
        keys = keys.repeat_interleave(self.group_size, dim=1)  # (b, num_heads, start_pos + num_tokens, head_dim)
        values = values.repeat_interleave(self.group_size, dim=1)
        causal_mask = torch.triu(torch.ones(end, end, dtype=torch.bool, device=x.device), diagonal=1)
        context = masked_attention(
            queries, keys, values, causal_mask=causal_mask[start_pos:], attention_mask=attention_mask
        )  # (b, num_heads, num_tokens, head_dim): rows start_pos .. end - 1 of the causal mask
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # (b, num_tokens, d_out)
        return self.out_proj(context), next_cache
