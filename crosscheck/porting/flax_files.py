"""The Flax parameter files ``crosscheck convert`` writes, as bytes: written, read back and recognised.

* ``.safetensors`` (written and read through ``safetensors.torch``, which holds bfloat16 and float64
  exactly, where ``safetensors.numpy`` has no bfloat16): flat keys ``params/W_query/kernel`` (Flax's
  ``flatten_dict(sep="/")``) and the metadata;
* ``.msgpack`` (``flax.serialization``): ``{"params": ..., "metadata": {...}}``.

torch, safetensors and flax are imported only by the functions that write or read a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from crosscheck.errors import BadInputError

#: The metadata ``format`` of a Flax file written here.
FORMAT = "flax"
#: The separator of the flat ``.safetensors`` keys (``params/W_query/kernel``).
SEP = "/"


def suffix_of(path: str) -> str:
    """A path's extension, lower case (``.safetensors``)."""
    return os.path.splitext(path)[1].lower()


def is_flax_file(path: str) -> bool:
    """Whether ``path`` is a Flax file: ``.msgpack``, or ``.safetensors`` whose metadata says ``format: flax``."""
    if suffix_of(path) == ".msgpack":
        return True
    if suffix_of(path) != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception as err:  # noqa: BLE001 - a corrupt file: say so, naming it
        raise BadInputError(f"cannot read safetensors file {path}: {err}") from None


def flax_bytes(dst: str, params: Mapping, meta: dict) -> bytes:
    """The bytes of a Flax file holding ``params`` and ``meta``, in the format ``dst``'s extension names."""
    if suffix_of(dst) == ".msgpack":
        from flax.serialization import msgpack_serialize

        return msgpack_serialize({"params": dict(params), "metadata": meta})
    from flax.traverse_util import flatten_dict

    return safetensors_bytes(flatten_dict({"params": params}, sep=SEP), meta)


def safetensors_bytes(arrays: Mapping[str, Any], meta: dict) -> bytes:
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


def read_flax_bytes(data: bytes, suffix: str, where: str) -> tuple[dict, dict]:
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


def write_bytes(path: str, data: bytes) -> None:
    """``data`` written to ``path`` (the temporary file of :func:`crosscheck.porting.outputs.atomic_write`)."""
    with open(path, "wb") as f:
        f.write(data)
