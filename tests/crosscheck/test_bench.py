"""``crosscheck bench`` at a tiny shape: runs, agrees with torch, writes valid JSON and PNG, counts compilations."""

import argparse
import json

import pytest

torch = pytest.importorskip("torch", reason="the benchmark compares against torch")

import numpy as np  # noqa: E402

from crosscheck.benchmarks import bench, bench_models  # noqa: E402
from jaxattn.tolerance import attention_bound, linear_error  # noqa: E402
from tests.bounds import one_head, torch_layer_bound  # noqa: E402

TINY = ["--tokens", "8,20", "--batch", "2", "--d-model", "16", "--heads", "2", "--repeats", "2"]
FAST_IMPLS = ["jax-naive", "jax-blockwise", "jax-xla", "jax-auto", "jax-fused-blockwise", "torch-book", "torch-sdpa"]


def parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def layer_bound(args, tokens):
    """The derived bound on two float32 computations of the bench's layer: its weights and input rebuilt as
    the bench draws them (crosscheck.benchmarks.bench_models, seeded), read by tests/bounds.py."""
    book = bench_models.book_torch(args.d_model, args.heads, tokens, "float32", args.seed)
    return torch_layer_bound(book, bench_models.input_np(args, tokens))


def piece_bound(args, tokens, piece):
    """The same for the breakdown's pieces: one projection ``x @ W_query.T``, one causal attention core."""
    if piece == "projection":
        book = bench_models.book_torch(args.d_model, args.heads, tokens, "float32", args.seed)
        kernel = book.W_query.weight.detach().double().numpy().T
        return 2 * float(linear_error(bench_models.input_np(args, tokens), kernel)[1].max())
    shape = (3, args.batch, args.heads, tokens, args.d_model // args.heads)
    q, k, v = np.random.default_rng(args.seed + 1).standard_normal(shape, dtype=np.float32)  # as build_piece_runners
    return attention_bound(one_head(q), one_head(k), one_head(v), is_causal=True)


def test_tiny_run_writes_json_and_png(tmp_path):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    args = parse(TINY + ["--impls", ",".join(FAST_IMPLS), "--json", str(json_path), "--plot", str(png_path)])
    assert bench.main(args) == 0
    result = json.loads(json_path.read_text())
    rows = result["results"]
    bounds = {t: layer_bound(args, t) for t in (8, 20)}
    assert {(r["impl"], r["tokens"]) for r in rows} == {(i, t) for i in FAST_IMPLS for t in (8, 20)}
    for row in rows:
        assert row["framework"] == ("jax" if row["impl"].startswith("jax-") else "torch")
        assert row["batch"] == 2 and row["median_s"] > 0 and len(row["times_s"]) == 2
        # every implementation computed the torch book class's output on the same weights and input
        assert row["max_abs_diff_vs_reference"] <= bounds[row["tokens"]], (row, bounds[row["tokens"]])
        if row["framework"] == "jax":
            assert row["compile_s"] > 0 and row["memory"]["total_bytes"] >= row["memory"]["argument_bytes"] > 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_dash_puts_the_json_alone_on_stdout_and_the_tables_on_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from crosscheck.cli import main

    argv = ["--tokens", "8", "--d-model", "8", "--heads", "2", "--repeats", "1", "--impls", "jax-naive,torch-book"]
    assert main(["bench", *argv, "--json", "-"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # nothing but the JSON on stdout
    assert {r["impl"] for r in result["results"]} == {"jax-naive", "torch-book"}
    bound = layer_bound(parse(argv), 8)
    assert all(r["max_abs_diff_vs_reference"] <= bound for r in result["results"]), (result["results"], bound)
    assert "jax-naive" in err and "crosscheck bench:" in err
    assert list(tmp_path.iterdir()) == []  # no file named "-"


def test_breakdown_times_each_piece_in_both_frameworks_on_the_same_inputs(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    args = parse(TINY + ["--impls", "jax-auto,torch-sdpa", "--breakdown", "--json", str(json_path)])
    assert bench.main(args) == 0
    pieces = json.loads(json_path.read_text())["breakdown"]
    assert {(r["impl"], r["tokens"]) for r in pieces} == {
        (f"{fw}-{piece}", t) for fw in ("jax", "torch") for piece in ("projection", "attention-core") for t in (8, 20)
    }
    for row in pieces:
        assert row["framework"] == row["impl"].split("-")[0] and row["batch"] == 2
        assert row["median_s"] > 0 and len(row["times_s"]) == 2
        # the JAX piece computed what torch's did: x @ W_query.T, and SDPA(is_causal=True)
        bound = piece_bound(args, row["tokens"], row["impl"].split("-", 1)[1])
        assert row["max_abs_diff_jax_vs_torch"] <= bound, (row, bound)
    out = capsys.readouterr().out
    assert "-- breakdown at tokens=20" in out and "4 x projection + core: jax" in out


def test_torch_compile_failure_is_reported_not_raised(monkeypatch, tmp_path):
    def broken_compile(module):
        def fail(*_):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    json_path = tmp_path / "b.json"
    args = parse(TINY[:2] + ["8"] + TINY[3:] + ["--impls", "torch-book,torch-compile", "--json", str(json_path)])
    assert bench.main(args) == 0
    rows = {r["impl"]: r for r in json.loads(json_path.read_text())["results"]}
    assert rows["torch-compile"]["median_s"] is None
    assert rows["torch-compile"]["status"] == "failed: RuntimeError: no C++ compiler"
    assert rows["torch-book"]["median_s"] > 0


def test_recompilations_counted_with_and_without_bucketing():
    args = parse(["--d-model", "8", "--heads", "2"])
    sweep = [3, 5, 6, 9, 100, 130]
    rec = bench.count_recompilations(sweep, args)["policies"]
    assert rec["none"]["compilations"] == 6  # one per distinct length
    assert rec["pow2"]["compilations"] == 5  # 4, 8, 16, 128, 256
    assert rec["multiple"]["compilations"] == 2  # 128, 256
    for policy in rec.values():
        assert policy["jit_cache_size"] in (None, policy["compilations"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tokens", "0"], "--tokens: 0 is outside"),
        (["--d-model", "10", "--heads", "3"], "--d-model=10 must be divisible by --heads=3"),
        (["--impls", "jax-naive,jax-magic"], "--impls: unknown jax-magic"),
        (["--dtype", "float8"], "--dtype must be one of"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_options_exit_2_with_named_limit(argv, message, capsys):
    assert bench._cli(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--impls", ""], "--impls: give at least one implementation"),
    (["--impls", "", "--decode"], "--impls with --decode: give at least one implementation"),
    (["--seed", "-1", "--impls", "jax-naive"], "--seed must be >= 0, got -1"),
    (["--seed", "-1", "--decode"], "--seed must be >= 0, got -1"),
    (["--recompile-sweep", "0", "--impls", "jax-naive"], r"--recompile-sweep: 0 is outside \[1, 65536\]"),
])
def test_bad_bench_flags_are_refused_before_any_work(argv, message, capsys):
    """These ran nothing and exited 0, or failed only after the run without naming the flag."""
    from crosscheck.errors import BadInputError

    with pytest.raises(BadInputError, match=message):
        bench.main(parse(TINY + argv))
    assert "crosscheck bench:" not in capsys.readouterr().out  # refused before the header: no work started
