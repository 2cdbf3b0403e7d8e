"""What the family files of :mod:`crosscheck.variants` share: module builders, shape and structure readers.

The builders import torch or JAX when they are called, never when this module loads (the ttnn
worker imports the registry in an interpreter that has neither).
"""

from __future__ import annotations

from collections.abc import Callable

from crosscheck.config import AttnConfig
from crosscheck.variants.variant import Shapes

# --- module builders (lazy imports) ---------------------------------------------------------------


def build_flax(name: str, args: Callable[[AttnConfig], dict]):
    def build(cfg: AttnConfig, api: str = "linen", **options):
        """The Linen module (``options``: fields to set), or with ``api="nnx"`` its ``jaxattn.nnx`` twin
        (``options``: keyword arguments, e.g. ``dtype``; random weights from ``rngs``, default seed 0)."""
        if api == "nnx":
            from flax import nnx

            import jaxattn.nnx

            options.setdefault("rngs", nnx.Rngs(0))
            return getattr(jaxattn.nnx, name)(**args(cfg), **options)
        import jaxattn

        return getattr(jaxattn, name)(**args(cfg), **options)

    return build


def build_torch(name: str, args: Callable[[AttnConfig], dict]):
    def build(cfg: AttnConfig):
        from crosscheck.references import torch_ref

        return getattr(torch_ref, name)(**args(cfg))

    return build


def build_torch_cached(name: str, args: Callable[[AttnConfig], dict]):
    def build(cfg: AttnConfig):
        from crosscheck.references import torch_kv_cache

        return getattr(torch_kv_cache, name)(**args(cfg))

    return build


def causal_args(cfg: AttnConfig) -> dict:
    """The book's ``CausalAttention`` constructor arguments."""
    return dict(
        d_in=cfg.d_in, d_out=cfg.d_out, context_length=cfg.context_length, dropout=cfg.dropout, qkv_bias=cfg.qkv_bias
    )


def heads_args(cfg: AttnConfig) -> dict:
    """The book's multi-head constructor arguments: ``CausalAttention``'s and ``num_heads``."""
    return dict(causal_args(cfg), num_heads=cfg.num_heads)


# --- reading shapes and structure (torch imported lazily) ----------------------------------------


def matrix(shapes: Shapes, key: str) -> tuple[int, int] | None:
    shape = shapes.get(key)
    return shape if shape is not None and len(shape) == 2 else None


def has_linear(module, attr: str) -> bool:
    sub = getattr(module, attr, None)
    return sub is not None and hasattr(sub, "weight") and hasattr(sub, "in_features")


def is_torch_mha(module) -> bool:
    from torch import nn

    return isinstance(module, nn.MultiheadAttention)


def has_heads(module) -> bool:
    """The wrapper's shape: a non-empty ``nn.ModuleList`` of single-head layers named ``heads``."""
    from torch import nn

    heads = getattr(module, "heads", None)
    return isinstance(heads, nn.ModuleList) and len(heads) > 0


def is_combined_qkv(module) -> bool:
    return not has_heads(module) and has_linear(module, "qkv") and has_linear(module, "proj")


def qkv_layer(module) -> bool:
    """A single layer with ``W_query``/``W_key``/``W_value`` (the seed notebook spells it ``W_val``)."""
    if is_torch_mha(module) or has_heads(module) or is_combined_qkv(module):
        return False
    values = "W_value" if hasattr(module, "W_value") else "W_val"
    return all(hasattr(module, n) for n in ("W_query", "W_key", values))
