"""``crosscheck bench --decode``: per-token latency of jitted Flax KV-cache decoding against the book's cached
torch class.

Same weights (the book's ``MultiHeadAttention``, GPT-2 small by default), same process:

* ``jax-<impl>``: ``jaxattn.MultiHeadAttention(decode=True)`` with that ``attention_impl``;
  one ``jax.jit`` of ``apply(..., mutable=["cache"])`` serves the prompt and every step;
  the cache holds ``prompt_len + steps`` tokens, fixed, so shapes never change.
* ``torch-book-cache``: :class:`crosscheck.references.torch_kv_cache.MultiHeadAttention`, the book's
  ``kv_cache`` API (``forward(x, use_cache=True, start_pos=..., cache=...)``, keys and
  values concatenated to the cache each step), eager, ``inference_mode``.

Method: each round runs, per implementation, the prompt and then ``--steps`` single
tokens, each step waited for (``block_until_ready``) and timed; the per-token latency
of a round is the mean over its steps. Rounds rotate the order; the median over
``--repeats`` rounds is reported, with its ratio to torch's. The first round is a
warm-up (compiles) and excluded. Compilations: ``jax.jit``'s cache size after all
rounds (target 2: the prompt and the step), and a Python trace counter as a second
witness. The decoded outputs of every implementation are compared with torch's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from crosscheck.benchmarks import bench_models
from crosscheck.errors import BadInputError
from crosscheck.pipeline import placement

TORCH_DECODE_IMPL = "torch-book-cache"


def jax_decode_impls() -> tuple[str, ...]:
    """``jax-<kernel>`` for each kernel serving a decode step (:func:`bench_models.decode_kernels`), ``jax-auto``."""
    return (*(f"jax-{name}" for name in bench_models.decode_kernels()), "jax-auto")


def default_decode_impls() -> tuple[str, ...]:
    """The rows without ``--impls``: the kernels holding one query's scores whole, ``jax-auto`` and torch's."""
    return (*(f"jax-{name}" for name in bench_models.decode_default_kernels()), "jax-auto", TORCH_DECODE_IMPL)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The decode bench's own options (it shares --batch, --d-model, --heads, --dtype, --repeats, --seed, --json)."""
    g = parser.add_argument_group("decoding (--decode)")
    g.add_argument(
        "--decode",
        action="store_true",
        help="time KV-cache decoding per token (Flax decode=True vs the book's cached torch class)",
    )
    g.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before decoding (default 16)")
    g.add_argument("--steps", type=int, default=256, help="tokens decoded one at a time (default 256)")


