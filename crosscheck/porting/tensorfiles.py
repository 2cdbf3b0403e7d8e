"""Reading tensor files (``.safetensors``, ``.pt``/``.pth``/``.bin``, ``.npy``) with sizes checked first.

Each reader looks at shapes and dtypes before any tensor is materialised and checks them
against the memory budget (:func:`crosscheck.pipeline.budget.check_tensors`): a ``.pt`` tensor saved
from ``torch.zeros(1).expand(60000, 60000)`` holds 4 bytes of storage but 13.4 GiB dense,
and is refused, not copied. ``.pt`` files are opened with ``torch.load(mmap=True,
weights_only=True)`` so that storage stays on disk until it is needed; safetensors headers
are read before the data. bfloat16 safetensors tensors are read as ``ml_dtypes.bfloat16``
(safetensors' numpy path does not know that dtype). Any parse failure is a
:class:`BadInputError` naming the file.

numpy, safetensors and ml_dtypes at import; torch only when a ``.pt`` file is read.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.pipeline import budget

#: safetensors dtype names -> numpy itemsize, for the budget (the header says the dtype).
_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_safetensors(path: str, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, each tensor's size checked before it is read."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            names = f.keys()  # safe_open is no dict: keys() is its one way to list the tensors (no __iter__)
            heads = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in names}
            budget.check_tensors(
                [(k, shape, _ITEMSIZE.get(dt, 8)) for k, (dt, shape) in heads.items()], f"{what} {path}"
            )
            tensors = {k: f.get_tensor(k) for k, (dt, _) in heads.items() if dt != "BF16"}
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises bare Exceptions for some corruptions
        raise BadInputError(f"cannot read {what} {path}: not a safetensors file ({_first_line(err)})") from None
    bf16 = [k for k, (dt, _) in heads.items() if dt == "BF16"]
    if bf16:
        tensors.update(_read_bf16(path, {k: heads[k][1] for k in bf16}))
    return {k: tensors[k] for k in heads}, metadata


def _read_bf16(path: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """bfloat16 tensors of a safetensors file whose header safetensors has already validated."""
    import ml_dtypes

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        out = {}
        for key, shape in shapes.items():
            begin, end = header[key]["data_offsets"]
            f.seek(8 + n + begin)
            out[key] = np.frombuffer(f.read(end - begin), dtype=ml_dtypes.bfloat16).reshape(shape).copy()
    return out


def _tensors_in(obj: Any, name: str = "") -> list[tuple[str, Any]]:
    """``(name, tensor)`` of every tensor in a loaded ``.pt`` object (nested dicts, lists)."""
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return [(name or "(tensor)", obj)]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in _tensors_in(v, f"{name}.{k}" if name else str(k))]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _tensors_in(v, f"{name}[{i}]")]
    return []


def read_pt(path: str, what: str, as_what: str = "a state dict") -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped, with every tensor's dense size checked.

    Raises :class:`BadInputError` naming the file (``what``: "weights file") and what it was read
    as (``as_what``) for whatever the unpickler raises.
    """
    import torch

    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(True)
        except RuntimeError as err:  # files in torch's legacy (non-zip) format cannot be mapped
            if "mmap" not in str(err):
                raise
            obj = load(False)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file makes the unpickler raise anything
        first = _first_line(err)
        if not isinstance(err, (pickle.UnpicklingError, RuntimeError)):
            first = f"{type(err).__name__}: {first}"
        raise BadInputError(f"cannot load {path} as {as_what} with torch.load(weights_only=True): {first}") from None
    budget.check_tensors([(k, tuple(t.shape), t.element_size()) for k, t in _tensors_in(obj)], f"{what} {path}")
    return obj


def read_npy(path: str, what: str) -> np.ndarray:
    """A ``.npy`` array (no pickles), its size checked from the header before it is read."""
    try:
        mapped = np.load(path, allow_pickle=False, mmap_mode="r")
    except Exception as err:  # noqa: BLE001 - numpy raises ValueError, OSError, EOFError... for corrupt headers
        raise BadInputError(f"cannot read {what} {path}: {_first_line(err)}") from None
    if not isinstance(mapped, np.ndarray):
        raise BadInputError(f"{what} {path}: not a single array")
    budget.check_tensors([("array", mapped.shape, mapped.dtype.itemsize)], f"{what} {path}")
    try:
        return np.array(mapped)
    except Exception as err:  # noqa: BLE001 - a truncated file fails here
        raise BadInputError(f"cannot read {what} {path}: {_first_line(err)}") from None
