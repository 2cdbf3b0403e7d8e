"""Layers inside a whole model's state dict: the prefixes they sit under, and one layer selected by its prefix.

A whole model keeps its attention layers under prefixes (``model.layers.3.self_attn.``,
``transformer.h.0.attn.``, the book's ``trf_blocks.0.att.``); a port reads one bare layer.
"""

from __future__ import annotations

import re
from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.porting.arrays import StateDict
from crosscheck.variants import portmap as pm
from crosscheck.variants import registry


def select_prefix(state_dict: StateDict, prefix: str) -> dict[str, Any]:
    """The entries of a whole model's ``state_dict`` under ``prefix``, with the prefix removed.

    Raises :class:`BadInputError` naming the prefix, a few keys and the layer prefixes the state
    dict does hold (:func:`layer_prefixes`) when nothing is under it.
    """
    if not prefix:
        return dict(state_dict)
    found = {str(k)[len(prefix) :]: v for k, v in state_dict.items() if str(k).startswith(prefix)}
    if not found:
        sample = ", ".join(repr(str(k)) for k in list(state_dict)[:3])
        layers = layer_prefixes(state_dict)
        hint = f"; attention layers found under {_list_prefixes(layers)}" if layers and layers != [""] else ""
        raise BadInputError(
            f"no key starts with the prefix {prefix!r} (the state dict has {len(state_dict)} keys, e.g. {sample})"
            + hint
        )
    return found


def _layer_anchors() -> set[str]:
    """One key per format that only a layer of that format has (its first parameter: ``W_query.weight``,
    ``heads.0.W_query.weight``, ``q_proj.weight``, ``c_attn.weight``, ``in_proj_weight`` ...)."""
    anchors = set()
    for v in registry.VARIANTS:
        entries = v.portmap(v.resolve(AttnConfig(**{**AttnConfig().to_dict(), **dict(v.defaults)}))).entries
        if entries:
            anchors.add(entries[0].torch_key)
    return anchors


def _natural(text: str) -> tuple:
    """Sort key that puts ``layers.2.`` before ``layers.10.``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))


def layer_prefixes(state_dict: StateDict) -> list[str]:
    """The prefixes under which ``state_dict`` holds attention layers (``model.layers.0.self_attn.``), sorted.

    ``[""]`` when it is one bare layer; ``[]`` when no format's keys are in it. A layer inside another
    (the wrapper's ``heads.0.`` under its own prefix) counts once, under the outer prefix.
    """
    anchors = _layer_anchors()
    found: set[str] = set()
    for key in state_dict:
        key = pm.canonical_key(str(key))
        for anchor in anchors:
            if key == anchor:
                found.add("")
            elif key.endswith("." + anchor):
                found.add(key[: len(key) - len(anchor)])
    outer = [p for p in found if not any(q != p and p.startswith(q) for q in found)]
    return sorted(outer, key=_natural)


def _list_prefixes(prefixes: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(p) for p in prefixes[:limit])
    return shown + (f" ... ({len(prefixes)} in all)" if len(prefixes) > limit else "")


def whole_model_hint(state_dict: StateDict, option: str = "--prefix", under: str = "") -> str | None:
    """A sentence naming ``option`` and the layer prefixes, when ``state_dict`` holds layers under prefixes
    and no bare layer (a whole model's state dict read as one layer); else ``None``. ``under``: the prefix
    ``state_dict`` was selected with, put before each prefix found."""
    layers = [under + p for p in layer_prefixes(state_dict)]
    if not layers or under in layers:
        return None
    many = f"{len(layers)} attention layers" if len(layers) > 1 else "an attention layer"
    return f"it holds {many} under a prefix, not one bare layer: choose one with {option} ({_list_prefixes(layers)})"