def _impls(args: argparse.Namespace) -> list[str]:
    if not args.impls:
        return list(default_decode_impls())
    chosen = [i for group in args.impls for i in (group if isinstance(group, list) else [group])]
    known = (*jax_decode_impls(), TORCH_DECODE_IMPL)
    bad = [i for i in chosen if i not in known]
    if bad:
        raise BadInputError(f"--impls with --decode: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    if not chosen:
        raise BadInputError(f"--impls with --decode: give at least one implementation; choose from {', '.join(known)}")
    return chosen


def _validate(args: argparse.Namespace) -> list[str]:
    bench_models.check_sizes(args, "prompt_len", "steps")
    if args.seed < 0:
        raise BadInputError(f"--seed must be >= 0, got {args.seed}")
    if args.dtype not in ("float32", "bfloat16"):
        raise BadInputError(f"--dtype must be float32 or bfloat16, got {args.dtype!r}")
    return _impls(args)


class _Decoder:
    """One implementation: ``prefill()`` then ``step(t)``; outputs kept for the comparison."""

    name: str
    framework: str
    compilations: int | None = None
    traces: int | None = None
    cache: Any
    outs: list[Any]

    def reset(self) -> None: ...
    def prefill(self) -> None: ...
    def step(self, t: int) -> None: ...
    def output(self) -> np.ndarray:
        raise NotImplementedError


class _JaxDecoder(_Decoder):
    framework = "jax"
    traces: int  # counted from 0 here

    def __init__(self, name, book, x_np, args):
        import jax
        import jax.numpy as jnp

        import jaxattn
        from crosscheck.porting.port import load_state_dict

        self.name, self.prompt_len = name, args.prompt_len
        dtype = placement.jax_dtype(args.dtype)
        tokens = x_np.shape[1]
        module = jaxattn.MultiHeadAttention(
            args.d_model,
            args.d_model,
            tokens,
            0.0,
            args.heads,
            attention_impl=name.removeprefix("jax-"),
            dtype=dtype,
            param_dtype=dtype,
            decode=True,
        )
        state = {k: v.float().numpy() for k, v in book.state_dict().items() if k != "mask"}
        self.params = load_state_dict(module.clone(decode=False), state)
        self.x = jnp.asarray(x_np, dtype=dtype)
        self.empty = jax.jit(lambda: module.init(jax.random.key(0), self.x)["cache"])()
        self.traces = 0

        def apply(params, cache, chunk):
            self.traces += 1  # runs once per trace, i.e. per compilation
            out, state = module.apply({**params, "cache": cache}, chunk, mutable=["cache"])
            return out, state["cache"]

        self.fn = jax.jit(apply, donate_argnums=1)  # the cache is updated in place, not copied each step
        self.reset()

    def reset(self) -> None:
        import jax
        import jax.numpy as jnp

        self.cache, self.outs = jax.tree.map(jnp.copy, self.empty), []  # a fresh cache: the step donates it

    def _run(self, chunk) -> None:
        out, self.cache = self.fn(self.params, self.cache, chunk)
        out.block_until_ready()
        self.outs.append(out)

    def prefill(self) -> None:
        self._run(self.x[:, : self.prompt_len])

    def step(self, t: int) -> None:
        self._run(self.x[:, t : t + 1])

    def output(self) -> np.ndarray:
        import jax.numpy as jnp

        self.compilations = self.fn._cache_size()  # type: ignore[attr-defined]  # jit's private counter, not in stubs
        return np.asarray(jnp.concatenate(self.outs, axis=1), dtype=np.float32)


class _TorchDecoder(_Decoder):
    framework = "torch"

    def __init__(self, book, x_np, args):
        import torch

        from crosscheck.references.torch_kv_cache import MultiHeadAttention

        self.name, self.prompt_len = TORCH_DECODE_IMPL, args.prompt_len
        self.module = MultiHeadAttention(args.d_model, args.d_model, x_np.shape[1], 0.0, args.heads)
        self.module.load_state_dict(book.state_dict(), strict=True)
        self.module.to(book.W_query.weight.dtype).eval()
        self.x = torch.from_numpy(x_np).to(book.W_query.weight.dtype)
        self.reset()

    def reset(self) -> None:
        self.cache, self.outs = None, []

    def _run(self, start: int, stop: int) -> None:
        import torch

        with torch.inference_mode():
            out, self.cache = self.module(self.x[:, start:stop], use_cache=True, start_pos=start, cache=self.cache)
        self.outs.append(out)

    def prefill(self) -> None:
        self._run(0, self.prompt_len)

    def step(self, t: int) -> None:
        self._run(t, t + 1)

    def output(self) -> np.ndarray:
        import torch

        return torch.cat(self.outs, dim=1).float().numpy()


def _round(decoder: _Decoder, prompt_len: int, steps: int) -> tuple[float, float]:
    """``(prefill seconds, mean seconds per decoded token)`` of one full decode."""
    decoder.reset()
    start = time.perf_counter()
    decoder.prefill()
    prefill_s = time.perf_counter() - start
    per_step = []
    for t in range(prompt_len, prompt_len + steps):
        start = time.perf_counter()
        decoder.step(t)
        per_step.append(time.perf_counter() - start)
    return prefill_s, sum(per_step) / len(per_step)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every implementation; the result rows (also printed)."""
    import os

    import jax
    import torch

    from crosscheck.references.torch_ref import MultiHeadAttention

    impls = _validate(args)
    tokens = args.prompt_len + args.steps
    torch.manual_seed(args.seed)
    book = MultiHeadAttention(args.d_model, args.d_model, tokens, 0.0, args.heads)
    book = book.to(placement.torch_dtype(args.dtype)).eval()
    x_np = np.random.default_rng(args.seed).standard_normal((args.batch, tokens, args.d_model), dtype=np.float32)
    decoders: list[_Decoder] = [
        _TorchDecoder(book, x_np, args) if name == TORCH_DECODE_IMPL else _JaxDecoder(name, book, x_np, args)
        for name in impls
    ]
    config = {
        "mode": "decode",
        "batch": args.batch,
        "d_model": args.d_model,
        "heads": args.heads,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "repeats": args.repeats,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()),
    }
    print("crosscheck bench --decode: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    with jax.default_matmul_precision(placement.matmul_precision(args.dtype)):
        for d in decoders:  # warm-up round: compiles, excluded
            _round(d, args.prompt_len, args.steps)
        times: dict[str, list[tuple[float, float]]] = {d.name: [] for d in decoders}
        for r in range(args.repeats):
            order = decoders[r % len(decoders) :] + decoders[: r % len(decoders)]
            for d in order:
                times[d.name].append(_round(d, args.prompt_len, args.steps))
    outputs = {d.name: d.output() for d in decoders}
    reference = outputs.get(TORCH_DECODE_IMPL)
    rows: list[dict[str, Any]] = []
    for d in decoders:
        per_token = statistics.median(t for _, t in times[d.name])
        rows.append(
            {
                "impl": d.name,
                "framework": d.framework,
                "per_token_median_s": per_token,
                "prefill_median_s": statistics.median(p for p, _ in times[d.name]),
                "per_token_times_s": [t for _, t in times[d.name]],
                "compilations": d.compilations,
                "traces": d.traces,
                "max_abs_diff_vs_torch": None
                if reference is None
                else float(np.abs(outputs[d.name] - reference).max()),
            }
        )
    torch_row = next((r for r in rows if r["framework"] == "torch"), None)
    for row in rows:
        row["speedup_vs_torch"] = torch_row["per_token_median_s"] / row["per_token_median_s"] if torch_row else None
    _print(rows, args)
    return {"config": config, "results": rows}


def _print(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n== decode: prompt {args.prompt_len} + {args.steps} steps, batch={args.batch} d_model={args.d_model} "
        f"heads={args.heads} {args.dtype} =="
    )
    print(f"{'impl':<18}{'per token':>12}{'prefill':>12}{'vs torch':>10}{'compilations':>14}{'max|diff|':>12}")
    for r in rows:
        ratio = "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x"
        comp = "-" if r["compilations"] is None else str(r["compilations"])
        diff = "-" if r["max_abs_diff_vs_torch"] is None else f"{r['max_abs_diff_vs_torch']:.1e}"
        print(
            f"{r['impl']:<18}{r['per_token_median_s'] * 1e3:>10.3f}ms{r['prefill_median_s'] * 1e3:>10.2f}ms"
            f"{ratio:>10}{comp:>14}{diff:>12}"
        )
