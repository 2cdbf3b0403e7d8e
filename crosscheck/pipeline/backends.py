"""The backends: each runs a :class:`crosscheck.pipeline.cases.Case` in its framework and returns numpy arrays.

* torch — the float32 reference and the same module in float64 (:func:`torch_outputs`);
* flax — :func:`flax_output`, through the one Flax runner (:mod:`crosscheck.pipeline.flax_runner`);
* ttnn — in this interpreter (:func:`ttnn_outputs_in_process`) or in another one through a
  bundle and the worker (:func:`ttnn_outputs_elsewhere`).

Backends know their framework and nothing of verdicts: comparing is :mod:`crosscheck.pipeline.compare`'s.
torch, JAX and ttnn are imported inside the functions, so importing this module needs numpy only.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.pipeline import flax_runner
from crosscheck.pipeline.cases import Case, bundle_cases

BACKENDS = ("torch", "flax", "ttnn")
DTYPES = flax_runner.DTYPES
TTNN_RUNTIMES = ("auto", "device", "host")


def _torch_mask(case: Case):
    import torch

    return None if case.attention_mask is None else torch.from_numpy(np.asarray(case.attention_mask, dtype=bool))


def _torch_forward(case: Case, module, x) -> np.ndarray:
    """``module`` on ``x`` on the reference's device (:func:`crosscheck.pipeline.placement.torch_device`), TF32 off."""
    import copy

    import torch

    from crosscheck.pipeline import placement

    device = placement.torch_device()
    mask = _torch_mask(case)
    if device != "cpu":  # a copy: the case's module stays where the other checks expect it
        module, x = copy.deepcopy(module).to(device), x.to(device)
        mask = None if mask is None else mask.to(device)
    with torch.no_grad(), placement.torch_without_tf32():
        return case.variant.torch_forward(module, x, case.config, mask).cpu().numpy()


def torch_output(case: Case) -> np.ndarray:
    """The float32 output of the torch reference on ``case`` (with its ``attention_mask``)."""
    import torch

    return _torch_forward(case, case.torch_module, torch.from_numpy(np.array(case.x, dtype=np.float32)))


