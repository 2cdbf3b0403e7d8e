"""The models and inputs of ``crosscheck bench`` (CPU and ``--device cuda`` alike): one home for how a row is built.

The book's ``MultiHeadAttention`` drawn from a seed, the same weights around torch's
``scaled_dot_product_attention``, the same weights ported into a jaxattn module with a
chosen ``attention_impl``, and the one input every row of a shape gets.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.pipeline.placement import jax_dtype, torch_dtype

#: Sizes every bench shares: the flags that must be >= 1, and the token range.
SIZE_FLAGS = ("batch", "d_model", "heads", "repeats")
MIN_TOKENS, MAX_TOKENS = 1, 65536


def flat(groups: Iterable) -> list:
    """A repeatable comma-list flag (``--tokens 8,20 --tokens 64`` -> ``[[8, 20], 64]``) as one list."""
    return [t for group in groups for t in (group if isinstance(group, list) else [group])]


def check_sizes(args: argparse.Namespace, *more: str) -> None:
    """:data:`SIZE_FLAGS` and ``more`` are >= 1 and ``--d-model`` divides by ``--heads``; else a
    :class:`BadInputError` naming the flag."""
    for name in (*SIZE_FLAGS, *more):
        if getattr(args, name) < 1:
            raise BadInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.d_model % args.heads:
        raise BadInputError(f"--d-model={args.d_model} must be divisible by --heads={args.heads}")


# --- the jaxattn rows: read off the implementation table (imported when asked: JAX starts after the flags) ---


def _call(platform: str, dtype: str = "float32", *, decode: bool = False):
    """A causal self-attention call of a bench's kind (a decode step: one query, a cache mask and a q_offset)."""
    from jaxattn import implementations

    tokens = 1024
    return implementations.Call(
        platform=platform,
        dtype=dtype,
        batch=1,
        q_tokens=1 if decode else tokens,
        kv_tokens=tokens,
        heads=12,
        kv_heads=12,
        head_dim=64,
        value_head_dim=64,
        has_mask=decode,
        has_bias=False,
        is_causal=True,
        q_offset=decode,
        dropout=False,
        same_dtypes=True,
    )


def _portable(call) -> list:
    """The registered implementations that run on every platform and serve ``call``, in registration order
    (ring attention refuses: it needs a mesh)."""
    from jaxattn import implementations

    rows = [implementations.get(name) for name in implementations.names()]
    return [impl for impl in rows if impl.platforms is None and impl.refusal(call) is None]


def cpu_kernels() -> tuple[str, ...]:
    """The kernels the CPU bench times: every portable implementation that serves its call."""
    return tuple(impl.name for impl in _portable(_call("cpu")))


def gpu_kernels() -> tuple[str, ...]:
    """The kernels the GPU bench times: the implementations that run on a GPU only, in the order ``"auto"``
    prefers them for a bfloat16 call (the fused kernels torch's sdpa is measured against)."""
    from jaxattn import implementations

    call = _call("gpu", "bfloat16")
    rows = [implementations.get(name) for name in implementations.names()]
    gpu_only = [impl for impl in rows if impl.platforms == ("gpu",)]
    return tuple(impl.name for impl in sorted(gpu_only, key=lambda impl: -(impl.auto(call) or 0.0)))


def decode_kernels() -> tuple[str, ...]:
    """The kernels the decode bench offers: the portable ones that serve a decode step, those that multiply
    every value by its weight first (one query's scores held whole: the default rows), then the tiled ones."""
    rows = _portable(_call("cpu", decode=True))
    return tuple(impl.name for impl in sorted(rows, key=lambda impl: not impl.every_value))


def decode_default_kernels() -> tuple[str, ...]:
    """The decode bench's default kernels: :func:`decode_kernels` that hold one query's scores whole."""
    return tuple(impl.name for impl in _portable(_call("cpu", decode=True)) if impl.every_value)


def input_np(args: argparse.Namespace, tokens: int) -> np.ndarray:
    """The ``(batch, tokens, d_model)`` float32 input every implementation of one shape gets."""
    return np.random.default_rng(args.seed).standard_normal((args.batch, tokens, args.d_model), dtype=np.float32)


def book_torch(d_model: int, heads: int, context_length: int, dtype: str, seed: int):
    import torch

    from crosscheck.references.torch_ref import MultiHeadAttention

    torch.manual_seed(seed)
    module = MultiHeadAttention(d_model, d_model, context_length, 0.0, heads, qkv_bias=False)
    return module.to(torch_dtype(dtype)).eval()


def sdpa_class():
    import torch
    import torch.nn.functional as F

    class SdpaMultiHeadAttention(torch.nn.Module):
        """The book's ``MultiHeadAttention`` (same parameter names) on ``scaled_dot_product_attention``."""

        def __init__(self, book):
            super().__init__()
            self.num_heads, self.head_dim, self.d_out = book.num_heads, book.head_dim, book.d_out
            self.W_query, self.W_key, self.W_value, self.out_proj = (
                book.W_query,
                book.W_key,
                book.W_value,
                book.out_proj,
            )

        def forward(self, x):
            b, t, _ = x.shape
            split = lambda y: y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731 (b, H, T, hd)
            q, k, v = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
            context_vec = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, H, T, hd)
            return self.out_proj(context_vec.transpose(1, 2).reshape(b, t, self.d_out))

    return SdpaMultiHeadAttention


def flax_state(book, d_model, heads, context_length, dtype, impl):
    """A jaxattn ``MultiHeadAttention`` with ``impl`` and the book module's weights (ported)."""
    import jaxattn
    from crosscheck.porting.port import load_state_dict

    jdtype = jax_dtype(dtype)
    module = jaxattn.MultiHeadAttention(
        d_model, d_model, context_length, 0.0, heads, attention_impl=impl, dtype=jdtype, param_dtype=jdtype
    )
    state = {k: v.float().cpu().numpy() for k, v in book.state_dict().items() if k != "mask"}
    return module, load_state_dict(module, state)
