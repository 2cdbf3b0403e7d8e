"""A jaxattn module's torch format: the registry variant and config it was built with, and the source a
port from torch recorded on it (:class:`PortedFrom`), so that the way back writes the same state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.variants import registry

#: The context length :func:`crosscheck.porting.from_torch.from_torch` gives a module whose source has no
#: ``mask`` buffer and no ``context_length`` (the book's ``PyTorchMultiHeadAttention``): no limit, and no
#: buffer written back.
UNBOUNDED_CONTEXT = 1 << 30


def is_unbounded(cfg: AttnConfig) -> bool:
    """Whether ``cfg`` has no context limit (:data:`UNBOUNDED_CONTEXT`): a source without a mask."""
    return cfg.context_length >= UNBOUNDED_CONTEXT


def variant_arg(variant) -> registry.Variant:
    """A registry entry, or the one named ``variant``; :class:`BadInputError` for an unknown name."""
    if isinstance(variant, registry.Variant):
        return variant
    try:
        return registry.get(str(variant))
    except KeyError as err:
        raise BadInputError(str(err.args[0])) from None


def config_of(flax_module, variant=None) -> tuple[registry.Variant, AttnConfig]:
    """The registry variant and :class:`AttnConfig` a jaxattn module was built with.

    ``variant`` (a name or entry): the torch format, when several share the module's class
    (``LlamaAttention`` runs on ``GroupedQueryAttention``); default: the variant named like the class.
    """
    name = type(flax_module).__name__
    candidates = registry.for_flax_class(name)
    if not candidates:
        raise BadInputError(f"not a jaxattn attention module: {name}")
    chosen = candidates[0] if variant is None else variant_arg(variant)
    if chosen not in candidates:
        raise BadInputError(
            f"{chosen.name} runs on jaxattn.{chosen.flax_class_name}, not {name}; "
            f"formats of {name}: {', '.join(v.name for v in candidates)}"
        )
    raw = chosen.config_of(flax_module)
    cfg = chosen.resolve(raw)
    fixed = [f"{k}={getattr(raw, k)}" for k in ("qkv_bias", "qk_norm") if getattr(raw, k) != getattr(cfg, k)]
    if fixed:
        raise BadInputError(f"{name} with {', '.join(fixed)} is not a {chosen.name} (the format fixes it)")
    return chosen, cfg


@dataclass(frozen=True)
class PortedFrom:
    """What a module ported from torch remembers of its source, so that ``to_state_dict`` writes the
    same state dict back by default: the format (``LlamaAttention``, ``Qwen3Attention`` and the book's
    ``GroupedQueryAttention`` share one Flax class, and the Flax module alone cannot tell them apart) and
    whether the source's state dict carried the ``mask`` buffers (``None``: not known)."""

    variant: str
    buffers: bool | None = None


#: The attribute a ported module keeps its :class:`PortedFrom` under.
PORTED_FROM_ATTR = "_crosscheck_ported_from"


def ported_from(flax_module) -> PortedFrom | None:
    """The source ``from_torch`` or ``load_state_dict`` recorded on ``flax_module`` (``None``: none).

    A record on the module object itself: a Linen ``clone()`` or ``replace()`` makes a new object
    without it, and ``to_state_dict`` then needs ``variant=``.
    """
    record = getattr(flax_module, PORTED_FROM_ATTR, None)
    return record if isinstance(record, PortedFrom) else None


def remember(flax_module, record: PortedFrom) -> None:
    """Record ``record`` on ``flax_module`` (:func:`ported_from` reads it back)."""
    if is_nnx(flax_module):
        setattr(flax_module, PORTED_FROM_ATTR, record)  # NNX keeps it as a static attribute (split/merge, clone)
    else:
        object.__setattr__(flax_module, PORTED_FROM_ATTR, record)  # Linen modules refuse setattr once built


def is_nnx(obj: Any) -> bool:
    """Whether ``obj`` is an NNX module or state (without importing flax for Linen users' numpy trees)."""
    return type(obj).__module__.startswith(("flax.nnx", "jaxattn.nnx"))
