"""The report of ``crosscheck --stages`` (:mod:`crosscheck.checks.stages`): layouts, comparing, views.

Each backend's raw stages are normalised to heads-first arrays, compared stage by stage with
torch's under the backend's row of the tolerance table, and rendered as a table per variant with
each backend's first stage over its bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from crosscheck.pipeline import compare as cmp

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from rich.console import JustifyMethod

#: Every stage a variant may expose, in the order the layer computes them.
STAGES = (
    "queries",
    "keys",
    "values",
    "queries_normed",
    "keys_normed",
    "queries_rope",
    "keys_rope",
    "scores",
    "weights",
    "context",
    "output",
)
#: A backend's raw stages: name -> arrays (one per head for the wrapper, else one); ``output`` is one array.
Raw = dict[str, list]


# --- layouts ------------------------------------------------------------------------------------


def heads_first(a: np.ndarray) -> np.ndarray:
    """``a`` as ``(batch, heads, tokens, dim)``: ``(T, d)`` -> ``(1, 1, T, d)``, ``(b, T, d)`` -> ``(b, 1, T, d)``."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        return a[None, None]
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4:
        return a
    raise ValueError(f"a stage must have rank 2..4, got shape {a.shape}")


def normalise(raw: Raw) -> dict[str, np.ndarray]:
    """One array per stage: heads-first, the wrapper's per-head arrays stacked on the heads axis."""
    out = {}
    for name, arrays in raw.items():
        if name == "output":
            out[name] = np.asarray(arrays[0], dtype=np.float32)
        else:
            out[name] = np.concatenate([heads_first(a) for a in arrays], axis=1)
    return out


# --- comparing ---------------------------------------------------------------------------------------


@dataclass
class StageRow:
    stage: str
    shape: list[int] | None
    max_abs_err: float | None
    bound: float | None  # max_abs x the stage's ref_scale
    pcc: float | None
    passed: bool
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class BackendStages:
    """One variant on one backend: a row per stage, against torch's same stage."""

    backend: str
    runtime: str
    dtype: str
    rows: list[StageRow]

    @property
    def first_failure(self) -> StageRow | None:
        return next((r for r in self.rows if not r.passed), None)

    @property
    def passed(self) -> bool:
        return self.first_failure is None

    def to_dict(self) -> dict:
        first = self.first_failure
        return {
            "backend": self.backend,
            "runtime": self.runtime,
            "dtype": self.dtype,
            "passed": self.passed,
            "first_failing_stage": None if first is None else first.stage,
            "stages": [r.to_dict() for r in self.rows],
        }


@dataclass
class VariantStages:
    variant: str
    #: Normalised arrays per backend (``torch`` included): what ``--plot`` draws.
    arrays: dict[str, dict[str, np.ndarray]]
    backends: list[BackendStages]
    #: The tolerance of each backend's output (``--plot``'s summary): ``{backend: (max_abs_err, bound)}``.
    output_error: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class StagesReport:
    variants: list[VariantStages]
    input: dict
    weights: str
    ttnn_runtime: dict | None
    labels: list[str]  # one per token: the seed sentence's words, else indices
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(b.passed for v in self.variants for b in v.backends)

    @property
    def failing_variants(self) -> list[str]:
        return [v.variant for v in self.variants if not all(b.passed for b in v.backends)]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "mode": {"check": "stages"},
            "failing_variants": self.failing_variants,
            "input": self.input,
            "weights": self.weights,
            "ttnn_runtime": self.ttnn_runtime,
            "tokens": self.labels,
            "stages": [{"variant": v.variant, "backends": [b.to_dict() for b in v.backends]} for v in self.variants],
            "seconds": self.seconds,
        }


def compare_stages(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], tol: cmp.Tolerance, dtype: str
) -> list[StageRow]:
    """A row per stage of ``reference`` (in :data:`STAGES` order, a plugin's submodules before ``output``); a
    stage of :data:`STAGES` the candidate lacks fails, a submodule it lacks is left out.

    Every stage is held to ``tol``'s abs and rel bounds; PCC only at ``output`` (as the forward check
    does). Inside the layer PCC is ill-conditioned: an almost uniform softmax (SelfAttentionV2 on the
    seed sentence: every weight ~1/6) has almost no variance to correlate, and ttnn's bf16 weights read
    PCC 0.9987 there at a max abs error of 4.6e-4, 1/68 of the bound.
    """
    rows = []
    inner = replace(tol, min_pcc=None)
    # A registered plugin's stages are its submodules, in the order torch ran them, before the output;
    # they are compared where both sides have one of that name.
    submodules = [s for s in reference if s not in STAGES]
    order = [s for s in STAGES if s in reference and s != "output"] + submodules
    for stage in [*order, *(["output"] if "output" in reference else [])]:
        if stage not in candidate:
            if stage in submodules:
                continue
            rows.append(StageRow(stage, None, None, None, None, False, [f"stage {stage} not exposed by this backend"]))
            continue
        c = cmp.compare(candidate[stage], reference[stage], tol if stage == "output" else inner, computed_in=dtype)
        m = c.metrics
        rows.append(
            StageRow(
                stage,
                list(c.shape),
                None if m is None else m.max_abs_err,
                None if m is None or tol.max_abs is None else tol.max_abs * m.ref_scale,
                None if m is None else m.pcc,
                c.passed,
                list(c.failures),
            )
        )
    return rows


