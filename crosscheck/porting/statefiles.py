"""State dicts on disk: ``.pt``/``.pth``/``.bin`` (``weights_only=True``) or ``.safetensors``, read through
:mod:`crosscheck.porting.tensorfiles` (sizes checked before reading) and written by extension.

torch is imported only to write a ``.pt`` file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.porting import tensorfiles
from crosscheck.porting.arrays import to_numpy


def require_readable_file(path: str, what: str) -> None:
    """Raise :class:`BadInputError` unless ``path`` is an existing, readable file (``what``: "weights", "input")."""
    if not os.path.exists(path):
        raise BadInputError(f"{what} file not found: {path}")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise BadInputError(f"{what} file is not a readable file: {path}")


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``.

    Accepts a bare state dict or one nested under ``state_dict`` / ``model_state_dict``.
    Raises :class:`BadInputError` naming the file and the problem.
    """
    path = os.fspath(path)
    require_readable_file(path, "weights")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return tensorfiles.read_safetensors(path, "safetensors file")[0]
    if ext in (".pt", ".pth", ".bin"):
        return _as_state_dict(tensorfiles.read_pt(path, "weights file"), path)
    raise BadInputError(f"unsupported weights format {ext or '(none)'} for {path}: use .pt, .pth or .safetensors")


def _as_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping):
        for nested in ("state_dict", "model_state_dict"):
            if nested in obj and isinstance(obj[nested], Mapping):
                obj = obj[nested]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise BadInputError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    out = {}
    for key, value in obj.items():
        if not hasattr(value, "shape"):
            raise BadInputError(f"{path}: entry {key!r} is not a tensor ({type(value).__name__}); not a state dict")
        out[str(key)] = to_numpy(value)
    return out


def save_file(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a state dict as ``.safetensors`` or ``.pt`` (by extension)."""
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file as st_save

        st_save(arrays, path)
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
