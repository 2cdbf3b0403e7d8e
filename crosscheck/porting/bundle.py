"""Bundles: the cases of a cross-check in one ``.safetensors`` file, for a second interpreter.

The real ``ttnn`` wheel needs CPython 3.10-3.12 and numpy<2, and the torch reference
may live elsewhere; a bundle carries everything a backend needs (variant, config,
state dict, inputs) so that ``python -m crosscheck.tt.worker`` can run it in the
other interpreter and write an outputs file back.

Layout of a bundle file:

* tensors ``"<variant>/weights/<torch key>"`` (the torch state dict, torch layouts),
  ``"<variant>/inputs"`` (``(tokens, d_in)`` or ``(batch, tokens, d_in)``) and, when the
  inputs are padded, ``"<variant>/attention_mask"`` (uint8 ``inputs.shape[:-1]``, 1 = real
  token, 0 = padding);
* metadata ``"crosscheck"`` = JSON ``{"format": "crosscheck-bundle", "version": 1,
  "cases": [{"variant": ..., "config": {...}}, ...], "meta": {...}}``; ``meta`` may carry
  ``"decode_prompt_len"`` (an int >= 1): the worker then decodes through the KV cache,
  prefilling that many tokens, instead of running the full forward.

Both additions are optional: bundles written before them read unchanged.

An outputs file holds tensors ``"<variant>"`` (the context vectors) and metadata
``"crosscheck"`` = JSON ``{"format": "crosscheck-outputs", "version": 1, "meta": {...}}``
(backend, runtime name and description, versions).

Only numpy and safetensors are imported here: no torch, no JAX.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.pipeline import budget
from crosscheck.porting.arrays import to_numpy
from crosscheck.porting.outputs import atomic_write, check_output_path
from crosscheck.porting.tensorfiles import read_safetensors
from crosscheck.variants import registry

FORMAT_VERSION = 1
BUNDLE_FORMAT = "crosscheck-bundle"
OUTPUTS_FORMAT = "crosscheck-outputs"
_META_KEY = "crosscheck"
_SEP = "/"
_CONFIG_FIELDS = tuple(f.name for f in fields(AttnConfig))


@dataclass
class BundleCase:
    """One variant to run: its config, its torch state dict and its inputs."""

    variant: str
    config: AttnConfig
    state_dict: dict[str, np.ndarray]
    inputs: np.ndarray
    #: ``inputs.shape[:-1]``, 1 = real token, 0 = padding; ``None``: no padding.
    attention_mask: np.ndarray | None = None


#: ``meta`` key of a bundle to be decoded through the KV cache: the prompt length (int >= 1).
DECODE_PROMPT_LEN = "decode_prompt_len"


# --- helpers -------------------------------------------------------------------------------------


def _as_array(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = to_numpy(value)
    array = np.ascontiguousarray(np.asarray(value))
    if array.dtype == object:
        raise BadInputError(f"{what}: not a numeric array")
    return array


def _mask_array(mask: Any, inputs_shape: tuple[int, ...], where: str) -> np.ndarray:
    """A 0/1 ``uint8`` attention mask of ``inputs_shape[:-1]``, or :class:`BadInputError` naming ``where``."""
    array = _as_array(mask, where)
    if array.shape != tuple(inputs_shape[:-1]):
        raise BadInputError(
            f"{where}: must have the inputs' shape without d_in, {tuple(inputs_shape[:-1])}; found shape {array.shape}"
        )
    if not np.isin(array, (0, 1)).all():
        raise BadInputError(f"{where}: must hold only 0 (padding) and 1 (real token)")
    return array.astype(np.uint8)


def check_decode_prompt_len(value: Any, where: str) -> int | None:
    """``meta["decode_prompt_len"]`` validated: ``None`` (full forward) or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise BadInputError(f"{where}: {DECODE_PROMPT_LEN} must be an int >= 1, found {value!r}")
    return int(value)


