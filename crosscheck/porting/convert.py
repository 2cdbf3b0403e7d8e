"""``crosscheck convert IN OUT``: a torch attention layer's weights as a Flax parameter file, and back.

Direction by the files: IN a torch state dict (``.pt``/``.pth``/``.bin``, read with
``weights_only=True``, or a ``.safetensors`` without Flax metadata; a whole model's with
``prefix``) and OUT ``.safetensors`` or ``.msgpack`` writes Flax parameters; IN a Flax file
written here (``.msgpack``, or ``.safetensors`` whose metadata says ``format: flax``) and OUT
``.pt``/``.pth`` or ``.safetensors`` writes the torch state dict.

The Flax files hold Linen's ``variables`` (``{"params": ...}``), which the :mod:`jaxattn.nnx`
modules load too (:func:`jaxattn.nnx.load_params`):

* ``.safetensors`` (written and read through ``safetensors.torch``, which holds bfloat16 and float64
  exactly, where ``safetensors.numpy`` has no bfloat16): flat keys ``params/W_query/kernel`` (Flax's
  ``flatten_dict(sep="/")``), metadata ``format``, ``crosscheck_variant``, ``crosscheck_config``
  (the :class:`AttnConfig` as JSON), ``torch_buffers``, ``source``;
* ``.msgpack`` (``flax.serialization``): ``{"params": ..., "metadata": {same keys}}``.

Variant and config are inferred as ``crosscheck --weights`` infers them (:func:`crosscheck.pipeline.cases.build_cases`:
the keys and shapes, then flags and a transformers ``config.json``), and recorded in the file. A state dict
that holds layers under prefixes and no bare layer (a whole model's) is refused, naming ``--prefix`` and the
prefixes found. Back from a Flax file, the variant and config come from its metadata, each field checked as
a flag is (type, range, heads that split the width); flags and a ``config.json`` may repeat them, and one
that contradicts the metadata is refused naming both values. Both directions refuse alike a key or
parameter path the variant does not have, a parameter that is not floating point, and NaN or infinite
weights; the ``mask`` buffers are written in the weights' dtype, as the torch module holding them keeps
them (float32 where the weights' dtypes differ). Before writing, both sides run on one input (the seed
sentence, or random inputs of the weights' width) and must agree within the float32 bound of the tolerance
table; the written bytes are read back and must give the torch tensors again exactly. A failed check raises
:class:`MismatchError` and writes nothing; bad input raises :class:`BadInputError`, also before anything is
written. OUT is never replaced without ``force`` and is written atomically (:mod:`crosscheck.porting.outputs`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.pipeline import inputs as inp
from crosscheck.pipeline.backends import torch_output
from crosscheck.pipeline.cases import build_cases
from crosscheck.porting import port
from crosscheck.porting.convert_checks import (
    check_budget,
    check_exact,
    check_finite,
    check_input,
    check_outputs,
    run_torch_module,
)
from crosscheck.porting.flax_files import (
    FORMAT,
    flax_bytes,
    is_flax_file,
    read_flax_bytes,
    safetensors_bytes,
    suffix_of,
    write_bytes,
)
from crosscheck.porting.flax_metadata import check_flags_agree, metadata_buffers, metadata_config
from crosscheck.porting.outputs import atomic_write, check_output_path
from crosscheck.variants import portmap as pm
from crosscheck.variants import registry

FLAX_SUFFIXES = (".safetensors", ".msgpack")
TORCH_SUFFIXES = (".pt", ".pth", ".safetensors")


@dataclass
class Converted:
    """What :func:`convert` did: the direction, the variant and config, and the check's error (``None``: skipped)."""

    direction: str  # "torch->flax" or "flax->torch"
    variant: str
    config: dict
    tensors: int
    max_abs_err: float | None
    bound: float | None
    out: str


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    variant: str | None = None,
    prefix: str = "",
    model_config: Any = None,
    overrides: Mapping[str, Any] | None = None,
    inputs: Any = None,
    check: bool = True,
    force: bool = False,
) -> Converted:
    """Convert ``src`` to ``dst`` (see the module docstring); returns what was done."""
    src, dst = os.fspath(src), os.fspath(dst)
    port.require_readable_file(src, "IN")
    check_output_path(dst, "OUT", [("IN", src), ("--config", model_config), ("--input", inputs)], "converted weights")
    if os.path.exists(dst) and not force:
        raise BadInputError(f"OUT {dst} exists; pass --force to replace it")
    direction = _flax_to_torch if is_flax_file(src) else _torch_to_flax
    return direction(
        src,
        dst,
        variant=variant,
        prefix=prefix,
        model_config=model_config,
        overrides=overrides,
        inputs=inputs,
        check=check,
    )


# --- torch -> flax --------------------------------------------------------------------------------


