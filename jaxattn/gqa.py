"""Grouped-query attention with RoPE and optional QK-norm: the book's Llama 3 and Qwen3 ``GroupedQueryAttention``.

``num_heads`` query heads share ``num_kv_groups`` key/value heads; query head ``h`` reads kv
group ``h // (num_heads // num_kv_groups)`` (the book's ``repeat_interleave``). Here the keys
and values are never repeated: the attention core takes ``(batch, tokens, kv_groups, head_dim)``
directly. ``num_kv_groups == num_heads`` is multi-head attention, ``num_kv_groups == 1`` is
multi-query attention.

Step by step, as the book's ``forward``: project, split heads, RMS-normalise queries and keys
(``qk_norm``, Qwen3), rotate them with RoPE (split halves, :mod:`jaxattn.rope`), causal attention,
``out_proj``. Porting: the book's Qwen3 class is ``GroupedQueryAttention(d_in, num_heads,
num_kv_groups, head_dim, qk_norm)``; the book's Llama 3 class ``(d_in, d_out, num_heads,
num_kv_groups)`` is ``GroupedQueryAttention(d_in, num_heads, num_kv_groups, head_dim=d_out //
num_heads, out_features=d_out, rope_theta=..., freq_config=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import ArrayLike
from jaxtyping import Array, Float

from jaxattn.base import AttentionModule, Projection
from jaxattn.checks import check_input, check_sizes
from jaxattn.norms import rms_norm
from jaxattn.rope import apply_rope, compute_rope_params


class RMSNorm(nn.Module):
    """The book's ``qwen3.RMSNorm(emb_dim, eps)``: one parameter ``scale`` of shape ``(emb_dim,)``, ones."""

    emb_dim: int
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "*batch emb_dim"]) -> Float[Array, "*batch emb_dim"]:
        check_sizes(type(self).__name__, emb_dim=self.emb_dim)
        scale = self.param("scale", nn.initializers.ones, (self.emb_dim,), self.param_dtype)
        return rms_norm(x, jnp.asarray(scale), self.eps)  # params may arrive as numpy arrays


class GroupedQueryAttention(AttentionModule):
    """Causal grouped-query attention with RoPE and optional QK-norm.

    ``GroupedQueryAttention(d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False,
    context_length=4096, rope_theta=10_000.0, freq_config=None, qkv_bias=False, out_bias=False,
    out_features=None)``: ``head_dim`` defaults to ``d_in // num_heads``; ``out_proj`` maps
    ``num_heads * head_dim -> out_features`` (default ``d_in``). ``freq_config`` is the book's
    Llama 3 scaling (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_context_length``), given as a dict or as (key, value) pairs; it is stored as a
    sorted tuple so the module stays hashable.

    Parameters: ``W_query``, ``W_key``, ``W_value``, ``out_proj`` (``kernel`` = torch ``weight.T``)
    and, with ``qk_norm``, ``q_norm/scale`` and ``k_norm/scale`` of shape ``(head_dim,)``.
    With ``decode=True`` queries and keys are rotated at positions ``cache_index ..
    cache_index + T - 1`` and the keys go into the cache already rotated.
    """

    d_in: int
    num_heads: int
    num_kv_groups: int
    head_dim: int | None = None
    qk_norm: bool = False
    context_length: int = 4096
    rope_theta: float = 10_000.0
    freq_config: tuple[tuple[str, float], ...] | Mapping[str, float] | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    out_features: int | None = None

    def __post_init__(self):
        if self.freq_config is not None:  # a dict is not hashable: keep sorted (key, value) pairs
            object.__setattr__(self, "freq_config", tuple(sorted(dict(self.freq_config).items())))
        super().__post_init__()

    @property
    def resolved_head_dim(self) -> int:
        """``head_dim``, or ``d_in // num_heads`` when it is ``None``."""
        return self.d_in // self.num_heads if self.head_dim is None else self.head_dim

    def check_config(self) -> None:
        check_gqa_config(self)

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "batch tokens d_in"],
        *,
        attention_mask: ArrayLike | None = None,
        deterministic: bool = True,
    ) -> Float[Array, "batch tokens out_features"]:
        self.check_config()
        check_input(type(self).__name__, x.shape, d_in=self.d_in, ranks=(3,), context_length=self.context_length)
        head_dim, kv_groups = self.resolved_head_dim, self.num_kv_groups
        q_norm = k_norm = None
        if self.qk_norm:  # Qwen3: normalise each head before RoPE
            q_norm = RMSNorm(head_dim, 1e-6, self.param_dtype, name="q_norm")
            k_norm = RMSNorm(head_dim, 1e-6, self.param_dtype, name="k_norm")
        out_features = self.d_in if self.out_features is None else self.out_features
        return grouped_query_attention(
            x,
            self.dense(self.num_heads * head_dim, self.qkv_bias, "W_query"),
            self.dense(kv_groups * head_dim, self.qkv_bias, "W_key"),
            self.dense(kv_groups * head_dim, self.qkv_bias, "W_value"),
            self.dense(out_features, self.out_bias, "out_proj"),
            partial(self.attend, rate=0.0, deterministic=deterministic, attention_mask=attention_mask),
            q_norm=q_norm,
            k_norm=k_norm,
            num_heads=self.num_heads,
            num_kv_groups=kv_groups,
            rope=rope_tables(self, tokens=x.shape[1]),
            offset=self.cache_offset(),
        )


