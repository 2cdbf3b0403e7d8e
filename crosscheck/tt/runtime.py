"""Where the ttnn programs run: a real device, or the host model. Chosen automatically, overridable.

* ``"device"`` — the real ``ttnn`` package with an opened device: a Tenstorrent card
  (``/dev/tenstorrent/*``) or the ttsim simulator (``TT_METAL_SIMULATOR``).
* ``"host"`` — :mod:`crosscheck.tt.host_model`, a numpy model of ttnn's numerics (not ttnn).
* ``"auto"`` — ``device`` when ttnn imports and a device is detected, else ``host``.

Device detection never crashes: ttnn may be absent, and ttnn's device-count functions
raise ``No chips detected`` instead of returning 0, so they are only called when a
device node or the simulator is present, inside ``try``.

Numpy + ml_dtypes only (the real ``ttnn`` is imported lazily, torch never required).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.tt import decode_programs, host_model, ops
from crosscheck.tt.port import preprocess_parameters

KINDS = ("auto", "device", "host")
DEVICE_ID = 0


@dataclass
class Runtime:
    name: str  # "device" | "host"
    description: str  # one honest line for reports
    ttnn: Any  # the module the programs receive
    device: Any


# --- real ttnn without torch -------------------------------------------------------------------


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


class NumpyTtnn:
    """The real ``ttnn`` module, with ``from_torch``/``to_torch`` that work on numpy when torch is absent.

    ttnn 0.81.1's ``from_torch`` imports torch even for a numpy array, and
    ``to_torch`` returns torch tensors; the ttnn interpreter may have no torch. So
    ``from_torch`` builds the tensor with the constructor ``from_torch`` itself ends in
    (``ttnn.Tensor(tensor=..., data_type=..., ...)``), and ``to_torch`` reads back
    with ``from_device`` -> ``to_layout(ROW_MAJOR)`` -> ``to_dtype(float32)`` -> ``Tensor.to_numpy()``
    (``to_numpy`` of a bfloat16 tensor gives no usable array in 0.81.1). Every other
    name is the real module's.
    """

    def __init__(self, ttnn):
        self._ttnn = ttnn

    def __getattr__(self, name: str):
        return getattr(self._ttnn, name)

    def from_torch(self, tensor, dtype=None, *, layout=None, device=None, memory_config=None, pad_value=None):
        ttnn = self._ttnn
        if tensor is None:
            return None
        if _torch_available():
            return ttnn.from_torch(
                tensor, dtype, layout=layout, device=device, memory_config=memory_config, pad_value=pad_value
            )
        array = np.ascontiguousarray(tensor)
        if array.dtype == np.float64:
            raise BadInputError("float64 arrays abort ttnn's converter; pass float32")
        return ttnn.Tensor(
            tensor=array,
            data_type=dtype,
            device=device,
            layout=layout,
            mem_config=memory_config,
            tile=None,
            cq_id=None,
            pad_value=pad_value,
            mesh_mapper=None,
            preserve_nan_values=False,
            col_tilize=False,
            enable_bfloat_opt=False,
        )

    def to_torch(self, tensor):
        """float32 numpy of ``tensor``'s logical values (torch never needed)."""
        ttnn = self._ttnn
        if _torch_available():
            return ttnn.to_torch(tensor).float().numpy()
        host = ttnn.from_device(tensor) if tensor.storage_type() == ttnn.StorageType.DEVICE else tensor
        host = ttnn.to_layout(host, ttnn.ROW_MAJOR_LAYOUT)
        if host.dtype != ttnn.float32:
            host = ttnn.to_dtype(host, ttnn.float32)
        return np.asarray(host.to_numpy(), dtype=np.float32)


def _read_back(runtime: Runtime, tensor) -> np.ndarray:
    out = runtime.ttnn.to_torch(tensor)
    return np.asarray(out, dtype=np.float32)


# --- detection ---------------------------------------------------------------------------------


