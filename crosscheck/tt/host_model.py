"""ttnn host model: a numpy model of ttnn's NUMERICS and rules on the CPU. It is a model, not ttnn.

The ttnn programs (:mod:`crosscheck.tt.programs`) receive a module named ``ttnn``.
On a Tenstorrent device (or ttsim) that is the real ``ttnn`` package; everywhere
else it is this module, which exposes the same names for exactly the subset the
programs use, with ttnn 0.81.1's parameter names, kinds and defaults, so a program
that runs here is written against the real API.

What it models (checked against the real ttnn 0.81.1 wheel where a host can check it):

* **bfloat16 storage.** Values are rounded float32 -> bfloat16 round-to-nearest-even
  when a tensor is created and after every op (:func:`to_bfloat16`, bit-equal to
  the real host conversion: ±inf pass through, magnitudes past the bfloat16 range
  overflow to ±inf, subnormals are kept, every NaN becomes the quiet NaN ``0x7FC0``).
  ``float32`` tensors stay float32 (``from_torch`` does not down-cast them).
* **Logical and padded shapes.** TILE tensors report ``shape`` (logical) and
  ``padded_shape`` (last two dims rounded up to 32; rank 1 ``[n]`` pads as a row to
  ``[32, ceil32(n)]``, rank 0 to ``[32, 32]``; a ROW_MAJOR scalar's padded shape is ``[1]``).
* **The rules a device enforces**, with ttnn's error texts: ops need device tensors
  (``Operand to matmul must be on device`` ...), matmul/SDPA need TILE inputs,
  SDPA needs bfloat16 and a head_dim that is a multiple of 32, keyword-only
  parameters, unknown keywords and positional ``open_device(0)`` raise ``TypeError``.
* **In-place cache ops**: ``fill_cache`` and ``update_cache`` write into the cache
  tensor and return it, with tt-metal's validation rules and texts (padded-shape checks,
  ``update_idx`` a multiple of 32 for ``fill_cache``, users along dim -2 for ``update_cache``).
* **Output dtypes**: matmul/linear/eltwise outputs take input A's dtype unless
  ``dtype=`` says otherwise; matmul/linear/softmax/SDPA outputs are TILE.

Where a real device differs (the model is closer to float32 than the hardware):

* matmul/linear accumulate in float32 and round once at the end. A device at its
  defaults (``compute_kernel_config=None``) multiplies at **HiFi2** fidelity (bf16
  operands with B's last mantissa bit dropped) and accumulates in the **bf16 DST**
  register; the programs pass HiFi4 + ``fp32_dest_acc_en=True``, which is the
  closest device setting to this model.
* softmax computes ``exp`` exactly in float32; the device default
  (``math_approx_mode=True``) uses an **approximate exp** and bf16 intermediates;
  the programs pass ``math_approx_mode=False`` and fp32 accumulation.
* ``rms_norm`` is ``x / sqrt(mean(x**2) + eps) * gamma`` in float32 over the logical
  width, rounded once; the device runs a fused kernel with the given kernel config.
* SDPA is computed as one float32 softmax(QK^T * scale) V rounded once; the device
  runs FlashAttention-2 style chunks with bf16 intermediates.
* A scalar operand of ``multiply``/``add`` is rounded to input A's dtype first
  (bf16 scalars are packed as bf16 on device).
* Cases where the real package **crashes the process** (``concat``/SDPA on host
  tensors, float64 numpy into ``from_torch``) raise ``RuntimeError`` here instead.
* ``from_torch`` accepts numpy arrays directly (the real 0.81.1 ``from_torch``
  imports torch first); ``to_torch`` returns **numpy** (``ml_dtypes.bfloat16`` for
  bfloat16 tensors, as torch would give ``torch.bfloat16``).
* Tile padding is not stored: padding never leaks into results here, whereas on a
  device its contents after some ops are undefined. The model only records what the
  padding holds (0 or ``pad_value`` after ``from_torch``, the value given to
  ``fill_implicit_tile_padding``, else undefined); ``fill_cache``/``update_cache``, which
  copy whole tiles into the cache's logical positions, write NaN where it is undefined.
* Only bfloat16 and float32 data are modelled; block floats (bfloat8_b/bfloat4_b),
  sharding, program/core-grid configs, activations and meshes raise ``NotImplementedError``.

Numpy + ml_dtypes only: this module runs where neither torch nor JAX is installed.
"""

from __future__ import annotations

import builtins
import enum
import functools
import inspect
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import ml_dtypes
import numpy as np

builtins_slice = builtins.slice  # ttnn.slice below shadows the builtin

__all__ = ["IMPLEMENTED", "Tensor", "to_bfloat16"]

#: The NaN every float32 NaN becomes in real ttnn's host float32 -> bfloat16 conversion.
BFLOAT16_NAN_BITS = 0x7FC0

TILE_SIZE = 32


# --- enums and configs -------------------------------------------------------------------------


class DataType(enum.Enum):
    BFLOAT16 = 0
    FLOAT32 = 1
    UINT32 = 2
    BFLOAT8_B = 3
    BFLOAT4_B = 4
    UINT8 = 5
    UINT16 = 6
    INT32 = 7
    INT8 = 8
    FP8_E4M3 = 9
    INVALID = 10


bfloat16 = DataType.BFLOAT16
float32 = DataType.FLOAT32
uint32 = DataType.UINT32
bfloat8_b = DataType.BFLOAT8_B
bfloat4_b = DataType.BFLOAT4_B
uint8 = DataType.UINT8
uint16 = DataType.UINT16
int32 = DataType.INT32
int8 = DataType.INT8
fp8_e4m3 = DataType.FP8_E4M3


class Layout(enum.Enum):
    ROW_MAJOR = 0
    TILE = 1
    INVALID = 2


ROW_MAJOR_LAYOUT = Layout.ROW_MAJOR
TILE_LAYOUT = Layout.TILE


class StorageType(enum.Enum):
    HOST = 0
    DEVICE = 1


class TileReshapeMapMode(enum.Enum):
    CACHE = 0
    RECREATE = 1


class MathFidelity(enum.Enum):
    LoFi = 0
    HiFi2 = 2
    HiFi3 = 3
    HiFi4 = 4
    Invalid = 255


class ThrottleLevel(enum.Enum):
    NO_THROTTLE = 0


@dataclass(frozen=True)
class MemoryConfig:
    buffer_type: str  # "DRAM" | "L1"; always interleaved in the model

    def is_sharded(self) -> bool:
        return False


DRAM_MEMORY_CONFIG = MemoryConfig("DRAM")
L1_MEMORY_CONFIG = MemoryConfig("L1")