# --- the math, shared with jaxattn.nnx ---------------------------------------------------------------


def grouped_query_attention(
    x: Float[Array, "batch tokens d_in"],
    W_query: Projection,
    W_key: Projection,
    W_value: Projection,
    out_proj: Projection,
    attend: Callable[..., Array],
    *,
    q_norm: Callable[[Array], Array] | None,
    k_norm: Callable[[Array], Array] | None,
    num_heads: int,
    num_kv_groups: int,
    rope: tuple[Array, Array],
    offset,
) -> Float[Array, "batch tokens out_features"]:
    """The book's ``GroupedQueryAttention.forward``: project, split heads, QK-norm, RoPE, attend, ``out_proj``.

    ``rope``: the ``(cos, sin)`` tables, ``(positions, head_dim)`` each; ``offset``: the position of the
    first token (the cache index when decoding). ``attend(queries, keys, values, is_causal=...)``: the
    shell's call into the core, with the kv groups shared by the core, never repeated.
    """
    b, tokens, _ = x.shape
    queries = W_query(x)  # (b, T, heads * hd)
    keys = W_key(x)  # (b, T, kv_groups * hd)
    values = W_value(x)  # (b, T, kv_groups * hd)
    head_dim = queries.shape[-1] // num_heads
    queries = queries.reshape(b, tokens, num_heads, head_dim)  # (b, T, heads, hd)
    keys = keys.reshape(b, tokens, num_kv_groups, head_dim)  # (b, T, kv_groups, hd)
    values = values.reshape(b, tokens, num_kv_groups, head_dim)  # (b, T, kv_groups, hd)

    if q_norm is not None:  # Qwen3: normalise each head before RoPE
        assert k_norm is not None, "q_norm and k_norm come together"
        queries, keys = q_norm(queries), k_norm(keys)

    # RoPE at positions offset .. offset + T - 1, keys rotated before they are cached.
    cos, sin = rope
    queries = apply_rope(queries, cos, sin, offset=offset)  # (b, T, heads, hd)
    keys = apply_rope(keys, cos, sin, offset=offset)  # (b, T, kv_groups, hd)

    context_vec = attend(queries, keys, values, is_causal=True)  # (b, T, heads, hd)
    context_vec = context_vec.reshape(b, tokens, num_heads * head_dim)  # (b, T, heads * hd)
    return out_proj(context_vec)  # (b, T, out_features)


def rope_tables(module, *, tokens: int) -> tuple[Array, Array]:
    """``(cos, sin)`` for a Linen or NNX ``GroupedQueryAttention``: every position its cache can hold when
    decoding, else the ``tokens`` of this call."""
    return compute_rope_params(
        module.resolved_head_dim,
        module.rope_theta,
        module.context_length if module.decode else tokens,
        None if module.freq_config is None else dict(module.freq_config),
    )  # (positions, hd) each


def check_gqa_config(module) -> None:
    """The sizes of a Linen or NNX ``GroupedQueryAttention``; head_dim even for RoPE."""
    owner = type(module).__name__
    check_sizes(
        owner,
        d_in=module.d_in,
        num_heads=module.num_heads,
        num_kv_groups=module.num_kv_groups,
        head_dim=module.head_dim,
        context_length=module.context_length,
        out_features=module.out_features,
    )
    if module.num_heads % module.num_kv_groups != 0:
        raise ValueError(
            f"{owner}: num_heads={module.num_heads} must be divisible by num_kv_groups={module.num_kv_groups}"
        )
    if module.head_dim is None and module.d_in % module.num_heads != 0:
        raise ValueError(
            f"{owner}: d_in={module.d_in} must be divisible by num_heads={module.num_heads} when head_dim is not set"
        )
    head_dim = module.d_in // module.num_heads if module.head_dim is None else module.head_dim
    if head_dim < 2 or head_dim % 2 != 0:
        raise ValueError(f"{owner}: head_dim={head_dim} must be even for RoPE (rotates pairs of dimensions)")
