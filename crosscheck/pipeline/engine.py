"""The cross-check as a Python API: the same weights and inputs through torch, Flax and ttnn.

    from crosscheck.pipeline import engine
    report = engine.run()                       # the seed sentence, every variant, every backend
    report = engine.run(["MultiHeadAttention"], weights="mha.pt", inputs="x.npy", backends=("torch", "flax"))
    assert report.passed, report.failing_variants
    report = engine.run(RunRequest(("CausalAttention",), decode=3))   # or a request, validated when built

Every backend is compared with the torch float32 reference (the book's classes run in
``eval()`` mode), using :mod:`crosscheck.pipeline.compare`. The ``torch`` row itself is that
float32 reference against the same module run in float64: it shows how far the
reference is from exact arithmetic, the scale every other bound is judged on.

Dropout: every backend runs in inference mode (torch ``eval()``, Flax
``deterministic=True``), where dropout is the identity; a ``dropout`` rate is carried
in the config only. Two frameworks' dropout streams could never be compared anyway.

Errors: :class:`BadInputError` for anything the user gave that cannot be used (exit 2
in the CLI); a failed verdict is a :class:`Result` with ``passed=False`` (exit 1).

This module only orchestrates: the options are validated once in :class:`RunRequest`
(:mod:`crosscheck.pipeline.request`), cases are built and validated in :mod:`crosscheck.pipeline.cases`,
and the check the request asks (:func:`crosscheck.checks.select`: forward, decode, padding, training,
sharding) runs them on :mod:`crosscheck.pipeline.backends`, judged by :mod:`crosscheck.pipeline.compare`;
its :class:`~crosscheck.pipeline.results.CheckOutcome` becomes the :class:`Report`. The names users and tests
reach through ``engine.`` (``Report``, ``RunRequest``, ``build_cases``, ``flax_output``, ``BACKENDS``, ``port`` ...)
are re-exported here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from crosscheck import checks
from crosscheck.errors import BadInputError
from crosscheck.pipeline import budget, flax_runner, placement
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline.backends import (
    BACKENDS,
    DTYPES,
    TTNN_RUNTIMES,
    check_ttnn_available,
    flax_output,
    torch_output,
    torch_outputs,
    ttnn_outputs_elsewhere,
    ttnn_outputs_in_process,
    versions,
)
from crosscheck.pipeline.cases import (
    OVERRIDABLE,
    TORCH_SEED,
    Case,
    build_cases,
    bundle_cases,
    cases_from_bundle,
    match_variants,
    resolve_config,
    select_variants,
)
from crosscheck.pipeline.inputs import Inputs
from crosscheck.pipeline.progress import Progress
from crosscheck.pipeline.request import APIS, FLAX_API_BACKENDS, RunRequest, check_attention_impl
from crosscheck.pipeline.results import CheckOutcome, Report, Result, result_of
from crosscheck.porting import port
from crosscheck.variants import registry

#: The public API, including the names re-exported from cases, backends, request and results.
__all__ = [
    "APIS",
    "BACKENDS",
    "DTYPES",
    "FLAX_API_BACKENDS",
    "OVERRIDABLE",
    "TORCH_SEED",
    "TTNN_RUNTIMES",
    "Case",
    "Progress",
    "Report",
    "Result",
    "RunRequest",
    "build_cases",
    "bundle_cases",
    "check_attention_impl",
    "compare_outputs",
    "export_bundle",
    "flax_output",
    "match_variants",
    "port",
    "registry",
    "resolve_config",
    "run",
    "select_variants",
    "torch_outputs",
    "ttnn_outputs_elsewhere",
    "ttnn_outputs_in_process",
    "versions",
]


# --- run -----------------------------------------------------------------------------------------


def run(
    request: RunRequest | Iterable[str] | None = None, /, *, progress: Progress | None = None, **options: Any
) -> Report:
    """Run the cross-check ``request`` asks and return its :class:`Report` (never raises on a mismatch).

    ``request``: a :class:`RunRequest`, or the variants of one built from ``options``
    (:meth:`RunRequest.create`: its fields, and the config fields ``d_in=``, ``num_heads=`` ...).
    ``variants``: jaxattn class names (case-insensitive); all when ``None``. With ``weights`` and
    no ``variants``, the variants whose keys and shapes the state dict fits. ``inputs``: ``None``
    (the seed sentence), a path, an array or :class:`crosscheck.pipeline.inputs.RandomInputs`.
    ``dtype`` is what Flax computes in; torch is always the float32 reference and ttnn computes in
    bfloat16. ``attention_impl``: the attention core of the Flax modules that take one (``None``:
    their default, "auto").

    The request chooses the check (:func:`crosscheck.checks.select`): the forward check by default;
    ``decode=P`` prefills ``P`` tokens and decodes the rest one at a time in every backend
    (:mod:`crosscheck.checks.decode_check`; without ``variants``, the variants that decode);
    ``padding="left"|"right"`` with ``pad_lengths`` runs a padded batch and compares it at the real
    tokens with the sequences run one by one (:mod:`crosscheck.checks.padding_check`).

    ``train=True``: torch and Flax in training mode on identical dropout masks
    (:mod:`crosscheck.checks.train_check`; ``dropout`` defaults to 0.1). ``grad=True``: gradients of
    ``sum(output * R)`` for the input and every parameter, per torch parameter name
    (:mod:`crosscheck.checks.grad_check`; in training mode with ``train``). ``train_seed`` (default 0)
    draws the masks and ``R``. Both compare torch with Flax in float32: ttnn in ``backends`` is
    skipped, with the reason in ``report.mode["skipped_backends"]``.

    ``devices=N, shard=MODE``: the Flax rows run split over N devices, plus a ``"flax 1 device"`` row
    (:mod:`crosscheck.checks.sharding_check`).

    ``api``: the Flax modules to run: ``"linen"`` (rows ``flax``), ``"nnx"`` (the :mod:`jaxattn.nnx`
    twins, rows ``flax-nnx``) or ``"both"``; NNX in the forward check only.

    ``jax_layers``: other JAX libraries' attention layers (``"flax.linen,flax.nnx,equinox"``; ``jaxattn`` is the
    ``flax`` row) ported from ``TorchMultiheadAttention``'s weights, a row each in the forward, padding and decode
    checks (:mod:`crosscheck.jax_layers`).

    ``prefix``: the layer of a whole model's ``weights`` to check (``model.layers.0.self_attn.``);
    ``model_config``: a transformers ``config.json`` (heads, kv heads, head_dim, RoPE), whose
    values the flags must not contradict.

    ``max_memory`` (bytes or ``"8G"``; default: :mod:`crosscheck.pipeline.budget`'s fraction of physical
    memory): a run whose estimated memory exceeds it is refused before anything is allocated.
    """
    if not isinstance(request, RunRequest):
        request = RunRequest.create(request, **options)
    elif options:
        raise TypeError(f"run(request): the request holds the options; got {', '.join(options)} besides")
    with budget.limited(request.max_memory):
        t_start = time.perf_counter()
        if "ttnn" in request.run_backends:
            check_ttnn_available(request.ttnn_runtime, request.ttnn_python)
        cases, data, weights_desc = build_cases(
            request.variants,
            weights=request.weights,
            inputs=request.inputs,
            overrides=request.config_overrides,
            prefix=request.prefix,
            model_config=request.model_config,
        )
        outcome = checks.select(request).run(cases, request, progress)
        return _report(outcome, cases, data, weights_desc, request, t_start)


def _report(
    outcome: CheckOutcome, cases: Sequence[Case], data: Inputs, weights_desc: str, request: RunRequest, t_start: float
) -> Report:
    """The :class:`Report` of a check's ``outcome`` on ``cases``."""
    placement.describe(outcome.results)  # device and precision on every result
    checked = cases if outcome.cases is None else outcome.cases
    shapes = outcome.shapes or {c.variant.name: list(c.x.shape) for c in checked}
    mode = outcome.mode
    if request.jax_layers is not None:  # the layers asked (a layer without a row says why in the check's mode)
        mode = {**(mode or {"check": "forward"}), "jax_layers": list(request.jax_layers)}
    return Report(
        results=outcome.results,
        configs={c.variant.name: c.variant.report_config(c.config) for c in checked},
        input={**data.describe(), "per_variant_shape": shapes},
        weights=weights_desc,
        versions=versions(outcome.ttnn_versions),
        ttnn_runtime=outcome.ttnn_runtime,
        backends=request.run_backends,
        seconds=time.perf_counter() - t_start,
        attention_impl=(request.attention_impl or flax_runner.AUTO) if "flax" in request.run_backends else None,
        mode=mode,
        sharding=outcome.sharding,
    )


