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

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError, MismatchError
from crosscheck.pipeline import compare as cmp
from crosscheck.porting import port
from crosscheck.porting.outputs import atomic_write, check_output_path
from crosscheck.variants import registry

FLAX_SUFFIXES = (".safetensors", ".msgpack")
TORCH_SUFFIXES = (".pt", ".pth", ".safetensors")
FORMAT = "flax"
SEP = "/"


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
    direction = _flax_to_torch if _is_flax_file(src) else _torch_to_flax
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


# --- which file is which --------------------------------------------------------------------------


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _is_flax_file(path: str) -> bool:
    if _suffix(path) == ".msgpack":
        return True
    if _suffix(path) != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception as err:  # noqa: BLE001 - a corrupt file: say so, naming it
        raise BadInputError(f"cannot read safetensors file {path}: {err}") from None


# --- torch -> flax --------------------------------------------------------------------------------


def _torch_to_flax(src, dst, *, variant, prefix, model_config, overrides, inputs, check) -> Converted:
    from crosscheck.pipeline.cases import build_cases

    if _suffix(dst) not in FLAX_SUFFIXES:
        raise BadInputError(
            f"OUT {dst}: a torch state dict converts to Flax .safetensors or .msgpack, not {_suffix(dst) or '(none)'}"
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
    meta = {
        "format": FORMAT,
        "crosscheck_variant": v.name,
        "crosscheck_config": json.dumps(v.resolve(cfg).to_dict()),
        "torch_buffers": ",".join(
            b.torch_key for b in portmap.buffers if b.torch_key in {port.pm.canonical_key(k) for k in raw}
        ),
        "source": os.path.basename(src) + (f" [{prefix}]" if prefix else ""),
    }
    data = _flax_bytes(dst, params, meta)
    params_back, meta_back = _read_flax_bytes(data, _suffix(dst), dst)
    # exact: the file gives back every tensor of the layer, bit for bit, dtype included
    back = port.to_state_dict(v.flax_module(cfg), {"params": params_back}, variant=v, buffers=False)
    _check_exact(back, {k: port.to_numpy(raw[k]) for k in raw}, portmap, src)
    err = bound = None
    if check:
        from crosscheck.pipeline.backends import torch_output

        err, bound = _check_outputs(v, cfg, back, case.x, torch_output(case), f"{src} -> {dst}")
    atomic_write(dst, lambda tmp: _write_bytes(tmp, data), "converted weights")
    return Converted("torch->flax", v.name, v.report_config(cfg), len(portmap.entries), err, bound, dst)


def _flax_bytes(dst: str, params: Mapping, meta: dict) -> bytes:
    if _suffix(dst) == ".msgpack":
        from flax.serialization import msgpack_serialize

        return msgpack_serialize({"params": dict(params), "metadata": meta})
    from flax.traverse_util import flatten_dict

    return _safetensors_bytes(flatten_dict({"params": params}, sep=SEP), meta)


def _safetensors_bytes(arrays: Mapping[str, Any], meta: dict) -> bytes:
    """safetensors bytes of numpy arrays, bfloat16 (ml_dtypes) included, bit for bit."""
    import torch
    from safetensors.torch import save

    def tensor(a) -> torch.Tensor:
        a = np.array(a, copy=True, order="C")  # writable: torch shares numpy's memory
        if str(a.dtype) == "bfloat16":  # torch has no numpy bfloat16: move the bits
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    return save({k: tensor(a) for k, a in arrays.items()}, metadata=meta)


def _arrays_of_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of safetensors bytes as numpy arrays, bfloat16 as ``ml_dtypes.bfloat16``."""
    import ml_dtypes
    import torch
    from safetensors.torch import load

    def array(t: torch.Tensor) -> np.ndarray:
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    return {k: array(t) for k, t in load(data).items()}


def _read_flax_bytes(data: bytes, suffix: str, where: str) -> tuple[dict, dict]:
    """``(params, metadata)`` of a Flax file's bytes; :class:`BadInputError` naming ``where`` if they are not ours,
    or if they hold anything beside the parameters and the metadata (it would be dropped unseen)."""
    try:
        if suffix == ".msgpack":
            from flax.serialization import msgpack_restore

            tree = msgpack_restore(data)
            params, meta = tree.get("params"), tree.get("metadata")
            stray = sorted(str(k) for k in tree if k not in ("params", "metadata"))
        else:
            from flax.traverse_util import unflatten_dict

            meta = _safetensors_metadata(data)
            arrays = _arrays_of_safetensors(data)
            params = unflatten_dict(arrays, sep=SEP).get("params")
            stray = sorted(k for k in arrays if not k.startswith("params" + SEP))
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - a foreign or corrupt file: one line naming it
        raise BadInputError(f"cannot read {where} as a Flax parameter file: {type(err).__name__}: {err}") from None
    if not isinstance(params, Mapping) or not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        raise BadInputError(
            f"{where}: not a Flax parameter file written by crosscheck convert (no 'params' and metadata)"
        )
    if stray:
        raise BadInputError(f"{where}: unexpected entries beside 'params' and the metadata: {', '.join(stray[:4])}")
    return dict(params), dict(meta)


def _safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes (the header: an 8-byte length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__", {})


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# --- flax -> torch --------------------------------------------------------------------------------


def _flax_to_torch(src, dst, *, variant, prefix, model_config, overrides, inputs, check) -> Converted:
    if _suffix(dst) not in TORCH_SUFFIXES:
        raise BadInputError(
            f"OUT {dst}: a Flax file converts to a torch .pt, .pth or .safetensors, not {_suffix(dst) or '(none)'}"
        )
    if prefix:
        raise BadInputError(
            f"--prefix {prefix!r} selects a layer of a whole model's torch state dict; {src} is a Flax file "
            "of one layer: drop --prefix"
        )
    with open(src, "rb") as f:
        params, meta = _read_flax_bytes(f.read(), _suffix(src), src)
    v, cfg = _metadata_config(meta, src)
    buffers = _metadata_buffers(meta, v, cfg, src)
    _check_flags_agree(v, cfg, variant, model_config, overrides, src)
    flax_module = v.flax_module(cfg)
    # Keys, shapes, dtypes and stray parameters first: the file's arrays are real, the metadata's sizes may not be.
    try:
        weights = port.to_state_dict(flax_module, {"params": params}, variant=v, buffers=False)
    except BadInputError as exc:  # the layer's own message, and which file holds it
        raise type(exc)(f"{src}: {exc}") from None
    _check_finite(weights, v.portmap(cfg), src)
    x = None
    if check:
        from crosscheck.pipeline import inputs as inp

        missing = registry.missing_needs(v)
        if missing:
            raise BadInputError(
                f"{v.name} needs {', '.join(missing)} to check the conversion, which is not installed: "
                "pip install 'jaxattn[hf]', or pass --no-check"
            )
        x = inp.for_variant(v, inp.resolve_inputs(inputs, cfg.d_in).array)
        _check_input(v, cfg, x, src)
    if check or buffers:
        _check_budget(v, cfg, x.shape if x is not None else (1, 1, cfg.d_in), inputs, src)
    sd = port.to_state_dict(flax_module, {"params": params}, variant=v, buffers=bool(buffers))
    sd = {k: a for k, a in sd.items() if k in buffers or k in weights}
    err = bound = None
    if check:
        import torch

        assert x is not None  # resolved above when checking
        module = v.torch_module(cfg)
        module.load_state_dict(
            {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in sd.items()},
            strict=not _has_unloaded_buffers(module, sd),
        )
        module.eval()
        with torch.no_grad():
            ref = v.torch_forward(module, torch.from_numpy(np.asarray(x, np.float32)), cfg).numpy()
        err, bound = _check_outputs(v, cfg, weights, x, ref, f"{src} -> {dst}")
    if _suffix(dst) == ".safetensors":
        data = _safetensors_bytes(sd, {"format": "pt"})
        atomic_write(dst, lambda tmp: _write_bytes(tmp, data), "converted weights")
    else:
        import torch

        tensors = port.to_state_dict(flax_module, {"params": params}, "pt", variant=v, buffers=bool(buffers))
        tensors = {k: t for k, t in tensors.items() if k in sd}
        atomic_write(dst, lambda tmp: torch.save(tensors, tmp), "converted weights")
    return Converted("flax->torch", v.name, v.report_config(cfg), len(sd), err, bound, dst)


# --- a Flax file's metadata ----------------------------------------------------------------------


def _metadata_config(meta: Mapping, src: str) -> tuple[registry.Variant, AttnConfig]:
    """The variant and config a Flax file's metadata records, each field checked as the same value given
    by a flag is: a file edited by hand (or by a bug) is refused naming the field, not run into a traceback."""
    from crosscheck.porting import bundle

    name = meta.get("crosscheck_variant")
    if not isinstance(name, str):
        raise BadInputError(f"{src}: metadata crosscheck_variant must be a variant name, found {name!r}")
    try:
        v = registry.get(name)
    except KeyError as err:
        raise BadInputError(f"{src}: metadata crosscheck_variant: {err.args[0]}") from None
    where = f"{src}: metadata crosscheck_config"
    text = meta.get("crosscheck_config")
    if not isinstance(text, str):
        raise BadInputError(f"{where} must be a JSON string, found {type(text).__name__}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInputError(f"{where} is not valid JSON ({err})") from None
    cfg = bundle.config_from_json(raw, where)  # a JSON object, each field of its type
    missing = [f for f in v.fields if f not in raw]
    if missing:
        raise BadInputError(f"{where}: missing {', '.join(missing)} (fields {v.name} reads)")
    bundle.check_config(v, cfg, where)
    cfg = v.resolve(cfg)
    if not v.portmap(cfg).entries:
        raise BadInputError(f"{src}: metadata names {v.name}, which has no parameters to convert")
    return v, cfg


def _metadata_buffers(meta: Mapping, v: registry.Variant, cfg: AttnConfig, src: str) -> list[str]:
    """The torch buffers the source state dict carried (``torch_buffers``: comma-separated keys of the variant)."""
    text = meta.get("torch_buffers", "")
    if not isinstance(text, str):
        raise BadInputError(f"{src}: metadata torch_buffers must be a comma-separated string, found {text!r}")
    names = [b for b in text.split(",") if b]
    known = [b.torch_key for b in v.portmap(cfg).buffers]
    unknown = [b for b in names if b not in known]
    if unknown:
        has = f"its buffers: {', '.join(known[:4])}" if known else "it has none"
        raise BadInputError(f"{src}: metadata torch_buffers names {unknown[0]!r}, not a buffer of {v.name} ({has})")
    return names


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_flags_agree(v, cfg: AttnConfig, variant, model_config, overrides, src: str) -> None:
    """Flags (and a ``config.json``) on a Flax file may repeat what its metadata records; one that contradicts
    it is refused naming both values (the metadata describes the weights the file holds)."""
    from crosscheck.pipeline import cases

    if variant is not None:
        try:
            named = registry.get(str(variant))
        except KeyError as err:
            raise BadInputError(str(err.args[0])) from None
        if named is not v:
            raise BadInputError(
                f"--variant {named.name} contradicts {src}'s metadata, whose crosscheck_variant is {v.name}"
            )
    given = {k: val for k, val in (overrides or {}).items() if val is not None}
    unknown = sorted(set(given) - set(cases.OVERRIDABLE))
    if unknown:
        raise BadInputError(f"unknown config overrides {unknown}; known: {', '.join(cases.OVERRIDABLE)}")
    merged, origins = cases.config_overrides(given, model_config)
    for key, value in merged.items():
        recorded = getattr(cfg, key)
        if value != recorded:
            source = origins.get(key, "--" + key.replace("_", "-"))
            raise BadInputError(
                f"{source} {_show(value)} contradicts {src}'s metadata, whose crosscheck_config gives "
                f"{key}={_show(recorded)}"
            )


# --- checks before anything is built --------------------------------------------------------------


def _check_finite(weights: Mapping[str, np.ndarray], portmap, src: str) -> None:
    """NaN or infinite weights are refused, as the torch -> Flax direction refuses them: a check of a layer
    whose outputs are NaN on both sides proves nothing, and without the check nothing would say so."""
    paths = {e.torch_key: SEP.join(("params", *e.flax_path)) for e in portmap.entries}
    for key, array in weights.items():
        if not np.isfinite(np.asarray(array, dtype=np.float32)).all():
            raise BadInputError(
                f"{src}: weight {key!r} ({paths.get(key, key)}) has NaN or infinite values (or overflows float32)"
            )


def _check_input(v, cfg: AttnConfig, x: np.ndarray, src: str) -> None:
    """The check's input against the layer the metadata describes, before torch or JAX sees it."""
    if x.shape[-1] != cfg.d_in:
        raise BadInputError(
            f"{v.name}: the input's last dimension is {x.shape[-1]} but the layer in {src} takes "
            f"d_in={cfg.d_in} (its metadata)"
        )
    tokens = x.shape[-2]
    if "context_length" in v.fields and tokens > cfg.context_length:
        raise BadInputError(
            f"{v.name}: input has tokens={tokens}, beyond context_length={cfg.context_length} "
            f"({src}'s metadata); pass --tokens or an --input of at most {cfg.context_length} tokens"
        )


def _input_flag(inputs) -> str:
    if isinstance(inputs, (str, os.PathLike)):
        return f"the shape of --input {os.fspath(inputs)}"
    return "--tokens/--batch"


def _check_budget(v, cfg: AttnConfig, x_shape, inputs, src: str) -> None:
    """The torch module, its mask buffers and the check's activations against the memory budget, before any
    is built; what the metadata sizes is named as such (no flag changes it)."""
    import dataclasses

    from crosscheck.pipeline import budget

    flag = _input_flag(inputs)
    terms = [
        dataclasses.replace(t, flag=f"the layer's sizes in {src}'s metadata") if t.kept else t
        for t in budget.case_terms(v, cfg, x_shape, flag)
    ]
    budget.check_terms(terms, f"{v.name} ({src})")


def _has_unloaded_buffers(module, sd: Mapping) -> bool:
    """Whether the torch module registers buffers (the causal mask) that the source file did not carry."""
    return bool(set(module.state_dict()) - set(sd))


# --- checks ---------------------------------------------------------------------------------------


def _check_exact(back: Mapping[str, np.ndarray], raw: Mapping[str, np.ndarray], portmap, where: str) -> None:
    """Every parameter of ``raw`` comes back from the Flax file bit for bit, in its dtype."""
    canonical = {port.pm.canonical_key(k): a for k, a in raw.items()}
    for entry in portmap.entries:
        want, got = canonical[entry.torch_key], back[entry.torch_key]
        if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
            raise MismatchError(f"{where}: {entry.torch_key} does not come back exactly from the Flax file")


def _check_outputs(v, cfg, state_dict: Mapping, x: np.ndarray, ref: np.ndarray, where: str) -> tuple[float, float]:
    """``(max abs error, bound)`` of the Flax module on ``state_dict`` (the file's tensors) against the torch
    output ``ref``, run as every cross-check runs it (:func:`crosscheck.pipeline.flax_runner.run_flax`, float32 at
    precision highest); raises :class:`MismatchError` (nothing written) when over the table's float32 bound."""
    from crosscheck.pipeline.flax_runner import run_flax

    float32 = {k: np.asarray(a, dtype=np.float32) for k, a in state_dict.items()}
    out = run_flax(v, cfg, float32, x)
    tol = cmp.policy_for("flax", "float32")
    verdict = cmp.compare(out, ref, tol, computed_in="float32")
    if not verdict.passed:
        raise MismatchError(
            f"{where}: the Flax module and torch disagree ({'; '.join(verdict.failures)}); nothing written"
        )
    assert verdict.metrics is not None and tol.max_abs is not None  # a pass has metrics; the float32 row a bound
    return float(verdict.metrics.max_abs_err), float(tol.max_abs)
