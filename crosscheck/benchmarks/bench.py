"""``crosscheck bench``: forward latency of jaxattn's multi-head attention against torch, same weights, same process.

Implementations (``--impls``; default all):

* ``jax-naive`` / ``jax-blockwise`` / ``jax-xla`` / ``jax-auto``: ``jaxattn.MultiHeadAttention``
  with that ``attention_impl``, jitted (``jax.jit(module.apply)``).
* ``jax-fused-blockwise``: the same weights with Q/K/V fused into one ``(d, 3d)`` matmul
  (:func:`jaxattn.blockwise.fused_mha`), blockwise attention.
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
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from crosscheck.benchmarks import bench_decode, bench_gpu, bench_models, bench_shard
from crosscheck.errors import BadInputError
from crosscheck.pipeline import budget, placement
from crosscheck.porting.outputs import atomic_write, atomic_write_text, check_output_path, same_file

JAX_IMPLS = ("jax-naive", "jax-blockwise", "jax-xla", "jax-auto", "jax-fused-blockwise")
TORCH_IMPLS = ("torch-book", "torch-sdpa", "torch-compile")
ALL_IMPLS = JAX_IMPLS + TORCH_IMPLS
DTYPES = ("float32", "bfloat16")
MIN_TOKENS, MAX_TOKENS = bench_models.MIN_TOKENS, bench_models.MAX_TOKENS
DEFAULT_SWEEP = tuple(range(100, 1025, 44))  # 22 lengths that are neither powers of two nor multiples of 128


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
        "--impls", type=_name_list, nargs="+", default=None, help=f"subset of {', '.join(ALL_IMPLS)} (default all)"
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
    if args.dtype not in DTYPES:
        raise BadInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    impls = list(ALL_IMPLS)
    if args.impls:
        impls = bench_models.flat(args.impls)
        unknown = [i for i in impls if i not in ALL_IMPLS]
        if unknown:
            raise BadInputError(f"--impls: unknown {', '.join(unknown)}; choose from {', '.join(ALL_IMPLS)}")
        if not impls:
            raise BadInputError(f"--impls: give at least one implementation; choose from {', '.join(ALL_IMPLS)}")
    if args.seed < 0:
        raise BadInputError(f"--seed must be >= 0, got {args.seed}")
    if args.recompile_sweep is not None:
        for t in bench_models.flat(args.recompile_sweep):
            if not MIN_TOKENS <= t <= MAX_TOKENS:
                raise BadInputError(f"--recompile-sweep: {t} is outside [{MIN_TOKENS}, {MAX_TOKENS}]")
    return tokens, impls


# --- building the implementations ------------------------------------------------------------------


# The models and inputs every row is built from live in crosscheck.benchmarks.bench_models (the GPU bench shares them).
_torch_dtype, _jax_dtype, _input_np = bench_models.torch_dtype, bench_models.jax_dtype, bench_models.input_np
_book_torch, _sdpa_class, _flax_state = bench_models.book_torch, bench_models.sdpa_class, bench_models.flax_state


class Runner:
    """One implementation at one shape: ``call()`` runs a forward and waits for it."""

    def __init__(self, name: str, framework: str, call: Callable[[], Any], compile_s=None, memory_bytes=None):
        self.name, self.framework, self.call = name, framework, call
        self.compile_s, self.memory_bytes, self.status = compile_s, memory_bytes, "ok"
        self.output: np.ndarray | None = None


def _jax_runner(name, book, x_np, args, context_length) -> Runner:
    import jax
    import jax.numpy as jnp

    from jaxattn.blockwise import fuse_qkv_params, fused_mha

    impl = name.removeprefix("jax-")
    fused = impl == "fused-blockwise"
    module, variables = _flax_state(
        book, args.d_model, args.heads, context_length, args.dtype, "blockwise" if fused else impl
    )
    x = jnp.asarray(x_np, dtype=variables["params"]["out_proj"]["kernel"].dtype)
    if fused:
        params = fuse_qkv_params(variables["params"])
        fn = jax.jit(lambda p, x: fused_mha(p, x, num_heads=args.heads, impl="blockwise"))
    else:
        params = variables
        fn = jax.jit(module.apply)
    start = time.perf_counter()
    with jax.default_matmul_precision(placement.matmul_precision(args.dtype)):
        compiled = fn.lower(params, x).compile()
    compile_s = time.perf_counter() - start
    memory = None
    analysis = compiled.memory_analysis()
    if analysis is not None:
        memory = {
            "temp_bytes": int(analysis.temp_size_in_bytes),
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "output_bytes": int(analysis.output_size_in_bytes),
        }
        memory["total_bytes"] = sum(memory.values())
    return Runner(name, "jax", lambda: compiled(params, x).block_until_ready(), compile_s, memory)


def _torch_runner(name, book, x_np, args) -> Runner:
    import torch

    x = torch.from_numpy(x_np).to(_torch_dtype(args.dtype))
    if name == "torch-book":
        module = book
    elif name == "torch-sdpa":
        module = _sdpa_class()(book).eval()
    else:
        module = torch.compile(book)

    def call():
        with torch.inference_mode():
            return module(x)

    runner = Runner(name, "torch", call)
    if name == "torch-compile":  # compile happens on the first call: time it, catch failure
        start = time.perf_counter()
        try:
            call()
        except Exception as err:  # noqa: BLE001 - any compiler failure is a result to report
            runner.status = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        runner.compile_s = time.perf_counter() - start
    return runner


def build_runners(impls, tokens, args, book, context_length) -> list[Runner]:
    x_np = _input_np(args, tokens)
    runners = []
    for name in impls:
        if name.startswith("jax-"):
            runners.append(_jax_runner(name, book, x_np, args, context_length))
        else:
            runners.append(_torch_runner(name, book, x_np, args))
    return runners


def build_piece_runners(tokens: int, args: argparse.Namespace, book) -> list[Runner]:
    """One projection matmul and the attention core, each as a JAX and a torch runner on the same inputs."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from jaxattn import core

    x_np = _input_np(args, tokens)
    qkv_shape = (3, args.batch, args.heads, tokens, args.d_model // args.heads)
    qkv_np = np.random.default_rng(args.seed + 1).standard_normal(qkv_shape, dtype=np.float32)
    jdtype = _jax_dtype(args.dtype)
    tdtype = _torch_dtype(args.dtype)
    x, qkv = jnp.asarray(x_np, jdtype), jnp.asarray(qkv_np, jdtype)
    kernel = jnp.asarray(book.W_query.weight.detach().float().numpy().T, jdtype)  # (d_in, d_out), as ported
    with jax.default_matmul_precision(placement.matmul_precision(args.dtype)):
        projection = jax.jit(lambda x, w: x @ w).lower(x, kernel).compile()
        attention = jax.jit(lambda q, k, v: core.causal_attention(q, k, v, impl="auto")[0]).lower(*qkv).compile()
    x_t, qkv_t = torch.from_numpy(x_np).to(tdtype), torch.from_numpy(qkv_np).to(tdtype)

    def torch_projection():
        with torch.inference_mode():
            return book.W_query(x_t)

    def torch_attention():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(qkv_t[0], qkv_t[1], qkv_t[2], is_causal=True)

    return [
        Runner("jax-projection", "jax", lambda: projection(x, kernel).block_until_ready()),
        Runner("torch-projection", "torch", torch_projection),
        Runner("jax-attention-core", "jax", lambda: attention(*qkv).block_until_ready()),
        Runner("torch-attention-core", "torch", torch_attention),
    ]


def time_breakdown(tokens: int, args: argparse.Namespace, book) -> list[dict]:
    """Rows for :func:`build_piece_runners`, timed round-robin; each JAX piece is checked against torch's."""
    runners = build_piece_runners(tokens, args, book)
    times = time_round_robin(runners, args.repeats, args.warmup)
    outputs = {r.name: r.output for r in runners}
    rows = []
    for runner in runners:
        piece = runner.name.split("-", 1)[1]
        other = outputs[("torch-" if runner.framework == "jax" else "jax-") + piece]
        assert runner.output is not None and other is not None  # time_round_robin ran every runner
        rows.append(
            {
                "piece": piece,
                "impl": runner.name,
                "framework": runner.framework,
                "tokens": tokens,
                "batch": args.batch,
                "median_s": statistics.median(times[runner.name]),
                "times_s": times[runner.name],
                "max_abs_diff_jax_vs_torch": float(np.abs(runner.output - other).max()),
            }
        )
    return rows


# --- timing ------------------------------------------------------------------------------------------


def _to_numpy(out) -> np.ndarray:
    if hasattr(out, "detach"):
        return out.detach().float().numpy()
    return np.asarray(out, dtype=np.float32)


def max_abs_diffs(runners: list[Runner]) -> dict[str, float | None]:
    """Max |impl - reference| per implementation; the reference is torch-book if it ran, else the first."""
    outs = {r.name: r.output for r in runners if r.output is not None}
    if not outs:
        return {}
    ref = outs.get("torch-book", next(iter(outs.values())))
    return {name: float(np.abs(out - ref).max()) for name, out in outs.items()}


def time_round_robin(
    runners: list[Runner], repeats: int, warmup: int, on_round: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Per-implementation wall times: warm-up excluded, one call each per round, order rotated.

    ``on_round()`` after the warm-up and after each timed round (the sweep's progress bar).
    """
    live = [r for r in runners if r.status == "ok"]
    for runner in live:
        for _ in range(warmup):
            runner.call()
        runner.output = _to_numpy(runner.call())  # also a warm-up call; kept to check agreement
    if on_round is not None:
        on_round()
    times: dict[str, list[float]] = {r.name: [] for r in live}
    for rep in range(repeats):
        shift = rep % max(len(live), 1)
        for runner in live[shift:] + live[:shift]:
            start = time.perf_counter()
            runner.call()
            times[runner.name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round()
    return times


# --- memory: a fresh process per implementation ---------------------------------------------------


def _max_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_child(args: argparse.Namespace) -> int:
    """``--child IMPL``: set up one implementation, run one forward, print RSS figures as JSON."""
    tokens, _ = _validate(args)
    t = tokens[0]
    book = _book_torch(args.d_model, args.heads, t if args.child.startswith("torch") else 1, args.dtype, args.seed)
    x_np = _input_np(args, t)
    if args.child.startswith("jax-"):
        runner = _jax_runner(args.child, book, x_np, args, t)  # compiles (not run) before the baseline
    else:
        runner = _torch_runner(args.child, book, x_np, args)
    before = _max_rss_bytes()
    runner.call()
    after = _max_rss_bytes()
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


def measure_rss(impl: str, tokens: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "crosscheck.benchmarks.bench",
        "--child",
        impl,
        "--tokens",
        str(tokens),
        "--batch",
        str(args.batch),
        "--d-model",
        str(args.d_model),
        "--heads",
        str(args.heads),
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": f"failed: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- recompilation count -------------------------------------------------------------------------------


def count_recompilations(sweep: list[int], args: argparse.Namespace, impl: str = "blockwise") -> dict:
    """Compilations of one jitted ``MultiHeadAttention`` over ``sweep`` token counts, per bucketing policy."""
    import jax
    import jax.numpy as jnp

    import jaxattn
    from jaxattn.bucketing import bucketed

    context_length = max(1 << (max(sweep) - 1).bit_length(), -(-max(sweep) // 128) * 128)
    module = jaxattn.MultiHeadAttention(
        args.d_model, args.d_model, context_length, 0.0, args.heads, attention_impl=impl
    )
    variables = module.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, 1, args.d_model), jnp.float32))
    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {"sweep_tokens": list(sweep), "impl": impl, "batch": 1, "policies": {}}

    def counted(traces: list[int]):
        def apply(v, x):
            traces[0] += 1  # runs once per trace, i.e. once per compilation
            return module.apply(v, x)

        return apply

    for policy in ("none", "pow2", "multiple"):
        traces = [0]
        jitted = jax.jit(counted(traces))
        call = bucketed(functools.partial(jitted, variables), policy=policy, multiple=128, maximum=context_length)
        start = time.perf_counter()
        for t in sweep:
            call(rng.standard_normal((1, t, args.d_model), dtype=np.float32)).block_until_ready()
        # jit's private compilation counter (absent from jax's stubs), read only where it exists
        cache_size = jitted._cache_size() if hasattr(jitted, "_cache_size") else None
        out["policies"][policy] = {
            "compilations": traces[0],
            "jit_cache_size": cache_size,
            "total_s": time.perf_counter() - start,
        }
    return out


# --- output ----------------------------------------------------------------------------------------------


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def print_table(rows: list[dict], tokens: int) -> None:
    shape_rows = [r for r in rows if r["tokens"] == tokens]
    torch_ok = [r for r in shape_rows if r["framework"] == "torch" and r["median_s"] is not None]
    fastest = min(torch_ok, key=lambda r: r["median_s"]) if torch_ok else None
    by_name = {r["impl"]: r for r in shape_rows}
    head = (
        f"{'impl':<22}{'median':>11}{'vs fastest torch':>18}{'vs sdpa':>9}{'vs book':>9}{'compile':>10}{'memory':>14}"
    )
    print(head)
    for r in shape_rows:
        if r["median_s"] is None:
            print(f"{r['impl']:<22}{r['status']}")
            continue

        def ratio(ref, r=r):
            return f"{ref['median_s'] / r['median_s']:.2f}x" if ref and ref["median_s"] else "-"

        mem = r.get("memory_rss") or r.get("memory") or {}
        mem_bytes = mem.get("max_rss_bytes", mem.get("total_bytes"))
        compile_s = "-" if r.get("compile_s") is None else f"{r['compile_s']:.2f}s"
        print(
            f"{r['impl']:<22}{r['median_s'] * 1e3:>9.1f}ms{ratio(fastest):>18}{ratio(by_name.get('torch-sdpa')):>9}"
            f"{ratio(by_name.get('torch-book')):>9}{compile_s:>10}{_fmt_bytes(mem_bytes):>14}"
        )
    diffs = {r["impl"]: r.get("max_abs_diff_vs_reference") for r in shape_rows}
    print(
        "max |out - torch-book| (or the first impl): "
        + ", ".join(f"{k}={v:.1e}" for k, v in diffs.items() if v is not None)
    )
    if fastest:
        print(f"(ratios = reference median / impl median; fastest torch: {fastest['impl']})")


def print_breakdown(pieces: list[dict], tokens: int) -> None:
    median = {r["impl"]: r["median_s"] for r in pieces if r["tokens"] == tokens}
    print(f"\n-- breakdown at tokens={tokens}: the pieces alone, same inputs, own round-robin --")
    print(f"{'piece':<16}{'jax':>11}{'torch':>11}{'jax speed vs torch':>20}")
    for piece in ("projection", "attention-core"):
        jax_s, torch_s = median[f"jax-{piece}"], median[f"torch-{piece}"]
        print(f"{piece:<16}{jax_s * 1e3:>9.1f}ms{torch_s * 1e3:>9.1f}ms{torch_s / jax_s:>19.2f}x")
    total = {fw: 4 * median[f"{fw}-projection"] + median[f"{fw}-attention-core"] for fw in ("jax", "torch")}
    print(
        f"4 x projection + core: jax {total['jax'] * 1e3:.1f}ms, torch {total['torch'] * 1e3:.1f}ms "
        "(one MHA forward is these plus the head split/merge and out_proj's bias)"
    )


def write_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["tokens"], r["median_s"]) for r in rows if r["impl"] == impl and r["median_s"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("forward latency, median (s)")
    ax.set_title("multi-head causal attention, forward")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), what="plot")
    finally:
        plt.close(fig)


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
    import jax
    import torch

    config = {
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
    print("crosscheck bench: " + ", ".join(f"{k}={v}" for k, v in config.items() if k != "impls"))
    rows: list[dict] = []
    pieces: list[dict] = []
    sweep = _sweep_progress(args, len(tokens_list))
    for tokens in tokens_list:
        context_length = tokens
        book = _book_torch(
            args.d_model, args.heads, tokens if any(i.startswith("torch") for i in impls) else 1, args.dtype, args.seed
        )
        runners = build_runners(impls, tokens, args, book, context_length)
        label = f"tokens={tokens} ({len(runners)} impls)"
        times = time_round_robin(runners, args.repeats, args.warmup, functools.partial(sweep.step, label))
        diffs = max_abs_diffs(runners)
        for runner in runners:
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
            rows.append(row)
        del runners, book
        if args.memory == "rss":
            for row in rows:
                if row["tokens"] == tokens:
                    row["memory_rss"] = {"method": "subprocess ru_maxrss", **measure_rss(row["impl"], tokens, args)}
        print(f"\n== tokens={tokens} batch={args.batch} d_model={args.d_model} heads={args.heads} {args.dtype} ==")
        print_table(rows, tokens)
        if args.breakdown:  # only W_query is used: a context-1 book skips the loop's (tokens, tokens) mask
            book = _book_torch(args.d_model, args.heads, 1, args.dtype, args.seed)
            pieces += time_breakdown(tokens, args, book)
            print_breakdown(pieces, tokens)
            del book
    sweep.close()
    for row in rows:  # speed relative to the fastest torch row of the same shape
        torch_ok = [
            r["median_s"]
            for r in rows
            if r["tokens"] == row["tokens"] and r["framework"] == "torch" and r["median_s"] is not None
        ]
        row["speedup_vs_fastest_torch"] = (min(torch_ok) / row["median_s"]) if torch_ok and row["median_s"] else None
    result: dict[str, Any] = {"config": config, "results": rows}
    if args.breakdown:
        result["breakdown"] = pieces
    if args.recompile_sweep is not None:
        sweep = [t for g in args.recompile_sweep for t in (g if isinstance(g, list) else [g])] or list(DEFAULT_SWEEP)
        rec = count_recompilations(sweep, args)
        result["recompilation"] = rec
        print(f"\n== recompilations over {len(sweep)} token counts ({min(sweep)}..{max(sweep)}), batch 1 ==")
        for policy, r in rec["policies"].items():
            print(
                f"{policy:<10} compilations={r['compilations']:>3}  jit cache={r['jit_cache_size']}  "
                f"sweep wall time={r['total_s']:.1f}s"
            )
    _write_json(result, args.json_path, args)
    if args.plot_path is not None:
        write_plot(rows, args.plot_path)
        print(f"wrote {args.plot_path}")
    return 0


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
