"""``crosscheck bench --device cuda`` (crosscheck/benchmarks/bench_gpu.py): what a CPU can check, and the real run on a GPU.

On a CPU: the refusal (exit 2, one line), the option checks, the synchronised timing
loop (fake runners count launches and waits), the row and speed-up construction, and the whole
bench run end to end with torch's rows on the CPU (``bench_gpu.TORCH_DEVICE``). Under the
``gpu`` marker: one small real run, every row present and agreeing with torch's SDPA.
"""

import argparse
import json

import numpy as np
import pytest
import torch

from crosscheck import cli
from crosscheck.benchmarks import bench, bench_gpu, bench_models
from jaxattn.tolerance import reference_bound
from tests.bounds import chain_length, layer_grads64, torch_layer_bound


def parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


TINY = ["--device", "cuda", "--tokens", "16", "--batch", "1", "--d-model", "16", "--heads", "2", "--repeats", "2",
        "--pipeline", "3"]


def test_cuda_without_cuda_is_exit_2_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a machine without CUDA says
    assert cli.main(["bench", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("crosscheck: error: --device cuda: torch ") and "sees no CUDA device" in err


def test_jax_without_a_gpu_is_named(monkeypatch):
    import jax

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with pytest.raises(bench_gpu.BadInputError, match=r"--device cuda: JAX .* runs on 'cpu', not on a GPU"):
        bench_gpu.check_cuda()


@pytest.mark.parametrize("argv,message", [
    (["--impls", "jax-naive"], "--impls with --device cuda: unknown jax-naive; choose from torch-sdpa, "),
    (["--pipeline", "0"], "--pipeline must be >= 1, got 0"),
    (["--tokens", "70000"], r"--tokens: give token counts in \[1, 65536\], got \[70000\]"),
    (["--heads", "3"], "--d-model=16 must be divisible by --heads=3"),
])
def test_bad_options_are_refused_before_any_gpu_work(argv, message, monkeypatch):
    monkeypatch.setattr(bench_gpu, "check_cuda", lambda: pytest.fail("checked CUDA before the options"))
    with pytest.raises(bench_gpu.BadInputError, match=message):
        bench_gpu.main(parse(TINY + argv))


class FakeDevice:
    """A device whose work finishes only when waited for: records the order of launches and waits."""

    def __init__(self):
        self.events = []

    def runner(self, name):
        def call():
            self.events.append("launch")
            return len(self.events)

        def wait(result):
            assert isinstance(result, int)  # the result of a call, never None
            self.events.append("wait")

        return bench_gpu.GpuRunner(name, name.split("-")[0], call, wait, lambda: 123, lambda r: np.zeros(2))


def test_timing_waits_after_every_call_and_once_per_pipeline():
    device = FakeDevice()
    timings = bench_gpu.time_runner(device.runner("jax-flash"), repeats=2, pipeline=3, warmup=1)
    one_round = ["launch", "wait"] + ["launch"] * 3 + ["wait"]
    assert device.events == ["launch", "wait"] + one_round * 2  # warm-up, then per-call and pipelined
    assert len(timings["per_call_s"]) == len(timings["pipelined_s"]) == 2
    assert all(t >= 0 for t in timings["per_call_s"] + timings["pipelined_s"])


def test_rows_and_speedups():
    args = parse(TINY + ["--backward", "--dtype", "bfloat16"])
    device = FakeDevice()
    sdpa = bench_gpu.make_row(device.runner("torch-sdpa"), {"per_call_s": [2.0, 4.0, 3.0], "pipelined_s": [1.0]},
                              16, args, 1000, 0.0)
    flash = bench_gpu.make_row(device.runner("jax-flash"), {"per_call_s": [1.5], "pipelined_s": [0.5, 0.5]},
                               16, args, 800, 1e-3)
    failed_runner = device.runner("torch-book")
    failed_runner.status = "failed: OutOfMemoryError: CUDA out of memory"
    failed = bench_gpu.make_row(failed_runner, None, 16, args, None, None)
    rows = [sdpa, flash, failed]
    bench_gpu.add_speedups(rows)
    assert sdpa["per_call_median_s"] == 3.0 and sdpa["pass"] == "forward+backward" and sdpa["device"] == "cuda"
    assert flash["speedup_vs_torch_sdpa"] == {"per_call_median_s": 2.0, "pipelined_median_s": 2.0}
    assert failed["speedup_vs_torch_sdpa"] == {"per_call_median_s": None, "pipelined_median_s": None}
    assert failed["status"].startswith("failed: OutOfMemoryError") and failed["per_call_median_s"] is None
    assert flash["memory_method"].startswith("XLA memory_analysis") and sdpa["memory_method"].startswith("torch.cuda")
    json.dumps(rows)  # plain data
    bench_gpu.print_rows(rows, "a fake GPU")


def diff_bound(args, tokens):
    """The derived bound on a row's max |diff| against torch's SDPA, on the bench's own weights and inputs
    (crosscheck.benchmarks.bench_models, seeded). Forward: the layer's first-order bound. Backward (d loss / d x): the
    difference is within |row - float64| + |float64 - SDPA|, so 4x + 1x SDPA's own float32 error against
    float64 (jaxattn.tolerance.reference_bound with multiple 5)."""
    book = bench_models.book_torch(args.d_model, args.heads, tokens, "float32", args.seed)
    x = bench_models.input_np(args, tokens)
    if not args.backward:
        return torch_layer_bound(book, x)
    r = np.random.default_rng(args.seed + 1).standard_normal((*x.shape[:2], args.d_model), dtype=np.float32)
    x_t = torch.from_numpy(x).requires_grad_(True)
    (sdpa_dx,) = torch.autograd.grad(bench_models.sdpa_class()(book).eval()(x_t), [x_t], torch.from_numpy(r))
    module, variables = bench_models.flax_state(book, args.d_model, args.heads, tokens, "float32", "naive")
    _, exact = layer_grads64(module, variables["params"], x, r)
    length = chain_length(module, variables["params"], x) + x.shape[0] * x.shape[1]
    return reference_bound(sdpa_dx.numpy(), exact, reduction_length=length, multiple=5.0)


@pytest.fixture
def torch_rows_on_the_cpu(monkeypatch):
    """The bench as it runs on a GPU, with torch's rows on this CPU and ``torch.cuda``'s calls recorded."""
    calls = []
    monkeypatch.setattr(bench_gpu, "TORCH_DEVICE", "cpu")
    monkeypatch.setattr(bench_gpu, "check_cuda", lambda: "this CPU standing in for a GPU")
    for name, result in (("synchronize", None), ("reset_peak_memory_stats", None), ("max_memory_allocated", 4096),
                         ("empty_cache", None)):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name, result=result: calls.append(name) or result)
    return calls


@pytest.mark.parametrize("backward", [False, True])
def test_the_whole_bench_runs_with_torch_on_the_cpu(tmp_path, torch_rows_on_the_cpu, backward):
    """Every line of the GPU bench but CUDA's own: models, ports, compiles, timings, peaks, diffs, JSON."""
    import jax

    path = tmp_path / "bench.json"
    argv = TINY + ["--impls", "torch-sdpa", "torch-book", "jax-cudnn", "jax-flash", "jax-auto", "--json", str(path)]
    args = parse(argv + (["--backward"] if backward else []))
    assert bench.main(args) == 0
    bound = diff_bound(args, 16)
    report = json.loads(path.read_text())
    rows = {r["impl"]: r for r in report["results"]}
    assert report["config"]["gpu"] == "this CPU standing in for a GPU" and report["config"]["backward"] == backward
    for name in ("torch-sdpa", "torch-book", "jax-auto"):  # ran: timed, measured, compared with torch's SDPA
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["per_call_median_s"] > 0 and row["pipelined_median_s"] > 0 and row["peak_device_bytes"] > 0
        assert row["max_abs_diff_vs_torch_sdpa"] <= bound, (row, bound)  # float32 at "highest", the same weights
        assert row["pass"] == ("forward+backward" if backward else "forward")
    assert rows["torch-sdpa"]["peak_device_bytes"] == 4096  # torch.cuda.max_memory_allocated's, as recorded
    assert rows["jax-auto"]["compile_s"] > 0
    refused = "failed: ValueError: attention implementation '{}' cannot serve this call: it "
    cudnn_status = refused.format("cudnn") + "does not support dtype float32 (supports bfloat16, float16)"
    if jax.default_backend() == "cpu":  # a refusal names every reason: the dtype and the platform
        cudnn_status += "; it runs on gpu, not on cpu"
    assert rows["jax-cudnn"]["status"] == cudnn_status  # a refusal is the row's status, not a crash
    if jax.default_backend() == "cpu":
        assert rows["jax-flash"]["status"] == refused.format("flash") + "runs on gpu, not on cpu"
    assert {"synchronize", "reset_peak_memory_stats", "max_memory_allocated", "empty_cache"} <= \
        set(torch_rows_on_the_cpu)


@pytest.mark.gpu
def test_a_small_real_run_on_the_gpu(tmp_path):
    path = tmp_path / "gpu.json"
    args = parse(TINY + ["--tokens", "256", "--d-model", "128", "--dtype", "bfloat16", "--json", str(path)])
    assert bench.main(args) == 0
    rows = json.loads(path.read_text())["results"]
    assert [r["impl"] for r in rows] == list(bench_gpu.gpu_impls())
    for r in rows:
        if r["impl"] == "torch-compile" and r["status"] != "ok":
            continue  # a compiler failure is reported, not hidden
        assert r["status"] == "ok", r
        assert r["per_call_median_s"] > 0 and r["pipelined_median_s"] > 0 and r["peak_device_bytes"] > 0
        assert r["max_abs_diff_vs_torch_sdpa"] <= 4e-2 * 4, r  # bf16 budget, outputs of size ~1-4
