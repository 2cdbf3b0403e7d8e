"""``crosscheck bench``: forward latency of jaxattn's multi-head attention against torch, same weights, same process.

Implementations (``--impls``; default all):

* ``jax-<impl>`` for each implementation of :mod:`jaxattn.implementations` a CPU runs (today
  ``jax-naive`` / ``jax-blockwise`` / ``jax-xla``; :func:`jax_impls`) and ``jax-auto``:
  ``jaxattn.MultiHeadAttention`` with that ``attention_impl``, jitted (``jax.jit(module.apply)``).
* ``jax-fused-blockwise``: the same weights with Q/K/V fused into one ``(d, 3d)`` matmul
  (:func:`jaxattn.fused.fused_mha`), blockwise attention.
* ``torch-book``: ``crosscheck.references.torch_ref.MultiHeadAttention``, eager.
* ``torch-sdpa``: the book's projections around ``F.scaled_dot_product_attention(is_causal=True)``.
* ``torch-compile``: ``torch.compile`` of the book class (a failure is caught and reported).

Method: weights drawn once for the torch book class and ported to Flax with
:func:`crosscheck.porting.port.load_state_dict`; one input per shape shared by all; warm-up
calls excluded (JAX's compile is timed separately, via ``lower().compile()``);
then ``--repeats`` rounds in which every implementation runs once, round-robin,
the order rotated each round; the median per implementation is reported with
its speed ratio to the fastest torch implementation. float32 JAX programs are
compiled at matmul precision ``highest`` (``--device cuda`` and ``--decode`` too): a
GPU's default is TF32, ~3e-4 off torch's float32; a CPU computes float32 either way.

Memory (``--memory``): ``analysis`` (default) reports, for JAX only, XLA's own
``compiled.memory_analysis()`` (temp + argument + output bytes: what the
program needs, not what the process holds) under ``memory``; ``rss`` also runs
each implementation in a fresh subprocess and reports, under ``memory_rss``,
its ``ru_maxrss`` high-water mark (whole process: interpreter, JAX/torch
runtimes, weights, input) and the rise of that mark caused by the first forward.
The table's memory column shows the RSS high-water mark when measured, else the analysis total.

Breakdown (``--breakdown``): the two pieces that dominate one forward, timed in
their own round-robin with the same inputs: one projection matmul
(``x @ W_query``, as ``nn.Linear`` in torch) and the attention core alone
(``jaxattn.core.causal_attention(impl="auto")`` against
``F.scaled_dot_product_attention(is_causal=True)`` on the same ``(b, H, T, hd)``
query/key/value). It shows where a whole-MHA ratio comes from.

Recompilations (``--recompile-sweep``): a jitted ``MultiHeadAttention`` applied to
a sweep of token counts with no bucketing, power-of-two buckets and multiples
of 128 (:mod:`jaxattn.bucketing`); a Python counter inside the traced function
counts traces (= compilations), checked against ``jax.jit``'s cache size.

Decoding (``--decode``, with ``--prompt-len`` and ``--steps``): per-token latency of
KV-cache decoding, Flax against the book's cached torch class (:mod:`crosscheck.benchmarks.bench_decode`).

GPU (``--device cuda``, with ``--backward`` and ``--pipeline``): torch on CUDA against JAX on the
GPU, synchronised per-call and pipelined timings and peak device memory (:mod:`crosscheck.benchmarks.bench_gpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

from crosscheck.benchmarks import bench_decode, bench_gpu, bench_models, bench_shard, bench_timing
from crosscheck.benchmarks.bench_report import print_breakdown, print_table, write_plot
from crosscheck.benchmarks.bench_timing import (
    Runner,
    build_runners,
    count_recompilations,
    max_abs_diffs,
    measure_rss,
    time_breakdown,
    time_round_robin,
)
from crosscheck.errors import BadInputError
from crosscheck.pipeline import budget, placement
from crosscheck.porting.outputs import atomic_write_text, check_output_path, same_file

TORCH_IMPLS = ("torch-book", "torch-sdpa", "torch-compile")
DTYPES = ("float32", "bfloat16")
MIN_TOKENS, MAX_TOKENS = bench_models.MIN_TOKENS, bench_models.MAX_TOKENS
DEFAULT_SWEEP = tuple(range(100, 1025, 44))  # 22 lengths that are neither powers of two nor multiples of 128


def jax_impls() -> tuple[str, ...]:
    """``jax-<kernel>`` for each kernel of the table a CPU runs (:func:`bench_models.cpu_kernels`: naive,
    blockwise, xla), ``jax-auto``, and the fused-QKV model on the blockwise kernel."""
    return (*(f"jax-{name}" for name in bench_models.cpu_kernels()), "jax-auto", "jax-fused-blockwise")


def all_impls() -> tuple[str, ...]:
    """Every row, in the default order: :func:`jax_impls`, then :data:`TORCH_IMPLS`."""
    return jax_impls() + TORCH_IMPLS


# --- arguments ---------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from err


def _name_list(text: str) -> list[str]:
    return [t.strip().lower() for t in text.replace(",", " ").split() if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``crosscheck bench`` options (GPT-2 small by default)."""
    parser.add_argument(
        "--tokens",
        type=_int_list,
        nargs="+",
        default=[[1024]],
        help="token counts, e.g. --tokens 128 256 1024 or --tokens 128,1024 (default 1024)",
    )
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--d-model", type=int, default=768, help="d_in = d_out (default 768)")
    parser.add_argument("--heads", type=int, default=12, help="number of heads (default 12)")
    parser.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)} (default float32)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per implementation (default 1)")
    parser.add_argument(
        "--impls",
        type=_name_list,
        nargs="+",
        default=None,
        help="subset of jax-<each implementation a CPU runs>, jax-auto, jax-fused-blockwise, "
        f"{', '.join(TORCH_IMPLS)} (default all)",
    )
    parser.add_argument(
        "--memory",
        choices=("analysis", "rss", "none"),
        default="analysis",
        help="peak memory: XLA memory_analysis (JAX only), per-impl subprocess RSS, or none",
    )
    parser.add_argument(
        "--recompile-sweep",
        type=_int_list,
        nargs="*",
        default=None,
        help="count compilations over these token counts with/without bucketing (no value: 100,144,...,1024)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time one projection matmul and the attention core alone, JAX vs torch",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", dest="json_path", default=None, help="write results as JSON here (-: stdout, the tables go to stderr)"
    )
    parser.add_argument("--plot", dest="plot_path", default=None, help="write a PNG of latency vs tokens here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one impl, RSS mode
    bench_decode.add_arguments(parser)
    bench_shard.add_arguments(parser)
    bench_gpu.add_arguments(parser)
    budget.add_budget_option(parser)


def _validate(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    tokens = bench_models.flat(args.tokens)
    if not tokens:
        raise BadInputError("--tokens: give at least one token count")
    for t in tokens:
        if not MIN_TOKENS <= t <= MAX_TOKENS:
            raise BadInputError(f"--tokens: {t} is outside [{MIN_TOKENS}, {MAX_TOKENS}]")
    bench_models.check_sizes(args)
    if args.warmup < 0:
        raise BadInputError(f"--warmup must be >= 0, got {args.warmup}")
    placement.check_dtype(args.dtype, DTYPES, what="--dtype")
    known = all_impls()
    impls = list(known)
    if args.impls:
        impls = bench_models.flat(args.impls)
        unknown = [i for i in impls if i not in known]
        if unknown:
            raise BadInputError(f"--impls: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        if not impls:
            raise BadInputError(f"--impls: give at least one implementation; choose from {', '.join(known)}")
    if args.seed < 0:
        raise BadInputError(f"--seed must be >= 0, got {args.seed}")
    if args.recompile_sweep is not None:
        for t in bench_models.flat(args.recompile_sweep):
            if not MIN_TOKENS <= t <= MAX_TOKENS:
                raise BadInputError(f"--recompile-sweep: {t} is outside [{MIN_TOKENS}, {MAX_TOKENS}]")
    return tokens, impls


# --- memory: one implementation in this process (--child; bench_timing.measure_rss starts it) ----------


def run_child(args: argparse.Namespace) -> int:
    """``--child IMPL``: set up one implementation, run one forward, print RSS figures as JSON."""
    tokens, _ = _validate(args)
    t = tokens[0]
    book = bench_models.book_torch(
        args.d_model, args.heads, t if args.child.startswith("torch") else 1, args.dtype, args.seed
    )
    x_np = bench_models.input_np(args, t)
    if args.child.startswith("jax-"):
        runner = bench_timing.jax_runner(args.child, book, x_np, args, t)  # compiles (not run) before the baseline
    else:
        runner = bench_timing.torch_runner(args.child, book, x_np, args)
    before = bench_timing.max_rss_bytes()
    runner.call()
    after = bench_timing.max_rss_bytes()
    print(
        json.dumps(
            {
                "impl": args.child,
                "max_rss_bytes": after,
                "setup_rss_bytes": before,
                "forward_rss_rise_bytes": after - before,
                "status": runner.status,
            }
        )
    )
    return 0


# --- entry points ------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit status (bad options raise :class:`BadInputError`).

    ``--json -``: the JSON alone on stdout, the tables on stderr (and no progress bar).
    """
    if getattr(args, "child", None):
        with _on_the_host():
            return run_child(args)
    if getattr(args, "json_path", None) != "-":
        return _main(args)
    stdout = sys.stdout
    args.json_stream = stdout
    with contextlib.redirect_stdout(sys.stderr):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    _check_output_paths(args)
    if bench_shard.wanted(args):  # --devices N --shard MODE: before anything imports JAX (crosscheck.pipeline.devices)
        _write_json(bench_shard.run(args), args.json_path, args)
        return 0
    if getattr(args, "device", "cpu") == "cuda":  # torch on CUDA, JAX on the GPU: crosscheck.benchmarks.bench_gpu
        return bench_gpu.main(args)
    with _on_the_host():
        return _main_on_the_cpu(args)


def _on_the_host():
    """``--device cpu``: JAX on the host CPU too, on a machine whose default backend is a GPU (torch is on the CPU)."""
    import jax

    return jax.default_device(jax.devices("cpu")[0])


def _main_on_the_cpu(args: argparse.Namespace) -> int:
    if getattr(args, "decode", False):
        _check_budget(args, [args.prompt_len + args.steps], ["torch-book"])
        decoded = bench_decode.run(args)
        _write_json(decoded, args.json_path, args)
        return 0
    tokens_list, impls = _validate(args)
    _check_budget(args, tokens_list, impls)
    config = _config(args, impls)
    print("crosscheck bench: " + ", ".join(f"{k}={v}" for k, v in config.items() if k != "impls"))
    rows: list[dict] = []
    pieces: list[dict] = []
    sweep = _sweep_progress(args, len(tokens_list))
    for tokens in tokens_list:
        rows += _time_shape(tokens, impls, args, sweep.step)
        print(f"\n== tokens={tokens} batch={args.batch} d_model={args.d_model} heads={args.heads} {args.dtype} ==")
        print_table(rows, tokens)
        if args.breakdown:  # only W_query is used: a context-1 book skips the loop's (tokens, tokens) mask
            book = bench_models.book_torch(args.d_model, args.heads, 1, args.dtype, args.seed)
            pieces += time_breakdown(tokens, args, book)
            print_breakdown(pieces, tokens)
            del book
    sweep.close()
    _add_speedups(rows)
    result: dict[str, Any] = {"config": config, "results": rows}
    if args.breakdown:
        result["breakdown"] = pieces
    if args.recompile_sweep is not None:
        result["recompilation"] = _recompilations(args)
    _write_json(result, args.json_path, args)
    if args.plot_path is not None:
        write_plot(rows, args.plot_path)
        print(f"wrote {args.plot_path}")
    return 0


def _config(args: argparse.Namespace, impls: list[str]) -> dict[str, Any]:
    """The run's settings and versions, as the JSON records them."""
    import jax
    import torch

    return {
        "batch": args.batch,
        "d_model": args.d_model,
        "heads": args.heads,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "impls": impls,
        "memory": args.memory,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()),
    }


def _time_shape(tokens: int, impls: list[str], args: argparse.Namespace, step: Callable[[str], None]) -> list[dict]:
    """The rows of one token count: every implementation built, timed round-robin, its memory measured.

    ``step(label)`` after the warm-up and each timed round (the sweep's progress).
    """
    context_length = tokens
    book = bench_models.book_torch(
        args.d_model, args.heads, tokens if any(i.startswith("torch") for i in impls) else 1, args.dtype, args.seed
    )
    runners = build_runners(impls, tokens, args, book, context_length)
    label = f"tokens={tokens} ({len(runners)} impls)"
    times = time_round_robin(runners, args.repeats, args.warmup, functools.partial(step, label))
    diffs = max_abs_diffs(runners)
    rows = [_row(runner, tokens, times, diffs, args) for runner in runners]
    del runners, book
    if args.memory == "rss":
        for row in rows:
            row["memory_rss"] = {"method": "subprocess ru_maxrss", **measure_rss(row["impl"], tokens, args)}
    return rows


def _row(runner: Runner, tokens: int, times: dict[str, list[float]], diffs: dict, args: argparse.Namespace) -> dict:
    """One implementation's result row at one token count."""
    row = {
        "impl": runner.name,
        "framework": runner.framework,
        "tokens": tokens,
        "batch": args.batch,
        "d_model": args.d_model,
        "heads": args.heads,
        "dtype": args.dtype,
        "median_s": statistics.median(times[runner.name]) if runner.name in times else None,
        "times_s": times.get(runner.name, []),
        "compile_s": runner.compile_s,
        "status": runner.status,
        "memory": None,
        "max_abs_diff_vs_reference": diffs.get(runner.name),
    }
    if args.memory != "none" and runner.memory_bytes is not None:
        row["memory"] = {"method": "xla memory_analysis (temp+argument+output)", **runner.memory_bytes}
    return row


def _add_speedups(rows: list[dict]) -> None:
    """Each row's speed relative to the fastest torch row of the same shape."""
    for row in rows:
        torch_ok = [
            r["median_s"]
            for r in rows
            if r["tokens"] == row["tokens"] and r["framework"] == "torch" and r["median_s"] is not None
        ]
        row["speedup_vs_fastest_torch"] = (min(torch_ok) / row["median_s"]) if torch_ok and row["median_s"] else None


def _recompilations(args: argparse.Namespace) -> dict:
    """``--recompile-sweep``: :func:`count_recompilations` over the asked (or default) token counts, printed."""
    sweep = [t for g in args.recompile_sweep for t in (g if isinstance(g, list) else [g])] or list(DEFAULT_SWEEP)
    rec = count_recompilations(sweep, args)
    print(f"\n== recompilations over {len(sweep)} token counts ({min(sweep)}..{max(sweep)}), batch 1 ==")
    for policy, r in rec["policies"].items():
        print(
            f"{policy:<10} compilations={r['compilations']:>3}  jit cache={r['jit_cache_size']}  "
            f"sweep wall time={r['total_s']:.1f}s"
        )
    return rec


def _check_budget(args: argparse.Namespace, tokens_list: list[int], impls: list[str]) -> None:
    """Loop counts bounded and every shape's memory estimated (:mod:`crosscheck.pipeline.budget`) before any work."""
    for flag, value, limit in (
        ("--repeats", args.repeats, budget.MAX_REPEATS),
        ("--warmup", args.warmup, budget.MAX_WARMUP),
        ("--heads", args.heads, budget.MAX_HEADS),
        ("--steps", getattr(args, "steps", 0), budget.MAX_DECODE_STEPS),
        ("--prompt-len", getattr(args, "prompt_len", 0), MAX_TOKENS),
    ):
        budget.check_count(int(value), limit, flag)
    if args.recompile_sweep is not None:
        n = sum(len(g) if isinstance(g, list) else 1 for g in args.recompile_sweep)
        budget.check_count(n, budget.MAX_SWEEP_LENGTHS, "--recompile-sweep: the number of token counts")
    itemsize = 2 if args.dtype == "bfloat16" else 4
    with budget.limited(getattr(args, "max_memory", None)):
        for tokens in tokens_list:
            budget.check_terms(
                budget.bench_terms(tokens, args.batch, args.d_model, args.heads, itemsize, impls),
                f"bench at tokens={tokens}",
            )


def _sweep_progress(args: argparse.Namespace, shapes: int):
    """The sweep's steps (warm-up + timed rounds per shape), with a bar on a terminal
    (:mod:`crosscheck.pipeline.progress`)."""
    from crosscheck.pipeline import progress

    bar = progress.Bar() if progress.wanted(json_path=getattr(args, "json_path", None)) else None
    return progress.Steps(shapes * (args.repeats + 1), bar)


def _check_output_paths(args: argparse.Namespace) -> None:
    """``--json`` and ``--plot`` checked before the benchmark runs (and never the same file)."""
    json_path, plot_path = getattr(args, "json_path", None), getattr(args, "plot_path", None)
    if json_path is not None and json_path != "-":  # "-": stdout
        check_output_path(json_path, "--json", what="JSON results")
    if plot_path is not None:
        check_output_path(plot_path, "--plot", what="plot")
        if json_path is not None and same_file(plot_path, json_path):
            raise BadInputError(
                f"--plot {plot_path} is also the --json file: give the plot and the results different names"
            )


def _write_json(result: dict, path: str | None, args: argparse.Namespace | None = None) -> None:
    if path == "-":
        print(json.dumps(result, indent=2), file=getattr(args, "json_stream", None) or sys.stdout)
    elif path is not None:
        atomic_write_text(path, json.dumps(result, indent=2), what="JSON results")
        print(f"wrote {path}")


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crosscheck.benchmarks.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except BadInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
