"""The forward check: each case's output on every backend against the torch float32 reference.

Rows per variant: ``torch`` is the float32 reference against the same module in float64 (how far
the reference is from exact arithmetic, the scale every other bound is judged on); ``flax`` (and
``flax-nnx`` with ``--api nnx|both``) computes in the asked dtype; ``ttnn`` in bfloat16; with
``--jax-layers``, a row per other JAX library's layer (:mod:`crosscheck.jax_layers.rows`, float32). Every
backend runs in inference mode, where dropout is the identity.

:func:`run_rows` takes the Flax rows of a case as a function, so that
:mod:`crosscheck.checks.sharding_check` runs the same check with the Flax module split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.jax_layers import rows as jax_rows
from crosscheck.pipeline import backends, flax_runner, placement
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline.cases import Case
from crosscheck.pipeline.progress import Progress, Steps
from crosscheck.pipeline.request import FLAX_API_BACKENDS, RunRequest
from crosscheck.pipeline.results import CheckOutcome, Result, result_of

#: ``flax_rows(case, request, api, torch float32 output)`` -> the Flax rows of ``case`` in Flax API ``api``.
FlaxRows = Callable[[Case, RunRequest, str, np.ndarray], list[Result]]


def run(cases: Sequence[Case], request: RunRequest, progress: Progress | None) -> CheckOutcome:
    """The forward check of ``cases`` on the request's backends."""
    return run_rows(cases, request, progress, flax_rows)


def flax_rows(case: Case, request: RunRequest, api: str, ref: np.ndarray) -> list[Result]:
    """The Flax row of ``case`` in Flax API ``api`` (``"linen"`` or ``"nnx"``), against ``ref``."""
    t0 = time.perf_counter()
    out = backends.flax_output(case, request.dtype, request.attention_impl, api=api)
    return [flax_result(case, request, FLAX_API_BACKENDS[api], out, ref, time.perf_counter() - t0)]


def flax_result(
    case: Case, request: RunRequest, backend: str, out: np.ndarray, ref: np.ndarray, seconds: float
) -> Result:
    """A Flax output against the torch float32 reference, under the tolerance of the request's dtype."""
    dtype, name = request.dtype, case.variant.name
    tol = cmp.policy_for("flax", placement.tolerance_dtype(dtype))  # TF32's row below "highest"
    result = result_of(name, backend, flax_runner.platform(), dtype, "torch float32", out, ref, tol, seconds)
    if case.variant.takes_attention_impl:
        result.attention_impl = request.attention_impl or flax_runner.AUTO
    if backend != "flax":  # placement.describe knows the "flax" row; the NNX row runs on the same JAX
        result.device, result.precision = placement.jax_device(), placement.matmul_precision(dtype)
    return result


def run_rows(
    cases: Sequence[Case], request: RunRequest, progress: Progress | None, flax_rows: FlaxRows
) -> CheckOutcome:
    """The forward check with the Flax rows of each case from ``flax_rows``."""
    chosen = request.run_backends
    apis = request.flax_apis if "flax" in chosen else ()
    per_case = len(chosen) + ("flax" in chosen) * (len(request.flax_apis) - 1) + len(jax_rows.chosen(request))
    steps = Steps(len(cases) * per_case, progress)
    by_variant: dict[str, list[Result]] = {c.variant.name: [] for c in cases}
    refs: dict[str, np.ndarray] = {}
    for case in cases:
        name = case.variant.name
        t0 = time.perf_counter()
        out32, out64 = backends.torch_outputs(case)
        refs[name] = out32
        if "torch" in chosen:
            by_variant[name].append(torch_row(name, out32, out64, time.perf_counter() - t0))
            steps.step(f"torch {name}")
        for api in apis:  # a row per Flax API (--api)
            by_variant[name] += flax_rows(case, request, api, out32)
            steps.step(f"{FLAX_API_BACKENDS[api]} {name}")
        for row in jax_rows.rows(case, request, _versus(name, "torch float32", out32)):  # --jax-layers
            by_variant[name].append(row)
            steps.step(f"{row.backend} {name}")
    outcome = CheckOutcome([])
    if "ttnn" in chosen:
        on_ttnn = [c for c in cases if not c.variant.no_ttnn]  # a registered plugin may have no ttnn program
        if on_ttnn:
            outcome.ttnn_runtime, outcome.ttnn_versions = ttnn_rows(on_ttnn, request, refs, by_variant, steps.step)
        why = [c.variant.no_ttnn for c in cases if c.variant.no_ttnn]
        if why:  # left out, with the reason in the report's header and its JSON mode
            skipped = {**(outcome.mode or {}).get("skipped_backends", {}), "ttnn": "not run: " + "; ".join(why)}
            outcome.mode = {**(outcome.mode or {"check": "forward"}), "skipped_backends": skipped}
    outcome.results = [r for c in cases for r in by_variant[c.variant.name]]
    return outcome


def _versus(name: str, reference: str, ref: np.ndarray) -> jax_rows.Judge:
    """A float32 row of another JAX library's layer against ``ref``."""

    def judge(backend: str, runtime: str, out: np.ndarray, tol: cmp.Tolerance, seconds: float) -> Result:
        return result_of(name, backend, runtime, jax_rows.DTYPE, reference, out, ref, tol, seconds)

    return judge


def torch_row(name: str, out32: np.ndarray, out64: np.ndarray, seconds: float) -> Result:
    """The torch float32 reference against the same module in float64."""
    tol = cmp.policy_for("torch", "float32")
    return result_of(name, "torch", placement.torch_device(), "float32", "torch float64", out32, out64, tol, seconds)


def ttnn_rows(
    cases: Sequence[Case],
    request: RunRequest,
    refs: dict[str, np.ndarray],
    by_variant: dict[str, list[Result]],
    step: Callable[[str], None],
) -> tuple[dict, dict]:
    """Append each case's ttnn row (bfloat16, against ``refs``); ``(runtime info, ttnn versions)``."""
    outs, info, versions, secs = backends.ttnn_outputs(cases, request.ttnn_runtime, request.ttnn_python, progress=step)
    for case in cases:
        name = case.variant.name
        tol = cmp.policy_for("ttnn", "bfloat16", name)
        if name not in outs:
            raise BadInputError(f"the ttnn backend returned no output for {name}")
        by_variant[name].append(
            result_of(
                name, "ttnn", info["name"], "bfloat16", "torch float32", outs[name], refs[name], tol, secs.get(name)
            )
        )
    return info, versions
