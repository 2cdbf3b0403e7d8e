"""``crosscheck bench --device cuda``: jaxattn's MultiHeadAttention on a GPU against torch on CUDA.

Same weights and input for every row (the book's class drawn once, ported to Flax as
:mod:`crosscheck.benchmarks.bench` does), on one NVIDIA GPU:

* ``torch-sdpa``: the book's projections around ``F.scaled_dot_product_attention(is_causal=True)``;
  ``torch-book``: the book's class; ``torch-compile``: ``torch.compile`` of the book's class.
* ``jax-cudnn``, ``jax-flash``, ``jax-auto``: ``jaxattn.MultiHeadAttention`` with that
  ``attention_impl``, jitted.

Timing is synchronised: a JAX call ends at ``jax.block_until_ready`` of its result, a torch
call at ``torch.cuda.synchronize()``. Two figures per row, medians over ``--repeats``:
*per call* (launch, run, wait: what one isolated call costs) and *pipelined*
(``--pipeline`` calls back to back, one wait at the end, divided by their number: the
throughput of a training or serving loop, where launch overhead hides behind the GPU work).
``--backward`` times forward+backward: the gradients of ``sum(out * R)`` with respect to the
input and every weight (``jax.grad``; ``torch.autograd.grad``). Peak device memory: torch's
``max_memory_allocated`` after a reset and one call; JAX's compiled program's own
``memory_analysis`` (arguments + outputs + temporaries). float32 runs at ``highest`` precision
in both (TF32 off). A row that fails (out of memory, a kernel refusing the shape) says so in
``status`` and the others go on.

Without a CUDA device (``torch.cuda.is_available()`` false or JAX's backend not ``gpu``),
``--device cuda`` is exit 2 with one line saying which.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from crosscheck.benchmarks import bench_models
from crosscheck.errors import BadInputError
from crosscheck.pipeline import placement
from crosscheck.porting.outputs import atomic_write_text

TORCH_GPU_IMPLS = ("torch-sdpa", "torch-book", "torch-compile")
DEVICES = ("cpu", "cuda")
#: Where the torch rows run: CUDA. The tests run the whole bench on the CPU by setting it to "cpu"
#: (and faking ``torch.cuda``'s synchronise and memory calls), so no line of it first runs on a GPU.
TORCH_DEVICE = "cuda"
DTYPES = ("float32", "bfloat16")
MIN_TOKENS, MAX_TOKENS = bench_models.MIN_TOKENS, bench_models.MAX_TOKENS


def gpu_impls() -> tuple[str, ...]:
    """The rows: torch's, then ``jax-<kernel>`` for each GPU-only kernel of the table
    (:func:`bench_models.gpu_kernels`: ``jax-cudnn``, ``jax-flash``) and ``jax-auto``."""
    return (*TORCH_GPU_IMPLS, *(f"jax-{name}" for name in bench_models.gpu_kernels()), "jax-auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--backward``, ``--pipeline`` (their own group of ``crosscheck bench``)."""
    g = parser.add_argument_group("GPU: --device cuda (torch on CUDA, JAX on the GPU)")
    g.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help=f"cpu (default: the CPU benchmark) or cuda: rows {', '.join(TORCH_GPU_IMPLS)}, "
        "jax-<each GPU-only implementation>, jax-auto",
    )
    g.add_argument("--backward", action="store_true", help="with --device cuda: time forward+backward")
    g.add_argument(
        "--pipeline", type=int, default=20, help="with --device cuda: calls per pipelined timing (default 20)"
    )


