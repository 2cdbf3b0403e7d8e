"""Views of a :class:`crosscheck.results.Report`: the rich terminal table and the JSON file."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from crosscheck.outputs import atomic_write_text, check_output_path
from crosscheck.results import Report, Result


def backend_label(r: Result) -> str:
    """How a row names its backend, honest about what ran (e.g. ``ttnn (host model)``)."""
    if r.backend == "torch":
        return "torch (cpu, vs float64)" if r.reference == "torch float64" else "torch (cpu)"
    if r.backend == "flax":
        return f"flax ({r.runtime})"
    if r.backend == "ttnn":
        return {"host": "ttnn (host model)", "device": "ttnn (device)"}.get(r.runtime, f"ttnn ({r.runtime})")
    return r.backend


def _num(x: Optional[float], fmt: str = ".2e") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, fmt)


def _pcc(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.6f}"


def _ulp(x: Optional[int]) -> str:
    if x is None:
        return "-"
    return "inf" if x >= 2**62 else str(x)


def render(report: Report, console, *, quiet: bool = False) -> None:
    """Print ``report`` on ``console`` (a ``rich.console.Console``); ``quiet``: failures and one line only."""
    from rich import box
    from rich.table import Table

    if not quiet:
        console.print(f"[bold]crosscheck[/bold]  input: {report.input.get('description', report.input.get('source'))}")
        console.print(f"weights: {report.weights}")
        if report.ttnn_runtime:
            where = f" via {report.ttnn_runtime['python']}" if report.ttnn_runtime.get("python") else ""
            console.print(f"ttnn runtime: {report.ttnn_runtime.get('name')} - {report.ttnn_runtime.get('description')}{where}")
        if report.attention_impl is not None:
            from crosscheck.flax_runner import describe_attention_impl

            console.print(f"attention impl: {describe_attention_impl(report.attention_impl)}")
        mode = report.mode or {}
        if mode.get("check") == "decode":
            counts = sorted(set((mode.get("flax_compilations") or {}).values()))
            compiled = "" if not counts else "; flax jit compilations per variant: " + "/".join(map(str, counts))
            console.print(f"decode: prompt of {mode['prompt_len']} tokens, then one token at a time to {mode['tokens']}{compiled}")
        elif mode.get("check") == "padding":
            console.print(f"padding: {mode['side']}, pad lengths {mode['pad_lengths']}; real tokens vs each sequence alone")
        v = report.versions
        ttnn = v.get("ttnn") or f"absent ({v.get('ttnn_reason')})"
        console.print(f"versions: torch {v.get('torch')}, jax {v.get('jax')}, flax {v.get('flax')}, ttnn {ttnn}")
        table = Table(box=box.SIMPLE_HEAVY, header_style="bold")
        versus = mode.get("check") in ("decode", "padding")
        for col, justify in (
            ("variant", "left"), ("backend", "left"), *((("vs", "left"),) if versus else ()), ("dtype", "left"), ("shape", "left"),
            ("max abs err", "right"), ("max rel err", "right"), ("PCC", "right"), ("ULP", "right"), ("", "left"),
        ):
            table.add_column(col, justify=justify, no_wrap=True)
        previous = None
        for i, r in enumerate(report.results):
            if previous is not None and r.variant != previous:
                table.add_section()
            verdict = "[green]PASS[/green]" if r.passed else "[bold red]FAIL[/bold red]"
            table.add_row(
                r.variant if r.variant != previous else "",
                backend_label(r), *((r.reference,) if versus else ()), r.dtype, "x".join(map(str, r.shape or [])),
                _num(r.max_abs_err), _num(r.max_rel_err), _pcc(r.pcc), _ulp(r.ulp), verdict,
            )
            previous = r.variant
        console.print(table)
    for r in report.results:
        for failure in r.failures:
            against = f" vs {r.reference}" if (report.mode or {}).get("check") in ("decode", "padding") else ""
            console.print(f"[red]FAIL[/red] {r.variant} / {backend_label(r)}{against}: {failure}", highlight=False)
    n_pass = sum(r.passed for r in report.results)
    total = len(report.results)
    if report.passed:
        console.print(f"[green]all {total} checks passed[/green]" + ("" if quiet else _timing(report)))
    else:
        console.print(
            f"[bold red]{total - n_pass} of {total} checks failed[/bold red]: {', '.join(report.failing_variants)}"
        )


def _timing(report: Report) -> str:
    return f" in {report.seconds:.1f} s" if report.seconds is not None else ""


def write_json(report: Report, path: str | os.PathLike) -> None:
    """The JSON report (see the README for its fields); NaN/inf written as strings to stay valid JSON.

    Written atomically (:func:`crosscheck.outputs.atomic_write`): a failure leaves no partial file.
    Callers check ``path`` against the run's inputs before the run (:func:`crosscheck.outputs.check_output_path`).
    """
    path = os.fspath(path)

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    text = json.dumps(clean(report.to_dict()), indent=2, allow_nan=False)
    check_output_path(path, "--json", what="JSON report")
    atomic_write_text(path, text + "\n", what="JSON report")
