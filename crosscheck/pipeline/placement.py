"""Where the torch reference and JAX run, and at which float32 matmul precision: chosen once, recorded on every result.

Two choices enter from the CLI (``--torch-device``, ``--matmul-precision``) as context
(:func:`choices`), so the engine and the backends need no new argument threaded through
every check: :func:`torch_device` and :func:`matmul_precision` read them where the
work is done. :func:`describe` turns them into the words a report shows and the JSON
records (``device`` and ``precision`` on every result).

Why the precision matters: on a GPU, JAX's default float32 matmul is TF32 (10-bit
mantissa), 3.56e-4 off torch's float32 for MultiHeadAttention at d=768 (an earlier GPU report), where
the float32 bound is 1e-5. Cross-checks therefore run float32 at ``"highest"`` unless
asked otherwise; ``"default"``/``"high"`` are judged against the TF32 row of the tolerance
table (:data:`crosscheck.pipeline.compare.POLICY`). torch runs with TF32 off (its matmul default;
its cuDNN default is on, and is turned off here).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import numpy as np

from crosscheck.errors import BadInputError

TORCH_DEVICES = ("cpu", "cuda")
PRECISIONS = ("default", "high", "highest")

_TORCH_DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("torch_device", default="cpu")
_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("matmul_precision", default="highest")


def check_torch_device(name: str, flag: str = "--torch-device") -> str:
    """``name`` if torch can run there; a :class:`BadInputError` (exit 2) in one line otherwise."""
    if name not in TORCH_DEVICES:
        raise BadInputError(f"{flag} must be one of {', '.join(TORCH_DEVICES)}, got {name!r}")
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise BadInputError(f"{flag} cuda: torch {torch.__version__} ({build}) sees no CUDA device on this machine")
    return name


def check_precision(name: str, flag: str = "--matmul-precision") -> str:
    if name not in PRECISIONS:
        raise BadInputError(f"{flag} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


@contextlib.contextmanager
def choices(torch_device: str = "cpu", matmul_precision: str = "highest") -> Iterator[None]:
    """Run a cross-check with torch on ``torch_device`` and float32 JAX matmuls at ``matmul_precision``."""
    check_torch_device(torch_device)
    check_precision(matmul_precision)
    device_token, precision_token = _TORCH_DEVICE.set(torch_device), _PRECISION.set(matmul_precision)
    try:
        yield
    finally:
        _TORCH_DEVICE.reset(device_token)
        _PRECISION.reset(precision_token)


def torch_device() -> str:
    """The torch device of the reference in this context: ``"cpu"`` unless :func:`choices` says ``"cuda"``."""
    return _TORCH_DEVICE.get()


def matmul_precision(dtype: str) -> str:
    """The JAX matmul precision of a check computing in ``dtype``: the chosen one for float32 (``"highest"``
    by default); 16-bit runs keep JAX's default, their own precision."""
    return _PRECISION.get() if dtype == "float32" else "default"


#: The float dtypes a check or a bench is asked for by name. torch, JAX and numpy each spell them the same
#: (numpy's ``bfloat16`` is ml_dtypes'); the functions below look the name up in the framework when called,
#: so importing this module imports neither torch nor JAX.
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


def check_dtype(name: str, allowed: Sequence[str] = DTYPE_NAMES, what: str = "dtype") -> str:
    """``name``, or a :class:`BadInputError` naming ``what`` was given (a flag, say) and the ``allowed`` dtypes
    (a part may allow fewer than all)."""
    if name not in allowed:
        raise BadInputError(f"{what} must be one of {', '.join(allowed)}; got {name!r}")
    return name


def jax_dtype(name: str, allowed: Sequence[str] = DTYPE_NAMES):
    """``jnp.float32``, ``jnp.bfloat16``, ... for a name of ``allowed`` (else a :class:`BadInputError`)."""
    import jax.numpy as jnp

    return getattr(jnp, check_dtype(name, allowed))


def torch_dtype(name: str):
    """``torch.float32``, ``torch.bfloat16``, ... for a name of :data:`DTYPE_NAMES` (else a :class:`BadInputError`)."""
    import torch

    return getattr(torch, check_dtype(name))


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a name of :data:`DTYPE_NAMES` (``bfloat16``: ml_dtypes', as JAX's)."""
    if check_dtype(name) == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def tolerance_dtype(dtype: str) -> str:
    """The tolerance row's dtype: ``"tensorfloat32"`` for float32 below ``"highest"``, else ``dtype``.

    ``"high"`` (bf16x3 or TF32 by backend) is held to the TF32 row too: at least as precise, never looser.
    """
    return "tensorfloat32" if dtype == "float32" and matmul_precision(dtype) != "highest" else dtype


def jax_device() -> str:
    """``"cpu"``, or the platform and device kind: ``"gpu: NVIDIA H100 80GB HBM3"``."""
    import jax

    device = jax.devices()[0]
    return "cpu" if device.platform == "cpu" else f"{device.platform}: {device.device_kind}"


def torch_device_label(device: str | None = None) -> str:
    """``"cpu"``, or ``"cuda: <device name>"``."""
    device = device or torch_device()
    if device == "cpu":
        return "cpu"
    import torch

    return f"cuda: {torch.cuda.get_device_name()}"


@contextlib.contextmanager
def torch_without_tf32() -> Iterator[None]:
    """torch float32 products in float32 (TF32 off for matmuls and cuDNN), restored afterwards."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def describe(results) -> None:
    """Fill ``device`` and ``precision`` of each :class:`crosscheck.pipeline.results.Result` that has none yet.

    torch: its device, precision ``"highest"`` (TF32 off); flax: JAX's device and the matmul
    precision of its dtype; ttnn: its runtime, precision ``"bfloat16"`` (Tenstorrent math);
    a result read from an outputs file (``source``) keeps what the file said (else ``None``).
    """
    for r in results:
        if r.device is not None or r.source is not None:
            continue
        if r.backend == "torch":
            r.device, r.precision = torch_device_label(), "highest"
        elif r.backend == "flax":
            r.device, r.precision = jax_device(), matmul_precision(r.dtype)
        elif r.backend == "ttnn":
            r.device, r.precision = f"ttnn {r.runtime}", "bfloat16"
