"""The decode cross-check: a prompt, then one token at a time through the KV cache, in every framework.

``crosscheck --decode PROMPT_LEN``: each backend prefills ``x[:, :PROMPT_LEN]`` and
decodes the input's other tokens one at a time (torch: the book's ``kv_cache`` API in
:mod:`crosscheck.references.torch_kv_cache`; Flax: ``decode=True`` and the ``'cache'`` collection;
ttnn: the decode programs with device-side caches). Every step's context vectors are
compared, as rows of one array:

* torch decoding against the torch full forward (float32, the same module's weights);
* Flax and ttnn decoding against torch decoding, and against their own full forward.

With ``--jax-layers``, each other JAX library's layer with a cache decodes the input through it, one
token a call (:mod:`crosscheck.jax_layers.rows`), against torch decoding; a layer without a cache is named
in the report's ``mode["skipped_backends"]`` with why.

A row's ``detail`` names the token with the largest error, so a drift that grows with
the cache shows where it starts. Only the variants with a KV cache (the causal ones)
decode; the engine refuses others by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.jax_layers import rows as jax_rows
from crosscheck.pipeline import backends, flax_runner
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline.cases import Case
from crosscheck.pipeline.progress import Progress, Steps
from crosscheck.pipeline.request import RunRequest
from crosscheck.pipeline.results import CheckOutcome, Result, result_of
from crosscheck.variants import registry


def check_cases(cases: Sequence[Case], prompt_len: int) -> None:
    """:class:`BadInputError` unless every case decodes and has at least ``prompt_len`` tokens."""
    for case in cases:
        if not case.variant.decodes(case.config):
            names = ", ".join(v.name for v in registry.decoding())
            why = (
                "it is not causal at this config"
                if case.variant in registry.decoding()
                else ("it has no torch reference with a KV cache")
            )
            raise BadInputError(f"{case.variant.name} cannot decode: {why}; variants that decode: {names}")
        tokens = case.x.shape[-2]
        if not 1 <= prompt_len <= tokens:
            raise BadInputError(
                f"--decode {prompt_len}: the prompt must have 1..{tokens} tokens (the input has {tokens}; "
                "set --tokens for a longer one)"
            )


def token_errors(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``(tokens,)``: the max abs error of each token position over batch and features (inf where non-finite)."""
    diff = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
    diff = np.where(np.isfinite(diff), diff, np.inf)
    return diff.max(axis=(0, 2)) if diff.ndim == 3 else diff.max(axis=-1)


def detail(out: np.ndarray, ref: np.ndarray, prompt_len: int) -> dict:
    """What a decode row reports besides the metrics: the steps and the worst token."""
    if np.shape(out) != np.shape(ref):
        return {"prompt_len": prompt_len, "steps": int(np.shape(ref)[-2]) - prompt_len}
    errors = token_errors(out, ref)
    worst = int(np.argmax(errors))
    return {
        "prompt_len": prompt_len,
        "steps": int(errors.shape[0]) - prompt_len,
        "worst_token": worst,
        "worst_token_max_abs_err": float(errors[worst]),
    }