def check_cuda() -> str:
    """The GPU's name, or a one-line :class:`BadInputError` saying what is missing."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise BadInputError(f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA device on this machine")
    import jax

    if jax.default_backend() != "gpu":
        raise BadInputError(
            f"--device cuda: JAX {jax.__version__} runs on {jax.default_backend()!r}, not on a GPU "
            "(install jax[cuda12])"
        )
    return torch.cuda.get_device_name()


def validate(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """Token counts and sizes (the CPU bench's limits) and the GPU rows asked for; a BadInputError naming the flag."""
    tokens = bench_models.flat(args.tokens)
    if not tokens or any(not MIN_TOKENS <= t <= MAX_TOKENS for t in tokens):
        raise BadInputError(f"--tokens: give token counts in [{MIN_TOKENS}, {MAX_TOKENS}], got {tokens}")
    bench_models.check_sizes(args, "pipeline")
    placement.check_dtype(args.dtype, DTYPES, what="--dtype")
    known = gpu_impls()
    impls = list(known)
    if args.impls:
        impls = bench_models.flat(args.impls)
        unknown = [i for i in impls if i not in known]
        if unknown or not impls:
            raise BadInputError(
                f"--impls with --device cuda: unknown {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(known)}"
            )
    return tokens, impls


class GpuRunner:
    """One row: ``call()`` launches a forward (or forward+backward) and returns its result; ``wait(result)``
    blocks until the device has finished it; ``peak_bytes()`` measures one call's peak device memory."""

    def __init__(
        self,
        name: str,
        framework: str,
        call: Callable[[], Any],
        wait: Callable[[Any], None],
        peak_bytes: Callable[[], int | None],
        output: Callable[[Any], np.ndarray],
        compile_s=None,
    ):
        self.name, self.framework, self.call, self.wait = name, framework, call, wait
        self.peak_bytes, self.output, self.compile_s, self.status = peak_bytes, output, compile_s, "ok"


def time_runner(runner: GpuRunner, repeats: int, pipeline: int, warmup: int = 1) -> dict:
    """``{"per_call_s": [...], "pipelined_s": [...]}``: every timing ends when the device is done."""
    for _ in range(warmup):
        runner.wait(runner.call())
    per_call, pipelined = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.wait(runner.call())
        per_call.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = None
        for _ in range(pipeline):  # launched back to back; one wait for the last (the stream is in order)
            result = runner.call()
        runner.wait(result)
        pipelined.append((time.perf_counter() - start) / pipeline)
    return {"per_call_s": per_call, "pipelined_s": pipelined}


def make_row(
    runner: GpuRunner,
    timings: dict | None,
    tokens: int,
    args: argparse.Namespace,
    peak: int | None,
    diff: float | None,
) -> dict:
    """The JSON row of one runner at one shape (``timings`` ``None``: it failed, see ``status``)."""

    def median(key: str) -> float | None:
        return statistics.median(timings[key]) if timings else None

    return {
        "impl": runner.name,
        "framework": runner.framework,
        "device": "cuda",
        "tokens": tokens,
        "batch": args.batch,
        "d_model": args.d_model,
        "heads": args.heads,
        "dtype": args.dtype,
        "pass": "forward+backward" if args.backward else "forward",
        "per_call_median_s": median("per_call_s"),
        "pipelined_median_s": median("pipelined_s"),
        "times_s": timings or {},
        "compile_s": runner.compile_s,
        "status": runner.status,
        "peak_device_bytes": peak,
        "memory_method": "torch.cuda.max_memory_allocated after reset"
        if runner.framework == "torch"
        else "XLA memory_analysis of the compiled program (arguments + outputs + temporaries)",
        "max_abs_diff_vs_torch_sdpa": diff,
    }


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_torch_sdpa``: torch-sdpa's median / the row's, per call and pipelined, per shape."""
    for row in rows:
        ref = next((r for r in rows if r["impl"] == "torch-sdpa" and r["tokens"] == row["tokens"]), None)
        row["speedup_vs_torch_sdpa"] = {
            key: (ref[key] / row[key]) if ref and ref.get(key) and row.get(key) else None
            for key in ("per_call_median_s", "pipelined_median_s")
        }


# --- building the runners (CUDA only) ------------------------------------------------------------


def _jax_runner(name: str, book, x_np: np.ndarray, r_np: np.ndarray, args, tokens: int) -> GpuRunner:
    import jax
    import jax.numpy as jnp

    module, variables = bench_models.flax_state(
        book, args.d_model, args.heads, tokens, args.dtype, name.removeprefix("jax-")
    )
    dtype = variables["params"]["out_proj"]["kernel"].dtype
    x, r = jax.device_put(jnp.asarray(x_np, dtype)), jax.device_put(jnp.asarray(r_np, jnp.float32))
    variables = jax.device_put(variables)

    def loss(v, x):
        return (module.apply(v, x).astype(jnp.float32) * r).sum()

    fn = jax.jit(jax.grad(loss, argnums=(0, 1))) if args.backward else jax.jit(module.apply)
    start = time.perf_counter()
    with jax.default_matmul_precision(placement.matmul_precision(args.dtype)):
        compiled = fn.lower(variables, x).compile()
    compile_s = time.perf_counter() - start

    def peak() -> int | None:
        analysis = compiled.memory_analysis()
        if analysis is None:
            return None
        return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes)

    def output(result) -> np.ndarray:
        out = result[1] if args.backward else result  # the input's gradient, or the forward's output
        return np.asarray(jax.device_get(out), np.float32)

    return GpuRunner(name, "jax", lambda: compiled(variables, x), jax.block_until_ready, peak, output, compile_s)


def _torch_runner(name: str, book, x_np: np.ndarray, r_np: np.ndarray, args) -> GpuRunner:
    import torch

    dtype = placement.torch_dtype(args.dtype)
    x = torch.from_numpy(x_np).to(TORCH_DEVICE, dtype).requires_grad_(args.backward)
    r = torch.from_numpy(r_np).to(TORCH_DEVICE, dtype)
    module = {
        "torch-book": lambda: book,
        "torch-sdpa": lambda: bench_models.sdpa_class()(book).eval(),
        "torch-compile": lambda: torch.compile(book),
    }[name]()
    params = list(book.parameters())

    def call():
        if not args.backward:
            with torch.inference_mode():
                return module(x)
        out = module(x)
        return torch.autograd.grad(out, [x, *params], r)

    def wait(_):
        torch.cuda.synchronize()

    def peak() -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        wait(call())
        return int(torch.cuda.max_memory_allocated())

    def output(result) -> np.ndarray:
        out = result[0] if args.backward else result
        return out.detach().float().cpu().numpy()

    runner = GpuRunner(name, "torch", call, wait, peak, output)
    if name == "torch-compile":  # compiles on the first call
        start = time.perf_counter()
        wait(call())
        runner.compile_s = time.perf_counter() - start
    return runner


def _no_output(_result: Any) -> np.ndarray:
    """The output of a placeholder runner, one whose build failed: never asked for."""
    raise RuntimeError("this runner failed before it ran: it has no output")


def _failed(err: BaseException) -> str:
    first = str(err).splitlines()[0] if str(err) else ""
    return f"failed: {type(err).__name__}: {first}"[:300]


def run_shape(tokens: int, impls: list[str], args: argparse.Namespace) -> list[dict]:
    """Every row at one token count, one after the other (each built, measured and dropped)."""
    import torch

    x_np = bench_models.input_np(args, tokens)
    r_np = np.random.default_rng(args.seed + 1).standard_normal((*x_np.shape[:2], args.d_model), dtype=np.float32)
    book = bench_models.book_torch(args.d_model, args.heads, tokens, args.dtype, args.seed).to(TORCH_DEVICE)
    rows, outputs = [], {}
    with placement.torch_without_tf32():
        for name in impls:
            runner = GpuRunner(name, name.split("-")[0], lambda: None, lambda _: None, lambda: None, _no_output)
            timings, peak = None, None
            try:
                if name.startswith("jax-"):
                    runner = _jax_runner(name, book, x_np, r_np, args, tokens)
                else:
                    runner = _torch_runner(name, book, x_np, r_np, args)
                outputs[name] = runner.output(runner.call())
                timings = time_runner(runner, args.repeats, args.pipeline, args.warmup)
                peak = runner.peak_bytes()
            except Exception as err:  # noqa: BLE001 - out of memory or a refused shape is a result to report
                runner.status, timings = _failed(err), None
            ref = outputs.get("torch-sdpa")
            diff = float(np.abs(outputs[name] - ref).max()) if ref is not None and name in outputs else None
            rows.append(make_row(runner, timings, tokens, args, peak, diff))
            del runner
            torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict], gpu: str) -> None:
    head = f"{'impl':<15}{'per call':>12}{'pipelined':>12}{'vs sdpa (call/pipe)':>22}{'peak memory':>14}  status"
    for tokens in dict.fromkeys(r["tokens"] for r in rows):
        shape = [r for r in rows if r["tokens"] == tokens]
        first = shape[0]
        print(
            f"\n== {gpu}: {first['pass']}, batch {first['batch']}, tokens {tokens}, d_model {first['d_model']}, "
            f"heads {first['heads']}, {first['dtype']} =="
        )
        print(head)
        for r in shape:

            def ms(v):
                return "-" if v is None else f"{v * 1e3:.3f}ms"

            s = r.get("speedup_vs_torch_sdpa") or {}
            ratio = "/".join(
                "-" if s.get(k) is None else f"{s[k]:.2f}x" for k in ("per_call_median_s", "pipelined_median_s")
            )
            mem = "-" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / 2**20:,.0f} MiB"
            print(
                f"{r['impl']:<15}{ms(r['per_call_median_s']):>12}{ms(r['pipelined_median_s']):>12}{ratio:>22}"
                f"{mem:>14}  {r['status']}"
            )


def main(args: argparse.Namespace) -> int:
    """``crosscheck bench --device cuda``: validate, check CUDA, run every shape, print, write ``--json``."""
    tokens_list, impls = validate(args)
    # Before JAX starts: it would take 75% of the GPU up front, leaving torch too little.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    gpu = check_cuda()
    import jax
    import torch

    config = {
        "device": "cuda",
        "gpu": gpu,
        "batch": args.batch,
        "d_model": args.d_model,
        "heads": args.heads,
        "dtype": args.dtype,
        "backward": bool(args.backward),
        "repeats": args.repeats,
        "pipeline": args.pipeline,
        "impls": impls,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "matmul_precision": "highest (TF32 off in torch)" if args.dtype == "float32" else "default",
    }
    print("crosscheck bench --device cuda: " + ", ".join(f"{k}={v}" for k, v in config.items() if k != "impls"))
    rows = [row for tokens in tokens_list for row in run_shape(tokens, impls, args)]
    add_speedups(rows)
    print_rows(rows, gpu)
    if args.json_path == "-":
        print(
            json.dumps({"config": config, "results": rows}, indent=2),
            file=getattr(args, "json_stream", None) or sys.stdout,
        )
    elif args.json_path is not None:
        atomic_write_text(
            args.json_path, json.dumps({"config": config, "results": rows}, indent=2), what="JSON results"
        )
        print(f"wrote {args.json_path}")
    return 0