def torch_outputs(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 output, float64 output)`` of the torch reference on ``case`` (with its ``attention_mask``)."""
    import copy

    import torch

    m64 = copy.deepcopy(case.torch_module).double()
    out64 = _torch_forward(case, m64, torch.from_numpy(np.array(case.x, dtype=np.float64)))
    return torch_output(case), out64


def torch_decode_output(case: Case, prompt_len: int) -> np.ndarray:
    """The torch reference with a KV cache (the book's ``kv_cache`` API) on ``case``, float32.

    ``x[:, :prompt_len]`` first, then one token at a time, each call given the cache the
    previous one returned and ``start_pos``; returns the chunks' outputs concatenated along
    the tokens. ``attention_mask``, as in Hugging Face, covers every token so far.
    """
    import torch

    module = case.variant.torch_cached_module(case.config)
    module.load_state_dict(case.torch_module.state_dict(), strict=True)
    module.eval()
    x = torch.from_numpy(np.array(case.x, dtype=np.float32))
    mask = _torch_mask(case)
    bounds = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, x.shape[1])]
    outs, cache = [], None
    with torch.no_grad():
        for start, stop in bounds:
            out, cache = module(
                x[:, start:stop],
                use_cache=True,
                start_pos=start,
                cache=cache,
                attention_mask=None if mask is None else mask[:, :stop],
            )
            outs.append(out)
    return torch.cat(outs, dim=1).numpy()


def flax_output(
    case: Case, dtype: str = "float32", attention_impl: str | None = None, api: str = "linen"
) -> np.ndarray:
    """The jitted jaxattn module on ``case`` with float32 parameters, computing in ``dtype``.

    ``attention_impl``: the attention core for variants that take one (``None``: the module's default).
    ``api``: ``"linen"`` or ``"nnx"`` (the :mod:`jaxattn.nnx` twin, same weights).
    """
    return flax_runner.run_flax(
        case.variant,
        case.config,
        case.state_dict,
        case.x,
        dtype=dtype,
        attention_impl=attention_impl,
        attention_mask=case.attention_mask,
        api=api,
    )


def flax_decode_output(
    case: Case, prompt_len: int, dtype: str = "float32", attention_impl: str | None = None
) -> tuple[np.ndarray, int]:
    """``(outputs, compilations)`` of the jaxattn module decoding ``case`` (:func:`flax_runner.run_flax_decode`)."""
    return flax_runner.run_flax_decode(
        case.variant,
        case.config,
        case.state_dict,
        case.x,
        prompt_len,
        dtype=dtype,
        attention_impl=attention_impl,
        attention_mask=case.attention_mask,
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


def ttnn_outputs_in_process(
    cases: Sequence[Case], runtime: str, progress: Callable[[str], None], *, prompt_len: int | None = None
):
    """``({variant: output}, runtime info, versions, seconds per variant)`` in this interpreter.

    Each case's ``attention_mask`` goes to the program; ``prompt_len`` decodes through the
    ttnn KV cache instead of the full forward (:func:`crosscheck.tt.runtime.run_variant_decode`).
    """
    rt = _ttnn_runtime_module()
    outputs, seconds = {}, {}
    with rt.open_runtime(runtime) as opened:
        info = {"name": opened.name, "description": opened.description, "python": None}
        for case in cases:
            t0 = time.perf_counter()
            mask = getattr(case, "attention_mask", None)
            if prompt_len is None:
                out = rt.run_variant(opened, case.variant, case.config, case.state_dict, case.x, mask)
            else:
                out = rt.run_variant_decode(
                    opened, case.variant, case.config, case.state_dict, case.x, prompt_len, mask
                )
            outputs[case.variant.name] = np.asarray(out)
            seconds[case.variant.name] = time.perf_counter() - t0
            progress(f"ttnn {case.variant.name}")
    return outputs, info, dict(rt.ttnn_versions()), seconds


def check_ttnn_available(runtime: str, python: str | None) -> None:
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


def ttnn_outputs_elsewhere(cases: Sequence[Case], runtime: str, python: str, *, prompt_len: int | None = None):
    """The same, through a bundle run by ``python`` (B's worker), e.g. the 3.12 venv with real ttnn.

    The bundle carries each case's ``attention_mask`` and ``prompt_len`` (meta ``decode_prompt_len``).
    """
    from crosscheck.porting.bundle import DECODE_PROMPT_LEN, write_bundle
    from crosscheck.tt.worker import run_in_interpreter

    records = bundle_cases(cases)
    for record, case in zip(records, cases, strict=True):
        if getattr(record, "attention_mask", None) is None:
            record.attention_mask = getattr(case, "attention_mask", None)
    with tempfile.TemporaryDirectory(prefix="crosscheck-") as tmp:
        bundle, out = os.path.join(tmp, "bundle.safetensors"), os.path.join(tmp, "outputs.safetensors")
        write_bundle(bundle, records, meta={"purpose": "ttnn backend"}, decode_prompt_len=prompt_len)
        t0 = time.perf_counter()
        outputs, meta = run_in_interpreter(python, bundle, out, backend="ttnn", runtime=runtime)
        elapsed = time.perf_counter() - t0
    if meta.get(DECODE_PROMPT_LEN) != prompt_len:
        raise BadInputError(
            f"the ttnn worker ({python}) ran with decode_prompt_len={meta.get(DECODE_PROMPT_LEN)!r}, "
            f"asked {prompt_len!r}: is it an older crosscheck?"
        )
    info = {
        "name": meta.get("runtime"),
        "description": meta.get("runtime_description"),
        "python": meta.get("python", python),
    }
    return outputs, info, dict(meta.get("versions", {})), {c.variant.name: elapsed / len(cases) for c in cases}


def ttnn_outputs(
    cases: Sequence[Case],
    runtime: str,
    python: str | None,
    *,
    prompt_len: int | None = None,
    progress: Callable[[str], None] | None = None,
):
    """:func:`ttnn_outputs_in_process`, or :func:`ttnn_outputs_elsewhere` with ``python``; ``progress`` per case."""
    progress = progress or (lambda _: None)
    if python is None:
        return ttnn_outputs_in_process(cases, runtime, progress, prompt_len=prompt_len)
    found = ttnn_outputs_elsewhere(cases, runtime, python, prompt_len=prompt_len)
    for case in cases:
        progress(f"ttnn {case.variant.name}")
    return found


# --- versions ------------------------------------------------------------------------------------


def versions(ttnn: dict | None = None) -> dict:
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
        except Exception as err:  # noqa: BLE001 - a broken ttnn install must not hide the report
            ttnn = {"ttnn": None, "ttnn_reason": f"{type(err).__name__}: {err}"}
    out["ttnn"] = ttnn.get("ttnn")
    out["ttnn_reason"] = ttnn.get("ttnn_reason")
    out["jax_backend"] = _jax_backend()
    return out


def _jax_backend() -> str | None:
    """JAX's platform and device (``"gpu: NVIDIA H100 80GB HBM3"``, ``"cpu"``), ``None`` without JAX."""
    try:
        from crosscheck.pipeline import placement

        return placement.jax_device()
    except ImportError:
        return None
