"""The variant registry: each supported attention variant named once, with every fact about it.

Each entry is a :class:`~crosscheck.variants.variant.Variant`, kept in its family's file: the book's
chapter-3 classes (:mod:`~crosscheck.variants.book`), ``torch.nn.MultiheadAttention``
(:mod:`~crosscheck.variants.torch_mha`), the book's grouped-query attention
(:mod:`~crosscheck.variants.grouped_query`) and transformers' formats
(:mod:`~crosscheck.variants.transformers`). This module gathers them and answers the lookups the
CLI, the compare engine, the porting code, the ttnn runtime, the benchmark and the tests make, so a
new family is one file plus its module in :data:`VARIANTS` (and the import above it). Numpy only,
like the ttnn worker.
"""

from __future__ import annotations

from collections.abc import Callable

from crosscheck.variants import book, grouped_query, torch_mha, transformers
from crosscheck.variants.variant import FLAX_APIS, Shapes, Variant

__all__ = [
    "BF16_ROUNDINGS",
    "BUILT_IN",
    "FLAX_APIS",
    "TTNN_BF16_ABS_BUDGET",
    "TTNN_BF16_TOLERANCE",
    "VARIANTS",
    "Shapes",
    "Variant",
    "add",
    "decoding",
    "default_run",
    "for_flax_class",
    "get",
    "missing_needs",
    "names",
    "recognising",
    "registered",
    "remove",
    "takes_attention_impl",
    "ttnn_decoders",
    "ttnn_programs",
]

#: The project's own entries; :data:`VARIANTS` adds those registered at run time
#: (:func:`crosscheck.register_variant`, :mod:`crosscheck.variants.plugins`).
BUILT_IN: tuple[Variant, ...] = (*book.VARIANTS, *torch_mha.VARIANTS, *grouped_query.VARIANTS, *transformers.VARIANTS)

VARIANTS: tuple[Variant, ...] = BUILT_IN

_BY_NAME = {v.name.lower(): v for v in VARIANTS}


def get(name: str) -> Variant:
    """Look a variant up by its jaxattn class name, case-insensitively."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        known = ", ".join(v.name for v in VARIANTS)
        raise KeyError(f"unknown variant {name!r}; known variants: {known}") from None


def add(variant: Variant) -> None:
    """Add a registered variant to every lookup; a name already taken (case-insensitively) is an error."""
    global VARIANTS
    taken = _BY_NAME.get(variant.name.lower())
    if taken is not None:
        what = "a built-in variant" if taken in BUILT_IN else "a variant registered before"
        raise ValueError(f"cannot register {variant.name!r}: the name is taken by {what} ({taken.name})")
    VARIANTS = (*VARIANTS, variant)
    _BY_NAME[variant.name.lower()] = variant
    BF16_ROUNDINGS[variant.name] = variant.bf16_roundings
    TTNN_BF16_TOLERANCE[variant.name] = variant.ttnn_tolerance


def remove(name: str) -> Variant:
    """Take a registered variant out of every lookup (built-in ones stay); returns it."""
    global VARIANTS
    variant = get(name)
    if variant in BUILT_IN:
        raise ValueError(f"{variant.name} is a built-in variant; only registered ones can be removed")
    VARIANTS = tuple(v for v in VARIANTS if v is not variant)
    del _BY_NAME[variant.name.lower()]
    BF16_ROUNDINGS.pop(variant.name, None)
    TTNN_BF16_TOLERANCE.pop(variant.name, None)
    return variant


def registered() -> list[Variant]:
    """The variants registered at run time, in the order they were."""
    return [v for v in VARIANTS if v not in BUILT_IN]


def recognising(torch_module) -> list[Variant]:
    """The entries that recognise ``torch_module``; a registered class recognised as itself wins over the
    built-in entries' structural tests (a plugin's layer may have the book's ``W_query``...)."""
    found = [v for v in VARIANTS if v.recognises(torch_module)]
    own = [v for v in found if v not in BUILT_IN]
    return own or found


def names() -> list[str]:
    return [v.name for v in VARIANTS]


def default_run() -> list[Variant]:
    """The variants a plain ``crosscheck`` runs (the book's chapter-3 ones)."""
    return [v for v in VARIANTS if v.in_default_run]


def for_flax_class(class_name: str) -> list[Variant]:
    """The variants whose Flax module is the jaxattn class ``class_name``, the one named like it first."""
    found = [v for v in VARIANTS if v.flax_class_name == class_name]
    return sorted(found, key=lambda v: v.name != class_name)


def missing_needs(variant: Variant) -> list[str]:
    """The optional packages ``variant``'s torch side needs that this interpreter lacks."""
    import importlib.util

    return [n for n in variant.needs if importlib.util.find_spec(n) is None]


def decoding() -> list[Variant]:
    """The variants with a KV cache (at a causal config)."""
    return [v for v in VARIANTS if v.make_torch_cached is not None]


def takes_attention_impl() -> list[Variant]:
    """The variants whose jaxattn module runs a selectable attention core."""
    return [v for v in VARIANTS if v.takes_attention_impl]


def ttnn_programs() -> dict[str, Callable]:
    """Every ttnn program by name, the SDPA twins too (read off the entries)."""
    found = [p for v in VARIANTS for p in (v.ttnn_forward, v.ttnn_sdpa) if p is not None]
    return {p.__name__: p for p in found}


def ttnn_decoders() -> dict[str, object]:
    """``program name -> its KV-cache decode`` for the programs that decode (read off the entries)."""
    return {v.ttnn_program: v.ttnn_decode for v in VARIANTS if v.ttnn_decode is not None}


# --- the ttnn tolerance table, read off the entries (how the roundings are counted: crosscheck.tt) ----

#: bf16 roundings on each variant's longest data path.
BF16_ROUNDINGS: dict[str, int] = {v.name: v.bf16_roundings for v in VARIANTS}

#: THE ttnn tolerance table: variant -> (max-abs budget for unit-scale data, min PCC) vs torch float32.
TTNN_BF16_TOLERANCE: dict[str, tuple[float, float]] = {v.name: v.ttnn_tolerance for v in VARIANTS}

#: One number for callers that do not distinguish variants: the largest budget (15 u for grouped-query attention).
TTNN_BF16_ABS_BUDGET: float = max(budget for budget, _ in TTNN_BF16_TOLERANCE.values())
