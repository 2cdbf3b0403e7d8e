"""Views of a :class:`crosscheck.pipeline.results.Report`: the rich terminal table and the JSON file."""

from __future__ import annotations

import json
import math
import os

from crosscheck.jax_layers import LAYERS as JAX_LAYERS
from crosscheck.pipeline.results import Report, Result
from crosscheck.porting.outputs import atomic_write_text, check_output_path


def backend_label(r: Result) -> str:
    """How a row names its backend, honest about what ran (e.g. ``ttnn (host model)``)."""
    if r.backend == "torch":  # the device: "cpu", or "cuda: NVIDIA H100 80GB HBM3" (--torch-device cuda)
        device = r.device or "cpu"
        return f"torch ({device}, vs float64)" if r.reference == "torch float64" else f"torch ({device})"
    if r.backend == "flax":  # JAX's platform and device: "cpu", or "gpu: NVIDIA H100 80GB HBM3"
        return f"flax ({r.device or r.runtime})"
    if r.backend == "flax-nnx":  # the jaxattn.nnx modules (crosscheck --api nnx|both), same JAX device
        return f"flax-nnx ({r.device or r.runtime})"
    if r.backend == "ttnn":
        return {"host": "ttnn (host model)", "device": "ttnn (device)"}.get(r.runtime, f"ttnn ({r.runtime})")
    if r.backend in JAX_LAYERS:  # another library's layer (--jax-layers) and its version: "flax.nnx 0.12.8"
        return f"{r.backend} {r.runtime.rpartition(' ')[2]}"
    return r.backend


def _num(x: float | None, fmt: str = ".2e") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, fmt)


def _pcc(x: float | None) -> str:
    return "-" if x is None else f"{x:.6f}"


def _ulp(x: int | None) -> str:
    if x is None:
        return "-"
    return "inf" if x >= 2**62 else str(x)


def render(report: Report, console, *, quiet: bool = False) -> None:
    """Print ``report`` on ``console`` (a ``rich.console.Console``); ``quiet``: failures and one line only."""
    versus = (report.mode or {}).get("check") in _VERSUS_CHECKS or report.sharding is not None  # "flax 1 device"
    if not quiet:
        _render_header(report, console)
        console.print(_table(report, versus))
    for r in report.results:
        for failure in r.failures:
            against = f" vs {r.reference}" if versus else ""
            console.print(f"[red]FAIL[/red] {r.variant} / {backend_label(r)}{against}: {failure}", highlight=False)
    n_pass = sum(r.passed for r in report.results)
    total = len(report.results)
    if report.passed:
        console.print(f"[green]all {total} checks passed[/green]" + ("" if quiet else _timing(report)))
    else:
        console.print(
            f"[bold red]{total - n_pass} of {total} checks failed[/bold red]: {', '.join(report.failing_variants)}"
        )


def _render_header(report: Report, console) -> None:
    """What ran: input, weights, ttnn runtime, attention core, the check's settings, versions, precision, split."""
    console.print(f"[bold]crosscheck[/bold]  input: {report.input.get('description', report.input.get('source'))}")
    console.print(f"weights: {report.weights}")
    if report.ttnn_runtime:
        where = f" via {report.ttnn_runtime['python']}" if report.ttnn_runtime.get("python") else ""
        console.print(
            f"ttnn runtime: {report.ttnn_runtime.get('name')} - {report.ttnn_runtime.get('description')}{where}"
        )
    if report.attention_impl is not None:
        from crosscheck.pipeline.flax_runner import describe_attention_impl

        console.print(f"attention impl: {describe_attention_impl(report.attention_impl)}")
    mode = report.mode or {}
    if mode.get("check") == "decode":
        counts = sorted(set((mode.get("flax_compilations") or {}).values()))
        compiled = "" if not counts else "; flax jit compilations per variant: " + "/".join(map(str, counts))
        console.print(
            f"decode: prompt of {mode['prompt_len']} tokens, then one token at a time to {mode['tokens']}{compiled}"
        )
    elif mode.get("check") == "padding":
        console.print(f"padding: {mode['side']}, pad lengths {mode['pad_lengths']}; real tokens vs each sequence alone")
    elif mode.get("check") in ("train", "grad"):
        _render_train_mode(mode, console)
    if mode.get("jax_layers"):
        console.print(f"jax layers: {', '.join(mode['jax_layers'])} (float32, matmul precision highest)")
    for backend, why in (mode.get("skipped_backends") or {}).items():
        console.print(f"{backend}: {why}")
    v = report.versions
    ttnn = v.get("ttnn") or f"absent ({v.get('ttnn_reason')})"
    console.print(f"versions: torch {v.get('torch')}, jax {v.get('jax')}, flax {v.get('flax')}, ttnn {ttnn}")
    precisions = sorted({f"{r.dtype} at {r.precision}" for r in report.results if r.backend == "flax" and r.precision})
    if precisions:  # what "float32" meant for the JAX matmuls (TF32 below "highest" on a GPU)
        console.print(f"flax matmul precision: {', '.join(precisions)}")
    if report.sharding is not None:
        sh = report.sharding
        ring = ", attention as ring attention" if sh["mode"] == "sequence" else ""
        console.print(
            f"sharding: {sh['mode']} over {sh['devices']} {sh.get('platform', '')} devices{ring} "
            '(jaxattn.sharding); the "flax 1 device" row is the same module on one device'
        )