def _torch_to_flax(src, dst, *, variant, prefix, model_config, overrides, inputs, check) -> Converted:
    if suffix_of(dst) not in FLAX_SUFFIXES:
        raise BadInputError(
            f"OUT {dst}: a torch state dict converts to Flax .safetensors or .msgpack, not {suffix_of(dst) or '(none)'}"
        )
    raw = port.select_prefix(port.load_file(src), prefix)  # the tensors as stored: their dtypes are kept
    hint = port.whole_model_hint(raw, under=prefix)
    if hint:  # else every format's port error lists the model's keys as unexpected, and never says --prefix
        raise BadInputError(f"{src}{f' under --prefix {prefix!r}' if prefix else ''}: {hint}")
    cases, _, _ = build_cases(
        [variant] if variant else None,
        weights=raw,
        inputs=inputs,
        overrides=dict(overrides or {}),
        model_config=model_config,
    )
    if len(cases) > 1:
        names = ", ".join(c.variant.name for c in cases)
        raise BadInputError(f"{src} fits several variants ({names}); choose one with --variant")
    case = cases[0]
    v, cfg = case.variant, case.config
    portmap = v.portmap(cfg)
    params = port.variables_from_state_dict(portmap, raw, v.name)["params"]
    data = flax_bytes(dst, params, _metadata(v, cfg, raw, src, prefix))
    params_back, meta_back = read_flax_bytes(data, suffix_of(dst), dst)
    # exact: the file gives back every tensor of the layer, bit for bit, dtype included
    back = port.to_state_dict(v.flax_module(cfg), {"params": params_back}, variant=v, buffers=False)
    check_exact(back, {k: port.to_numpy(raw[k]) for k in raw}, portmap, src)
    err = bound = None
    if check:
        err, bound = check_outputs(v, cfg, back, case.x, torch_output(case), f"{src} -> {dst}")
    atomic_write(dst, lambda tmp: write_bytes(tmp, data), "converted weights")
    return Converted("torch->flax", v.name, v.report_config(cfg), len(portmap.entries), err, bound, dst)


def _metadata(v: registry.Variant, cfg, raw: Mapping[str, Any], src: str, prefix: str) -> dict[str, str]:
    """The metadata of a Flax file: its format, variant, config, the torch buffers the source carried, the source."""
    keys = {pm.canonical_key(k) for k in raw}
    return {
        "format": FORMAT,
        "crosscheck_variant": v.name,
        "crosscheck_config": json.dumps(v.resolve(cfg).to_dict()),
        "torch_buffers": ",".join(b.torch_key for b in v.portmap(cfg).buffers if b.torch_key in keys),
        "source": os.path.basename(src) + (f" [{prefix}]" if prefix else ""),
    }


# --- flax -> torch --------------------------------------------------------------------------------


def _flax_to_torch(src, dst, *, variant, prefix, model_config, overrides, inputs, check) -> Converted:
    if suffix_of(dst) not in TORCH_SUFFIXES:
        raise BadInputError(
            f"OUT {dst}: a Flax file converts to a torch .pt, .pth or .safetensors, not {suffix_of(dst) or '(none)'}"
        )
    if prefix:
        raise BadInputError(
            f"--prefix {prefix!r} selects a layer of a whole model's torch state dict; {src} is a Flax file "
            "of one layer: drop --prefix"
        )
    with open(src, "rb") as f:
        params, meta = read_flax_bytes(f.read(), suffix_of(src), src)
    v, cfg = metadata_config(meta, src)
    buffers = metadata_buffers(meta, v, cfg, src)
    check_flags_agree(v, cfg, variant, model_config, overrides, src)
    flax_module = v.flax_module(cfg)
    # Keys, shapes, dtypes and stray parameters first: the file's arrays are real, the metadata's sizes may not be.
    try:
        weights = port.to_state_dict(flax_module, {"params": params}, variant=v, buffers=False)
    except BadInputError as exc:  # the layer's own message, and which file holds it
        raise type(exc)(f"{src}: {exc}") from None
    check_finite(weights, v.portmap(cfg), src)
    x = _checked_input(v, cfg, inputs, src) if check else None
    if check or buffers:
        check_budget(v, cfg, x.shape if x is not None else (1, 1, cfg.d_in), inputs, src)
    sd = port.to_state_dict(flax_module, {"params": params}, variant=v, buffers=bool(buffers))
    sd = {k: a for k, a in sd.items() if k in buffers or k in weights}
    err = bound = None
    if check:
        assert x is not None  # resolved above when checking
        ref = run_torch_module(v, cfg, sd, x)
        err, bound = check_outputs(v, cfg, weights, x, ref, f"{src} -> {dst}")
    if suffix_of(dst) == ".safetensors":
        data = safetensors_bytes(sd, {"format": "pt"})
        atomic_write(dst, lambda tmp: write_bytes(tmp, data), "converted weights")
    else:
        tensors = port.to_state_dict(flax_module, {"params": params}, "pt", variant=v, buffers=bool(buffers))
        _write_pt(dst, {k: t for k, t in tensors.items() if k in sd})
    return Converted("flax->torch", v.name, v.report_config(cfg), len(sd), err, bound, dst)


def _checked_input(v: registry.Variant, cfg, inputs, src: str) -> np.ndarray:
    """The check's input (the seed sentence, random inputs or ``--input``), checked against the layer."""
    missing = registry.missing_needs(v)
    if missing:
        raise BadInputError(
            f"{v.name} needs {', '.join(missing)} to check the conversion, which is not installed: "
            "pip install 'jaxattn[hf]', or pass --no-check"
        )
    x = inp.for_variant(v, inp.resolve_inputs(inputs, cfg.d_in).array)
    check_input(v, cfg, x, src)
    return x


def _write_pt(dst: str, tensors: Mapping[str, Any]) -> None:
    import torch

    atomic_write(dst, lambda tmp: torch.save(tensors, tmp), "converted weights")
