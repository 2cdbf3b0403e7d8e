"""``crosscheck --plot DIR``: the attention weights as pictures, from the stages of :mod:`crosscheck.checks.stages`.

* ``DIR/<variant>.png``: a row per head; per backend its weights as a heatmap (queries down,
  keys across, labelled with the tokens: the seed sentence's words for the default input, as the
  book's figures, else indices), and for flax and ttnn ``|weights - torch's|`` beside them
  (batch row 0 when the input is a batch).
* ``DIR/summary.png``: every variant's max abs error of the output over its bound, per backend,
  on a log axis with the bound at 1.

matplotlib is the optional extra ``.[plot]`` (Agg backend: no display needed). :func:`plan`
runs before the work: the directory's parent must exist, and a PNG already there is replaced
only when asked (``--plot-overwrite``). Each file is written atomically (:mod:`crosscheck.porting.outputs`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.porting.outputs import atomic_write
from crosscheck.variants import registry

SUMMARY = "summary.png"
#: More tokens than this: every n-th tick only, so the labels stay legible.
MAX_TICKS = 16


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or :class:`BadInputError` naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise BadInputError("--plot needs matplotlib, the optional extra: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class Plan:
    directory: str
    overwrite: bool


def plan(
    directory: str, variants: Sequence[str] | None, *, from_weights: bool = False, overwrite: bool = False
) -> Plan:
    """Check ``--plot DIR`` before any work: matplotlib present, DIR a directory (or creatable), no PNG replaced
    unasked.

    The files checked are those of ``variants`` (the default run's without names; every
    variant's when ``--weights`` choose them) and ``summary.png``.
    """
    require_matplotlib()
    if not directory or not str(directory).strip():
        raise BadInputError("--plot: empty directory name")
    target = os.path.realpath(directory)
    if os.path.exists(target) and not os.path.isdir(target):
        raise BadInputError(f"--plot {directory}: exists and is not a directory")
    parent = target if os.path.isdir(target) else os.path.dirname(target)
    if not os.path.isdir(parent):
        raise BadInputError(
            f"--plot {directory}: directory {os.path.dirname(os.path.abspath(directory))} does not exist"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"--plot {directory}: {parent} is not writable")
    if variants:
        names = [registry.get(n).name for n in variants if n.lower() in {v.lower() for v in registry.names()}]
    else:
        names = registry.names() if from_weights else [v.name for v in registry.default_run()]
    if not overwrite and os.path.isdir(target):
        taken = [f for f in [*(f"{n}.png" for n in names), SUMMARY] if os.path.lexists(os.path.join(target, f))]
        if taken:
            raise BadInputError(
                f"--plot {directory}: {', '.join(taken)} already there; refusing to replace them "
                "(--plot-overwrite replaces them, or choose another directory)"
            )
    return Plan(directory, overwrite)


def _ticks(ax, rows: Sequence[str], cols: Sequence[str]) -> None:
    """Token labels on both axes, every n-th one past :data:`MAX_TICKS`."""
    for labels, set_ticks, set_labels, rotation in (
        (cols, ax.set_xticks, ax.set_xticklabels, 90),
        (rows, ax.set_yticks, ax.set_yticklabels, 0),
    ):
        idx = list(range(0, len(labels), max(1, -(-len(labels) // MAX_TICKS))))
        set_ticks(idx)
        set_labels([labels[i] for i in idx], rotation=rotation, fontsize=7)


def _labels(labels: Sequence[str], n: int) -> list[str]:
    return list(labels[:n]) if len(labels) >= n else [str(i) for i in range(n)]


def variant_figure(plt, variant, labels: Sequence[str]):
    """The heads x (backend, |diff|) grid of one :class:`crosscheck.checks.stages.VariantStages`."""
    weights = {b: a["weights"][0] for b, a in variant.arrays.items() if "weights" in a}  # (heads, T, S), batch row 0
    ref = weights["torch"]
    columns = [("torch", ref, False)]
    for backend in (b for b in ("flax", "ttnn") if b in weights):
        columns += [(backend, weights[backend], False), (f"|{backend} - torch|", np.abs(weights[backend] - ref), True)]
    heads, tq, tk = ref.shape
    fig, axes = plt.subplots(heads, len(columns), figsize=(2.7 * len(columns) + 0.5, 2.5 * heads + 0.8), squeeze=False)
    q_labels, k_labels = _labels(labels, tq), _labels(labels, tk)
    for h in range(heads):
        for c, (title, data, is_diff) in enumerate(columns):
            ax = axes[h][c]
            im = ax.imshow(
                data[h],
                cmap="magma" if is_diff else "viridis",
                vmin=0.0,
                vmax=None if is_diff else 1.0,
                interpolation="nearest",
            )
            _ticks(ax, q_labels, k_labels)
            ax.set_title(f"{title}  head {h}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle(f"{variant.variant}: attention weights (queries down, keys across; batch row 0)", fontsize=10)
    fig.tight_layout()
    return fig


def summary_figure(plt, report):
    """Every variant's output error over its bound, per backend (log axis; the bound is 1)."""
    names = [v.variant for v in report.variants]
    backends = [b for b in ("flax", "ttnn") if any(b in v.output_error for v in report.variants)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    width = 0.8 / max(1, len(backends))
    tiny = 1e-6  # an exact match (error 0) drawn at the axis floor
    for i, backend in enumerate(backends):
        ratios = [
            max(v.output_error[backend][0] / v.output_error[backend][1], tiny) if backend in v.output_error else np.nan
            for v in report.variants
        ]
        x = np.arange(len(names)) + (i - (len(backends) - 1) / 2) * width
        ax.bar(x, ratios, width, label=backend)
        for xi, v in zip(x, report.variants, strict=True):
            if backend in v.output_error and v.output_error[backend][0] == 0.0:
                ax.text(xi, tiny * 1.5, "exact", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="bound")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("max abs err / bound (output)")
    ax.set_title("every variant's error against its bound (below the red line: pass)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write(report, the_plan: Plan) -> list[str]:
    """Draw and write the PNGs of ``report`` (a :class:`crosscheck.checks.stages.StagesReport`); the paths written."""
    plt = require_matplotlib()
    os.makedirs(the_plan.directory, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = os.path.join(the_plan.directory, name)
        if not the_plan.overwrite and os.path.lexists(path):
            raise BadInputError(f"--plot: {path} appeared during the run; refusing to replace it")
        try:
            atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), what="plot")
        finally:
            plt.close(fig)
        written.append(path)

    for v in report.variants:
        save(variant_figure(plt, v, report.labels), f"{v.variant}.png")
    save(summary_figure(plt, report), SUMMARY)
    return written