def _table(report: Report, versus: bool):
    """A row per result, a section per variant; ``versus``: a "vs" column naming each row's reference."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAVY, header_style="bold")
    for col, justify in (
        ("variant", "left"),
        ("backend", "left"),
        *((("vs", "left"),) if versus else ()),
        ("dtype", "left"),
        ("shape", "left"),
        ("max abs err", "right"),
        ("max rel err", "right"),
        ("PCC", "right"),
        ("ULP", "right"),
        ("", "left"),
    ):
        table.add_column(col, justify=justify, no_wrap=True)
    previous = None
    for r in report.results:
        if previous is not None and r.variant != previous:
            table.add_section()
        verdict = "[green]PASS[/green]" if r.passed else "[bold red]FAIL[/bold red]"
        stage = (r.detail or {}).get("first_diverging_stage")
        if not r.passed and stage:  # --jax-layers: where the layer first leaves the float64 reference
            verdict += f" at {stage}"
        table.add_row(
            r.variant if r.variant != previous else "",
            backend_label(r),
            *((r.reference,) if versus else ()),
            r.dtype,
            "x".join(map(str, r.shape or [])),
            _num(r.max_abs_err),
            _num(r.max_rel_err),
            _pcc(r.pcc),
            _ulp(r.ulp),
            verdict,
        )
        previous = r.variant
    return table


#: Checks whose rows name their reference in a "vs" column (several references per variant).
_VERSUS_CHECKS = ("decode", "padding", "train", "grad")


def _render_train_mode(mode: dict, console) -> None:
    """The header lines of a --train / --grad run: dropout, masks, loss (the backends skipped follow)."""
    from rich.markup import escape  # the loss names default_rng([seed, 1]): brackets, not markup

    if mode.get("train"):
        rate = mode.get("dropout")
        rate = "no variant with dropout" if rate in (None, []) else f"dropout {rate}"
        console.print(f"training mode: {rate}; masks: {mode.get('masks')} (seed {mode.get('seed')})")
    if mode.get("check") == "grad":
        console.print(
            f"gradients: loss {escape(str(mode.get('loss')))}, seed {mode.get('seed')}; torch autograd vs jax.grad"
        )


def _timing(report: Report) -> str:
    return f" in {report.seconds:.1f} s" if report.seconds is not None else ""


def write_json(report: Report, path: str | os.PathLike) -> None:
    """The JSON report (see the README for its fields); NaN/inf written as strings to stay valid JSON.

    Written atomically (:func:`crosscheck.porting.outputs.atomic_write`): a failure leaves no partial file.
    Callers check ``path`` against the run's inputs before the run
    (:func:`crosscheck.porting.outputs.check_output_path`).
    """
    path = os.fspath(path)
    text = json_text(report)
    check_output_path(path, "--json", what="JSON report")
    atomic_write_text(path, text, what="JSON report")


def json_text(report) -> str:
    """``report.to_dict()`` as indented JSON ending in a newline (``--json -`` prints it on stdout)."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(report.to_dict()), indent=2, allow_nan=False) + "\n"