def config_from_json(raw: Any, where: str) -> AttnConfig:
    """An :class:`AttnConfig` from a JSON object written by ``to_dict()``: each field of its type (an int
    field takes no bool or float, ``rope_scaling`` a freq_config JSON string), unknown fields refused,
    missing ones at their defaults; :class:`BadInputError` names ``where``, the field and the value.
    Ranges are :func:`check_config`'s."""
    if not isinstance(raw, dict):
        raise BadInputError(f"{where}: config must be a JSON object, found {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_CONFIG_FIELDS))
    if unknown:
        raise BadInputError(f"{where}: unknown config fields {unknown}; known: {sorted(_CONFIG_FIELDS)}")
    defaults = AttnConfig()
    values = {}
    for name, value in raw.items():
        expected = type(getattr(defaults, name))
        if expected is str:  # rope_scaling: the book's freq_config as canonical JSON, "" = none
            ok = isinstance(value, str)
            if ok and value:
                try:
                    value = AttnConfig.encode_freq_config(json.loads(value))
                except (ValueError, TypeError, AttributeError) as err:
                    raise BadInputError(
                        f"{where}: config field {name!r} is not a freq_config JSON object ({err})"
                    ) from None
        else:
            ok = (
                isinstance(value, bool)
                if expected is bool
                else (
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                    if expected is float
                    else isinstance(value, int) and not isinstance(value, bool)
                )
            )
        if not ok:
            raise BadInputError(f"{where}: config field {name!r} must be {expected.__name__}, found {value!r}")
        values[name] = expected(value)
    return AttnConfig(**values)


def check_config(variant, cfg: AttnConfig, where: str) -> None:
    """A config read from a file, checked as flags are: sizes >= 1, ``num_kv_groups``/``head_dim`` >= 0,
    dropout in [0, 1), a finite RoPE base > 0, at most :data:`crosscheck.pipeline.budget.MAX_HEADS` heads, and the
    variant's own constraints (``num_heads`` divides the width it splits, kv heads divide the heads, an
    even head dim for RoPE: :meth:`crosscheck.variants.registry.Variant.check_heads`), each message naming ``where``,
    the field, its value and the constraint. ``variant``: a :class:`crosscheck.variants.registry.Variant`."""
    for name in ("d_in", "d_out", "context_length", "num_heads"):
        if getattr(cfg, name) < 1:
            raise BadInputError(f"{where}: config {name} must be >= 1, found {getattr(cfg, name)}")
    for name in ("num_kv_groups", "head_dim"):
        if getattr(cfg, name) < 0:
            raise BadInputError(f"{where}: config {name} must be >= 0 (0 = derived), found {getattr(cfg, name)}")
    if not 0.0 <= cfg.dropout < 1.0:  # NaN fails this too
        raise BadInputError(f"{where}: config dropout must be in [0, 1), found {cfg.dropout}")
    if not (np.isfinite(cfg.rope_theta) and cfg.rope_theta > 0):
        raise BadInputError(f"{where}: config rope_theta must be a finite number > 0, found {cfg.rope_theta}")
    budget.check_count(cfg.num_heads, budget.MAX_HEADS, f"{where}: config num_heads")
    try:  # before any table or module splits a width by it (a worker would fail far from the file)
        variant.check_heads(cfg)
    except BadInputError as err:
        raise BadInputError(f"{where}: {err}") from None


def _floating(array: np.ndarray) -> bool:
    return array.dtype != bool and (np.issubdtype(array.dtype, np.floating) or str(array.dtype) == "bfloat16")


def _check_case(case: BundleCase, where: str) -> None:
    """A case read from a bundle, validated as the same values given by flags and files would be.

    The config's fields (sizes >= 1, dropout in [0, 1), a finite positive RoPE base), the inputs
    (floating, finite, width = ``d_in``), the weights (floating and finite; the causal ``mask`` may be
    stored as integers) and the memory the case needs (:func:`crosscheck.pipeline.budget.check_cases`, from the
    variant's porting table) are checked before any backend sees them.
    """
    cfg = case.config
    try:
        variant = registry.get(case.variant)
    except KeyError as err:
        raise BadInputError(f"{where}: {err.args[0]}") from None
    check_config(variant, cfg, where)
    x = case.inputs
    if not _floating(x):
        raise BadInputError(f"{where}: inputs have dtype {x.dtype}; expected a floating dtype")
    if 0 in x.shape:
        raise BadInputError(f"{where}: empty inputs of shape {x.shape}")
    if x.shape[-1] != cfg.d_in:
        raise BadInputError(f"{where}: inputs have width {x.shape[-1]} but the config's d_in is {cfg.d_in}")
    if not np.isfinite(x.astype(np.float32)).all():
        raise BadInputError(f"{where}: inputs contain NaN or infinite values")
    for key, value in case.state_dict.items():
        if key.split(".")[-1] == "mask":
            continue
        if not _floating(value):
            raise BadInputError(f"{where}: weight {key!r} has dtype {value.dtype}; expected a floating dtype")
        if not np.isfinite(value.astype(np.float32)).all():
            raise BadInputError(f"{where}: weight {key!r} has NaN or infinite values")
    budget.check_cases([(variant, cfg, x.shape)], f"{where}'s inputs")


def _read_header(path: str, what: str) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and the parsed ``crosscheck`` metadata of a safetensors file (validated container)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadInputError(f"{what} not found: {path}")
    tensors, metadata = read_safetensors(path, what)  # sizes checked against the budget before reading
    if _META_KEY not in metadata:
        raise BadInputError(f"{path} is a safetensors file but not a crosscheck {what} (no {_META_KEY!r} metadata)")
    try:
        header = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path}: {_META_KEY!r} metadata is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: {_META_KEY!r} metadata must be a JSON object")
    return tensors, header


