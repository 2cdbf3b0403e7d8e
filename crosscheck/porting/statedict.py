"""A torch state dict read against a porting table: every key, shape, dtype and buffer checked, and the
hyperparameters its keys and shapes pin down.

Every error names each offending key with the expected and the found shape (or dtype).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from crosscheck.errors import PortError
from crosscheck.porting.arrays import StateDict, not_floating, shape_of, to_numpy
from crosscheck.porting.prefixes import whole_model_hint
from crosscheck.variants import portmap as pm
from crosscheck.variants import registry


def check_state_dict(portmap: pm.PortMap, state_dict: StateDict, owner: str) -> dict[str, Any]:
    """Validate ``state_dict`` against ``portmap``; return it with canonical keys.

    Raises :class:`PortError` naming every missing, unexpected and mis-shaped key
    (with expected and found shapes) and every buffer whose values are wrong.
    """
    clashes = pm.alias_collisions(state_dict)
    if clashes:
        raise PortError(f"{owner}: ambiguous state dict, duplicate aliases:\n  " + "\n  ".join(clashes))
    canonical: dict[str, Any] = {}
    for key, value in state_dict.items():
        canonical[pm.canonical_key(str(key))] = value
    canonical = {k: v for k, v in canonical.items() if k not in portmap.ignored}
    problems = _parameter_problems(portmap, canonical) + _other_key_problems(portmap, canonical)
    if problems:
        hint = whole_model_hint(state_dict, "--prefix (prefix= in Python)")
        head = f"{owner}: state dict does not fit" + (f" ({hint})" if hint else "")
        raise PortError(head + ":\n  " + "\n  ".join(problems))
    return canonical


def _parameter_problems(portmap: pm.PortMap, canonical: Mapping[str, Any]) -> list[str]:
    """Each parameter of the table that is missing, mis-shaped or not floating point."""
    problems: list[str] = []
    for key, entry in portmap.by_torch_key().items():
        if key not in canonical:
            problems.append(f"missing key {key!r} (expected shape {entry.torch_shape})")
        elif shape_of(canonical[key]) != entry.torch_shape:
            problems.append(f"key {key!r}: expected shape {entry.torch_shape}, found {shape_of(canonical[key])}")
        elif wrong := not_floating(f"key {key!r}", canonical[key]):
            problems.append(wrong)
    return problems


def _other_key_problems(portmap: pm.PortMap, canonical: Mapping[str, Any]) -> list[str]:
    """Each key beside the parameters: a buffer of the wrong shape or values, or a key the table does not list."""
    params = portmap.by_torch_key()
    buffers = {b.torch_key: b for b in portmap.buffers}
    problems: list[str] = []
    for key, value in canonical.items():
        if key in params:
            continue
        if key in buffers:
            buf = buffers[key]
            if shape_of(value) != buf.torch_shape:
                problems.append(f"buffer {key!r}: expected shape {buf.torch_shape}, found {shape_of(value)}")
            elif not np.array_equal(to_numpy(value).astype(np.float32) != 0, buf.expected() != 0):
                problems.append(f"buffer {key!r}: not the causal mask triu(ones({buf.torch_shape[0]}), 1)")
            continue
        problems.append(f"unexpected key {key!r} (shape {shape_of(value)})")
    return problems


def infer_config(
    variant: registry.Variant, state_dict: StateDict, known: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The hyperparameters a state dict's keys and shapes pin down for ``variant``.

    Returns only what is certain (``d_in``, ``d_out``, ``qkv_bias``, ``context_length``
    from the ``mask`` buffer, ``num_heads`` for the wrapper); the caller supplies the rest.
    Which keys tell what is the variant's own fact (:meth:`registry.Variant.infer_config`);
    ``known`` (flags, a config file) makes more certain (the kv heads once the head dim is known).
    """
    return variant.infer_config({pm.canonical_key(str(k)): shape_of(v) for k, v in state_dict.items()}, known)
