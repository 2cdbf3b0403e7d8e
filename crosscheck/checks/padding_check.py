"""The padding cross-check: a padded batch equals its sequences run one by one, at the real tokens.

``crosscheck --padding left|right --pad-lengths 0,3,...``: row ``i`` of the padded batch
holds the first ``tokens - pad_lengths[i]`` tokens of input row ``i % batch`` and
``pad_lengths[i]`` padding tokens (before them for ``left``, after them for ``right``),
with an ``attention_mask`` of 1 at the real tokens. Every backend runs the padded batch
with that mask; the reference is the torch float32 module run on each real sequence
alone. Only real positions are compared (padded positions have no unpadded
counterpart), and any NaN or Inf anywhere in a padded output is a failure: a row with
no visible key must give zero context vectors, never NaN.

Padding tokens are random values from their own generator, so a mask that leaks shows.

With ``--jax-layers``, each other JAX library's layer runs the padded batch with the key-padding mask
through its own mask argument (:mod:`crosscheck.jax_layers.rows`): a row each, judged the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.jax_layers import rows as jax_rows
from crosscheck.pipeline import budget, flax_runner
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline.backends import flax_output, torch_output, ttnn_outputs
from crosscheck.pipeline.cases import Case
from crosscheck.pipeline.progress import Progress, Steps
from crosscheck.pipeline.request import PADDING_SIDES, RunRequest
from crosscheck.pipeline.results import CheckOutcome, Result, result_of

SIDES = PADDING_SIDES
#: Seed of the padding tokens' values (independent of the inputs').
PAD_SEED = 2024


def parse_pad_lengths(text: str) -> list[int]:
    """``"0,3,5"`` -> ``[0, 3, 5]``; :class:`BadInputError` naming a bad entry."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise BadInputError(f"--pad-lengths: not an integer: {part!r} (expected e.g. 0,3,5)") from None
        if value < 0:
            raise BadInputError(f"--pad-lengths: must be >= 0, got {value}")
        values.append(value)
    return values


def real_positions(tokens: int, pad: int, side: str) -> slice:
    """The token positions a row with ``pad`` padding tokens keeps real."""
    return slice(pad, tokens) if side == "left" else slice(0, tokens - pad)


def pad_case(case: Case, side: str, pad_lengths: Sequence[int]) -> tuple[Case, list[np.ndarray]]:
    """``case`` as a padded batch with its mask, and each row's real sequence ``(1, real_tokens, d_in)``."""
    if side not in SIDES:
        raise BadInputError(f"--padding must be one of {', '.join(SIDES)}; got {side!r}")
    if not pad_lengths:
        raise BadInputError("--pad-lengths: give at least one length, e.g. 0,3")
    x = case.x if case.x.ndim == 3 else case.x[None]  # (batch, tokens, d_in)
    batch, tokens, d_in = x.shape
    too_long = [p for p in pad_lengths if p >= tokens]
    if too_long:
        raise BadInputError(
            f"--pad-lengths: {too_long[0]} padding tokens leave no real token of {tokens}; "
            f"each length must be < {tokens}"
        )
    pads = np.random.default_rng(PAD_SEED).random((len(pad_lengths), tokens, d_in), dtype=np.float32)
    padded = pads.copy()
    mask = np.zeros((len(pad_lengths), tokens), dtype=np.int32)
    sequences = []
    for i, pad in enumerate(pad_lengths):
        real = x[i % batch, : tokens - pad]
        where = real_positions(tokens, pad, side)
        padded[i, where] = real
        mask[i, where] = 1
        sequences.append(real[None])
    return dataclasses.replace(case, x=padded, attention_mask=mask), sequences


def real_rows(out: np.ndarray, pad_lengths: Sequence[int], side: str) -> np.ndarray:
    """``(real tokens of all rows, features)``: the padded output at its real positions, row after row."""
    tokens = out.shape[1]
    return np.concatenate([out[i, real_positions(tokens, p, side)] for i, p in enumerate(pad_lengths)], axis=0)


