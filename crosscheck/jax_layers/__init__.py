"""Attention layers of other JAX libraries as rows against torch: ``--jax-layers``.

Each adapter takes the state dict of a ``torch.nn.MultiheadAttention`` (numpy arrays: ``in_proj_weight``,
``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), ports it into the library's own layer by that
layer's documented parameter layout, and calls the layer as its documentation shows: the forward pass, a
key-padding mask through the layer's own mask argument, and decoding through the layer's own cache where it
has one. What the adapters return is compared with torch like any other row; a disagreement is a result
about that library (a FAIL row naming the call and the first diverging stage), never something to tune.

The adapters import JAX, Flax or Equinox when called, so listing them costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module, metadata

import numpy as np

#: The stages every adapter reports, in the order a forward pass computes them.
STAGES = ("query", "key", "value", "attention", "output")


@dataclass(frozen=True, kw_only=True)
class JaxLayer:
    """One library's attention layer, as ``--jax-layers`` names it.

    ``module``: the adapter module (in this package) with ``stages`` and, where the layer has a cache,
    ``decode_stages``. ``imports``: the library's module, ``distribution`` its package (whose version a row
    names) and ``install`` how to get it. ``call``/``decode_call``: how the layer is called, as its
    documentation shows (named in a FAIL row). ``no_cache``: why there is no decode row, where the layer has
    no cache.
    """

    name: str
    distribution: str
    imports: str
    install: str
    module: str
    call: str
    decode_call: str | None = None
    no_cache: str | None = None

    def adapter(self):
        return import_module(f"crosscheck.jax_layers.{self.module}")

    def version(self) -> str:
        return metadata.version(self.distribution)

    def available(self) -> str | None:
        """``None``, or why the library cannot be used here (not installed)."""
        try:
            import_module(self.imports)
        except ImportError:
            return f"--jax-layers {self.name}: {self.distribution} is not installed ({self.install})"
        return None


LAYERS: dict[str, JaxLayer] = {
    layer.name: layer
    for layer in (
        JaxLayer(
            name="flax.linen",
            distribution="flax",
            imports="flax.linen",
            install="pip install jaxattn",
            module="linen",
            call="nn.MultiHeadDotProductAttention(...).apply(params, x, mask=nn.make_causal_mask(...))",
            decode_call="nn.MultiHeadDotProductAttention(..., decode=True): one token per apply, mutable=['cache']",
        ),
        JaxLayer(
            name="flax.nnx",
            distribution="flax",
            imports="flax.nnx",
            install="pip install jaxattn",
            module="nnx",
            call="nnx.MultiHeadAttention(...)(x, mask=..., is_causal=True)",
            decode_call="nnx.MultiHeadAttention(..., decode=True): init_cache, then one token per call, is_causal=True",
        ),
        JaxLayer(
            name="equinox",
            distribution="equinox",
            imports="equinox",
            install="pip install 'jaxattn[equinox]'",
            module="equinox_mha",
            call="jax.vmap(eqx.nn.MultiheadAttention(...))(x, x, x, mask=causal & keys)",
            no_cache="equinox.nn.MultiheadAttention has no KV cache",
        ),
    )
}

#: ``--jax-layers`` names: ours first (the ordinary Flax row), then the libraries.
NAMES = ("jaxattn", *LAYERS)


def parse(text: str) -> tuple[str, ...]:
    """``"jaxattn,flax.nnx"`` -> ``("jaxattn", "flax.nnx")``; an unknown name is a ``ValueError`` naming it."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"--jax-layers: unknown layer(s) {unknown}; choose from {', '.join(NAMES)}")
    if not names:
        raise ValueError(f"--jax-layers: no layer named; choose from {', '.join(NAMES)}")
    return names


def first_diverging(stages: dict[str, np.ndarray], reference: dict[str, np.ndarray], bound: Callable) -> str | None:
    """The first of :data:`STAGES` where ``stages`` and ``reference`` differ by more than ``bound(name, ref)``."""
    for name in STAGES:
        if name in stages and name in reference:
            got, want = np.asarray(stages[name], np.float64), np.asarray(reference[name], np.float64)
            if got.shape != want.shape or not (np.abs(got - want) <= bound(name, want)).all():
                return name
    return None