def variant_stages(name: str, torch_raw: Raw, candidates: Sequence[tuple[str, Raw | None, str, str]]) -> VariantStages:
    """``name``'s stages on each ``(backend, raw stages or None, dtype, where it ran)`` against torch's."""
    ref = normalise(torch_raw)
    arrays = {"torch": ref}
    rows, errors = [], {}
    for backend, raw, bdtype, where in candidates:
        if raw is None:
            continue
        tol = cmp.policy_for(backend, bdtype, name)
        arrays[backend] = normalise(raw)
        b = BackendStages(backend, where, bdtype, compare_stages(ref, arrays[backend], tol, bdtype))
        rows.append(b)
        last = b.rows[-1]
        errors[backend] = (
            float("inf") if last.max_abs_err is None else last.max_abs_err,
            float("nan") if last.bound is None else last.bound,
        )
    return VariantStages(name, arrays, rows, errors)


# --- views -------------------------------------------------------------------------------------------


def _label(b: BackendStages) -> str:
    if b.backend == "ttnn":
        return {"host": "ttnn (host model)", "device": "ttnn (device)"}.get(b.runtime, f"ttnn ({b.runtime})")
    return f"{b.backend} ({b.runtime}, {b.dtype})"


def _num(x: float | None) -> str:
    return "-" if x is None else ("inf" if np.isinf(x) else f"{x:.2e}")


def render(report: StagesReport, console, *, quiet: bool = False) -> None:
    """A table per variant (a row per stage and backend), then each backend's first stage over its bound."""
    from rich import box
    from rich.table import Table

    if not quiet:
        console.print(
            f"[bold]crosscheck --stages[/bold]  input: {report.input.get('description', report.input.get('source'))}"
        )
        console.print(f"weights: {report.weights}")
        if report.ttnn_runtime:
            console.print(
                f"ttnn runtime: {report.ttnn_runtime.get('name')} - {report.ttnn_runtime.get('description')}"
                " (generic program: scores and weights are separate ops)"
            )
        table = Table(box=box.SIMPLE_HEAVY, header_style="bold")
        columns: tuple[tuple[str, JustifyMethod], ...] = (
            ("variant", "left"),
            ("backend", "left"),
            ("stage", "left"),
            ("shape", "left"),
            ("max abs err", "right"),
            ("bound", "right"),
            ("PCC", "right"),
            ("", "left"),
        )
        for col, justify in columns:
            table.add_column(col, justify=justify, no_wrap=True)
        for i, v in enumerate(report.variants):
            if i:
                table.add_section()
            first = True
            for b in v.backends:
                for r in b.rows:
                    verdict = "[green]PASS[/green]" if r.passed else "[bold red]FAIL[/bold red]"
                    table.add_row(
                        v.variant if first else "",
                        _label(b),
                        r.stage,
                        "x".join(map(str, r.shape or [])),
                        _num(r.max_abs_err),
                        _num(r.bound),
                        "-" if r.pcc is None else f"{r.pcc:.6f}",
                        verdict,
                    )
                    first = False
        console.print(table)
    for v in report.variants:
        for b in v.backends:
            failure = b.first_failure
            if failure is not None:
                why = "; ".join(failure.failures)
                console.print(
                    f"[red]FAIL[/red] {v.variant} / {_label(b)}: first stage over its bound: "
                    f"[bold]{failure.stage}[/bold] ({why})",
                    highlight=False,
                )
    n = sum(len(v.backends) for v in report.variants)
    if report.passed:
        console.print(
            f"[green]every stage of {len(report.variants)} variant(s) within its bound[/green] "
            f"({n} backend rows) in {report.seconds:.1f} s"
        )
    else:
        bad = sum(not b.passed for v in report.variants for b in v.backends)
        console.print(
            f"[bold red]{bad} of {n} backend rows have a stage over its bound[/bold red]: "
            f"{', '.join(report.failing_variants)}"
        )
