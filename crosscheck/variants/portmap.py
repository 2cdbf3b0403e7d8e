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
#: ``raw``: a bare ``nn.Parameter`` used as ``x @ W`` (``SelfAttentionV1``; transformers' ``Conv1D`` in GPT-2,
#: whose ``weight`` is already ``(in, out)``), same layout everywhere.
#: A norm's scale vector (``q_norm.scale``) uses ``bias``: ``(n,)``, and ``(1, n)`` in ttnn.
Layout = Literal["linear_weight", "bias", "raw"]


@dataclass(frozen=True)
class Entry:
    torch_key: str  # e.g. "heads.0.W_query.weight"
    flax_path: tuple[str, ...]  # e.g. ("heads_0", "W_query", "kernel") under variables["params"]
    layout: Layout
    torch_shape: tuple[int, ...]
    #: Where the ttnn parameter tree holds it, as a torch key of the book's layout (the ttnn programs read
    #: the book's names whatever the torch format: transformers' ``q_proj.weight`` -> ``W_query.weight``);
    #: ``None``: the torch key itself.
    ttnn_key: str | None = None

    @property
    def ttnn_name(self) -> str:
        """The book-layout key the ttnn programs read (``ttnn_key``, else ``torch_key``)."""
        return self.ttnn_key or self.torch_key

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
    #: Keys accepted and dropped, never required (as transformers' ``_keys_to_ignore_on_load_unexpected``):
    #: buffers a format may carry that hold no weights (GPT-2's old ``bias``/``masked_bias`` masks, a
    #: notebook's RoPE ``cos``/``sin`` tables, ``rotary_emb.inv_freq``).
    ignored: tuple[str, ...] = ()

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


def linear_as(
    prefix: str, flax_prefix: tuple[str, ...], ttnn_prefix: str, d_in: int, d_out: int, bias: bool
) -> list[Entry]:
    """``linear`` under another torch name: transformers' ``q_proj`` held as the book's ``W_query`` in ttnn."""
    return [
        Entry(e.torch_key, e.flax_path, e.layout, e.torch_shape, ttnn_prefix + e.torch_key[len(prefix) :])
        for e in linear(prefix, flax_prefix, d_in, d_out, bias)
    ]


def conv1d(prefix: str, flax_prefix: tuple[str, ...], ttnn_prefix: str, d_in: int, d_out: int) -> list[Entry]:
    """transformers' ``Conv1D(nf=d_out, nx=d_in)``: weight ``(in, out)`` as is (``raw``), always a bias."""
    return [
        Entry(f"{prefix}.weight", (*flax_prefix, "kernel"), "raw", (d_in, d_out), f"{ttnn_prefix}.weight"),
        Entry(f"{prefix}.bias", (*flax_prefix, "bias"), "bias", (d_out,), f"{ttnn_prefix}.bias"),
    ]


def norm_scale(torch_key: str, flax_prefix: tuple[str, ...], ttnn_key: str, size: int) -> Entry:
    """An RMSNorm's scale ``(size,)`` (the book's ``.scale``, transformers' ``.weight``): ttnn ``(1, size)``."""
    return Entry(torch_key, (*flax_prefix, "scale"), "bias", (size,), ttnn_key)


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


def alias_collisions(keys) -> list[str]:
    """Keys that name one parameter twice (``W_val.weight`` and ``W_value.weight``), as ``"'a' and 'b'"`` lines.

    Either spelling is accepted alone; both at once is ambiguous, and one would silently win.
    """
    seen: dict[str, str] = {}
    clashes = []
    for key in keys:
        canonical = canonical_key(str(key))
        if canonical in seen:
            clashes.append(f"{seen[canonical]!r} and {str(key)!r} both name {canonical!r}")
        else:
            seen[canonical] = str(key)
    return clashes
