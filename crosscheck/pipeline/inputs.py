"""Inputs of a cross-check: the seed sentence, a file (.npy, .pt, .safetensors) or random values.

Whatever the source, the result is one float32 array, ``(tokens, d_in)`` or
``(batch, tokens, d_in)``. :func:`for_variant` then gives each variant the form the
book gives it: the v1/v2/simplified classes take one unbatched sentence, the causal
and multi-head classes a batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.porting.port import require_readable_file
from crosscheck.seed import INPUTS

#: Defaults of random inputs: one sentence as long as the seed sentence.
DEFAULT_BATCH, DEFAULT_TOKENS, DEFAULT_SEED = 1, 6, 0
_FILE_KEYS = ("inputs", "x", "input")


@dataclass(frozen=True)
class RandomInputs:
    """Uniform ``[0, 1)`` values (like the book's ``torch.rand``) from ``numpy.random.default_rng(seed)``."""

    batch: int | None = None
    tokens: int | None = None
    d_in: int | None = None
    seed: int | None = None


@dataclass
class Inputs:
    array: np.ndarray  # float32, (tokens, d_in) or (batch, tokens, d_in)
    source: str  # "seed", "file", "random", "array"
    description: str

    def describe(self) -> dict:
        return {"source": self.source, "description": self.description, "shape": list(self.array.shape)}


def validate_array(value: Any, what: str) -> np.ndarray:
    """``value`` as float32 ``(tokens, d_in)`` / ``(batch, tokens, d_in)``; :class:`BadInputError` otherwise."""
    from crosscheck.porting.port import to_numpy

    array = to_numpy(value)
    kind = str(array.dtype)
    if not (np.issubdtype(array.dtype, np.floating) or kind == "bfloat16"):
        raise BadInputError(f"{what}: dtype {kind} is not a floating dtype (float16/bfloat16/float32/float64)")
    if array.ndim not in (2, 3):
        raise BadInputError(f"{what}: expected shape (tokens, d_in) or (batch, tokens, d_in), got {tuple(array.shape)}")
    if 0 in array.shape:
        raise BadInputError(f"{what}: empty input of shape {tuple(array.shape)}")
    array = np.ascontiguousarray(array.astype(np.float32))
    if not np.isfinite(array).all():
        raise BadInputError(f"{what}: contains NaN or infinite values")
    return array


def _pick(obj: Any, path: str) -> Any:
    """A tensor from a file that holds either one tensor or a mapping with one (or an ``inputs``/``x`` key)."""
    if hasattr(obj, "shape"):
        return obj
    if isinstance(obj, dict):
        for key in _FILE_KEYS:
            if key in obj:
                return obj[key]
        if len(obj) == 1:
            return next(iter(obj.values()))
        raise BadInputError(
            f"{path}: holds {len(obj)} tensors {sorted(obj)[:6]}; store one, or name it one of {', '.join(_FILE_KEYS)}"
        )
    raise BadInputError(f"{path}: does not hold a tensor ({type(obj).__name__})")


def load_input(path: str | os.PathLike) -> np.ndarray:
    """The input array stored in ``path`` (``.npy``, ``.pt``/``.pth``, ``.safetensors``), validated."""
    path = os.fspath(path)
    require_readable_file(path, "input")
    ext = os.path.splitext(path)[1].lower()
    from crosscheck.porting import tensorfiles

    obj: Any  # an array, or a mapping of them to pick one from
    if ext == ".npy":
        obj = tensorfiles.read_npy(path, "input file")
    elif ext in (".pt", ".pth"):
        obj = tensorfiles.read_pt(path, "input file", "an input")
    elif ext == ".safetensors":
        obj = tensorfiles.read_safetensors(path, "input file")[0]
    else:
        raise BadInputError(f"unsupported input format {ext or '(none)'} for {path}: use .npy, .pt or .safetensors")
    return validate_array(_pick(obj, path), f"input {path}")


def random_inputs(spec: RandomInputs, d_in_hint: int | None = None) -> Inputs:
    batch = DEFAULT_BATCH if spec.batch is None else spec.batch
    tokens = DEFAULT_TOKENS if spec.tokens is None else spec.tokens
    d_in = spec.d_in or d_in_hint or INPUTS.shape[1]
    seed = DEFAULT_SEED if spec.seed is None else spec.seed
    for name, value in (("batch", batch), ("tokens", tokens), ("d_in", d_in)):
        if value < 1:
            raise BadInputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if seed < 0:
        raise BadInputError(f"--seed must be >= 0, got {seed}")
    from crosscheck.pipeline import budget

    # Before the draw: --batch 1000000000 would otherwise allocate 72 GB here.
    budget.current().check(
        budget.nbytes((batch, tokens, d_in), 4) * 4,
        f"random inputs (batch {batch} x tokens {tokens} x d_in {d_in})",
        "lower --batch/--tokens/--d-in",
    )
    array = np.random.default_rng(seed).random((batch, tokens, d_in), dtype=np.float32)
    return Inputs(array, "random", f"uniform [0, 1) {array.shape}, numpy default_rng({seed})")


def resolve_inputs(
    inputs: str | os.PathLike | np.ndarray | RandomInputs | None, d_in_hint: int | None = None
) -> Inputs:
    """The input of a run: the seed sentence (``None``; random values when the weights want another d_in)."""
    if inputs is None:
        if d_in_hint in (None, INPUTS.shape[1]):
            return Inputs(INPUTS.copy(), "seed", '"Your journey starts with one step" (6, 3), the book\'s inputs')
        return random_inputs(RandomInputs(), d_in_hint)
    if isinstance(inputs, RandomInputs):
        return random_inputs(inputs, d_in_hint)
    if isinstance(inputs, (str, os.PathLike)):
        array = load_input(inputs)
        return Inputs(array, "file", f"{os.fspath(inputs)} {tuple(array.shape)}")
    array = validate_array(inputs, "inputs")
    return Inputs(array, "array", f"array {tuple(array.shape)}")


def for_variant(variant, x: np.ndarray) -> np.ndarray:
    """``x`` in the form the book feeds ``variant``: a batch of one for the batched classes,
    the bare sentence for the unbatched ones (a batch of one is unwrapped for them)."""
    if x.ndim == 2 and not variant.unbatched:
        return x[None]
    if x.ndim == 3 and variant.unbatched and x.shape[0] == 1:
        return x[0]
    return x
