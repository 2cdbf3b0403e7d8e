"""Tensors as numpy arrays, their shapes and dtypes, without importing torch (numpy only at import).

Both port directions speak of a tensor through these: its shape as a tuple of ints, its dtype as numpy
spells it, and whether it is floating point (the only parameters a port carries).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: A torch state dict: names to tensors (or numpy arrays).
StateDict = Mapping[str, Any]

#: The parameter dtypes both directions port (exactly): torch's and JAX's floating types.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor, JAX array or array-like as a numpy array (bfloat16 kept as ml_dtypes.bfloat16)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def to_torch(array: np.ndarray):
    """A numpy array (ml_dtypes bfloat16 included, which ``torch.from_numpy`` does not know) as a tensor."""
    import torch

    array = np.ascontiguousarray(array)
    if str(array.dtype) == "bfloat16":
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def shape_of(value: Any) -> tuple[int, ...]:
    """A tensor's or array's shape as a tuple of ints."""
    return tuple(int(d) for d in getattr(value, "shape", np.shape(value)))


def dtype_name(value: Any) -> str:
    """A tensor's or array's dtype as numpy spells it (``int32``, ``bfloat16``), without importing torch."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        dtype = np.asarray(value).dtype
    return str(dtype).removeprefix("torch.")


def not_floating(what: str, value: Any) -> str | None:
    """A problem line when ``value`` is no floating-point tensor: an integer or bool weight would be ported
    bit for bit and then computed with as if it were a weight (or fail later, far from its key)."""
    name = dtype_name(value)
    if name in FLOAT_DTYPES:
        return None
    return f"{what}: dtype {name}; expected a floating dtype ({', '.join(FLOAT_DTYPES)})"
