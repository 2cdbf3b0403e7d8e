"""Porting by name: the convention Flax's and transformers' PyTorch converters followed, as a :class:`PortMap`.

For a torch module no table was written for, its parameters say where they go:

* ``X.weight`` of an ``nn.Linear`` is Flax ``X/kernel``, transposed; ``X.bias`` is ``X/bias``;
* ``weight`` of a ``LayerNorm`` or ``RMSNorm`` is ``scale`` (its ``bias`` stays ``bias``);
* ``weight`` of an ``Embedding`` is ``embedding``;
* any other parameter keeps its name and shape.

A torch list index joins its attribute as Linen names list members (``heads.0.W_key`` ->
``heads_0/W_key``); NNX keeps it as a path element (``heads/0/W_key``). The kinds come from the torch
module (:func:`crosscheck.references.byname.parameter_kinds`); this module is numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from crosscheck.variants.portmap import Entry, Layout, PortMap

Kind = Literal["linear", "norm", "embedding", "other"]

#: The Flax name of a torch parameter, by the kind of module that holds it.
_RENAMES: dict[tuple[Kind, str], str] = {
    ("linear", "weight"): "kernel",
    ("norm", "weight"): "scale",
    ("embedding", "weight"): "embedding",
}


def flax_path(torch_key: str, kind: Kind, api: str = "linen") -> tuple[str, ...]:
    """``"heads.0.W_key.weight"``, ``"linear"`` -> ``("heads_0", "W_key", "kernel")`` (Linen) or
    ``("heads", "0", "W_key", "kernel")`` (NNX)."""
    *modules, name = torch_key.split(".")
    path: list[str] = []
    for part in modules:
        if part.isdigit() and path and api == "linen":
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return (*path, _RENAMES.get((kind, name), name))


def port_map(parameters: Iterable[tuple[str, Kind, tuple[int, ...]]], api: str = "linen") -> PortMap:
    """The :class:`PortMap` of ``(torch key, kind of its module, torch shape)`` triples, by name."""
    entries = []
    for key, kind, shape in parameters:
        name = key.rsplit(".", 1)[-1]
        layouts: dict[tuple[str, str], Layout] = {("linear", "weight"): "linear_weight", ("linear", "bias"): "bias"}
        layout: Layout = layouts.get((kind, name), "raw")
        entries.append(Entry(key, flax_path(key, kind, api), layout, tuple(shape)))
    return PortMap(tuple(entries))