def _ttnn_spec_present() -> bool:
    try:
        return importlib.util.find_spec("ttnn") is not None
    except (ImportError, ValueError):
        return False


def _import_ttnn():
    # ttnn logs its whole CONFIG at DEBUG level on import; keep the user's terminal quiet.
    os.environ.setdefault("LOGURU_LEVEL", "INFO")
    import ttnn

    return ttnn


def detect_device() -> tuple[bool, str]:
    """``(available, reason)``: is there a Tenstorrent device (or ttsim) that real ttnn can open?"""
    if not _ttnn_spec_present():
        return False, f"ttnn is not installed in this interpreter ({sys.executable})"
    simulator = os.environ.get("TT_METAL_SIMULATOR")
    nodes = sorted(glob.glob("/dev/tenstorrent/*"))
    if not nodes and not simulator:
        mock = (
            " (TT_METAL_MOCK_CLUSTER_DESC_PATH is set, but a mock cluster runs no kernels)"
            if os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH")
            else ""
        )
        return False, (
            f"no Tenstorrent device (/dev/tenstorrent/ is empty or absent) and TT_METAL_SIMULATOR is not set{mock}"
        )
    if simulator and not os.path.exists(simulator):
        return False, f"TT_METAL_SIMULATOR={simulator} does not exist"
    try:
        ttnn = _import_ttnn()
    except Exception as err:  # noqa: BLE001 - a broken install: say so, don't crash
        return False, f"ttnn failed to import: {type(err).__name__}: {_first_line(err)}"
    try:
        count = int(ttnn.GetNumAvailableDevices())
    except Exception as err:  # noqa: BLE001 - "No chips detected in the cluster" is a RuntimeError, others vary
        return False, f"ttnn found no usable chip: {_first_info(err)}"
    if count < 1:
        return False, "ttnn reports 0 available devices"
    where = f"ttsim ({simulator})" if simulator else ", ".join(nodes)
    return True, f"{count} device(s) via {where}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _first_info(err: BaseException) -> str:
    """The ``info:`` line of a TT_FATAL message (its first line is a source location)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if "info:" in lines:
        i = lines.index("info:")
        if i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else type(err).__name__


def ttnn_versions() -> dict:
    """``{"ttnn": version or None, "ttnn_reason": why absent / what it is}`` without importing ttnn."""
    try:
        version = importlib.metadata.version("ttnn")
    except importlib.metadata.PackageNotFoundError:
        return {"ttnn": None, "ttnn_reason": f"ttnn is not installed in {sys.executable}; host model used"}
    return {"ttnn": version, "ttnn_reason": f"ttnn {version} installed in {sys.executable}"}


# --- opening -----------------------------------------------------------------------------------


@contextmanager
def _host() -> Iterator[Runtime]:
    device = host_model.open_device(device_id=DEVICE_ID)
    try:
        yield Runtime("host", host_model.DESCRIPTION, host_model, device)
    finally:
        host_model.close_device(device)


@contextmanager
def _device() -> Iterator[Runtime]:
    ok, reason = detect_device()
    if not ok:
        raise BadInputError(f"ttnn runtime 'device' is not available: {reason}")
    ttnn = _import_ttnn()
    try:
        device = ttnn.open_device(device_id=DEVICE_ID)
    except Exception as err:  # noqa: BLE001 - any failure to open is reported as the device being unavailable
        hint = ""
        if os.environ.get("TT_METAL_SIMULATOR") and os.environ.get("TT_METAL_SLOW_DISPATCH_MODE") != "1":
            hint = " (ttsim needs TT_METAL_SLOW_DISPATCH_MODE=1 and TT_METAL_DISABLE_SFPLOADMACRO=1)"
        raise BadInputError(f"could not open Tenstorrent device {DEVICE_ID}: {_first_info(err)}{hint}") from None
    version = ttnn_versions()["ttnn"]
    simulator = os.environ.get("TT_METAL_SIMULATOR")
    where = f"ttsim {os.path.basename(simulator)}" if simulator else f"device {DEVICE_ID}"
    arch = ""
    with suppress(Exception):  # the arch name is decoration only
        arch = f" ({ttnn.get_arch_name()})"
    try:
        yield Runtime("device", f"ttnn {version} on {where}{arch}", NumpyTtnn(ttnn), device)
    finally:
        ttnn.close_device(device)


@contextmanager
def open_runtime(kind: str = "auto") -> Iterator[Runtime]:
    """Open the ``kind`` runtime ("auto" | "device" | "host"); closed on exit, also on errors."""
    if kind not in KINDS:
        raise BadInputError(f"ttnn runtime must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "auto":
        kind = "device" if detect_device()[0] else "host"
    with _device() if kind == "device" else _host() as runtime:
        yield runtime


# --- running a variant -------------------------------------------------------------------------


def _program(variant, cfg):
    """The program :func:`run_variant` runs for ``variant`` at the resolved ``cfg`` (SDPA when head_dim % 32 == 0)."""
    if variant.ttnn_forward is None:
        raise BadInputError(f"{variant.name}: {variant.no_ttnn}")
    return ops.select(variant.ttnn_forward, variant.ttnn_sdpa, cfg)


def program_name(variant, cfg) -> str:
    """The name of the program :func:`run_variant` runs for ``variant`` at ``cfg``."""
    return _program(variant, variant.resolve(cfg)).__name__


def _check_input(variant, cfg, x: np.ndarray) -> None:
    ranks = (2, 3) if variant.unbatched else (3,)
    if x.ndim not in ranks:
        layouts = " or ".join({2: "(tokens, d_in)", 3: "(batch, tokens, d_in)"}[r] for r in ranks)
        raise BadInputError(f"{variant.name}: input must be {layouts}, got shape {x.shape}")
    if "d_in" in variant.fields and x.shape[-1] != cfg.d_in:
        raise BadInputError(f"{variant.name}: last input dim must be d_in={cfg.d_in}, got shape {x.shape}")
    if "context_length" in variant.fields and x.shape[-2] > cfg.context_length:
        raise BadInputError(f"{variant.name}: tokens={x.shape[-2]} exceeds context_length={cfg.context_length}")
    variant.check_heads(cfg)
    if not np.all(np.isfinite(x)):
        raise BadInputError(f"{variant.name}: input has NaN or inf values")


def _check_attention_mask(variant, x: np.ndarray, attention_mask) -> np.ndarray | None:
    """``attention_mask`` as bool ``x.shape[:-1]`` (1 = real token, 0 = padding), or ``None``; bad masks are named."""
    if attention_mask is None:
        return None
    mask = np.asarray(attention_mask)
    if mask.shape != x.shape[:-1]:
        raise BadInputError(
            f"{variant.name}: attention_mask must have the input's shape without d_in, {x.shape[:-1]}; got {mask.shape}"
        )
    if mask.dtype == object or not np.isin(mask, (0, 1)).all():
        raise BadInputError(f"{variant.name}: attention_mask must hold only 0 (padding) and 1 (real token)")
    return mask.astype(bool)


def _prepare(runtime: Runtime, variant, cfg, state_dict, x, attention_mask):
    """``(resolved cfg, float32 x, bool mask or None, parameters)``, everything validated."""
    cfg = variant.resolve(cfg)
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    _check_input(variant, cfg, x)
    mask = _check_attention_mask(variant, x, attention_mask)
    parameters = preprocess_parameters(runtime.ttnn, runtime.device, variant.portmap(cfg), state_dict, variant.name)
    return cfg, x, mask, parameters


def _to_device(runtime: Runtime, x: np.ndarray):
    ttnn = runtime.ttnn
    return ttnn.from_torch(np.ascontiguousarray(x), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=runtime.device)


def _check_output(variant, cfg, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    expected = (*x.shape[:-1], variant.output_dim(cfg))
    if out.shape != expected:
        raise RuntimeError(f"{variant.name}: ttnn program returned shape {out.shape}, expected {expected}")
    return out


def run_variant(
    runtime: Runtime, variant, cfg, state_dict, x, attention_mask=None, *, program: str | None = None
) -> np.ndarray:
    """Run ``variant``'s ttnn program on ``runtime``; float32 context vectors shaped like torch's output.

    ``state_dict`` is a torch-layout mapping (canonical torch keys) validated against
    the variant's port table; ``x`` is ``(tokens, d_in)`` or ``(batch, tokens, d_in)``.
    ``attention_mask``: ``x.shape[:-1]``, 1 = real token, 0 = padding (``None``: none).
    ``program`` overrides the automatic choice by name: one of the variant's own programs (e.g. force
    the generic program).
    """
    if program is None:
        fn = None
    else:
        own = {f.__name__: f for f in (variant.ttnn_forward, variant.ttnn_sdpa) if f is not None}
        fn = own.get(program)
        if fn is None:
            raise BadInputError(f"unknown ttnn program {program!r} for {variant.name}; its programs: {', '.join(own)}")
    cfg, x, mask, parameters = _prepare(runtime, variant, cfg, state_dict, x, attention_mask)
    if fn is None:
        fn = _program(variant, cfg)
    out = fn(
        runtime.ttnn, runtime.device, _to_device(runtime, x), parameters=parameters, config=cfg, attention_mask=mask
    )
    return _check_output(variant, cfg, x, _read_back(runtime, out))


def has_decode(variant, cfg) -> bool:
    """Whether ``variant`` at ``cfg`` has a ttnn KV-cache decode program (:func:`run_variant_decode`)."""
    return decode_programs.decode_program(variant, variant.resolve(cfg)) is not None


def run_variant_decode(
    runtime: Runtime, variant, cfg, state_dict, x, prompt_len: int, attention_mask=None
) -> np.ndarray:
    """Decode ``x`` through ``variant``'s ttnn KV cache: the full forward's shape, float32.

    Prefill of ``x[:, :prompt_len]`` (its context vectors, its keys/values into caches on
    the device), then one step per remaining token at positions ``prompt_len .. tokens-1``;
    the outputs are concatenated along the tokens. The caches hold ``tokens`` positions.
    ``attention_mask`` covers all of ``x``'s tokens; each call gets its own part.
    """
    decoder = decode_programs.decode_program(variant, variant.resolve(cfg))
    if decoder is None:
        raise BadInputError(
            f"{variant.name}: no ttnn KV-cache decode program at this config (decoding needs a causal variant)"
        )
    cfg, x, mask, parameters = _prepare(runtime, variant, cfg, state_dict, x, attention_mask)
    if x.ndim != 3:
        raise BadInputError(f"{variant.name}: decoding needs (batch, tokens, d_in) input, got shape {x.shape}")
    batch, tokens = x.shape[:2]
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, (int, np.integer)) or not 1 <= prompt_len <= tokens:
        raise BadInputError(f"{variant.name}: prompt_len must be an int in [1, tokens={tokens}], got {prompt_len!r}")
    prompt_len = int(prompt_len)
    ttnn, device = runtime.ttnn, runtime.device
    cache = decoder.allocate(ttnn, device, cfg, batch, tokens)

    def part(start: int, stop: int):
        return dict(
            config=cfg, parameters=parameters, cache=cache, attention_mask=None if mask is None else mask[:, start:stop]
        )

    outs = [
        _read_back(
            runtime, decoder.prefill(ttnn, device, _to_device(runtime, x[:, :prompt_len]), **part(0, prompt_len))
        )
    ]
    for pos in range(prompt_len, tokens):
        step = decoder.step(ttnn, device, _to_device(runtime, x[:, pos : pos + 1]), pos=pos, **part(pos, pos + 1))
        outs.append(_read_back(runtime, step))
    return _check_output(variant, cfg, x, np.concatenate(outs, axis=1))
