"""``crosscheck --devices N --shard MODE`` and ``crosscheck bench --devices N --shard MODE``.

In-process runs use the 8 host devices tests/conftest.py forces; two subprocesses check what only a
fresh process shows: the CLI sets the device count itself before JAX starts (the acceptance
command), and nothing imports JAX before the arguments are parsed. On a GPU machine all of it runs on
the host CPU devices: in process, JAX is seen as a CPU machine sees it (tests/host_cpu.py); the
subprocesses get ``JAX_PLATFORMS=cpu``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crosscheck import cli
from crosscheck.errors import BadInputError
from crosscheck.pipeline import devices, engine
from crosscheck.pipeline.inputs import RandomInputs
from tests.host_cpu import as_a_cpu_machine

CROSSCHECK = str(Path(sys.executable).with_name("crosscheck"))
# A fresh process with no device count of its own: the CLI must set it. Its devices are the host's
# (a one-GPU machine has one GPU device). It compiles as the suite does (tests/conftest.py).
ENV = {**os.environ, "XLA_FLAGS": os.environ.get("JAXATTN_TEST_COMPILE_FLAGS", ""), "NO_COLOR": "1",
       "COLUMNS": "200", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(autouse=True)
def cpu_machine(monkeypatch):
    with as_a_cpu_machine(monkeypatch):
        yield


def rows(report):
    return {(r.backend, r.reference): r for r in report.results}


@pytest.mark.parametrize("mode, variant, extra", [
    ("batch", "MultiHeadAttentionCombinedQKV", dict(num_heads=2)),
    ("heads", "MultiHeadAttention", dict(num_heads=8)),
    ("heads", "GroupedQueryAttention", dict(num_heads=8, num_kv_groups=8, head_dim=2)),
    ("sequence", "CausalAttention", {}),
    ("sequence", "TorchMultiheadAttention", dict(num_heads=2, causal=False)),
])
def test_each_mode_passes_with_a_one_device_row(mode, variant, extra):
    report = engine.run(
        [variant], inputs=RandomInputs(batch=11, tokens=21, d_in=16, seed=1), d_out=16, backends=("torch", "flax"),
        devices=8, shard=mode, **extra,
    )
    assert report.passed, [f for r in report.results for f in r.failures]
    by = rows(report)
    vs_torch, vs_one = by[("flax", "torch float32")], by[("flax", "flax 1 device")]
    # crosscheck's verdict under its ("flax sharded", "float32") POLICY row (crosscheck/pipeline/compare.py)
    assert vs_one.passed and vs_one.thresholds["max_abs"] == 1e-6
    assert vs_torch.device == vs_one.device == f"cpu x8 {mode}"
    assert vs_one.shape == [11, 21, 16]
    assert report.to_dict()["sharding"] == {"mode": mode, "devices": 8, "platform": "cpu"}
    if mode == "sequence":
        assert vs_torch.attention_impl == "ring"


def test_a_wrong_split_fails_the_one_device_row(monkeypatch):
    """The row can fail: ring attention off by 1 ulp-ish x 100 in sequence mode is caught against 1 device."""
    from jaxattn import sharding

    real = sharding.ring_attention
    monkeypatch.setattr(sharding, "ring_attention", lambda *a, **kw: real(*a, **kw) * (1 + 2e-5))
    report = engine.run(["MultiHeadAttention"], inputs=RandomInputs(batch=2, tokens=13, d_in=8, seed=2), d_out=8,
                        backends=("flax",), devices=8, shard="sequence")
    one = rows(report)[("flax", "flax 1 device")]
    assert not one.passed and one.max_abs_err > 1e-6 and any("max abs" in f for f in one.failures)


def test_no_sharding_records_none():
    report = engine.run(["MultiHeadAttention"], inputs=RandomInputs(batch=1, tokens=4, d_in=4), backends=("flax",))
    assert report.to_dict()["sharding"] is None
    assert all(r.reference != "flax 1 device" for r in report.results)


def fails(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("crosscheck: error:"), (code, err)
    return err


SMALL = ["--backends", "torch,flax", "--batch", "1", "--tokens", "8", "--d-in", "8", "--d-out", "8"]


@pytest.mark.parametrize("argv, message", [
    (["--variant", "MultiHeadAttention", "--shard", "batch"], "--shard batch needs --devices N"),
    (["--variant", "MultiHeadAttention", "--devices", "2"], "--devices 2 needs --shard"),
    (["--variant", "MultiHeadAttention", "--devices", "8", "--shard", "heads", "--num-heads", "2"],
     "MultiHeadAttention has num_heads=2, not divisible by --devices 8"),
    (["--variant", "GroupedQueryAttention", "--devices", "4", "--shard", "heads", "--num-heads", "4",
      "--num-kv-groups", "2", "--head-dim", "2"], "GroupedQueryAttention has num_kv_groups=2, not divisible by --devices 4"),
    (["--variant", "MultiHeadAttention", "--devices", "9", "--shard", "batch"],
     "--devices 9 --shard batch: the batch has 1 row(s) to split"),
    (["--variant", "SelfAttentionV2", "--devices", "2", "--shard", "batch"],
     "SelfAttentionV2 cannot be split by batch; its shard modes: none"),
    (["--variant", "MultiHeadAttention", "--devices", "2", "--shard", "sequence", "--attention-impl", "naive"],
     "--attention-impl naive cannot be combined with it"),
    (["--variant", "MultiHeadAttention", "--devices", "2", "--shard", "batch", "--decode", "4"],
     "cannot be combined with --decode"),
])
def test_bad_combinations_exit_2_naming_the_numbers(argv, message, capsys):
    assert message in fails(argv + SMALL, capsys)


def test_more_devices_than_a_gpu_machine_has(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(BadInputError, match="--devices 16: this machine has 8 gpu device"):
        devices.check_device_count(16)


def test_force_host_devices_replaces_an_earlier_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2")
    devices.force_host_devices(8)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"


def test_help_says_how_devices_are_made(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=N" in text and "before anything imports JAX" in text


def test_nothing_imports_jax_before_the_arguments_are_parsed():
    code = ("import sys, crosscheck.cli as c; import crosscheck.benchmarks.bench, crosscheck.pipeline.engine; "
            "c.build_parser().parse_args(['--devices', '8', '--shard', 'sequence']); "
            "print(sorted(m for m in ('jax', 'jaxlib', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.slow
def test_the_issues_acceptance_command_in_a_fresh_process(tmp_path):
    report = tmp_path / "r.json"
    argv = ["--devices", "8", "--shard", "sequence", "--variant", "MultiHeadAttention", "--batch", "2",
            "--tokens", "1000", "--d-in", "64", "--d-out", "64", "--num-heads", "4", "--json", str(report)]
    out = subprocess.run([CROSSCHECK, *argv], env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "flax 1 device" in out.stdout and "flax (cpu x8 sequence)" in out.stdout
    data = json.loads(report.read_text())
    assert data["sharding"] == {"mode": "sequence", "devices": 8, "platform": "cpu"}
    one = [r for r in data["results"] if r["reference"] == "flax 1 device"]
    assert len(one) == 1 and one[0]["passed"]  # crosscheck's verdict: its ("flax sharded", "float32") POLICY row
    assert {r["backend"] for r in data["results"]} == {"torch", "flax", "ttnn"}


def bench_layer_bound(argv, tokens):
    """The derived bound on the split run against one device: the bench's layer (crosscheck.benchmarks.bench_shard's
    module, init seed and input, rebuilt) read by tests/bounds.py (jaxattn.tolerance)."""
    import argparse

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxattn
    from crosscheck.benchmarks import bench
    from tests.bounds import layer_bound

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    d = args.d_model
    module = jaxattn.MultiHeadAttention(d, d, tokens, 0.0, args.heads)
    params = jax.jit(module.init)(jax.random.key(args.seed), jnp.zeros((1, 8, d), jnp.float32))["params"]
    x = np.random.default_rng(args.seed).normal(size=(args.batch, tokens, d)).astype(np.float32)
    return layer_bound(module, params, x)


def test_bench_reports_memory_per_device_against_one_device(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["--devices", "8", "--shard", "heads", "--batch", "2", "--tokens", "40", "--d-model", "32", "--heads", "8",
            "--repeats", "2"]
    code = cli.main(["bench", *argv, "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "1 device, blockwise" in text and "8 devices, heads" in text and "say little" in text
    result = json.loads(out.read_text())
    one, split = result["results"]
    assert result["config"]["memory_method"].startswith("xla compiled.memory_analysis(), per device")
    # Heads mode splits the 4 projections' columns/rows: each device holds 1/8 of the weights.
    weights = 4 * (32 * 32 + 32) * 4
    assert split["memory"]["argument_bytes"] < one["memory"]["argument_bytes"] - weights * 7 // 8 + 4 * 32 * 8
    bound = bench_layer_bound(argv, 40)
    assert split["max_abs_diff_vs_1_device"] <= bound and len(split["times_s"]) == 2, (split, bound)
    assert split["peak_ratio_vs_1_device"] == split["memory"]["peak_bytes"] / one["memory"]["peak_bytes"]


def test_bench_sequence_memory_per_device_is_a_fraction_of_one_device(tmp_path, capsys):
    """The target shape and bound: b=1, T=65536, d=768, 12 heads, 8 devices, <= 1/4 of one device (compiled only)."""
    out = tmp_path / "b.json"
    code = cli.main(["bench", "--devices", "8", "--shard", "sequence", "--batch", "1", "--tokens", "65536",
                     "--d-model", "768", "--heads", "12", "--memory-only", "--json", str(out)])
    assert code == 0
    one, split = json.loads(out.read_text())["results"]
    assert one["median_s"] is None and split["median_s"] is None  # compiled, never run
    assert split["peak_ratio_vs_1_device"] <= 0.25, (one["memory"], split["memory"])
    assert split["memory"]["argument_bytes"] * 6 < one["memory"]["argument_bytes"]  # x is split 8 ways
    capsys.readouterr()


def test_bench_refuses_a_half_request(capsys):
    assert cli.main(["bench", "--shard", "sequence"]) == 2
    assert "--devices N and --shard batch|heads|sequence go together" in capsys.readouterr().err