class WormholeComputeKernelConfig:
    """The device's math settings; the model records them and always computes as HiFi4 + fp32 accumulation."""

    def __init__(
        self,
        *,
        math_fidelity: MathFidelity = MathFidelity.Invalid,
        math_approx_mode: bool = True,
        fp32_dest_acc_en: bool = False,
        packer_l1_acc: bool = False,
        dst_full_sync_en: bool = False,
        throttle_level: ThrottleLevel = ThrottleLevel.NO_THROTTLE,
    ):
        self.math_fidelity = math_fidelity
        self.math_approx_mode = math_approx_mode
        self.fp32_dest_acc_en = fp32_dest_acc_en
        self.packer_l1_acc = packer_l1_acc
        self.dst_full_sync_en = dst_full_sync_en
        self.throttle_level = throttle_level

    def __repr__(self) -> str:
        return (
            f"WormholeComputeKernelConfig(math_fidelity={self.math_fidelity}, "
            f"math_approx_mode={self.math_approx_mode}, "
            f"fp32_dest_acc_en={self.fp32_dest_acc_en}, packer_l1_acc={self.packer_l1_acc})"
        )


BlackholeComputeKernelConfig = WormholeComputeKernelConfig


class Shape(tuple):
    """Like ``ttnn.Shape``: a sequence of ints that equals lists and tuples with the same entries."""

    def __eq__(self, other) -> bool:
        try:
            return tuple(self) == tuple(other)
        except TypeError:
            return NotImplemented

    def __ne__(self, other) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return f"Shape({list(self)})"

    @property
    def rank(self) -> int:
        return len(self)


# --- numerics ----------------------------------------------------------------------------------