def run(cases: Sequence[Case], request: RunRequest, progress: Progress | None) -> CheckOutcome:
    """Decode every case on the request's backends (without named variants: those that decode)."""
    prompt_len = int(request.decode or 0)
    if not request.variants:
        cases = [c for c in cases if c.variant.decodes(c.config)]
        if not cases:
            names = ", ".join(v.name for v in registry.decoding())
            raise BadInputError(f"--decode: none of the variants to run decodes; variants that decode: {names}")
    check_cases(cases, prompt_len)
    chosen = request.run_backends
    decoders = [layer for layer in jax_rows.chosen(request) if not layer.no_cache]
    steps = Steps(len(cases) * (len(chosen) + len(decoders)), progress)
    results: dict[str, list[Result]] = {c.variant.name: [] for c in cases}
    torch_dec: dict[str, np.ndarray] = {}
    compilations: dict[str, int] = {}
    for case in cases:
        name = case.variant.name
        full32 = backends.torch_output(case)  # float32 only: the float64 run is the forward check's
        torch_dec[name] = dec = backends.torch_decode_output(case, prompt_len)
        if "torch" in chosen:
            tol = cmp.policy_for("torch", "float32")
            row = result_of(name, "torch", "cpu", "float32", "torch full forward", dec, full32, tol)
            row.detail = detail(dec, full32, prompt_len)
            results[name].append(row)
            steps.step(f"torch decode {name}")
        if "flax" in chosen:
            out, compilations[name] = backends.flax_decode_output(
                case, prompt_len, request.dtype, request.attention_impl
            )
            results[name] += _flax_rows(case, request, out, torch_dec[name], prompt_len)
            steps.step(f"flax decode {name}")
        for row in jax_rows.rows(case, request, _jax_layer_judge(name, dec, prompt_len), decode=True):
            results[name].append(row)
            steps.step(f"{row.backend} decode {name}")
    outcome = CheckOutcome([], cases=list(cases))
    if "ttnn" in chosen:
        outcome.ttnn_runtime, outcome.ttnn_versions = _ttnn_rows(cases, request, torch_dec, results, steps.step)
    tokens = int(cases[0].x.shape[-2]) if cases else 0
    outcome.mode = {"check": "decode", "prompt_len": prompt_len, "tokens": tokens}
    if compilations:
        outcome.mode["flax_compilations"] = compilations
    if jax_rows.skipped(request, decode=True):
        outcome.mode["skipped_backends"] = jax_rows.skipped(request, decode=True)
    outcome.results = [r for c in cases for r in results[c.variant.name]]
    return outcome


def _flax_rows(case: Case, request: RunRequest, out: np.ndarray, torch_dec: np.ndarray, prompt_len: int) -> list:
    """Flax decoding against torch decoding and against Flax's own full forward."""
    name, dtype = case.variant.name, request.dtype
    full = backends.flax_output(case, dtype, request.attention_impl)
    impl = (request.attention_impl or flax_runner.AUTO) if case.variant.takes_attention_impl else None
    rows = []
    for reference, ref in (("torch decode", torch_dec), ("flax full forward", full)):
        r = result_of(
            name,
            "flax",
            flax_runner.platform(),
            dtype,
            reference,
            out,
            ref,
            cmp.policy_for("flax", dtype),
            detail=detail(out, ref, prompt_len),
        )
        r.attention_impl = impl
        rows.append(r)
    return rows


def _jax_layer_judge(name: str, torch_dec: np.ndarray, prompt_len: int) -> jax_rows.Judge:
    """Another JAX library's decoding (float32) against torch decoding."""

    def judge(backend: str, runtime: str, out: np.ndarray, tol: cmp.Tolerance, seconds: float) -> Result:
        return result_of(
            name,
            backend,
            runtime,
            jax_rows.DTYPE,
            "torch decode",
            out,
            torch_dec,
            tol,
            seconds,
            detail=detail(out, torch_dec, prompt_len),
        )

    return judge


def _ttnn_rows(cases, request: RunRequest, torch_dec, results, step) -> tuple[dict, dict]:
    """ttnn decoding against torch decoding and against ttnn's own full forward; ``(runtime info, versions)``."""
    prompt_len = int(request.decode or 0)
    runtime, python = request.ttnn_runtime, request.ttnn_python
    decoded, info, versions, _ = backends.ttnn_outputs(cases, runtime, python, prompt_len=prompt_len)
    full, _, _, _ = backends.ttnn_outputs(cases, runtime, python)
    for case in cases:
        name = case.variant.name
        if name not in decoded or name not in full:
            raise BadInputError(f"the ttnn backend returned no decode output for {name}")
        tol = cmp.policy_for("ttnn", "bfloat16", name)
        for reference, ref in (("torch decode", torch_dec[name]), ("ttnn full forward", full[name])):
            results[name].append(
                result_of(
                    name,
                    "ttnn",
                    info["name"],
                    "bfloat16",
                    reference,
                    decoded[name],
                    ref,
                    tol,
                    detail=detail(decoded[name], ref, prompt_len),
                )
            )
        step(f"ttnn decode {name}")
    return info, versions