def _check_format(header: dict, expected: str, path: str) -> None:
    if header.get("format") != expected:
        raise BadInputError(f"{path}: format is {header.get('format')!r}, expected {expected!r}")
    if header.get("version") != FORMAT_VERSION:
        raise BadInputError(
            f"{path}: {expected} version {header.get('version')!r} is not supported "
            f"(this crosscheck reads {FORMAT_VERSION})"
        )


def _write(path: str, tensors: Mapping[str, np.ndarray], header: dict, what: str) -> None:
    """Check ``path`` (:func:`crosscheck.porting.outputs.check_output_path`), then write it atomically."""
    from safetensors.numpy import save_file

    path = check_output_path(path, "OUT", what=what)
    metadata = {_META_KEY: json.dumps(header, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=metadata), what=what)


# --- bundles -------------------------------------------------------------------------------------


def write_bundle(
    path: str | os.PathLike,
    cases: Sequence[BundleCase],
    meta: Mapping[str, Any] | None = None,
    *,
    decode_prompt_len: int | None = None,
) -> None:
    """Write ``cases`` to one ``.safetensors`` file (see the module docstring for the layout).

    ``decode_prompt_len``: ask the worker to decode through the KV cache (stored in ``meta``).
    Written atomically; callers that read files check ``path`` against them first
    (:func:`crosscheck.porting.outputs.check_output_path`).
    """
    tensors: dict[str, np.ndarray] = {}
    entries: list[dict[str, Any]] = []
    for case in cases:
        if not case.variant or _SEP in case.variant:
            raise BadInputError(f"bundle case: invalid variant name {case.variant!r}")
        if any(e["variant"] == case.variant for e in entries):
            raise BadInputError(
                f"bundle case: variant {case.variant!r} appears twice; a bundle holds one case per variant"
            )
        for key, value in case.state_dict.items():
            tensors[f"{case.variant}/weights/{key}"] = _as_array(value, f"{case.variant} weight {key!r}")
        inputs = tensors[f"{case.variant}/inputs"] = _as_array(case.inputs, f"{case.variant} inputs")
        if case.attention_mask is not None:
            tensors[f"{case.variant}/attention_mask"] = _mask_array(
                case.attention_mask, inputs.shape, f"{case.variant} attention_mask"
            )
        entries.append({"variant": case.variant, "config": case.config.to_dict()})
    if not entries:
        raise BadInputError("a bundle needs at least one case")
    meta = dict(meta or {})
    if decode_prompt_len is not None:
        meta[DECODE_PROMPT_LEN] = check_decode_prompt_len(decode_prompt_len, "write_bundle")
    check_decode_prompt_len(meta.get(DECODE_PROMPT_LEN), "bundle meta")
    header = {"format": BUNDLE_FORMAT, "version": FORMAT_VERSION, "cases": entries, "meta": meta}
    _write(os.fspath(path), tensors, header, "bundle")


