"""The decode cross-check: a prompt, then one token at a time through the KV cache, in every framework.

``crosscheck --decode PROMPT_LEN``: each backend prefills ``x[:, :PROMPT_LEN]`` and
decodes the input's other tokens one at a time (torch: the book's ``kv_cache`` API in
:mod:`crosscheck.references.torch_kv_cache`; Flax: ``decode=True`` and the ``'cache'`` collection;
ttnn: the decode programs with device-side caches). Every step's context vectors are
compared, as rows of one array:

* torch decoding against the torch full forward (float32, the same module's weights);
* Flax and ttnn decoding against torch decoding, and against their own full forward.

A row's ``detail`` names the token with the largest error, so a drift that grows with
the cache shows where it starts. Only the variants with a KV cache (the causal ones)
decode; the engine refuses others by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline import flax_runner
from crosscheck.pipeline.backends import flax_decode_output, flax_output, torch_decode_output
from crosscheck.pipeline.cases import Case
from crosscheck.pipeline.results import Result, result_of


def check_cases(cases: Sequence[Case], prompt_len: int) -> None:
    """:class:`BadInputError` unless every case decodes and has at least ``prompt_len`` tokens."""
    from crosscheck.variants import registry

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


#: ``ttnn_outputs(cases, prompt_len)`` -> ``({variant: output}, runtime info, versions, seconds)``.
TtnnOutputs = Callable[[Sequence[Case], int | None], tuple]


def run(
    cases: Sequence[Case],
    prompt_len: int,
    *,
    backends: Sequence[str],
    dtype: str,
    attention_impl: str | None,
    ttnn_outputs: TtnnOutputs | None,
    step: Callable[[str], None],
) -> tuple[list[Result], dict, dict | None, dict | None]:
    """Decode every case on ``backends``; ``(results, mode, ttnn runtime info, ttnn versions)``."""
    from crosscheck.pipeline.backends import torch_output

    check_cases(cases, prompt_len)
    flax_tol = cmp.policy_for("flax", dtype)
    platform = flax_runner.platform()
    results: dict[str, list[Result]] = {c.variant.name: [] for c in cases}
    torch_dec: dict[str, np.ndarray] = {}
    compilations: dict[str, int] = {}
    for case in cases:
        name = case.variant.name
        full32 = torch_output(case)  # float32 only: the float64 run is the forward check's
        torch_dec[name] = dec = torch_decode_output(case, prompt_len)
        if "torch" in backends:
            results[name].append(
                result_of(
                    name,
                    "torch",
                    "cpu",
                    "float32",
                    "torch full forward",
                    dec,
                    full32,
                    cmp.policy_for("torch", "float32"),
                    detail=detail(dec, full32, prompt_len),
                )
            )
            step(f"torch decode {name}")
        if "flax" in backends:
            out, compilations[name] = flax_decode_output(case, prompt_len, dtype, attention_impl)
            full = flax_output(case, dtype, attention_impl)
            impl = (attention_impl or flax_runner.AUTO) if case.variant.takes_attention_impl else None
            for reference, ref in (("torch decode", torch_dec[name]), ("flax full forward", full)):
                r = result_of(
                    name, "flax", platform, dtype, reference, out, ref, flax_tol, detail=detail(out, ref, prompt_len)
                )
                r.attention_impl = impl
                results[name].append(r)
            step(f"flax decode {name}")
    info = versions = None
    if "ttnn" in backends and ttnn_outputs is not None:
        decoded, info, versions, _ = ttnn_outputs(cases, prompt_len)
        full, _, _, _ = ttnn_outputs(cases, None)
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
    tokens = int(cases[0].x.shape[-2]) if cases else 0
    mode = {"check": "decode", "prompt_len": prompt_len, "tokens": tokens}
    if compilations:
        mode["flax_compilations"] = compilations
    return [r for c in cases for r in results[c.variant.name]], mode, info, versions
