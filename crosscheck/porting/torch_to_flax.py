"""Torch state dict -> Flax ``variables``: each table entry's tensor, checked, in Flax layout at its Flax path.

JAX is imported only by :func:`load_state_dict` (the worker and the config readers never start it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.porting.arrays import StateDict, to_numpy
from crosscheck.porting.formats import PortedFrom, config_of, remember
from crosscheck.porting.prefixes import select_prefix
from crosscheck.porting.statedict import check_state_dict
from crosscheck.variants import portmap as pm
from crosscheck.variants import registry


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def variables_from_state_dict(portmap: pm.PortMap, state_dict: StateDict, owner: str, dtype=None) -> dict:
    """``{"params": ...}`` from a validated state dict, each array in Flax layout."""
    canonical = check_state_dict(portmap, state_dict, owner)
    params: dict = {}
    for entry in portmap.entries:
        array = pm.to_flax(entry.layout, to_numpy(canonical[entry.torch_key]))
        if dtype is not None:
            array = array.astype(dtype)
        _set(params, entry.flax_path, np.ascontiguousarray(array))
    return {"params": params}


def port_variables(variant: registry.Variant, cfg: AttnConfig, state_dict: StateDict, dtype: Any | None = None) -> dict:
    """Validated Flax variables for ``variant`` at ``cfg`` (numpy leaves)."""
    return variables_from_state_dict(variant.portmap(cfg), state_dict, variant.name, dtype)


def _format_of(flax_module, state_dict: StateDict, variant) -> tuple[registry.Variant, AttnConfig]:
    """The format ``state_dict`` is in, among those of ``flax_module``'s class (the one it fits)."""
    if variant is not None:
        return config_of(flax_module, variant)
    candidates = registry.for_flax_class(type(flax_module).__name__)
    for candidate in candidates[1:]:
        try:
            chosen, cfg = config_of(flax_module, candidate)
            check_state_dict(chosen.portmap(cfg), state_dict, chosen.name)
        except BadInputError:
            continue
        return chosen, cfg
    return config_of(flax_module)


def load_state_dict(flax_module, state_dict: StateDict, prefix: str = "", *, variant=None) -> dict:
    """Flax ``variables`` for ``flax_module`` from a torch state dict (validated, exact).

    ``prefix``: read the layer under it in a whole model's state dict (``model.layers.0.self_attn.``).
    ``variant``: the torch format (a name, e.g. ``"LlamaAttention"``); default: the one whose keys
    the state dict has, among the formats of ``flax_module``'s class. The module remembers it
    (:func:`crosscheck.porting.formats.ported_from`): ``to_state_dict`` writes that format back by default.

    Dtypes: a module at the default ``param_dtype`` (float32) keeps each weight's own floating
    dtype, so that ``to_state_dict`` gives back exactly what came in (float64 stays a numpy
    array where JAX runs without x64; the module computes in float32 from it); a module built with
    another ``param_dtype`` gets its weights cast to it.
    """
    import jax

    state_dict = select_prefix(state_dict, prefix)
    variant, cfg = _format_of(flax_module, state_dict, variant)
    variables = variables_from_state_dict(variant.portmap(cfg), state_dict, variant.name)
    remember(flax_module, PortedFrom(variant.name))
    param_dtype = getattr(flax_module, "param_dtype", None)
    return jax.tree.map(lambda a: _as_param(a, param_dtype), variables)


def _as_param(array: np.ndarray, param_dtype) -> Any:
    import jax
    import jax.numpy as jnp

    if param_dtype is not None and np.dtype(param_dtype) != np.float32:
        return jnp.asarray(array, dtype=param_dtype)
    if array.dtype == np.float64 and not jax.config.jax_enable_x64:  # type: ignore[attr-defined]  # dynamic option
        return array  # exact: a JAX array would be float32
    return jnp.asarray(array)