# --- bundles: export here, run elsewhere, compare here --------------------------------------------


@budget.with_max_memory
def export_bundle(
    out: str | os.PathLike,
    variants=None,
    *,
    weights=None,
    inputs=None,
    attention_impl: str | None = None,
    prefix: str = "",
    model_config=None,
    **overrides,
) -> list[Case]:
    """Write the cases :func:`run` would run to a bundle file for another interpreter.

    ``attention_impl`` goes into the bundle's meta, for the worker's Flax backend. ``out`` is checked
    before any work: it must not be a directory nor one of the files read (weights, inputs, config).
    """
    from crosscheck.porting.bundle import write_bundle
    from crosscheck.porting.outputs import check_output_path

    check_output_path(out, "OUT", [("--weights", weights), ("--input", inputs), ("--config", model_config)], "bundle")
    check_attention_impl(attention_impl, variants)
    cases, data, weights_desc = build_cases(
        variants, weights=weights, inputs=inputs, overrides=overrides, prefix=prefix, model_config=model_config
    )
    meta = {"input": data.describe(), "weights": weights_desc}
    if attention_impl is not None:
        meta["attention_impl"] = attention_impl
    write_bundle(out, bundle_cases(cases), meta=meta)
    return cases


_BUNDLE_DTYPE = {"ttnn": "bfloat16", "flax": "float32"}


