"""Porting tables: where each torch state-dict key lives in Flax and in ttnn.

Porting is data. A variant's :class:`PortMap` lists, for one configuration,
every torch key with its expected torch shape, the Flax parameter path that
holds it and the layout transform between them. The same table is read in
both directions (torch -> Flax, Flax -> torch) and towards ttnn, so the round
trip and the error messages come from one place.

Numpy only: this module is imported by the ttnn worker, which may run in an
interpreter without torch or JAX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

#: ``linear_weight``: torch ``nn.Linear.weight`` ``(out, in)`` = Flax ``kernel.T`` = ttnn ``(in, out)``.
#: ``bias``: ``(out,)`` in torch and Flax, ``(1, out)`` in ttnn.
#: ``raw``: a bare ``nn.Parameter`` used as ``x @ W`` (``SelfAttentionV1``), same layout everywhere.
Layout = Literal["linear_weight", "bias", "raw"]


@dataclass(frozen=True)
class Entry:
    torch_key: str  # e.g. "heads.0.W_query.weight"
    flax_path: tuple[str, ...]  # e.g. ("heads_0", "W_query", "kernel") under variables["params"]
    layout: Layout
    torch_shape: tuple[int, ...]

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return self.torch_shape[::-1] if self.layout == "linear_weight" else self.torch_shape

    @property
    def ttnn_shape(self) -> tuple[int, ...]:
        if self.layout == "bias":
            return (1, self.torch_shape[0])
        return self.flax_shape

    @property
    def module_path(self) -> tuple[str, ...]:
        """The torch submodule path and attribute, e.g. ``("heads", "0", "W_query", "weight")``."""
        return tuple(self.torch_key.split("."))


@dataclass(frozen=True)
class BufferEntry:
    """A buffer the torch module registers (the book's causal ``mask``): accepted and checked, never required."""

    torch_key: str
    torch_shape: tuple[int, ...]

    def expected(self) -> np.ndarray:
        n = self.torch_shape[0]
        return np.triu(np.ones((n, n), dtype=np.float32), k=1)


@dataclass(frozen=True)
class PortMap:
    entries: tuple[Entry, ...]
    buffers: tuple[BufferEntry, ...] = ()

    def by_torch_key(self) -> dict[str, Entry]:
        return {e.torch_key: e for e in self.entries}


def to_flax(layout: Layout, array: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout."""
    return array.T if layout == "linear_weight" else array


def from_flax(layout: Layout, array: np.ndarray) -> np.ndarray:
    """Flax layout -> torch layout (``linear_weight`` transposes back)."""
    return array.T if layout == "linear_weight" else array


def to_ttnn(layout: Layout, array: np.ndarray) -> np.ndarray:
    """Torch layout -> the layout ``ttnn.model_preprocessing`` gives: weights ``(in, out)``, biases ``(1, out)``."""
    if layout == "linear_weight":
        return np.ascontiguousarray(array.T)
    if layout == "bias":
        return array.reshape(1, -1)
    return array


# --- table builders: one line per torch submodule ------------------------------------------


def linear(prefix: str, flax_prefix: tuple[str, ...], d_in: int, d_out: int, bias: bool) -> list[Entry]:
    """An ``nn.Linear(d_in, d_out, bias)`` at torch ``prefix`` / Flax ``flax_prefix`` (a ``Dense``)."""
    entries = [Entry(f"{prefix}.weight", (*flax_prefix, "kernel"), "linear_weight", (d_out, d_in))]
    if bias:
        entries.append(Entry(f"{prefix}.bias", (*flax_prefix, "bias"), "bias", (d_out,)))
    return entries


def qkv_linears(prefix: str, flax_prefix: tuple[str, ...], d_in: int, d_out: int, bias: bool) -> list[Entry]:
    """The book's three projections ``W_query``, ``W_key``, ``W_value``."""
    return [
        entry
        for name in ("W_query", "W_key", "W_value")
        for entry in linear(prefix + name, (*flax_prefix, name), d_in, d_out, bias)
    ]


def causal_mask(prefix: str, context_length: int) -> BufferEntry:
    return BufferEntry(f"{prefix}mask", (context_length, context_length))


#: Attribute names that users' copies of the book's classes use for the same thing.
#: (The tutorial among our seeds names the value projection ``W_val``.)
KEY_ALIASES = {"W_val": "W_value"}


def canonical_key(key: str) -> str:
    """Rewrite alias segments (``W_val`` -> ``W_value``) so a user's state dict matches our table."""
    return ".".join(KEY_ALIASES.get(part, part) for part in key.split("."))
