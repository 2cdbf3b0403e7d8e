"""The backends: each runs a :class:`crosscheck.cases.Case` in its framework and returns numpy arrays.

* torch — the float32 reference and the same module in float64 (:func:`torch_outputs`);
* flax — :func:`flax_output`, through the one Flax runner (:mod:`crosscheck.flax_runner`);
* ttnn — in this interpreter (:func:`ttnn_outputs_in_process`) or in another one through a
  bundle and the worker (:func:`ttnn_outputs_elsewhere`).

Backends know their framework and nothing of verdicts: comparing is :mod:`crosscheck.compare`'s.
torch, JAX and ttnn are imported inside the functions, so importing this module needs numpy only.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from crosscheck import flax_runner
from crosscheck.cases import Case, bundle_cases
from crosscheck.errors import BadInputError

BACKENDS = ("torch", "flax", "ttnn")
DTYPES = flax_runner.DTYPES
TTNN_RUNTIMES = ("auto", "device", "host")


def torch_outputs(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 output, float64 output)`` of the torch reference on ``case``."""
    import copy

    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.array(case.x, dtype=np.float32))
        out32 = case.variant.torch_forward(case.torch_module, x, case.config).numpy()
        m64 = copy.deepcopy(case.torch_module).double()
        out64 = case.variant.torch_forward(m64, x.double(), case.config).numpy()
    return out32, out64


def flax_output(case: Case, dtype: str = "float32", attention_impl: Optional[str] = None) -> np.ndarray:
    """The jitted jaxattn module on ``case`` with float32 parameters, computing in ``dtype``.

    ``attention_impl``: the attention core for variants that take one (``None``: the module's default).
    """
    return flax_runner.run_flax(
        case.variant, case.config, case.state_dict, case.x, dtype=dtype, attention_impl=attention_impl
    )


def _ttnn_runtime_module():
    try:
        from crosscheck.tt import runtime as rt
    except ImportError as err:
        raise BadInputError(
            f"the ttnn backend is unavailable: crosscheck.tt.runtime cannot be imported ({err}); "
            "choose --backends torch,flax or --ttnn-python PATH"
        ) from None
    return rt


def ttnn_outputs_in_process(cases: Sequence[Case], runtime: str, progress: Callable[[str], None]):
    """``({variant: output}, runtime info, versions, seconds per variant)`` in this interpreter."""
    rt = _ttnn_runtime_module()
    outputs, seconds = {}, {}
    with rt.open_runtime(runtime) as opened:
        info = {"name": opened.name, "description": opened.description, "python": None}
        for case in cases:
            t0 = time.perf_counter()
            outputs[case.variant.name] = np.asarray(rt.run_variant(opened, case.variant, case.config, case.state_dict, case.x))
            seconds[case.variant.name] = time.perf_counter() - t0
            progress(f"ttnn {case.variant.name}")
    return outputs, info, dict(rt.ttnn_versions()), seconds


def check_ttnn_available(runtime: str, python: Optional[str]) -> None:
    """Fail before the slow part when the ttnn backend cannot run as asked."""
    if python is not None:
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise BadInputError(f"--ttnn-python: python interpreter not found or not executable: {python}")
        return
    rt = _ttnn_runtime_module()
    if runtime == "device":
        ok, reason = rt.detect_device()
        if not ok:
            raise BadInputError(f"ttnn runtime 'device' is not available: {reason}")


def ttnn_outputs_elsewhere(cases: Sequence[Case], runtime: str, python: str):
    """The same, through a bundle run by ``python`` (B's worker), e.g. the 3.12 venv with real ttnn."""
    from crosscheck.bundle import write_bundle
    from crosscheck.tt.worker import run_in_interpreter

    with tempfile.TemporaryDirectory(prefix="crosscheck-") as tmp:
        bundle, out = os.path.join(tmp, "bundle.safetensors"), os.path.join(tmp, "outputs.safetensors")
        write_bundle(bundle, bundle_cases(cases), meta={"purpose": "ttnn backend"})
        t0 = time.perf_counter()
        outputs, meta = run_in_interpreter(python, bundle, out, backend="ttnn", runtime=runtime)
        elapsed = time.perf_counter() - t0
    info = {"name": meta.get("runtime"), "description": meta.get("runtime_description"), "python": meta.get("python", python)}
    return outputs, info, dict(meta.get("versions", {})), {c.variant.name: elapsed / len(cases) for c in cases}


# --- versions ------------------------------------------------------------------------------------


def versions(ttnn: Optional[dict] = None) -> dict:
    """Versions of the interpreter and every framework (``None`` where absent; why, for ttnn)."""
    out: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "jax", "flax"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if ttnn is None:
        try:
            ttnn = dict(_ttnn_runtime_module().ttnn_versions())
        except BadInputError as err:
            ttnn = {"ttnn": None, "ttnn_reason": str(err)}
        except Exception as err:  # a broken ttnn install must not hide the report
            ttnn = {"ttnn": None, "ttnn_reason": f"{type(err).__name__}: {err}"}
    out["ttnn"] = ttnn.get("ttnn")
    out["ttnn_reason"] = ttnn.get("ttnn_reason")
    return out
