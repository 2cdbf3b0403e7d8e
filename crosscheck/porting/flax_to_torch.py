"""Flax ``variables`` -> torch state dict: each table entry's parameter, checked, in torch layout under its
torch key, then the causal ``mask`` buffers the format has.

torch is imported only for ``return_tensors="pt"``, flax only for an NNX module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError, PortError
from crosscheck.pipeline import budget
from crosscheck.porting.arrays import not_floating, shape_of, to_torch
from crosscheck.porting.formats import config_of, is_nnx, is_unbounded, ported_from
from crosscheck.variants import portmap as pm
from crosscheck.variants import registry


def to_state_dict(
    flax_module,
    variables: Any = None,
    return_tensors: str = "np",
    *,
    prefix: str = "",
    variant=None,
    buffers: bool | None = None,
) -> dict[str, Any]:
    """The torch state dict (keys, layouts, and the ``mask`` buffers) of Flax ``variables``.

    ``flax_module``: a Linen module with its ``variables``, or a :mod:`jaxattn.nnx` module alone
    (its ``nnx.Param`` state is the variables) or with an ``nnx.State`` of its parameters.

    ``return_tensors="np"`` gives numpy arrays; ``"pt"`` gives torch tensors,
    ready for ``torch_module.load_state_dict``. ``variant``: the torch format to write
    (``"LlamaAttention"`` writes ``q_proj.weight`` ...); default: the format the module was
    ported from (:func:`crosscheck.porting.formats.ported_from`: ``from_torch``, ``load_state_dict``),
    else the one named like the module's class; ``prefix`` goes before every key (``model.layers.0.self_attn.``).

    Keys and dtypes are the parameters' own (float64, float32, bfloat16, float16 round-trip
    exactly); a parameter of another dtype, a missing or mis-shaped one, and a parameter path the
    format does not have are refused, each named (as ``load_state_dict`` refuses torch keys).
    ``buffers``: write the causal ``mask`` buffers; default: what the source's state dict carried
    when the module came from ``from_torch`` (a non-persistent ``mask`` is not written back),
    else yes, unless the module's ``context_length`` is
    :data:`crosscheck.porting.formats.UNBOUNDED_CONTEXT` (a source without a mask). They are in the
    weights' dtype when those share one (torch's ``module.to(dtype)`` moves the buffers with them),
    else float32 (the torch reference's own). Their size is checked against the memory budget
    (:mod:`crosscheck.pipeline.budget`) before allocation.
    """
    variables = _linen_variables(flax_module, variables)
    remembered = ported_from(flax_module)
    if variant is None and remembered is not None:
        variant = remembered.variant
    variant, cfg = config_of(flax_module, variant)
    portmap = variant.portmap(cfg)
    out = _torch_weights(variant.name, portmap, variables.get("params", {}))
    if buffers is None and remembered is not None:
        buffers = remembered.buffers
    if buffers is None:
        buffers = not is_unbounded(cfg)
    if buffers and portmap.buffers:
        out.update(_mask_buffers(variant, cfg, portmap, out))
    out = {prefix + k: v for k, v in out.items()}
    if return_tensors == "pt":
        return {k: to_torch(v) for k, v in out.items()}
    if return_tensors != "np":
        raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
    return out


def _get(tree: Mapping, path: tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


def _torch_weights(owner: str, portmap: pm.PortMap, params: Mapping) -> dict[str, np.ndarray]:
    """Each table entry's parameter in torch layout under its torch key; :class:`PortError` naming every
    missing, mis-shaped, non-floating and unexpected parameter."""
    out: dict[str, Any] = {}
    problems = []
    for entry in portmap.entries:
        where = f"Flax parameter {'/'.join(entry.flax_path)}"
        try:
            value = np.asarray(_get(params, entry.flax_path))
        except (KeyError, TypeError, IndexError):
            problems.append(f"missing {where} (for {entry.torch_key!r})")
            continue
        if value.shape != entry.flax_shape:
            problems.append(f"{where}: expected shape {entry.flax_shape}, found {value.shape}")
            continue
        wrong = not_floating(f"{where} (for {entry.torch_key!r})", value)
        if wrong:
            problems.append(wrong)
            continue
        out[entry.torch_key] = np.ascontiguousarray(pm.from_flax(entry.layout, value))
    known = {e.flax_path[:i] for e in portmap.entries for i in range(1, len(e.flax_path) + 1)}
    problems += [
        f"unexpected Flax parameter {'/'.join(path)} (shape {shape_of(leaf)})"
        for path, leaf in _leaves(params)
        if path not in known
    ]
    if problems:
        raise PortError(f"{owner}: variables do not fit:\n  " + "\n  ".join(problems))
    return out


def _mask_buffers(
    variant: registry.Variant, cfg: AttnConfig, portmap: pm.PortMap, weights: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The causal ``mask`` buffers, in the ``weights``' dtype when they share one (else float32), after
    their size is checked against the memory budget."""
    # Before the allocation: CausalAttention(context_length=100000) would need 37 GiB of mask.
    total = sum(budget.nbytes(b.torch_shape, 4) for b in portmap.buffers)
    budget.current().check(
        total,
        f"{variant.name}: the mask buffers of context_length {cfg.context_length}",
        "pass buffers=False (no mask keys) or a smaller context_length",
    )
    dtypes = {a.dtype for a in weights.values()}
    like = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    return {buf.torch_key: buf.expected().astype(like) for buf in portmap.buffers}


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` of a nested mapping of parameters."""
    if isinstance(tree, Mapping):
        for key, sub in tree.items():
            yield from _leaves(sub, (*path, str(key)))
    else:
        yield path, tree


def _linen_variables(flax_module, variables: Any) -> Mapping:
    """``variables`` as Linen's ``{"params": ...}``: an NNX module's (or an ``nnx.State``'s) ``nnx.Param`` tree."""
    if variables is not None and not is_nnx(variables):
        return variables
    source = flax_module if variables is None else variables
    if not is_nnx(source):
        raise BadInputError(f"to_state_dict: a Linen module ({type(flax_module).__name__}) needs its variables")
    from jaxattn.nnx import params_of

    return {"params": params_of(source)}
