"""Run a bundle through one backend, possibly in another interpreter.

    python -m crosscheck.tt.worker BUNDLE OUT [--backend ttnn|flax] [--ttnn-runtime auto|device|host]

The real ``ttnn`` wheel wants CPython 3.10-3.12 with numpy<2, which need not be the
interpreter that has torch. The engine writes a bundle (:mod:`crosscheck.porting.bundle`), runs
this module with the other interpreter (:func:`run_in_interpreter`) and reads the
outputs back. ``--backend ttnn`` goes through :func:`crosscheck.tt.runtime.run_variant`
(a real device when one is found, else the host model); ``--backend flax`` ports the
state dict and runs the jitted jaxattn module through the engine's own Flax runner
(:func:`crosscheck.pipeline.flax_runner.run_flax`), so it needs JAX and Flax only.

A case's ``attention_mask`` goes to both backends. A bundle whose meta has
``decode_prompt_len`` is decoded through the KV cache instead
(:func:`crosscheck.tt.runtime.run_variant_decode`, :func:`crosscheck.pipeline.flax_runner.run_flax_decode`);
every case must then be a variant that decodes, and the outputs' meta echoes the prompt length.

Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

from crosscheck import extra
from crosscheck.errors import BadInputError
from crosscheck.porting import bundle as bd
from crosscheck.porting.outputs import check_output_path

BACKENDS = ("ttnn", "flax")
RUNTIMES = ("auto", "device", "host")


def _variant(name: str):
    from crosscheck.variants import registry

    try:
        return registry.get(name)
    except KeyError as err:
        raise BadInputError(str(err.args[0])) from None


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise BadInputError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")


# --- backends --------------------------------------------------------------------------------------


def _masked(case: bd.BundleCase) -> dict:
    """The ``attention_mask`` keyword for a case that has one (none otherwise: older runners lack it)."""
    return {} if case.attention_mask is None else {"attention_mask": np.asarray(case.attention_mask, dtype=bool)}


def _run_flax(
    cases: list[bd.BundleCase], attention_impl: str | None = None, prompt_len: int | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """The engine's own Flax runner (:func:`crosscheck.pipeline.flax_runner.run_flax`) on every case, in float32."""
    import flax
    import jax
    import jaxlib

    from crosscheck.pipeline import flax_runner, placement

    flax_runner.check_attention_impl(attention_impl)
    outputs = {}
    for case in cases:
        args = (_variant(case.variant), case.config, case.state_dict, case.inputs)
        if prompt_len is None:
            outputs[case.variant] = flax_runner.run_flax(*args, attention_impl=attention_impl, **_masked(case))
        else:
            outputs[case.variant] = flax_runner.run_flax_decode(
                *args, prompt_len, attention_impl=attention_impl, **_masked(case)
            )[0]
    meta = {
        "backend": "flax",
        "runtime": "jax",
        "runtime_description": f"JAX {jax.__version__} on {jax.default_backend()}",
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__},
        # Where and how it ran, for the results `bundle compare` makes of these outputs (crosscheck.pipeline.placement).
        "device": placement.jax_device(),
        "precision": flax_runner.matmul_precision("float32"),
    }
    if attention_impl is not None:
        meta["attention_impl"] = attention_impl
    return outputs, meta