@budget.with_max_memory
def compare_outputs(bundle_path, outputs_paths: Sequence[str | os.PathLike]) -> Report:
    """Compare outputs files (from ``bundle run`` / the worker) with the torch reference of the bundle."""
    from crosscheck.porting.bundle import read_bundle, read_bundle_meta, read_outputs

    t_start = time.perf_counter()
    bcases = read_bundle(bundle_path)
    bmeta = read_bundle_meta(bundle_path)
    cases = cases_from_bundle(bcases, bundle_path)
    refs = {c.variant.name: torch_output(c) for c in cases}
    results, ttnn_info, ttnn_versions, backends = [], None, None, []
    for path in outputs_paths:
        outs, meta = read_outputs(path)
        backend = meta.get("backend")
        if backend not in _BUNDLE_DTYPE:
            raise BadInputError(f"{path}: outputs of unknown backend {backend!r}; expected ttnn or flax")
        backends.append(backend)
        if backend == "ttnn":
            ttnn_info = {
                "name": meta.get("runtime"),
                "description": meta.get("runtime_description"),
                "python": meta.get("python"),
            }
            ttnn_versions = meta.get("versions", {})
        missing = [c.variant.name for c in cases if c.variant.name not in outs]
        if missing:
            raise BadInputError(f"{path}: no output for {', '.join(missing)} (the bundle has them)")
        dtype = _BUNDLE_DTYPE[backend]
        runtime = meta.get("runtime") if backend == "ttnn" else "cpu"
        for c in cases:
            name = c.variant.name
            tol = cmp.policy_for(backend, dtype, name)
            result = result_of(name, backend, str(runtime), dtype, "torch float32", outs[name], refs[name], tol)
            result.source = os.fspath(path)
            result.device, result.precision = meta.get("device"), meta.get("precision")  # as the run recorded them
            if backend == "flax" and c.variant.takes_attention_impl:
                result.attention_impl = meta.get("attention_impl", flax_runner.AUTO)
            results.append(result)
    order = {c.variant.name: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: order[r.variant])
    return Report(
        results=results,
        configs={c.variant.name: c.variant.report_config(c.config) for c in cases},
        input={
            "source": f"bundle {os.fspath(bundle_path)}",
            **({"bundle_input": bmeta["input"]} if "input" in bmeta else {}),
            "per_variant_shape": {c.variant.name: list(c.x.shape) for c in cases},
        },
        weights=str(bmeta.get("weights", f"bundle {os.fspath(bundle_path)}")),
        versions=versions(ttnn_versions or {"ttnn": None, "ttnn_reason": "no ttnn outputs compared"}),
        ttnn_runtime=ttnn_info,
        backends=tuple(dict.fromkeys(backends)),
        seconds=time.perf_counter() - t_start,
        attention_impl=next((r.attention_impl for r in results if r.attention_impl), None),
    )
