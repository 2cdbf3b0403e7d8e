"""``crosscheck bench --devices N --shard MODE``: time and peak memory per device of a split MultiHeadAttention,
against 1 device.

Two programs per token count, on the same parameters (``jaxattn.MultiHeadAttention(d, d, T, 0, heads)``,
``module.init`` weights) and input (normal, ``--seed``):

* **1 device**: ``module.apply`` with ``attention_impl="blockwise"`` (the one-device kernel whose memory
  is ``O(T x block)``), jitted, on one device;
* **N devices**: :func:`jaxattn.sharding.shard` in ``MODE`` over N devices (``sequence``: ring
  attention; ``batch``/``heads``: the blockwise kernel inside), jitted, inputs and parameters placed
  as the mode says.

Memory is XLA's own ``compiled.memory_analysis()`` of each compiled program: under SPMD the compiled
program is the one every device runs, so its sizes are **per device**. Peak = argument + output +
temp - alias bytes: what the program needs live at once on one device (XLA's buffer assignment), not a
measured high-water mark of the process. ``--memory-only`` compiles without running (the inputs are
``jax.ShapeDtypeStruct``\\ s: nothing is allocated), for shapes too slow to run on a small machine.

Time: median of ``--repeats`` calls after ``--warmup``, compile excluded (timed separately). On a CPU
the N devices are forced host devices (``--xla_force_host_platform_device_count``) sharing the same
cores, so the timing says little about a real N-device machine; the memory figures do not depend on it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from crosscheck.benchmarks import bench_models
from crosscheck.errors import BadInputError

MODES = ("batch", "heads", "sequence")
MEMORY_METHOD = "xla compiled.memory_analysis(), per device: argument + output + temp - alias bytes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the sharding bench.

    It shares --tokens, --batch, --d-model, --heads, --repeats, --warmup, --seed and --json with the others.
    """
    g = parser.add_argument_group("several devices (--devices N --shard MODE: split vs 1 device)")
    g.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="split over N devices (on a CPU: N forced host devices, set XLA_FLAGS="
        "--xla_force_host_platform_device_count=N before JAX starts)",
    )
    g.add_argument(
        "--shard", choices=MODES, default=None, help="how to split: batch, heads or sequence (ring attention)"
    )
    g.add_argument(
        "--memory-only",
        action="store_true",
        help="with --shard: compile both programs and report their memory analysis without running them",
    )


def wanted(args: argparse.Namespace) -> bool:
    return getattr(args, "shard", None) is not None or getattr(args, "devices", None) is not None


def _validate(args: argparse.Namespace) -> list[int]:
    if args.shard is None or args.devices is None:
        raise BadInputError("bench: --devices N and --shard batch|heads|sequence go together")
    if args.devices < 1:
        raise BadInputError(f"--devices must be >= 1, got {args.devices}")
    tokens = bench_models.flat(args.tokens)
    if not tokens or any(t < 1 for t in tokens):
        raise BadInputError(f"--tokens: give token counts >= 1, got {tokens}")
    bench_models.check_sizes(args)
    from crosscheck.pipeline.devices import check_split  # the --devices ceiling and the rows/tokens each device needs

    check_split(args.devices, args.shard, batch=args.batch, tokens=min(tokens))
    if args.shard == "heads" and args.heads % args.devices:
        raise BadInputError(f"--shard heads: --heads {args.heads} is not divisible by --devices {args.devices}")
    if args.dtype != "float32":
        raise BadInputError(f"--shard benchmarks float32 only, got --dtype {args.dtype}")
    return tokens


def memory(compiled) -> dict:
    """Per-device sizes from ``compiled.memory_analysis()`` and their peak (see the module docstring)."""
    ma = compiled.memory_analysis()
    sizes = {
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
    }
    sizes["peak_bytes"] = sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"] - sizes["alias_bytes"]
    return {"method": MEMORY_METHOD, **sizes}


def _time(fn, args_, repeats: int, warmup: int) -> list[float]:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args_))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args_))
        times.append(time.perf_counter() - t0)
    return times