def _run_ttnn(
    cases: list[bd.BundleCase], runtime: str, prompt_len: int | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    from crosscheck.tt import runtime as rt

    outputs = {}
    with rt.open_runtime(runtime) as opened:
        for case in cases:
            variant = _variant(case.variant)
            x = np.asarray(case.inputs, dtype=np.float32)
            if prompt_len is None:
                out = rt.run_variant(opened, variant, case.config, case.state_dict, x, case.attention_mask)
            else:
                out = rt.run_variant_decode(
                    opened, variant, case.config, case.state_dict, x, prompt_len, case.attention_mask
                )
            outputs[case.variant] = np.asarray(out)
        meta = {
            "backend": "ttnn",
            "runtime": opened.name,
            "runtime_description": opened.description,
            "versions": dict(rt.ttnn_versions()),
        }
    return outputs, meta


def run_cases(
    cases: list[bd.BundleCase],
    backend: str = "ttnn",
    runtime: str = "auto",
    attention_impl: str | None = None,
    prompt_len: int | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """``({variant: context_vec}, meta)`` of ``cases`` on ``backend``.

    ``attention_impl``: the Flax modules' attention core (``None``: their default); ttnn ignores it.
    ``prompt_len``: decode through the KV cache, prefilling that many tokens (``None``: full forward).
    """
    _check_choice(backend, BACKENDS, "backend")
    _check_choice(runtime, RUNTIMES, "ttnn runtime")
    prompt_len = bd.check_decode_prompt_len(prompt_len, "prompt_len")
    if prompt_len is not None:
        from crosscheck.tt.runtime import has_decode

        cannot = [c.variant for c in cases if not has_decode(_variant(c.variant), c.config)]
        if cannot:
            raise BadInputError(f"decode_prompt_len is set but these cases do not decode (not causal): {cannot}")
    if backend == "flax":
        outputs, meta = _run_flax(cases, attention_impl, prompt_len)
    else:
        outputs, meta = _run_ttnn(cases, runtime, prompt_len)
    if prompt_len is not None:
        meta[bd.DECODE_PROMPT_LEN] = prompt_len
    meta["versions"] = {
        **meta["versions"],
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    meta["python"] = sys.executable
    return outputs, meta


def run_bundle(bundle_path, out_path, backend: str = "ttnn", runtime: str = "auto") -> dict:
    """Run every case of ``bundle_path`` on ``backend`` in this interpreter; write ``out_path``; return meta.

    The Flax backend runs the attention core the bundle was exported with (its meta's ``attention_impl``);
    a meta ``decode_prompt_len`` makes both backends decode through the KV cache. ``out_path`` is
    checked before any work (:func:`crosscheck.porting.outputs.check_output_path`): never the bundle itself.
    """
    _check_choice(backend, BACKENDS, "backend")
    _check_choice(runtime, RUNTIMES, "ttnn runtime")
    check_output_path(out_path, "OUT", [("BUNDLE", bundle_path)], "outputs file")
    cases = bd.read_bundle(bundle_path)
    bundle_meta = bd.read_bundle_meta(bundle_path)
    outputs, meta = run_cases(
        cases, backend, runtime, bundle_meta.get("attention_impl"), bundle_meta.get(bd.DECODE_PROMPT_LEN)
    )
    bd.write_outputs(out_path, outputs, meta)
    return meta


# --- another interpreter ---------------------------------------------------------------------------


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_in_interpreter(
    python: str,
    bundle_path,
    out_path,
    backend: str = "ttnn",
    runtime: str = "auto",
    timeout: float = 600,
) -> tuple[dict[str, np.ndarray], dict]:
    """Run the worker with the interpreter ``python`` and return ``(outputs, meta)``.

    This checkout goes first on the child's ``PYTHONPATH``, so the other interpreter needs only
    its own packages (numpy, safetensors and ttnn or JAX+Flax), not an install of this project.
    Raises :class:`BadInputError` for a missing interpreter, a timeout, or a failed run (carrying
    the worker's last stderr line).
    """
    _check_choice(backend, BACKENDS, "backend")
    _check_choice(runtime, RUNTIMES, "ttnn runtime")
    python = os.fspath(python)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise BadInputError(f"python interpreter not found or not executable: {python}")
    bundle_path, out_path = os.path.abspath(os.fspath(bundle_path)), os.path.abspath(os.fspath(out_path))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(), env.get("PYTHONPATH")) if p)
    env[extra.WORKER_ENV] = "1"  # the worker's interpreter has no torch by design
    cmd = [python, "-m", "crosscheck.tt.worker", bundle_path, out_path, "--backend", backend, "--ttnn-runtime", runtime]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BadInputError(f"worker ({python}) did not finish within {timeout:g} s") from None
    except OSError as err:
        raise BadInputError(f"cannot start python interpreter {python}: {err.strerror or err}") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"no stderr output, exit status {proc.returncode}"
        raise BadInputError(f"worker ({python}, backend {backend}) failed with exit {proc.returncode}: {last}")
    return bd.read_outputs(out_path)


# --- CLI -------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crosscheck.tt.worker",
        description="Run every case of a crosscheck bundle through one backend and write the outputs file.",
    )
    p.add_argument("bundle", help="bundle file (.safetensors) written by crosscheck")
    p.add_argument("out", help="outputs file to write (.safetensors)")
    p.add_argument("--backend", default="ttnn", choices=BACKENDS, help="ttnn (device or host model) or flax")
    p.add_argument(
        "--ttnn-runtime",
        default="auto",
        choices=RUNTIMES,
        help="auto: a Tenstorrent device when one is found, else the host model",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        meta = run_bundle(args.bundle, args.out, args.backend, args.ttnn_runtime)
    except BadInputError as err:
        # One line, so that run_in_interpreter can carry it (port errors list one problem a line).
        print("error: " + "; ".join(line.strip() for line in str(err).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"error: backend {args.backend} is not usable in {sys.executable}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({meta['backend']}, {meta['runtime']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
