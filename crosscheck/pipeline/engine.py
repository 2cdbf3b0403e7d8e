"""The cross-check as a Python API: the same weights and inputs through torch, Flax and ttnn.

    from crosscheck.pipeline import engine
    report = engine.run()                       # the seed sentence, every variant, every backend
    report = engine.run(["MultiHeadAttention"], weights="mha.pt", inputs="x.npy", backends=("torch", "flax"))
    assert report.passed, report.failing_variants

Every backend is compared with the torch float32 reference (the book's classes run in
``eval()`` mode), using :mod:`crosscheck.pipeline.compare`. The ``torch`` row itself is that
float32 reference against the same module run in float64: it shows how far the
reference is from exact arithmetic, the scale every other bound is judged on.

Dropout: every backend runs in inference mode (torch ``eval()``, Flax
``deterministic=True``), where dropout is the identity; a ``dropout`` rate is carried
in the config only. Two frameworks' dropout streams could never be compared anyway.

Errors: :class:`BadInputError` for anything the user gave that cannot be used (exit 2
in the CLI); a failed verdict is a :class:`Result` with ``passed=False`` (exit 1).

This module only orchestrates: cases are built and validated in :mod:`crosscheck.pipeline.cases`,
run by :mod:`crosscheck.pipeline.backends`, judged by :mod:`crosscheck.pipeline.compare` and recorded in
:mod:`crosscheck.pipeline.results`. The names users and tests reach through ``engine.`` (``Report``,
``build_cases``, ``flax_output``, ``BACKENDS``, ``port`` ...) are re-exported here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from crosscheck.checks import sharding_check
from crosscheck.errors import BadInputError
from crosscheck.pipeline import budget, flax_runner, placement
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline import inputs as inp
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
    _check_config,
    _float32_state_dict,
    _torch_reference_module,
    build_cases,
    bundle_cases,
    match_variants,
    resolve_config,
    select_variants,
)
from crosscheck.pipeline.results import Report, Result, result_of
from crosscheck.porting import port
from crosscheck.variants import registry

#: The public API, including the names re-exported from cases, backends and results.
__all__ = [
    "BACKENDS",
    "DTYPES",
    "OVERRIDABLE",
    "TORCH_SEED",
    "TTNN_RUNTIMES",
    "Case",
    "Progress",
    "Report",
    "Result",
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

#: ``progress(done, total, description)`` — called after each step.
Progress = Callable[[int, int, str], None]


# --- run -----------------------------------------------------------------------------------------


def _check_choices(backends: Sequence[str], dtype: str, ttnn_runtime: str) -> tuple[str, ...]:
    """The chosen backends in canonical order; :class:`BadInputError` naming the bad choice and the options."""
    backends = tuple(dict.fromkeys(b.strip().lower() for b in backends if b.strip()))
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise BadInputError(f"unknown backend(s) {bad or '(none)'}; choose from {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if ttnn_runtime not in TTNN_RUNTIMES:
        raise BadInputError(f"ttnn runtime must be one of {', '.join(TTNN_RUNTIMES)}; got {ttnn_runtime!r}")
    return tuple(b for b in BACKENDS if b in backends)


def check_attention_impl(attention_impl: str | None, variants: Iterable[str] | None) -> None:
    """Refuse an unknown core, and a core for an explicitly named variant that has no choice of core.

    Without named variants, those that take no ``attention_impl`` run as they always do.
    """
    if attention_impl is None:
        return
    flax_runner.check_attention_impl(attention_impl)
    if variants:
        for v in select_variants(variants):
            if not v.takes_attention_impl:
                takers = ", ".join(t.name for t in registry.takes_attention_impl())
                raise BadInputError(
                    f"{v.name} takes no --attention-impl (its Flax module has one fixed attention core); "
                    f"variants that take one: {takers}"
                )


@budget.with_max_memory
def run(
    variants: Iterable[str] | None = None,
    *,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    inputs: str | os.PathLike | np.ndarray | inp.RandomInputs | None = None,
    d_in: int | None = None,
    d_out: int | None = None,
    context_length: int | None = None,
    dropout: float | None = None,
    num_heads: int | None = None,
    qkv_bias: bool | None = None,
    causal: bool | None = None,
    num_kv_groups: int | None = None,
    head_dim: int | None = None,
    qk_norm: bool | None = None,
    rope_theta: float | None = None,
    prefix: str = "",
    model_config: str | os.PathLike | Mapping[str, Any] | None = None,
    backends: Sequence[str] = BACKENDS,
    ttnn_runtime: str = "auto",
    ttnn_python: str | None = None,
    dtype: str = "float32",
    attention_impl: str | None = None,
    decode: int | None = None,
    padding: str | None = None,
    pad_lengths: Sequence[int] | None = None,
    train: bool = False,
    grad: bool = False,
    train_seed: int | None = None,
    progress: Progress | None = None,
    api: str = "linen",
    devices: int | None = None,
    shard: str | None = None,
) -> Report:
    """Run the cross-check and return its :class:`Report` (never raises on a mismatch).

    ``variants``: jaxattn class names (case-insensitive); all when ``None``. With
    ``weights`` and no ``variants``, the variants whose keys and shapes the state dict
    fits. ``inputs``: ``None`` (the seed sentence), a path, an array or
    :class:`crosscheck.pipeline.inputs.RandomInputs`. ``dtype`` is what Flax computes in; torch
    is always the float32 reference and ttnn computes in bfloat16. ``attention_impl``:
    the attention core of the Flax modules that take one (``None``: their default, "auto").

    ``decode=P``: instead of the forward check, prefill ``P`` tokens and decode the rest
    one at a time in every backend (:mod:`crosscheck.checks.decode_check`; without ``variants``,
    the variants that decode). ``padding="left"|"right"`` with ``pad_lengths``: run a
    padded batch and compare it at the real tokens with the sequences run one by one
    (:mod:`crosscheck.checks.padding_check`).

    ``train=True``: torch and Flax in training mode on identical dropout masks
    (:mod:`crosscheck.checks.train_check`; ``dropout`` defaults to 0.1). ``grad=True``: gradients of
    ``sum(output * R)`` for the input and every parameter, per torch parameter name
    (:mod:`crosscheck.checks.grad_check`; in training mode with ``train``). ``train_seed`` (default 0)
    draws the masks and ``R``. Both compare torch with Flax in float32: ttnn in ``backends`` is
    skipped, with the reason in ``report.mode["skipped_backends"]``.

    ``api``: the Flax modules to run: ``"linen"`` (rows ``flax``), ``"nnx"`` (the :mod:`jaxattn.nnx`
    twins, rows ``flax-nnx``) or ``"both"``; NNX in the forward check only.

    ``prefix``: the layer of a whole model's ``weights`` to check (``model.layers.0.self_attn.``);
    ``model_config``: a transformers ``config.json`` (heads, kv heads, head_dim, RoPE), whose
    values the flags must not contradict.

    ``max_memory`` (bytes or ``"8G"``; default: :mod:`crosscheck.pipeline.budget`'s fraction of physical
    memory): a run whose estimated memory exceeds it is refused before anything is allocated.
    """
    t_start = time.perf_counter()
    backends = _check_choices(backends, dtype, ttnn_runtime)
    check_attention_impl(attention_impl, variants)
    _check_mode(decode, padding, pad_lengths)
    if placement.torch_device() != "cpu" and (train or grad or decode is not None or padding is not None):
        raise BadInputError(
            f"--torch-device {placement.torch_device()}: only the forward check runs torch there; "
            "--train, --grad, --decode and --padding run torch on the CPU"
        )
    flax_apis = _flax_apis(api, decode=decode, padding=padding, train=train or grad)
    skipped: dict[str, str] = {}
    if train or grad:  # torch vs Flax only (crosscheck.checks.train_check); ttnn is skipped with its reason
        from crosscheck.checks import train_check

        kept = train_check.check_options(
            train=train,
            grad=grad,
            dtype=dtype,
            backends=backends,
            attention_impl=attention_impl,
            decode=decode,
            padding=padding,
        )
        skipped = {b: train_check.TTNN_SKIPPED for b in backends if b not in kept}
        backends = kept
        if train and dropout is None:
            dropout = train_check.DEFAULT_TRAIN_DROPOUT
    if "ttnn" in backends:
        check_ttnn_available(ttnn_runtime, ttnn_python)
    overrides = dict(
        d_in=d_in,
        d_out=d_out,
        context_length=context_length,
        dropout=dropout,
        num_heads=num_heads,
        qkv_bias=qkv_bias,
        causal=causal,
        num_kv_groups=num_kv_groups,
        head_dim=head_dim,
        qk_norm=qk_norm,
        rope_theta=rope_theta,
    )
    cases, data, weights_desc = build_cases(
        variants, weights=weights, inputs=inputs, overrides=overrides, prefix=prefix, model_config=model_config
    )
    if pad_lengths is not None:  # the padded batch: one row per length, each longer by its padding
        budget.check_cases(
            [
                (c.variant, c.config, (len(pad_lengths), c.x.shape[-2] + max(pad_lengths, default=0), c.x.shape[-1]))
                for c in cases
            ],
            "--pad-lengths",
        )
    if decode is not None and not variants:
        cases = [c for c in cases if c.variant.decodes(c.config)]
        if not cases:
            names = ", ".join(v.name for v in registry.decoding())
            raise BadInputError(f"--decode: none of the variants to run decodes; variants that decode: {names}")
    # --devices N --shard MODE (crosscheck.checks.sharding_check): the Flax rows run split, plus a "flax 1 device" row.
    sharding_check.check_request(
        cases,
        devices=devices,
        shard=shard,
        backends=backends,
        attention_impl=attention_impl,
        others=(
            ("--decode", decode is not None),
            ("--padding", padding is not None),
            ("--train", train),
            ("--grad", grad),
            ("--api nnx", api != "linen"),
        ),
    )
    total = len(cases) * (len(backends) + ("flax" in backends) * (len(flax_apis) - 1))
    done = 0

    def step(description: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, description)

    if train or grad:
        from crosscheck.checks import train_check

        results, mode = train_check.run(
            cases,
            train=train,
            grad=grad,
            seed=0 if train_seed is None else int(train_seed),
            backends=backends,
            attention_impl=attention_impl,
            skipped=skipped,
            step=step,
        )
        return _report(results, cases, cases, data, weights_desc, None, None, backends, attention_impl, t_start, mode)
    if decode is not None or padding is not None:
        return _run_mode(
            cases,
            data,
            weights_desc,
            t_start,
            backends=backends,
            dtype=dtype,
            attention_impl=attention_impl,
            ttnn_runtime=ttnn_runtime,
            ttnn_python=ttnn_python,
            decode=decode,
            padding=padding,
            pad_lengths=pad_lengths,
            step=step,
        )

    by_variant: dict[str, list[Result]] = {c.variant.name: [] for c in cases}
    refs: dict[str, np.ndarray] = {}
    for case in cases:
        name = case.variant.name
        t0 = time.perf_counter()
        out32, out64 = torch_outputs(case)
        refs[name] = out32
        if "torch" in backends:
            tol = cmp.policy_for("torch", "float32")
            by_variant[name].append(
                result_of(
                    name,
                    "torch",
                    placement.torch_device(),
                    "float32",
                    "torch float64",
                    out32,
                    out64,
                    tol,
                    time.perf_counter() - t0,
                )
            )
            step(f"torch {name}")
        for flax_api in flax_apis if "flax" in backends else ():  # a row per Flax API (--api)
            t0 = time.perf_counter()
            if shard is None:
                out = flax_output(case, dtype, attention_impl, api=flax_api)
            else:
                assert devices is not None  # check_request refuses --shard without --devices
                out = sharding_check.sharded_output(case, dtype, attention_impl, devices, shard)
            tol = cmp.policy_for("flax", placement.tolerance_dtype(dtype))  # TF32's row below "highest"
            backend = FLAX_API_BACKENDS[flax_api]
            result = result_of(
                name, backend, flax_runner.platform(), dtype, "torch float32", out, out32, tol, time.perf_counter() - t0
            )
            result.attention_impl = (attention_impl or flax_runner.AUTO) if case.variant.takes_attention_impl else None
            if backend != "flax":  # placement.describe knows the "flax" row; the NNX row runs on the same JAX
                result.device, result.precision = placement.jax_device(), placement.matmul_precision(dtype)
            by_variant[name].append(result)
            if shard is not None:
                assert devices is not None  # check_request refuses --shard without --devices
                sharding_check.label(result, dtype, devices, shard)
                by_variant[name].append(sharding_check.one_device_row(case, dtype, attention_impl, out, devices, shard))
            step(f"{backend} {name}")
    ttnn_info, ttnn_versions = None, None
    if "ttnn" in backends:
        if ttnn_python is None:
            outs, ttnn_info, ttnn_versions, secs = ttnn_outputs_in_process(cases, ttnn_runtime, step)
        else:
            outs, ttnn_info, ttnn_versions, secs = ttnn_outputs_elsewhere(cases, ttnn_runtime, ttnn_python)
            for case in cases:
                step(f"ttnn {case.variant.name}")
        for case in cases:
            name = case.variant.name
            tol = cmp.policy_for("ttnn", "bfloat16", name)
            if name not in outs:
                raise BadInputError(f"the ttnn backend returned no output for {name}")
            by_variant[name].append(
                result_of(
                    name,
                    "ttnn",
                    ttnn_info["name"],
                    "bfloat16",
                    "torch float32",
                    outs[name],
                    refs[name],
                    tol,
                    secs.get(name),
                )
            )
    results = [r for c in cases for r in by_variant[c.variant.name]]
    report = _report(
        results, cases, cases, data, weights_desc, ttnn_info, ttnn_versions, backends, attention_impl, t_start
    )
    report.sharding = None
    if shard is not None:
        assert devices is not None  # check_request refuses --shard without --devices
        report.sharding = sharding_check.describe(devices, shard)
    return report


def _report(
    results,
    cases,
    run_cases,
    data,
    weights_desc,
    ttnn_info,
    ttnn_versions,
    backends,
    attention_impl,
    t_start,
    mode: dict | None = None,
) -> Report:
    """The :class:`Report` of a run: ``run_cases`` are the cases as run (padded ones for ``--padding``)."""
    placement.describe(results)  # device and precision on every result
    return Report(
        results=results,
        configs={c.variant.name: c.variant.report_config(c.config) for c in cases},
        input={**data.describe(), "per_variant_shape": {c.variant.name: list(c.x.shape) for c in run_cases}},
        weights=weights_desc,
        versions=versions(ttnn_versions),
        ttnn_runtime=ttnn_info,
        backends=backends,
        seconds=time.perf_counter() - t_start,
        attention_impl=(attention_impl or flax_runner.AUTO) if "flax" in backends else None,
        mode=mode,
    )


#: ``api`` choices of :func:`run` and the backend name of each API's rows.
APIS = ("linen", "nnx", "both")
FLAX_API_BACKENDS = {"linen": "flax", "nnx": "flax-nnx"}


def _flax_apis(api: str, *, decode, padding, train: bool) -> tuple[str, ...]:
    """The Flax APIs to run (``api="both"``: Linen and NNX, a row each); NNX runs the forward check only."""
    if api not in APIS:
        raise BadInputError(f"--api must be one of {', '.join(APIS)}; got {api!r}")
    apis = ("linen", "nnx") if api == "both" else (api,)
    modes = [
        flag
        for flag, on in (
            ("--decode", decode is not None),
            ("--padding", padding is not None),
            ("--train/--grad", train),
        )
        if on
    ]
    if "nnx" in apis and modes:
        raise BadInputError(f"--api {api}: the NNX modules run in the forward check; {modes[0]} runs Linen only")
    return apis


def _check_mode(decode: int | None, padding: str | None, pad_lengths: Sequence[int] | None) -> None:
    """The decode and padding options: one check at a time, each complete."""
    from crosscheck.checks.padding_check import SIDES

    if decode is not None and padding is not None:
        raise BadInputError("--decode and --padding are separate checks; choose one")
    if decode is not None and (isinstance(decode, bool) or int(decode) < 1):
        raise BadInputError(f"--decode: the prompt length must be >= 1, got {decode}")
    if padding is not None and padding not in SIDES:
        raise BadInputError(f"--padding must be one of {', '.join(SIDES)}; got {padding!r}")
    if (padding is None) != (pad_lengths is None):
        raise BadInputError("--padding and --pad-lengths go together (e.g. --padding left --pad-lengths 0,3)")


def _run_mode(
    cases,
    data,
    weights_desc,
    t_start,
    *,
    backends,
    dtype,
    attention_impl,
    ttnn_runtime,
    ttnn_python,
    decode,
    padding,
    pad_lengths,
    step,
) -> Report:
    """The decode or padding check of ``cases`` as a :class:`Report`."""
    from crosscheck.checks import decode_check, padding_check

    def ttnn_outputs(run_cases, prompt_len=None):
        if ttnn_python is None:
            return ttnn_outputs_in_process(run_cases, ttnn_runtime, lambda _: None, prompt_len=prompt_len)
        return ttnn_outputs_elsewhere(run_cases, ttnn_runtime, ttnn_python, prompt_len=prompt_len)

    common = dict(backends=backends, dtype=dtype, attention_impl=attention_impl, ttnn_outputs=ttnn_outputs, step=step)
    if decode is not None:
        results, mode, info, ttnn_versions = decode_check.run(cases, int(decode), **common)
        run_cases = cases
    else:
        results, mode, info, ttnn_versions, run_cases = padding_check.run(cases, padding, list(pad_lengths), **common)
    return _report(
        results, cases, run_cases, data, weights_desc, info, ttnn_versions, backends, attention_impl, t_start, mode
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
    cases = []
    for bc in bcases:
        v = select_variants([bc.variant])[0]
        sd = _float32_state_dict(bc.state_dict, f"{bundle_path}: {bc.variant}")
        port.check_state_dict(v.portmap(bc.config), sd, v.name)
        x = inp.validate_array(np.asarray(bc.inputs), f"{bundle_path}: {bc.variant}/inputs")
        _check_config(v, bc.config, x.shape[-2], from_weights=False)
        budget.check_cases([(v, bc.config, x.shape)], f"the config or inputs of {os.fspath(bundle_path)}")
        cases.append(Case(v, bc.config, sd, x, _torch_reference_module(v, bc.config, sd)))
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