def read_bundle(path: str | os.PathLike) -> list[BundleCase]:
    """The cases of a bundle, validated; :class:`BadInputError` names the file and the problem."""
    path = os.fspath(path)
    tensors, header = _read_header(path, "bundle")
    _check_format(header, BUNDLE_FORMAT, path)
    entries = header.get("cases")
    if not isinstance(entries, list) or not entries:
        raise BadInputError(f"{path}: bundle has no cases")
    cases: list[BundleCase] = []
    claimed: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("variant"), str):
            raise BadInputError(f"{path}: case {i} has no variant name")
        variant = entry["variant"]
        config = config_from_json(entry.get("config"), f"{path}: case {variant!r}")
        inputs_key = f"{variant}/inputs"
        if inputs_key not in tensors:
            raise BadInputError(f"{path}: case {variant!r} has no tensor {inputs_key!r}")
        inputs = tensors[inputs_key]
        if inputs.ndim not in (2, 3):
            raise BadInputError(
                f"{path}: {inputs_key!r} must be (tokens, d_in) or (batch, tokens, d_in), found shape {inputs.shape}"
            )
        prefix = f"{variant}/weights/"
        state_dict = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        claimed.update([inputs_key, *(prefix + k for k in state_dict)])
        mask_key = f"{variant}/attention_mask"
        mask = None
        if mask_key in tensors:
            mask = _mask_array(tensors[mask_key], inputs.shape, f"{path}: {mask_key!r}")
            claimed.add(mask_key)
        if any(c.variant == variant for c in cases):
            raise BadInputError(f"{path}: case {variant!r} appears twice; a bundle holds one case per variant")
        case = BundleCase(variant, config, state_dict, inputs, mask)
        _check_case(case, f"{path}: case {variant!r}")
        cases.append(case)
    stray = sorted(set(tensors) - claimed)
    if stray:
        raise BadInputError(f"{path}: tensors that belong to no case: {stray}")
    return cases


def read_bundle_meta(path: str | os.PathLike) -> dict:
    """The free-form ``meta`` a bundle was written with."""
    path = os.fspath(path)
    _, header = _read_header(path, "bundle")
    _check_format(header, BUNDLE_FORMAT, path)
    meta = dict(header.get("meta") or {})
    check_decode_prompt_len(meta.get(DECODE_PROMPT_LEN), f"{path}: bundle meta")
    return meta


# --- outputs -------------------------------------------------------------------------------------


def write_outputs(path: str | os.PathLike, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Write each variant's context vectors and ``meta`` (backend, runtime, versions), atomically."""
    tensors = {name: _as_array(value, f"output {name!r}") for name, value in outputs.items()}
    header = {"format": OUTPUTS_FORMAT, "version": FORMAT_VERSION, "meta": dict(meta)}
    _write(os.fspath(path), tensors, header, "outputs file")


def read_outputs(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """``(outputs, meta)`` of an outputs file written by :func:`write_outputs`."""
    path = os.fspath(path)
    tensors, header = _read_header(path, "outputs file")
    _check_format(header, OUTPUTS_FORMAT, path)
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise BadInputError(f"{path}: outputs metadata has no 'meta' object")
    return tensors, meta
