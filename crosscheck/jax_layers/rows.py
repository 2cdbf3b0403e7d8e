"""The rows ``--jax-layers`` adds to the forward, padding and decode checks: one per library and case.

A row runs a library's layer (an adapter of :mod:`crosscheck.jax_layers`) on the case's input with the
case's weights, in float32 at matmul precision ``"highest"`` (the adapters set it), and the check judges its
output against torch like its own rows, under the Flax float32 row of the tolerance table
(:func:`tolerance`). A failed row says how the layer was called and the first stage (query, key, value,
attention, output) where the layer leaves the float64 reference by more than that tolerance: a result about
the library, never something to tune.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.jax_layers import LAYERS, STAGES, JaxLayer, first_diverging
from crosscheck.jax_layers.weights import reference_stages, split
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline import placement
from crosscheck.pipeline.cases import Case
from crosscheck.pipeline.request import RunRequest
from crosscheck.pipeline.results import Result
from crosscheck.variants import registry

#: What every row computes in, and at which matmul precision (a float32 cross-check names and sets it).
DTYPE, PRECISION = "float32", "highest"

#: ``judge(backend, runtime, output, tolerance, seconds) -> Result``: the check's comparison of one output
#: with its torch reference (the check knows the reference and what its rows report besides the metrics).
Judge = Callable[[str, str, np.ndarray, cmp.Tolerance, float], Result]

#: ``view(stage (B, T, E)) -> array``: the positions a check compares (padding: the real tokens only).
View = Callable[[np.ndarray], np.ndarray]


def tolerance() -> cmp.Tolerance:
    """The Flax float32 row: the same math in float32, another library's kernels and summation order."""
    return cmp.policy_for("flax", DTYPE)


def chosen(request: RunRequest) -> list[JaxLayer]:
    """The libraries' layers the request names (``jaxattn`` is the flax backend's own row, not one of them)."""
    return [LAYERS[name] for name in request.jax_layers or () if name in LAYERS]


def skipped(request: RunRequest, *, decode: bool) -> dict[str, str]:
    """``{layer: why}`` of the named layers that have no row in this check (decoding: those without a cache)."""
    return {layer.name: f"no decode row: {layer.no_cache}" for layer in chosen(request) if decode and layer.no_cache}


def rows(case: Case, request: RunRequest, judge: Judge, *, decode: bool = False, view: View | None = None) -> list:
    """A row per named layer for ``case`` (decoding: per layer with a cache), judged by ``judge``."""
    layers = [layer for layer in chosen(request) if not (decode and layer.no_cache)]
    if not layers:
        return []
    if not case.variant.jax_layers:
        ports = ", ".join(v.name for v in registry.VARIANTS if v.jax_layers)
        raise BadInputError(
            f"--jax-layers needs {ports} (the layers are ported from a torch.nn.MultiheadAttention state dict); "
            f"{case.variant.name} is not one"
        )
    cfg = case.variant.resolve(case.config)
    weights = split(case.state_dict, cfg.num_heads)
    x = case.x if case.x.ndim == 3 else case.x[None]  # (B, T, E)
    mask = case.attention_mask  # (B, T), 1 = real token: the padding check's
    tol = tolerance()
    out = []
    for layer in layers:
        adapter = layer.adapter()
        t0 = time.perf_counter()
        if decode:
            stages = adapter.decode_stages(weights, x)
        else:
            stages = adapter.stages(weights, x, causal=cfg.causal, attention_mask=mask)
        output = np.asarray(stages["output"]).reshape(*case.x.shape[:-1], -1)
        row = judge(layer.name, f"{layer.distribution} {layer.version()}", output, tol, time.perf_counter() - t0)
        row.device, row.precision = placement.jax_device(), PRECISION
        row.detail = {**(row.detail or {}), "call": layer.decode_call if decode else layer.call}
        if decode:  # a cache that takes one token a call: the prompt too
            row.detail["prefill"] = "one token a call from token 0, the prompt too (the cache takes one a call)"
        if not row.passed:
            reference = reference_stages(weights, x, causal=cfg.causal, attention_mask=mask)
            explain(row, stages, reference, tol, view or (lambda a: a))
        out.append(row)
    return out


def explain(row: Result, stages: dict, reference: dict, tol: cmp.Tolerance, view: View) -> None:
    """Name, on a failed ``row``, the first stage of ``stages`` over ``tol``'s max abs bound from the float64
    ``reference`` (at the positions ``view`` keeps), and the call."""
    assert tol.max_abs is not None  # the Flax float32 row bounds the max abs error
    max_abs = tol.max_abs
    got = {name: view(np.asarray(a)) for name, a in stages.items()}
    want = {name: view(np.asarray(a)) for name, a in reference.items()}
    stage = first_diverging(got, want, lambda name, ref: max_abs * cmp.ref_scale(ref))
    assert row.detail is not None
    row.detail["first_diverging_stage"] = stage
    if stage is None:
        found = f"no stage of {', '.join(STAGES)} is over the max abs bound against float64"
    else:
        err, bound = cmp.max_abs_err(got[stage], want[stage]), max_abs * cmp.ref_scale(want[stage])
        found = f"first diverging stage: {stage} (max abs err {err:.3g} > {bound:.3g} against float64)"
    row.failures.append(f"{found}; the call: {row.detail['call']}")