def unpadded_reference(case: Case, sequences: Sequence[np.ndarray]) -> np.ndarray:
    """The torch float32 reference on each real sequence alone, rows concatenated like :func:`real_rows`."""
    outs = [torch_output(dataclasses.replace(case, x=seq, attention_mask=None))[0] for seq in sequences]
    return np.concatenate(outs, axis=0)


def _row(name, backend, runtime, dtype, padded_out, ref, tol, pad_lengths, side) -> Result:
    out = real_rows(padded_out, pad_lengths, side)
    r = result_of(
        name,
        backend,
        runtime,
        dtype,
        "torch unpadded, one by one",
        out,
        ref,
        tol,
        detail={"side": side, "pad_lengths": list(pad_lengths), "real_tokens": int(out.shape[0])},
    )
    if not np.isfinite(padded_out).all():
        r.passed = False
        r.failures.append("NaN or Inf in the padded output (padding positions included)")
    return r


def _jax_layer_row(rows, name, ref, backend, runtime, padded_out, tol, seconds) -> Result:
    """Another JAX library's padded output (float32) against ``ref``, as every padding row is judged."""
    r = rows(name, backend, runtime, jax_rows.DTYPE, padded_out, ref, tol)
    r.seconds = seconds
    return r


def run(cases: Sequence[Case], request: RunRequest, progress: Progress | None) -> CheckOutcome:
    """Run the padded batch of every case on the request's backends, against the sequences one by one."""
    side, pad_lengths = str(request.padding), list(request.pad_lengths or ())
    budget.check_cases(  # the padded batch: one row per length, each longer by its padding
        [
            (c.variant, c.config, (len(pad_lengths), c.x.shape[-2] + max(pad_lengths, default=0), c.x.shape[-1]))
            for c in cases
        ],
        "--pad-lengths",
    )
    chosen = request.run_backends
    steps = Steps(len(cases) * (len(chosen) + len(jax_rows.chosen(request))), progress)
    padded_cases, refs = [], {}
    results: dict[str, list[Result]] = {c.variant.name: [] for c in cases}
    for case in cases:
        padded, sequences = pad_case(case, side, pad_lengths)
        padded_cases.append(padded)
        refs[case.variant.name] = unpadded_reference(case, sequences)
    rows = functools.partial(_row, pad_lengths=pad_lengths, side=side)
    for case in padded_cases:
        name = case.variant.name
        if "torch" in chosen:
            tol = cmp.policy_for("torch", "float32")
            results[name].append(rows(name, "torch", "cpu", "float32", torch_output(case), refs[name], tol))
            steps.step(f"torch padded {name}")
        if "flax" in chosen:
            out = flax_output(case, request.dtype, request.attention_impl)
            tol = cmp.policy_for("flax", request.dtype)
            r = rows(name, "flax", flax_runner.platform(), request.dtype, out, refs[name], tol)
            r.attention_impl = (
                (request.attention_impl or flax_runner.AUTO) if case.variant.takes_attention_impl else None
            )
            results[name].append(r)
            steps.step(f"flax padded {name}")
        judge = functools.partial(_jax_layer_row, rows, name, refs[name])
        real = functools.partial(real_rows, pad_lengths=pad_lengths, side=side)
        for r in jax_rows.rows(case, request, judge, view=real):  # --jax-layers
            results[name].append(r)
            steps.step(f"{r.backend} padded {name}")
    outcome = CheckOutcome([], shapes={c.variant.name: list(c.x.shape) for c in padded_cases})
    if "ttnn" in chosen:
        outs, outcome.ttnn_runtime, outcome.ttnn_versions, _ = ttnn_outputs(
            padded_cases, request.ttnn_runtime, request.ttnn_python
        )
        for case in padded_cases:
            name = case.variant.name
            if name not in outs:
                raise BadInputError(f"the ttnn backend returned no output for {name}")
            tol = cmp.policy_for("ttnn", "bfloat16", name)
            runtime = outcome.ttnn_runtime["name"]
            results[name].append(rows(name, "ttnn", runtime, "bfloat16", np.asarray(outs[name]), refs[name], tol))
            steps.step(f"ttnn padded {name}")
    outcome.mode = {"check": "padding", "side": side, "pad_lengths": list(pad_lengths)}
    outcome.results = [r for c in cases for r in results[c.variant.name]]
    return outcome