def measure(tokens: int, args: argparse.Namespace) -> list[dict]:
    """The 1-device row and the N-device row at ``tokens`` (JAX already started with enough devices)."""
    import jax
    import jax.numpy as jnp

    import jaxattn
    from jaxattn import sharding

    d, heads, batch = args.d_model, args.heads, args.batch
    module = jaxattn.MultiHeadAttention(d, d, tokens, 0.0, heads, attention_impl="blockwise")
    variables = jax.jit(module.init)(jax.random.key(args.seed), jnp.zeros((1, 8, d), jnp.float32))
    mesh = sharding.make_mesh(args.devices)
    split = sharding.shard(module, mesh, args.shard)
    single_fn = jax.jit(module.apply)
    split_fn = jax.jit(split.call)
    param_shardings = split.param_shardings(variables)
    x_sharding = split.sharding(sharding.INPUT_AXES)
    divisible = (args.shard != "batch" or batch % args.devices == 0) and (
        args.shard != "sequence" or tokens % args.devices == 0
    )
    x_single: Any  # the input: a shape stand-in (memory only) or an array, on one device
    x_split: Any  # the same, split over the devices
    if args.memory_only:  # shapes only: nothing of (batch, tokens, d) is allocated
        x_single = jax.ShapeDtypeStruct((batch, tokens, d), jnp.float32)
        x_split = jax.ShapeDtypeStruct((batch, tokens, d), jnp.float32, sharding=x_sharding if divisible else None)
        v_split = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), variables, param_shardings
        )
    else:
        x = jnp.asarray(np.random.default_rng(args.seed).normal(size=(batch, tokens, d)), jnp.float32)
        x_single, v_split = x, jax.device_put(variables, param_shardings)
        x_split = jax.device_put(x, x_sharding) if divisible else x
    rows, outputs = [], {}
    for name, fn, call_args, devices in (
        ("1 device, blockwise", single_fn, (variables, x_single), 1),
        (f"{args.devices} devices, {args.shard}", split_fn, (v_split, x_split), args.devices),
    ):
        with jax.default_matmul_precision("highest"):
            t0 = time.perf_counter()
            compiled = fn.lower(*call_args).compile()
            compile_s = time.perf_counter() - t0
            row: dict[str, Any] = {
                "program": name,
                "devices": devices,
                "mode": None if devices == 1 else args.shard,
                "tokens": tokens,
                "batch": batch,
                "d_model": d,
                "heads": heads,
                "compile_s": compile_s,
                "memory": memory(compiled),
                "median_s": None,
                "times_s": [],
            }
            if not args.memory_only:
                times = _time(compiled, call_args, args.repeats, args.warmup)
                row["times_s"], row["median_s"] = times, statistics.median(times)
                outputs[devices] = np.asarray(compiled(*call_args))
        rows.append(row)
    one = rows[0]["memory"]["peak_bytes"]
    for row in rows:
        row["peak_ratio_vs_1_device"] = row["memory"]["peak_bytes"] / one if one else None
    if len(outputs) == 2:
        rows[1]["max_abs_diff_vs_1_device"] = float(np.max(np.abs(outputs[args.devices] - outputs[1])))
    return rows


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def print_rows(rows: list[dict]) -> None:
    print(
        f"{'program':<28}{'compile':>10}{'median':>10}{'peak/device':>16}{'vs 1 dev':>10}"
        f"{'argument':>14}{'temp':>14}{'output':>14}"
    )
    for r in rows:
        m = r["memory"]
        median = "-" if r["median_s"] is None else f"{r['median_s']:.3f}s"
        print(
            f"{r['program']:<28}{r['compile_s']:>9.1f}s{median:>10}{_mib(m['peak_bytes']):>16}"
            f"{r['peak_ratio_vs_1_device']:>10.3f}{_mib(m['argument_bytes']):>14}{_mib(m['temp_bytes']):>14}"
            f"{_mib(m['output_bytes']):>14}"
        )
    if "max_abs_diff_vs_1_device" in rows[-1]:
        print(f"max |split - 1 device| = {rows[-1]['max_abs_diff_vs_1_device']:.3g}")


def run(args: argparse.Namespace) -> dict:
    """The sharding bench: devices forced first (before JAX starts), then per token count both programs."""
    tokens_list = _validate(args)
    from crosscheck.pipeline.devices import check_device_count, force_host_devices

    force_host_devices(args.devices)
    platform = check_device_count(args.devices)
    import jax

    config = {
        "devices": args.devices,
        "shard": args.shard,
        "batch": args.batch,
        "d_model": args.d_model,
        "heads": args.heads,
        "dtype": "float32",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "memory_only": bool(args.memory_only),
        "platform": platform,
        "jax": jax.__version__,
        "memory_method": MEMORY_METHOD,
        "timing_note": "forced host devices share the CPU cores: CPU timings say little about N real devices"
        if platform == "cpu"
        else None,
    }
    print(
        "crosscheck bench --shard: "
        + ", ".join(
            f"{k}={v}" for k, v in config.items() if v is not None and k not in ("memory_method", "timing_note")
        )
    )
    rows = []
    for tokens in tokens_list:
        print(f"\n== tokens={tokens} batch={args.batch} d_model={args.d_model} heads={args.heads} ==")
        measured = measure(tokens, args)
        print_rows(measured)
        rows += measured
    if config["timing_note"]:
        print(f"\nnote: {config['timing_note']}")
    return {"config": config, "results": rows}