def to_bfloat16(array) -> np.ndarray:
    """float32 -> bfloat16 exactly as ttnn's host conversion does; returns an ``ml_dtypes.bfloat16`` array.

    Round-to-nearest-even, ±inf kept, overflow to ±inf, subnormals kept, every NaN
    (any sign or payload) -> ``0x7FC0``. Input is taken as float32 (a float64 input
    is first rounded to float32; the real ``from_torch`` refuses float64 numpy).
    """
    a = np.asarray(array, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        out = a.astype(ml_dtypes.bfloat16)
    nan = np.isnan(a)
    if nan.any():
        bits = out.view(np.uint16).copy()
        bits[nan] = BFLOAT16_NAN_BITS
        out = bits.view(ml_dtypes.bfloat16)
    return out


def _round(values: np.ndarray | np.floating, dtype: DataType) -> np.ndarray:
    """float32 values as stored in ``dtype`` (kept as float32 arrays holding representable values)."""
    if dtype == DataType.BFLOAT16:
        return to_bfloat16(values).astype(np.float32)
    if dtype == DataType.FLOAT32:
        return np.asarray(values, dtype=np.float32)
    raise NotImplementedError(f"host model: only bfloat16 and float32 are modelled, got {dtype}")


def _padded(shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    if layout != Layout.TILE:
        return tuple(shape) if shape else (1,)  # a scalar is stored as one element
    up = lambda n: -(-n // TILE_SIZE) * TILE_SIZE  # noqa: E731
    if len(shape) == 0:
        return (TILE_SIZE, TILE_SIZE)
    if len(shape) == 1:  # tiled as a [1, n] row
        return (TILE_SIZE, up(shape[0]))
    return (*shape[:-2], up(shape[-2]), up(shape[-1]))


# --- devices and tensors -------------------------------------------------------------------------


class Device:
    """An opened model device (``open_device`` returns one). Nothing runs anywhere but numpy."""

    def __init__(self, device_id: int):
        self.device_id = device_id
        self.is_open = True

    def id(self) -> int:
        return self.device_id

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<host model device {self.device_id} ({state}); not a Tenstorrent device>"


_OPEN: dict[int, Device] = {}


class Tensor:
    """A model ``ttnn.Tensor``: logical values (already rounded to ``dtype``), layout, storage."""

    def __init__(
        self,
        values: np.ndarray,
        dtype: DataType,
        layout: Layout,
        device: Device | None = None,
        memory_config: MemoryConfig | None = None,
        *,
        pad: float | None = None,
    ):
        self._values = _round(np.array(values, dtype=np.float32), dtype)  # a copy: the cache ops write in place
        self._dtype = dtype
        self._layout = layout
        self._device = device
        self._memory_config = memory_config if device is not None else None
        #: What the implicit tile padding holds: a known value (``from_torch`` pads with 0 or
        #: ``pad_value``, ``fill_implicit_tile_padding`` sets it) or ``None``, undefined, after any
        #: other op. The padding is not stored; only ops that copy whole tiles into another
        #: tensor's logical region (``fill_cache``, ``update_cache``) read it, as NaN when undefined.
        self._pad = pad if layout == Layout.TILE else None

    @property
    def shape(self) -> Shape:
        return Shape(int(d) for d in self._values.shape)

    @property
    def padded_shape(self) -> Shape:
        return Shape(_padded(tuple(self.shape), self._layout))

    @property
    def dtype(self) -> DataType:
        return self._dtype

    @property
    def layout(self) -> Layout:
        return self._layout

    def storage_type(self) -> StorageType:
        return StorageType.DEVICE if self._device is not None else StorageType.HOST

    def device(self) -> Device | None:
        return self._device

    def memory_config(self) -> MemoryConfig | None:
        return self._memory_config

    def logical_volume(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def volume(self) -> int:
        return int(np.prod(self.padded_shape, dtype=np.int64))

    def cpu(self) -> Tensor:
        return from_device(self)

    def to_list(self) -> list:
        return self._values.tolist()

    def __matmul__(self, other):
        return matmul(self, other)

    def __add__(self, other):
        return add(self, other)

    def __mul__(self, other):
        return multiply(self, other)

    def __repr__(self) -> str:
        return (
            f"ttnn.Tensor(host model, shape={list(self.shape)}, dtype={self._dtype}, layout={self._layout}, "
            f"storage={self.storage_type()})"
        )


def _like(t: Tensor, values: np.ndarray, *, dtype=None, layout=None, memory_config=None) -> Tensor:
    """A new tensor on ``t``'s device with ``values`` rounded to ``dtype`` (default: ``t``'s)."""
    return Tensor(
        values,
        dtype if dtype is not None else t.dtype,
        layout if layout is not None else t.layout,
        t._device,
        memory_config if memory_config is not None else (t._memory_config or DRAM_MEMORY_CONFIG),
    )


# --- the ttnn-style function wrapper -------------------------------------------------------------

#: qualified name -> wrapped function, in definition order.
_FUNCTIONS: dict[str, Any] = {}


def _type_name(value) -> str:
    if isinstance(value, Tensor):
        return "ttnn.Tensor"
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _render_signature(name: str, sig: inspect.Signature) -> str:
    parts = []
    star = False
    for p in sig.parameters.values():
        if p.kind == p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        ann = str(p.annotation).replace("Tensor", "ttnn.Tensor") if p.annotation is not p.empty else ""
        text = f"{p.name}: {ann}" if ann else p.name
        if p.default is not p.empty:
            text += f" = {p.default}"
        parts.append(text)
    return f"{name}({', '.join(parts)})"


def _incompatible(qualname: str, sig: inspect.Signature, args, kwargs, fast: bool) -> str:
    name = qualname.split(".")[-1]
    if fast:  # ttnn.decorators.FastOperation's message
        shown = lambda v: repr(v) if isinstance(v, (bool, str, type(None))) else str(v)  # noqa: E731 - as ttnn
        called = ", ".join([_type_name(a) for a in args] + [f"{k}={shown(v)}" for k, v in kwargs.items()])
        return (
            f"\nttnn.{qualname}(): incompatible function arguments.\n\nCalled with:\n  {name}({called})\n\n"
            f"Available signatures:\n  {_render_signature(name, sig)}"
        )
    # a bare nanobind function (open_device)
    types = ", ".join([_type_name(a) for a in args] + [f"{k}={_type_name(v)}" for k, v in kwargs.items()])
    rendered = _render_signature(name, sig).replace("(*", "(\\*")
    return (
        f"{name}(): incompatible function arguments. The following argument types are supported:\n"
        f"    1. {rendered}\n\nInvoked with types: {types}"
    )


def _accepts(annotation: str, value) -> bool:
    """The nanobind type check for the parameters the model declares as tensors or numbers."""
    if annotation == "Tensor":
        return isinstance(value, Tensor)
    if annotation == "Tensor | None":
        return value is None or isinstance(value, Tensor)
    if annotation == "Tensor | float":
        return isinstance(value, (Tensor, int, float, np.floating, np.integer)) and not isinstance(value, bool)
    return True


def _ttnn_function(qualname: str, *, fast: bool = True, python: bool = False):
    """Register a model function under ttnn's qualified name; bad calls raise ttnn's ``TypeError``.

    ``fast``: a C++ op behind ``ttnn.decorators.FastOperation`` (its rewritten nanobind message);
    ``fast=False``: a bare nanobind function (``open_device``); ``python``: a function of ttnn's
    Python layer (``from_torch``, ``to_torch``), whose bad calls raise Python's own ``TypeError``.
    """

    def wrap(fn):
        sig = inspect.signature(fn)
        if python:
            _FUNCTIONS[qualname] = fn
            return fn

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError:
                raise TypeError(_incompatible(qualname, sig, args, kwargs, fast)) from None
            for name, value in bound.arguments.items():
                if not _accepts(str(sig.parameters[name].annotation), value):
                    raise TypeError(_incompatible(qualname, sig, args, kwargs, fast))
            return fn(*args, **kwargs)

        _FUNCTIONS[qualname] = call
        return call

    return wrap


def _fatal(message: str) -> RuntimeError:
    """ttnn raises TT_FATAL assertions as RuntimeError whose text contains the message."""
    return RuntimeError(f"TT_FATAL: {message}")


def _not_modelled(op: str, **given) -> None:
    used = [k for k, v in given.items() if v is not None and v is not False and v != [] and v != 0]
    if used:
        raise NotImplementedError(f"host model: {op}({', '.join(f'{k}=...' for k in used)}) is not modelled")


def _check_kernel_config(config) -> None:
    if config is not None and not isinstance(config, WormholeComputeKernelConfig):
        raise TypeError(f"compute_kernel_config must be a WormholeComputeKernelConfig, got {type(config).__name__}")


# --- devices -----------------------------------------------------------------------------------


@_ttnn_function("open_device", fast=False)
def open_device(
    *,
    device_id: int,
    l1_small_size: int = 0,
    trace_region_size: int = 0,
    dispatch_core_config=None,
    worker_l1_size: int | None = None,
) -> Device:
    """Open model device ``device_id`` (keyword-only, as in ttnn); an open id returns the same device."""
    if not isinstance(device_id, int) or device_id < 0:
        raise TypeError(f"open_device(): device_id must be a non-negative int, got {device_id!r}")
    device = _OPEN.get(device_id)
    if device is None or not device.is_open:
        device = _OPEN[device_id] = Device(device_id)
    return device


def close_device(device: Device) -> None:
    """Close a model device; its tensors can no longer be used by ops."""
    device.is_open = False
    _OPEN.pop(device.device_id, None)


_FUNCTIONS["close_device"] = close_device


# --- creation and transfer ---------------------------------------------------------------------


def _as_numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):  # a torch.Tensor, without importing torch
        value = tensor.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(tensor)


_INFERRED = {np.dtype(np.float32): DataType.FLOAT32, np.dtype(ml_dtypes.bfloat16): DataType.BFLOAT16}


@_ttnn_function("from_torch", python=True)
def from_torch(
    tensor,
    dtype: DataType | None = None,
    *,
    spec=None,
    tile=None,
    pad_value: float | None = None,
    layout: Layout | None = None,
    device: Device | None = None,
    memory_config: MemoryConfig | None = None,
    mesh_mapper=None,
    cq_id: int | None = None,
    preserve_nan_values: bool = False,
    col_tilize: bool = False,
    enable_bfloat_opt: bool = False,
) -> Tensor | None:
    """A model tensor from a numpy array (or torch tensor): ``dtype`` None keeps float32 as FLOAT32."""
    if tensor is None:
        return None
    _not_modelled(
        "from_torch",
        spec=spec,
        tile=tile,
        mesh_mapper=mesh_mapper,
        col_tilize=col_tilize,
        enable_bfloat_opt=enable_bfloat_opt,
    )
    array = _as_numpy(tensor)
    if dtype is None:
        if array.dtype == np.float64:
            raise RuntimeError(
                "host model: float64 numpy input without dtype (real ttnn aborts the process: "
                "get_dtype_from_ttnn_datatype: got INVALID); cast to float32 first"
            )
        if array.dtype not in _INFERRED:
            raise NotImplementedError(f"host model: from_torch of {array.dtype} data is not modelled")
        dtype = _INFERRED[array.dtype]
    if dtype in (DataType.BFLOAT8_B, DataType.BFLOAT4_B) and layout == Layout.ROW_MAJOR:
        raise RuntimeError("Layout must be Layout::TILE for bfloat8_b or bfloat4_b!")
    if dtype not in (DataType.BFLOAT16, DataType.FLOAT32):
        raise NotImplementedError(f"host model: only bfloat16 and float32 are modelled, got {dtype}")
    if device is not None and not device.is_open:
        raise RuntimeError("host model: device is closed")
    values = np.asarray(array, dtype=np.float32)
    return Tensor(
        values,
        dtype,
        layout or Layout.ROW_MAJOR,
        device,
        memory_config or DRAM_MEMORY_CONFIG if device is not None else None,
        pad=0.0 if pad_value is None else float(pad_value),
    )


@_ttnn_function("to_torch", python=True)
def to_torch(
    tensor: Tensor,
    dtype=None,
    *,
    torch_rank: int | None = None,
    mesh_composer=None,
    device=None,
    cq_id: int | None = None,
) -> np.ndarray:
    """The logical values as **numpy** (the model's stand-in for a torch tensor).

    bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays (torch gives
    ``torch.bfloat16``), float32 as float32; ``dtype`` (a numpy dtype) casts at the end.
    """
    _not_modelled("to_torch", mesh_composer=mesh_composer)
    values = tensor._values
    out = values.astype(ml_dtypes.bfloat16) if tensor.dtype == DataType.BFLOAT16 else values.copy()
    if torch_rank is not None:
        while out.ndim > torch_rank:
            if out.shape[0] != 1:
                raise RuntimeError("ttnn: Unable to squeeze to desired rank!")
            out = out[0]
    return out.astype(dtype) if dtype is not None else out


@_ttnn_function("to_device")
def to_device(tensor: Tensor, device: Device, memory_config: MemoryConfig | None = None, *, queue_id=None) -> Tensor:
    if not isinstance(device, Device) or not device.is_open:
        raise RuntimeError(f"host model: to_device needs an open device from open_device, got {device!r}")
    return Tensor(
        tensor._values, tensor.dtype, tensor.layout, device, memory_config or DRAM_MEMORY_CONFIG, pad=tensor._pad
    )


@_ttnn_function("from_device")
def from_device(tensor: Tensor, blocking: bool = True, *, queue_id=None) -> Tensor:
    return Tensor(tensor._values, tensor.dtype, tensor.layout, None, None, pad=tensor._pad)


@_ttnn_function("to_layout")
def to_layout(
    tensor: Tensor,
    layout: Layout,
    dtype: DataType | None = None,
    memory_config: MemoryConfig | None = None,
    sub_core_grids=None,
    pad_value: float = 0.0,
) -> Tensor:
    """Re-layout (ROW_MAJOR <-> TILE); values are unchanged.

    ``dtype`` converts on a device; on a host tensor it is ignored, as observed with the real package.
    """
    _not_modelled("to_layout", sub_core_grids=sub_core_grids)
    target = dtype if (dtype is not None and tensor._device is not None) else tensor.dtype
    pad = tensor._pad if tensor.layout == Layout.TILE else float(pad_value)
    return Tensor(
        tensor._values,
        target,
        layout,
        tensor._device,
        memory_config or tensor._memory_config or (DRAM_MEMORY_CONFIG if tensor._device else None),
        pad=pad,
    )


# --- device checks -------------------------------------------------------------------------------


def _on_device(t: Tensor, message: str) -> None:
    if t._device is None:
        raise _fatal(message)
    if not t._device.is_open:
        raise _fatal(f"{message} (its device is closed)")


def _float_dtype(t: Tensor, op: str) -> None:
    if t.dtype not in (DataType.BFLOAT16, DataType.FLOAT32):
        raise NotImplementedError(f"host model: {op} on {t.dtype} is not modelled")


# --- matmul / linear -------------------------------------------------------------------------------


def _matmul_values(a: Tensor, b: Tensor, transpose_a: bool, transpose_b: bool) -> np.ndarray:
    for t in (a, b):
        _on_device(t, "Operand to matmul must be on device")
    if a.layout != Layout.TILE or b.layout != Layout.TILE:
        raise _fatal("Inputs to matmul must be tilized")
    _float_dtype(a, "matmul")
    _float_dtype(b, "matmul")
    av, bv = a._values, b._values
    if transpose_a:
        av = np.swapaxes(av, -1, -2)
    if transpose_b:
        bv = np.swapaxes(bv, -1, -2)
    if av.ndim < 1 or bv.ndim < 1:
        raise _fatal("matmul inputs must be at least 1-dimensional")
    width = av.shape[-1]
    height = bv.shape[-2] if bv.ndim >= 2 else bv.shape[0]
    if width != height:
        raise _fatal(
            "The width of the first tensor must be equal to the height of the second tensor. "
            f"Mismatch: width={width} height={height}"
        )
    a_batch, b_batch = av.shape[:-2], bv.shape[:-2]
    if bv.ndim > 2 and any(d != 1 for d in b_batch) and a_batch != b_batch and any(d != 1 for d in a_batch):
        raise _fatal(
            "bmm expects equal batch dims, or the batch dims of one operand all 1; "
            f"got {tuple(a.shape)} @ {tuple(b.shape)}"
        )
    # float32 products and float32 accumulation (HiFi4 + fp32 DST); rounded once by the caller.
    return np.matmul(av.astype(np.float32), bv.astype(np.float32))


@_ttnn_function("matmul")
def matmul(
    input_tensor_a: Tensor,
    input_tensor_b: Tensor,
    *,
    transpose_a: bool = False,
    transpose_b: bool = False,
    memory_config: MemoryConfig | None = None,
    dtype: DataType | None = None,
    program_config=None,
    activation=None,
    compute_kernel_config: WormholeComputeKernelConfig | None = None,
    core_grid=None,
    output_tile=None,
    optional_output_tensor=None,
    global_cb=None,
    sub_device_id=None,
    prefetcher_pipes=[],  # noqa: B006 - ttnn's own default, never mutated
) -> Tensor:
    """``A @ B`` in float32, rounded to ``dtype`` (default A's); output TILE."""
    _not_modelled(
        "matmul",
        program_config=program_config,
        activation=activation,
        core_grid=core_grid,
        output_tile=output_tile,
        optional_output_tensor=optional_output_tensor,
        global_cb=global_cb,
        sub_device_id=sub_device_id,
        prefetcher_pipes=list(prefetcher_pipes),
    )
    _check_kernel_config(compute_kernel_config)
    out = _matmul_values(input_tensor_a, input_tensor_b, transpose_a, transpose_b)
    return _like(input_tensor_a, out, dtype=dtype, layout=Layout.TILE, memory_config=memory_config)


@_ttnn_function("linear")
def linear(
    input_tensor_a: Tensor,
    input_tensor_b: Tensor,
    *,
    bias: Tensor | None = None,
    transpose_a: bool = False,
    transpose_b: bool = False,
    memory_config: MemoryConfig | None = None,
    dtype: DataType | None = None,
    program_config=None,
    activation=None,
    compute_kernel_config: WormholeComputeKernelConfig | None = None,
    core_grid=None,
    output_tile=None,
    optional_output_tensor=None,
    global_cb=None,
    sub_device_id=None,
    prefetcher_pipes=[],  # noqa: B006 - ttnn's own default, never mutated
    in0_column_offset: int | None = None,
) -> Tensor:
    """``A @ B + bias`` (B is ``(in, out)`` unless ``transpose_b``), float32 then one rounding; output TILE."""
    _not_modelled(
        "linear",
        program_config=program_config,
        activation=activation,
        core_grid=core_grid,
        output_tile=output_tile,
        optional_output_tensor=optional_output_tensor,
        global_cb=global_cb,
        sub_device_id=sub_device_id,
        prefetcher_pipes=list(prefetcher_pipes),
        in0_column_offset=in0_column_offset,
    )
    _check_kernel_config(compute_kernel_config)
    out = _matmul_values(input_tensor_a, input_tensor_b, transpose_a, transpose_b)
    if bias is not None:
        _on_device(bias, "Operand to matmul must be on device")
        if bias.layout != Layout.TILE:
            raise _fatal("Inputs to matmul must be tilized")
        if bias.shape[-1] != out.shape[-1] or any(d != 1 for d in bias.shape[:-1]):
            raise _fatal(f"bias must be a row vector [1, {out.shape[-1]}], got {list(bias.shape)}")
        out = out + bias._values.reshape(-1)
    return _like(input_tensor_a, out, dtype=dtype, layout=Layout.TILE, memory_config=memory_config)


# --- softmax -------------------------------------------------------------------------------------


@_ttnn_function("softmax")
def softmax(
    input_tensor: Tensor,
    dim: int = -1,
    *,
    memory_config: MemoryConfig | None = None,
    compute_kernel_config: WormholeComputeKernelConfig | None = None,
    numeric_stable: bool = True,
) -> Tensor:
    """Softmax over ``dim`` with exact float32 ``exp`` (row max subtracted if ``numeric_stable``); output TILE."""
    if input_tensor._device is None:
        raise _fatal("input_tensor.device() == nullptr, No device found, move input_tensor to device")
    _check_kernel_config(compute_kernel_config)
    _float_dtype(input_tensor, "softmax")
    rank = len(input_tensor.shape)
    axis = dim + rank if dim < 0 else dim
    if not 0 <= axis < rank:
        raise _fatal(f"softmax dim {dim} out of range for rank {rank}")
    if axis != rank - 1 and input_tensor.layout != Layout.TILE:
        raise _fatal("Inputs to softmax must be tilized")
    x = input_tensor._values.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        if numeric_stable:
            x = x - np.max(x, axis=axis, keepdims=True)
        e = np.exp(x)
        out = e / np.sum(e, axis=axis, keepdims=True)
    return _like(input_tensor, out, layout=Layout.TILE, memory_config=memory_config)


# --- normalization -------------------------------------------------------------------------------


@_ttnn_function("rms_norm")
def rms_norm(
    input_tensor: Tensor,
    *,
    epsilon: float = 1e-12,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    residual_input_tensor: Tensor | None = None,
    memory_config: MemoryConfig | None = None,
    program_config=None,
    compute_kernel_config: WormholeComputeKernelConfig | None = None,
) -> Tensor:
    """``x / sqrt(mean(x**2, -1) + epsilon) * weight`` over the LOGICAL last dim, float32, rounded once; output TILE.

    ``weight`` (gamma): a TILE row ``(1, W)`` (or ``(W,)``) whose padded width equals the
    input's and whose logical width is at least the input's, as 0.81.1 checks. The mean
    is over the input's logical width; that a device kernel excludes the tile padding of
    a width that is not a multiple of 32 is what the 0.81.1 gamma check implies (it
    compares logical widths), not something a run here has shown.
    """
    _not_modelled("rms_norm", bias=bias, residual_input_tensor=residual_input_tensor, program_config=program_config)
    _check_kernel_config(compute_kernel_config)
    if input_tensor._device is None:
        raise _fatal("Input tensor must be on device, got storage_type StorageType::HOST")
    _on_device(input_tensor, "Input tensor must be on device")
    if input_tensor.layout != Layout.TILE:
        raise _fatal("ttnn::rms_norm does not support ROW_MAJOR input tensors. Use TILE layout.")
    _float_dtype(input_tensor, "rms_norm")
    if len(input_tensor.shape) < 1:
        raise _fatal("rms_norm: the input must have rank >= 1")
    x = input_tensor._values.astype(np.float32)
    width = x.shape[-1]
    out = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(epsilon))
    if weight is not None:
        if weight._device is None:
            raise _fatal("Gamma must be on device.")
        _on_device(weight, "Gamma must be on device.")
        if weight._device is not input_tensor._device:
            raise _fatal("Input tensor device must match gamma tensor device")
        if weight.layout != Layout.TILE:
            raise NotImplementedError("host model: a ROW_MAJOR rms_norm weight ([W/32, 32] sticks) is not modelled")
        _float_dtype(weight, "rms_norm")
        g_logical, g_padded = weight.shape[-1], weight.padded_shape[-1]
        if g_padded != input_tensor.padded_shape[-1] or g_logical < width:
            raise _fatal(
                "Input and gamma padded widths must match and gamma logical width must be >= input logical width "
                "(otherwise valid input columns would be multiplied by gamma padding). Got input: "
                f"logical[-1]={width} padded[-1]={input_tensor.padded_shape[-1]} vs gamma: "
                f"logical[-1]={g_logical} padded[-1]={g_padded}"
            )
        if any(d != 1 for d in weight.shape[:-1]):
            raise _fatal(f"host model: rms_norm's weight must be a row [1, {g_logical}], got {list(weight.shape)}")
        out = out * weight._values.reshape(-1)[:width]
    return _like(input_tensor, out, layout=Layout.TILE, memory_config=memory_config)


# --- elementwise ---------------------------------------------------------------------------------


def _binary(op: str, a, b, fn, dtype, memory_config, extras: dict) -> Tensor:
    _not_modelled(op, **extras)
    tensors = [t for t in (a, b) if isinstance(t, Tensor)]
    for label, t in (("A", a), ("B", b)):
        if isinstance(t, Tensor) and t._device is None:
            raise _fatal(f"Input tensor {label} must be on device, got storage type: StorageType::HOST")
    first = tensors[0]  # the output follows A's dtype and layout (or the tensor operand's)
    for t in tensors:
        _float_dtype(t, op)

    def values(v):
        if isinstance(v, Tensor):
            return v._values
        # a scalar is packed in the tensor operand's format (bf16 for a bf16 tensor)
        return _round(np.asarray(v, dtype=np.float32), first.dtype)

    av, bv = values(a), values(b)
    try:
        out_shape = np.broadcast_shapes(av.shape, bv.shape)
    except ValueError:
        raise _fatal(f"{op}: shapes {list(av.shape)} and {list(bv.shape)} cannot be broadcast") from None
    if len(out_shape) > 5 and av.shape != bv.shape:
        raise _fatal(f"{op}: broadcasting is supported up to rank 5, got rank {len(out_shape)}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = fn(av.astype(np.float32), bv.astype(np.float32))
    return _like(first, out, dtype=dtype, memory_config=memory_config)


@_ttnn_function("add")
def add(
    input_tensor_a: Tensor | float,
    input_tensor_b: Tensor | float,
    *,
    fast_and_approximate_mode: bool = True,
    dtype: DataType | None = None,
    memory_config: MemoryConfig | None = None,
    output_tensor=None,
    activations=[],  # noqa: B006 - ttnn's own default, never mutated
    input_tensor_a_activations=[],  # noqa: B006
    input_tensor_b_activations=[],  # noqa: B006
    sub_core_grids=None,
    sub_device_id=None,
) -> Tensor:
    """``a + b`` with size-1 broadcasting, in float32, rounded to A's dtype."""
    extras = dict(
        output_tensor=output_tensor,
        activations=list(activations),
        input_tensor_a_activations=list(input_tensor_a_activations),
        input_tensor_b_activations=list(input_tensor_b_activations),
        sub_core_grids=sub_core_grids,
        sub_device_id=sub_device_id,
    )
    return _binary("add", input_tensor_a, input_tensor_b, np.add, dtype, memory_config, extras)


@_ttnn_function("multiply")
def multiply(
    input_tensor_a: Tensor | float,
    input_tensor_b: Tensor | float,
    *,
    fast_and_approximate_mode: bool = False,
    dtype: DataType | None = None,
    memory_config: MemoryConfig | None = None,
    output_tensor=None,
    activations=[],  # noqa: B006 - ttnn's own default, never mutated
    input_tensor_a_activations=[],  # noqa: B006
    input_tensor_b_activations=[],  # noqa: B006
    sub_core_grids=None,
    sub_device_id=None,
) -> Tensor:
    """``a * b`` with size-1 broadcasting (a scalar is first rounded to A's dtype), rounded to A's dtype."""
    extras = dict(
        output_tensor=output_tensor,
        activations=list(activations),
        input_tensor_a_activations=list(input_tensor_a_activations),
        input_tensor_b_activations=list(input_tensor_b_activations),
        sub_core_grids=sub_core_grids,
        sub_device_id=sub_device_id,
    )
    return _binary("multiply", input_tensor_a, input_tensor_b, np.multiply, dtype, memory_config, extras)


mul = multiply

# --- data movement -------------------------------------------------------------------------------


@_ttnn_function("permute")
def permute(input_tensor: Tensor, dims, *, memory_config: MemoryConfig | None = None, pad_value: float = 0.0) -> Tensor:
    _on_device(input_tensor, "Tensor must already be on device")
    rank = len(input_tensor.shape)
    axes = tuple(int(d) + rank if int(d) < 0 else int(d) for d in dims)
    if sorted(axes) != list(range(rank)):
        raise _fatal(f"permute: dims {list(dims)} are not a permutation of {rank} dims")
    return _like(input_tensor, np.transpose(input_tensor._values, axes), memory_config=memory_config)


@_ttnn_function("transpose")
def transpose(
    input_tensor: Tensor, dim1: int, dim2: int, *, memory_config: MemoryConfig | None = None, pad_value: float = 0.0
) -> Tensor:
    _on_device(input_tensor, "Device Operations expect device tensors as inputs")
    rank = len(input_tensor.shape)
    for d in (dim1, dim2):
        if not -rank <= d < rank:
            raise _fatal(f"transpose: dim {d} out of range for rank {rank}")
    return _like(input_tensor, np.swapaxes(input_tensor._values, dim1, dim2), memory_config=memory_config)


@_ttnn_function("reshape")
def reshape(
    input_tensor: Tensor,
    shape,
    *,
    memory_config: MemoryConfig | None = None,
    pad_value=None,
    reshape_tile_mode: TileReshapeMapMode = TileReshapeMapMode.CACHE,
    sub_core_grids=None,
    skip_padding_fill: bool = False,
) -> Tensor:
    """Same values in a new logical shape (one ``-1`` allowed); works on host and device tensors."""
    target = [int(d) for d in shape]
    volume = input_tensor.logical_volume()
    if target.count(-1) == 1:
        known = int(np.prod([d for d in target if d != -1], dtype=np.int64))
        if known and volume % known == 0:
            target[target.index(-1)] = volume // known
    if any(d < 0 for d in target) or int(np.prod(target, dtype=np.int64)) != volume:
        raise _fatal("Invalid arguments to reshape")
    return Tensor(
        input_tensor._values.reshape(target),
        input_tensor.dtype,
        input_tensor.layout,
        input_tensor._device,
        memory_config or input_tensor._memory_config,
    )


@_ttnn_function("slice")
def slice(  # noqa: A001 - ttnn's name
    input_tensor: Tensor,
    slice_start,
    slice_end,
    slice_step=None,
    *,
    memory_config: MemoryConfig | None = None,
    output_tensor=None,
    pad_value: float | None = None,
    sub_core_grids=None,
) -> Tensor:
    """``input_tensor[start:end:step]`` per dim; bounds must lie in ``[0, dim]`` (negative ones are not normalised)."""
    _not_modelled("slice", output_tensor=output_tensor, sub_core_grids=sub_core_grids)
    _on_device(input_tensor, "Device Operations expect device tensors as inputs")
    shape = tuple(input_tensor.shape)
    steps = list(slice_step) if slice_step is not None else [1] * len(shape)
    if not len(slice_start) == len(slice_end) == len(steps) == len(shape):
        raise _fatal(f"slice: start/end/step must have rank {len(shape)} entries")
    index = []
    for dim, (lo, hi, step) in enumerate(zip(slice_start, slice_end, steps, strict=True)):
        if not (0 <= lo <= hi <= shape[dim]) or step < 1:
            raise _fatal(
                f"slice: dim {dim}: need 0 <= start <= end <= {shape[dim]} and step >= 1, got {lo}:{hi}:{step}"
            )
        index.append(builtins_slice(lo, hi, step))
    return _like(input_tensor, input_tensor._values[tuple(index)], memory_config=memory_config)


@_ttnn_function("concat")
def concat(
    tensors,
    dim: int = 0,
    *,
    memory_config: MemoryConfig | None = None,
    output_tensor=None,
    groups: int = 1,
    sub_core_grids=None,
) -> Tensor:
    _not_modelled(
        "concat", output_tensor=output_tensor, sub_core_grids=sub_core_grids, groups=groups if groups != 1 else None
    )
    tensors = list(tensors)
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("ttnn.concat(): tensors must be a non-empty sequence of ttnn.Tensor")
    for t in tensors:
        if t._device is None:
            raise RuntimeError(
                "host model: ttnn.concat on a host tensor crashes the real process (SIGSEGV); move it to the device"
            )
    if len({t.dtype for t in tensors}) != 1:
        raise _fatal("All Tensors should have same dtypes.")
    if len({t.layout for t in tensors}) != 1:
        raise _fatal("All Tensors should have same layouts.")
    try:
        out = np.concatenate([t._values for t in tensors], axis=dim)
    except ValueError as err:
        raise _fatal(f"concat: {err}") from None
    return _like(tensors[0], out, memory_config=memory_config)


@_ttnn_function("repeat_interleave")
def repeat_interleave(
    input_tensor: Tensor, repeats: int, dim: int, *, memory_config: MemoryConfig | None = None
) -> Tensor:
    """torch's ``repeat_interleave(repeats, dim)``: each slice along ``dim`` ``repeats`` times in a row ([a, a, b, b]).

    ``repeats`` is a ``uint32`` in 0.81.1 (one count for every slice; no per-slice tensor).
    """
    repeats = _uint32("repeat_interleave", "repeats", repeats)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"ttnn.repeat_interleave(): incompatible function arguments: dim must be an int, got {dim!r}")
    _on_device(input_tensor, "Device Operations expect device tensors as inputs")
    _float_dtype(input_tensor, "repeat_interleave")
    rank = len(input_tensor.shape)
    if not -rank <= int(dim) < rank:
        raise _fatal(f"repeat_interleave: dim {dim} out of range for rank {rank}")
    if repeats == 0:
        raise NotImplementedError("host model: repeat_interleave with repeats=0 is not modelled")
    out = np.repeat(input_tensor._values, repeats, axis=int(dim))
    return _like(input_tensor, out, memory_config=memory_config)


# --- KV cache -------------------------------------------------------------------------------------
#
# ttnn.fill_cache and ttnn.update_cache write INTO the cache tensor and return it. The rules and
# their texts are tt-metal's ``update_cache_device_operation.cpp`` (validate_on_program_cache_miss);
# every text below is in the 0.81.1 binary. Both ops copy whole tiles or tile rows, so the input's
# tile padding lands in the cache: rows P..ceil32(P)-1 of a prompt (fill_cache), and columns past a
# head_dim that is not a multiple of 32. Where that padding is undefined the model writes NaN, so a
# program that reads it (instead of zeroing it with ``fill_implicit_tile_padding``) fails here.


def _uint32(qualname: str, name: str, value) -> int:
    """nanobind's ``uint32_t`` conversion: a non-negative Python int (bool excluded), else ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 2**32:
        raise TypeError(f"ttnn.{qualname}(): incompatible function arguments: {name} must be a uint32, got {value!r}")
    return int(value)


def _check_cache_operands(cache: Tensor, input_tensor: Tensor) -> None:
    """The checks fill_cache and update_cache share, in tt-metal's order."""
    if cache._device is None or input_tensor._device is None:
        raise _fatal("Operands to update_cache need to be on device!")
    if cache._device is not input_tensor._device:
        raise _fatal("Operands to update_cache need to be on the same device!")
    _on_device(cache, "Operands to update_cache need to be on device!")
    if cache.layout != Layout.TILE or input_tensor.layout != Layout.TILE:
        raise _fatal("Inputs to update_cache must be tilized")
    _float_dtype(input_tensor, "update_cache")
    _float_dtype(cache, "update_cache")
    if len(cache.shape) != 4 or len(input_tensor.shape) != 4:
        raise _fatal(
            f"host model: the cache ops are modelled on 4-D tensors (cache [batch, heads, tokens, head_dim]); "
            f"got cache {list(cache.shape)}, input {list(input_tensor.shape)}"
        )
    cp, ip = cache.padded_shape, input_tensor.padded_shape
    if ip[-1] != cp[-1]:
        raise _fatal(f"Input tensor width ({ip[-1]}) must equal cache tensor width ({cp[-1]})")
    if ip[0] != 1:
        raise _fatal(f"Input tensor batch size must be 1 but got {ip[0]}")
    if ip[1] != cp[1]:
        raise _fatal(f"Input tensor height ({ip[1]}) must equal cache tensor height ({cp[1]})")


def _tiles_of(input_tensor: Tensor) -> np.ndarray:
    """``input_tensor[0]`` with its tile padding, ``(heads, ceil32(rows), ceil32(width))``; NaN where undefined."""
    values = input_tensor._values[0]
    heads, rows, width = values.shape
    _, padded_rows, padded_width = _padded(values.shape, Layout.TILE)
    pad = np.float32(np.nan if input_tensor._pad is None else input_tensor._pad)
    block = np.full((heads, padded_rows, padded_width), pad, dtype=np.float32)
    block[:, :rows, :width] = values
    return block


def _written(cache: Tensor, input_tensor: Tensor) -> None:
    if cache._pad != input_tensor._pad:  # the written tiles' padding came from the input
        cache._pad = None


@_ttnn_function("fill_cache")
def fill_cache(cache_tensor: Tensor, input_tensor: Tensor, batch_idx: int, *, update_idx: int = 0) -> Tensor:
    """IN PLACE: ``cache_tensor[batch_idx, :, update_idx : update_idx + ceil32(P), :] = input_tensor[0]`` tiles.

    ``cache_tensor`` is ``(batch, heads, max_tokens, head_dim)``, ``input_tensor`` one user's
    ``(1, heads, P, head_dim)``, same dtype. ``update_idx`` must be a multiple of 32; whole tiles
    are copied, so the input's padding rows ``P .. ceil32(P) - 1`` land in the cache too. Returns
    ``cache_tensor`` itself.
    """
    batch_idx = _uint32("fill_cache", "batch_idx", batch_idx)
    update_idx = _uint32("fill_cache", "update_idx", update_idx)
    _check_cache_operands(cache_tensor, input_tensor)
    if input_tensor.dtype != cache_tensor.dtype:
        raise _fatal("Input and cache tensors must have same dtype!")
    cp, ip = cache_tensor.padded_shape, input_tensor.padded_shape
    if batch_idx >= cp[0]:
        raise _fatal(f"Batch index ({batch_idx}) must be less than cache tensor batch size ({cp[0]})")
    if update_idx % TILE_SIZE:
        raise _fatal(f"Fill update_idx ({update_idx}) must be a multiple of TILE_HEIGHT ({TILE_SIZE})")
    if not (update_idx <= cp[-2] and ip[-2] <= cp[-2] - update_idx):
        raise _fatal(
            f"Fill update_idx ({update_idx}) + input tensor height ({ip[-2]}) must be <= cache tensor height ({cp[-2]})"
        )
    block = _tiles_of(input_tensor)
    tokens, width = cache_tensor.shape[-2:]
    rows = max(0, min(block.shape[1], tokens - update_idx))  # rows past the logical cache are its own padding
    cache_tensor._values[batch_idx, :, update_idx : update_idx + rows, :] = _round(
        block[:, :rows, :width], cache_tensor.dtype
    )
    _written(cache_tensor, input_tensor)
    return cache_tensor


@_ttnn_function("update_cache")
def update_cache(
    cache: Tensor,
    input: Tensor,  # noqa: A002 - ttnn's name
    update_idx: int,
    *,
    batch_offset: int = 0,
    compute_kernel_config: WormholeComputeKernelConfig | None = None,
) -> Tensor:
    """IN PLACE: ``cache[u, :, update_idx, :] = input[0, :, batch_offset + u, :]`` for every user ``u``.

    ``cache`` is ``(batch, heads, max_tokens, head_dim)``; ``input`` is ``(1, heads, users,
    head_dim)`` with the users along dim -2 (padded to 32 rows), one new token each. Any
    ``update_idx`` (not only tile multiples) writes one row; all users get the same one.
    Returns ``cache`` itself. Real ttnn does not check ``update_idx`` against the cache;
    the model raises where the write would leave the cache's padded rows.
    """
    update_idx = _uint32("update_cache", "update_idx", update_idx)
    batch_offset = _uint32("update_cache", "batch_offset", batch_offset)
    _check_kernel_config(compute_kernel_config)
    _check_cache_operands(cache, input)
    cp, ip = cache.padded_shape, input.padded_shape
    if cp[0] > ip[-2]:
        raise _fatal(f"Cache tensor batch size ({cp[0]}) must be <= input tensor height ({ip[-2]})")
    if cp[0] < 32:
        if batch_offset + cp[0] > 32:
            raise _fatal(f"Batch offset ({batch_offset}) + cache tensor batch size ({cp[0]}) must be <= 32")
    elif batch_offset != 0:
        raise _fatal("Batch offset must be 0 when cache tensor batch size >= 32")
    if update_idx >= cp[-2]:
        raise RuntimeError(
            f"host model: update_cache update_idx={update_idx} is past the cache's {cp[-2]} padded rows "
            "(real ttnn does not check it and would write outside the cache)"
        )
    users, _, tokens, width = cache.shape
    if update_idx < tokens:  # else the row is the cache's own tile padding, which the model does not store
        rows = _tiles_of(input)[:, batch_offset : batch_offset + users, :width]  # (heads, users, width)
        cache._values[:, :, update_idx, :] = _round(np.swapaxes(rows, 0, 1), cache.dtype)
    _written(cache, input)
    return cache


@_ttnn_function("fill_implicit_tile_padding")
def fill_implicit_tile_padding(
    input_tensor: Tensor, fill_value: float, *, memory_config: MemoryConfig | None = None
) -> Tensor:
    """A copy of ``input_tensor`` whose tile padding (rows/columns past the logical shape) is ``fill_value``."""
    _on_device(input_tensor, "Device Operations expect device tensors as inputs")
    if isinstance(fill_value, (int, np.integer)) and not isinstance(fill_value, bool) and fill_value != 0:
        raise NotImplementedError("host model: an int fill_value (a raw bit pattern) other than 0 is not modelled")
    pad = float(_round(np.float32(fill_value), input_tensor.dtype))
    return Tensor(
        input_tensor._values,
        input_tensor.dtype,
        input_tensor.layout,
        input_tensor._device,
        memory_config or input_tensor._memory_config,
        pad=pad,
    )


# --- transformer ---------------------------------------------------------------------------------


@_ttnn_function("transformer.scaled_dot_product_attention")
def scaled_dot_product_attention(
    input_tensor_q: Tensor,
    input_tensor_k: Tensor,
    input_tensor_v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    sliding_window_size: int | None = None,
    memory_config: MemoryConfig | None = None,
    program_config=None,
    compute_kernel_config: WormholeComputeKernelConfig | None = None,
    attention_sink=None,
    cu_window_seqlens=None,
    windowed_q_token_offset: int = 0,
    windowed_q_token_offset_tensor=None,
    output_concat_heads: bool = False,
    attn_mask_block_map=None,
) -> Tensor:
    """``softmax(Q K^T * scale + mask) V`` over ``[b, heads, s, head_dim]``, float32, rounded once."""
    _not_modelled(
        "transformer.scaled_dot_product_attention",
        sliding_window_size=sliding_window_size,
        program_config=program_config,
        attention_sink=attention_sink,
        cu_window_seqlens=cu_window_seqlens,
        windowed_q_token_offset=windowed_q_token_offset,
        windowed_q_token_offset_tensor=windowed_q_token_offset_tensor,
        output_concat_heads=output_concat_heads,
        attn_mask_block_map=attn_mask_block_map,
    )
    _check_kernel_config(compute_kernel_config)
    q, k, v = input_tensor_q, input_tensor_k, input_tensor_v
    for t in (q, k, v):
        if t._device is None:
            raise RuntimeError(
                "host model: Operands to SDPA need to be allocated in buffers on device! "
                "(real ttnn crashes the process on host tensors)"
            )
        if t.layout != Layout.TILE:
            raise _fatal("Inputs to SDPA must be tilized")
        if t.dtype != DataType.BFLOAT16:
            raise _fatal(f"SDPA inputs must be BFLOAT16, BFLOAT8_B or BFLOAT4_B, got {t.dtype}")
        if len(t.shape) != 4:
            raise _fatal(f"SDPA inputs must be 4-D [b, heads, seq, head_dim], got {list(t.shape)}")
    b, nqh, sq, dh = q.shape
    _, nkv, sk, _ = k.shape
    if dh % TILE_SIZE or k.shape[-1] != dh:
        raise _fatal("Padding is not supported on the head_dim dimension")
    if v.shape[-2] != sk:
        raise _fatal(f"K and V tensors must have the same sequence length. K: {sk}, V: {v.shape[-2]}")
    if nqh % nkv:
        raise _fatal(f"query heads {nqh} must be a multiple of key/value heads {nkv}")
    if is_causal and attn_mask is not None:
        raise _fatal(
            f"is_causal and attn_mask cannot both be present. Got is_causal: {str(is_causal).lower()}, attn_mask: true"
        )
    if is_causal and sq != sk:
        raise _fatal(f"Causal SDPA requires Q and K to have the same sequence length. Got Q: {sq}, K: {sk}")
    kv = lambda t: np.repeat(t._values, nqh // nkv, axis=1)  # noqa: E731 - GQA head expansion
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    scores = np.matmul(q._values, np.swapaxes(kv(k), -1, -2)) * np.float32(scale)
    if is_causal:
        scores = np.where(np.tril(np.ones((sq, sk), dtype=bool)), scores, -np.inf)
    if attn_mask is not None:
        _check_sdpa_mask(attn_mask, q.shape, k.shape)
        scores = scores + attn_mask._values
    with np.errstate(over="ignore", invalid="ignore"):
        scores = scores - np.max(scores, axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights = weights / np.sum(weights, axis=-1, keepdims=True)
    out = np.matmul(weights.astype(np.float32), kv(v))
    return _like(q, out, layout=Layout.TILE, memory_config=memory_config)


def _check_sdpa_mask(mask: Tensor, q_shape, k_shape) -> None:
    """SDPA's mask rules (tt-metal ``sdpa_device_operation.cpp``; every text is in the 0.81.1 binary)."""
    _on_device(mask, "When mask is provided to SDPA, the tensor must be on device")
    if mask.layout != Layout.TILE:
        raise _fatal("When mask is provided to SDPA, it must be tilized")
    if mask.dtype != DataType.BFLOAT16:
        raise _fatal("When mask is provided to SDPA, it must be in BF16, BFP8, or BFP4 dataformat")
    if mask.memory_config() != DRAM_MEMORY_CONFIG:
        raise _fatal("When mask is provided to SDPA, it must be in DRAM")
    m = tuple(mask.shape)
    if len(m) != 4:
        raise _fatal(f"host model: SDPA masks are 4-D [1|b, 1|heads, Sq, Sk], got {list(m)}")
    if m[0] not in (1, q_shape[0]):
        raise _fatal(
            "Mask batch dim must either be 1 (to be broadcasted across all batches) or must match Q batch dimension"
        )
    if m[1] not in (1, q_shape[1]):
        raise _fatal(
            "Mask num_heads must either be 1 (to be broadcasted across all heads) or must match Q heads dimension"
        )
    if m[2] != q_shape[2]:
        raise _fatal("Mask sequence length must match Q sequence length")
    if m[3] != k_shape[2]:
        raise _fatal("Mask sequence length must match K sequence length")


transformer = SimpleNamespace(scaled_dot_product_attention=scaled_dot_product_attention)

#: Dotted names (relative to ``ttnn``) of the functions this module models.
IMPLEMENTED: tuple[str, ...] = tuple(_FUNCTIONS)

#: What a runtime reports for this module.
DESCRIPTION = "host model of ttnn numerics (numpy + ml_dtypes), not a Tenstorrent device"
