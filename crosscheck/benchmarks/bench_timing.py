"""The timing sweep of ``crosscheck bench``: one runner per implementation and shape, timed round-robin.

Runners are built from :mod:`crosscheck.benchmarks.bench_models` (the same weights and input for every
row); :func:`time_round_robin` is the method the module docstring of :mod:`crosscheck.benchmarks.bench`
describes; :func:`measure_rss` runs one implementation in a fresh process; :func:`count_recompilations`
is the ``--recompile-sweep``.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from crosscheck.benchmarks import bench_models
from crosscheck.pipeline import placement


class Runner:
    """One implementation at one shape: ``call()`` runs a forward and waits for it."""

    def __init__(self, name: str, framework: str, call: Callable[[], Any], compile_s=None, memory_bytes=None):
        self.name, self.framework, self.call = name, framework, call
        self.compile_s, self.memory_bytes, self.status = compile_s, memory_bytes, "ok"
        self.output: np.ndarray | None = None


def jax_runner(name, book, x_np, args, context_length) -> Runner:
    import jax
    import jax.numpy as jnp

    from jaxattn.fused import fuse_qkv_params, fused_mha

    impl = name.removeprefix("jax-")
    fused = impl == "fused-blockwise"
    module, variables = bench_models.flax_state(
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


def torch_runner(name, book, x_np, args) -> Runner:
    import torch

    x = torch.from_numpy(x_np).to(placement.torch_dtype(args.dtype))
    if name == "torch-book":
        module = book
    elif name == "torch-sdpa":
        module = bench_models.sdpa_class()(book).eval()
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
    x_np = bench_models.input_np(args, tokens)
    runners = []
    for name in impls:
        if name.startswith("jax-"):
            runners.append(jax_runner(name, book, x_np, args, context_length))
        else:
            runners.append(torch_runner(name, book, x_np, args))
    return runners


def build_piece_runners(tokens: int, args: argparse.Namespace, book) -> list[Runner]:
    """One projection matmul and the attention core, each as a JAX and a torch runner on the same inputs."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from jaxattn import core

    x_np = bench_models.input_np(args, tokens)
    qkv_shape = (3, args.batch, args.heads, tokens, args.d_model // args.heads)
    qkv_np = np.random.default_rng(args.seed + 1).standard_normal(qkv_shape, dtype=np.float32)
    jdtype = placement.jax_dtype(args.dtype)
    tdtype = placement.torch_dtype(args.dtype)
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


def max_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


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
