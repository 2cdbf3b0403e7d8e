"""The real console script (``.venv/bin/crosscheck``) in subprocesses, and ``cli.main`` in this process: exit
codes, JSON, messages.

The script runs where the way in is the subject: the default run, ``python -m crosscheck``, and one bad
input per way in (two at a time: importing torch and JAX dominates; most use .safetensors weights so they
never import torch). Everything else is ``cli.main`` in this process (cli_in_process.py), the same code
from argv to exit code without a new interpreter importing torch and JAX and tracing again.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from crosscheck.porting import port
from crosscheck.porting.bundle import read_outputs, write_outputs
from crosscheck.references import torch_ref
from crosscheck.variants import registry

from .cli_in_process import ENV as SCRIPT_ENV
from .cli_in_process import main_in_process

CROSSCHECK = str(Path(sys.executable).with_name("crosscheck"))
ENV = {**os.environ, **SCRIPT_ENV}


def run(args, cwd, timeout=300):
    return subprocess.run([CROSSCHECK, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def run_all(jobs: dict, cwd) -> dict:
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, args, cwd) for name, args in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(7)
    mha = torch_ref.MultiHeadAttention(3, 4, 6, 0.0, num_heads=2)
    torch.save(mha.state_dict(), d / "mha.pt")
    port.save_file(mha.state_dict(), d / "mha.safetensors")
    wrapper = torch_ref.MultiHeadAttentionWrapper(3, 2, 8, 0.0, num_heads=3, qkv_bias=True)
    torch.save(wrapper.state_dict(), d / "wrapper.pt")
    torch.save({"step": torch.tensor(1), "note": "x"}, d / "notsd.pt")
    (d / "garbage.pt").write_bytes(b"not a pickle at all")
    (d / "garbage.safetensors").write_bytes(b"\x00" * 16)
    bad = dict(mha.state_dict())
    bad["out_proj.weight"] = torch.zeros(4, 5)
    torch.save(bad, d / "badshape.pt")
    rng = np.random.default_rng(3)
    nan = dict(mha.state_dict())
    nan["W_key.weight"] = torch.full((4, 3), float("nan"))
    port.save_file(nan, d / "nan.safetensors")
    np.save(d / "x.npy", rng.random((2, 5, 3)).astype(np.float32))
    np.save(d / "x_long.npy", rng.random((1, 7, 3)).astype(np.float32))
    np.save(d / "x_int.npy", np.arange(15).reshape(5, 3))
    np.save(d / "x_4d.npy", np.zeros((1, 1, 5, 3), np.float32))
    np.save(d / "x_d4.npy", rng.random((5, 4)).astype(np.float32))
    return d


# --- the default run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("default")
    proc = run(["--json", "report.json"], d)
    return proc, d


@pytest.mark.slow
def test_default_run_passes_with_every_variant_and_backend(default_run):
    proc, d = default_run
    assert proc.returncode == 0, proc.stderr
    assert "all 24 checks passed" in proc.stdout
    report = json.loads((d / "report.json").read_text())
    assert report["passed"] is True
    pairs = {(r["variant"], r["backend"]) for r in report["results"]}
    assert pairs == {(v.name, b) for v in registry.default_run() for b in ("torch", "flax", "ttnn")}
    for r in report["results"]:
        for key in ("variant", "backend", "runtime", "max_abs_err", "max_rel_err", "pcc", "ulp", "passed", "thresholds", "shape"):
            assert key in r
        assert r["passed"] is True
        assert (r["ulp"] is None) == (r["backend"] == "ttnn")  # ttnn computes in bfloat16
        # ttnn's host model; torch on the CPU; Flax where this machine's JAX runs ("gpu" on a GPU)
        assert r["runtime"] == {"ttnn": "host", "torch": "cpu"}.get(r["backend"], jax.default_backend())
    assert report["ttnn_runtime"]["name"] == "host"
    assert {"torch", "jax", "flax", "ttnn", "ttnn_reason"} <= set(report["versions"])
    assert report["versions"]["torch"] == torch.__version__
    assert set(report["configs"]) == {v.name for v in registry.default_run()}
    assert report["configs"]["MultiHeadAttention"] == {
        "d_in": 3, "d_out": 2, "context_length": 6, "dropout": 0.0, "num_heads": 2, "qkv_bias": False, "causal": True,
    }


@pytest.mark.slow
def test_default_run_table_names_the_ttnn_runtime(default_run):
    proc, _ = default_run
    assert "ttnn (host model)" in proc.stdout
    assert "\x1b[" not in proc.stdout  # NO_COLOR and not a terminal: no escape codes
    assert "Traceback" not in proc.stderr


def test_help_documents_everything(tmp_path):
    procs = {
        name: main_in_process(args, tmp_path)
        for name, args in {"help": ["--help"], "bundle": ["bundle", "--help"], "export": ["bundle", "export", "--help"],
                           "bench": ["bench", "--help"]}.items()
    }
    text = procs["help"].stdout
    assert procs["help"].returncode == 0
    for flag in (
        "--variant", "--weights", "--num-heads", "--context-length", "--dropout", "--qkv-bias", "--d-out", "--d-in",
        "--causal", "--no-causal", "--input", "--batch", "--tokens", "--seed", "--dtype", "--backends",
        "--ttnn-runtime", "--ttnn-python", "--json", "--no-color", "-q",
        "crosscheck bench", "bundle export", "bundle run", "bundle compare", "exit codes",
    ):
        assert flag in text, flag
    assert "compare" in procs["bundle"].stdout and "--weights" in procs["export"].stdout
    assert procs["bench"].returncode == 0 and procs["bench"].stdout.startswith("usage: crosscheck bench")
    # a new interpreter, through crosscheck/__main__.py: the same text as cli.main gives in this process
    module = subprocess.run([sys.executable, "-m", "crosscheck", "--help"], capture_output=True, text=True, env=ENV)
    assert module.returncode == 0 and module.stdout == text


# --- weights files ----------------------------------------------------------------------------


@pytest.mark.slow
def test_state_dicts_round_trip(files):
    procs = {
        name: main_in_process(args, files)
        for name, args in {
            "pt": ["--weights", "mha.pt", "--input", "x.npy", "--json", "pt.json", "-q"],
            "st": ["--weights", "mha.safetensors", "--variant", "multiheadattention", "--input", "x.npy", "--json", "st.json", "-q"],
        }.items()
    }
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stdout, proc.stderr)
    assert procs["pt"].stdout == "all 3 checks passed\n"  # -q: one line
    pt = json.loads((files / "pt.json").read_text())
    st = json.loads((files / "st.json").read_text())
    assert [r["variant"] for r in pt["results"]] == ["MultiHeadAttention"] * 3  # found by its keys
    assert pt["configs"]["MultiHeadAttention"] == {
        "d_in": 3, "d_out": 4, "context_length": 6, "dropout": 0.0, "num_heads": 2, "qkv_bias": False, "causal": True,
    }
    assert pt["results"][0]["shape"] == [2, 5, 4]
    assert pt["input"]["source"] == "file"
    # Same weights from either format: the very same numbers.
    assert [r["max_abs_err"] for r in pt["results"]] == [r["max_abs_err"] for r in st["results"]]


@pytest.mark.slow
def test_tampered_outputs_fail_with_the_variant_named(files):
    variants = ["--variant", "CausalAttention", "--variant", "TorchMultiheadAttention"]
    assert main_in_process(["bundle", "export", "b.safetensors", *variants], files).returncode == 0
    on_ttnn = ["bundle", "run", "b.safetensors", "o.safetensors", "--backend", "ttnn", "--ttnn-runtime", "host"]
    proc = main_in_process(on_ttnn, files)
    assert proc.returncode == 0, proc.stderr
    outputs, meta = read_outputs(files / "o.safetensors")
    outputs["TorchMultiheadAttention"] = outputs["TorchMultiheadAttention"] + np.float32(0.1)  # offset: PCC-blind
    write_outputs(files / "t.safetensors", outputs, meta)
    procs = {
        name: main_in_process(args, files)
        for name, args in {
            "good": ["bundle", "compare", "b.safetensors", "o.safetensors", "--json", "good.json"],
            "bad": ["bundle", "compare", "b.safetensors", "t.safetensors", "--json", "bad.json"],
        }.items()
    }
    assert procs["good"].returncode == 0, procs["good"].stderr
    bad = procs["bad"]
    assert bad.returncode == 1
    assert "mismatch in TorchMultiheadAttention" in bad.stderr and "Traceback" not in bad.stderr
    assert "FAIL TorchMultiheadAttention / ttnn (host model): max abs err 0.1" in bad.stdout
    report = json.loads((files / "bad.json").read_text())
    assert report["failing_variants"] == ["TorchMultiheadAttention"]
    assert [r["passed"] for r in report["results"]] == [True, False]


# --- bad input: exit 2, one line, no traceback -----------------------------------------------

BAD = {
    "unknown variant": (["--variant", "nope"], "unknown variant 'nope'; known variants: SimplifiedSelfAttention"),
    "missing weights": (["--weights", "missing.pt"], "weights file not found: missing.pt"),
    "not a state dict": (["--weights", "notsd.pt"], "notsd.pt: entry 'note' is not a tensor (str); not a state dict"),
    "unreadable pt": (["--weights", "garbage.pt"], "cannot load garbage.pt as a state dict"),
    "unreadable safetensors": (["--weights", "garbage.safetensors"], "cannot read safetensors file garbage.safetensors"),
    "wrong shape": (
        ["--weights", "badshape.pt", "--variant", "MultiHeadAttention"],
        "key 'out_proj.weight': expected shape (4, 4), found (4, 5)",
    ),
    "wrong keys": (
        ["--weights", "mha.safetensors", "--variant", "CausalAttention"],
        "CausalAttention: state dict does not fit: unexpected key 'out_proj.",
    ),
    "nan weights": (["--weights", "nan.safetensors"], "nan.safetensors: weight 'W_key.weight' has NaN or infinite values"),
    "flag contradicts weights": (
        ["--weights", "mha.safetensors", "--d-out", "6"],
        "--d-out 6 contradicts the weights, whose shapes give d_out=4",
    ),
    "heads contradict wrapper": (
        ["--weights", "wrapper.pt", "--num-heads", "2"],
        "--num-heads 2 contradicts the weights, whose shapes give num_heads=3",
    ),
    "bias contradicts weights": (["--weights", "mha.safetensors", "--qkv-bias"], "--qkv-bias true contradicts the weights"),
    "tokens beyond mask": (["--weights", "mha.safetensors", "--input", "x_long.npy"], "tokens=7, beyond context_length=6"),
    "tokens beyond flag": (
        ["--variant", "CausalAttention", "--tokens", "9", "--context-length", "6"],
        "tokens=9, beyond context_length=6 (--context-length)",
    ),
    "input dtype": (["--input", "x_int.npy"], "dtype int64 is not a floating dtype"),
    "input rank": (["--input", "x_4d.npy"], "expected shape (tokens, d_in) or (batch, tokens, d_in), got (1, 1, 5, 3)"),
    "input vs weights d_in": (["--weights", "mha.safetensors", "--input", "x_d4.npy"], "last dimension is 4 but the weights take d_in=3"),
    "missing input": (["--input", "nofile.npy"], "input file not found: nofile.npy"),
    "heads do not divide": (["--variant", "MultiHeadAttention", "--num-heads", "3"], "d_out=2 must be divisible by num_heads=3"),
    "input and random": (["--input", "x.npy", "--seed", "1"], "--input cannot be combined with --seed"),
    "unknown backend": (["--backends", "torch,tpu"], "unknown backend(s) ['tpu']"),
    "device without device": (["--variant", "SelfAttentionV2", "--ttnn-runtime", "device"], "ttnn runtime 'device' is not available"),
    "bad ttnn python": (["--variant", "SelfAttentionV2", "--ttnn-python", "/no/python"], "python interpreter not found"),
    "bad flag value": (["--num-heads", "0"], "argument --num-heads: must be >= 1, got 0"),
    "unknown flag": (["--bogus"], "unrecognized arguments: --bogus"),
    "json directory": (["--json", "no-such-dir/r.json"], "cannot write JSON report no-such-dir/r.json"),
    "bundle not a bundle": (["bundle", "compare", "mha.safetensors", "mha.safetensors"], "not a crosscheck bundle"),
}


#: Cases run through the real console script: one per way in (argparse, a bad file that never imports torch,
#: one that does, a refusal after the inputs are read). The others call ``cli.main`` in this process, the
#: same code from argv to exit code without a new interpreter importing torch and JAX for each case.
THROUGH_THE_SCRIPT = ("unknown flag", "unreadable safetensors", "unreadable pt", "tokens beyond mask", "json directory")


@pytest.fixture(scope="module")
def bad_runs(files):
    return run_all({name: BAD[name][0] for name in THROUGH_THE_SCRIPT}, files)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(case, files, request):
    args, message = BAD[case]
    proc = request.getfixturevalue("bad_runs")[case] if case in THROUGH_THE_SCRIPT else main_in_process(args, files)
    code, stderr = proc.returncode, proc.stderr
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("crosscheck: error: ")
    assert message in lines[0]


# --- --attention-impl (in this process: torch and JAX are imported once) ------------------------

IMPLS = ("naive", "blockwise", "xla")
TAKERS = {v.name for v in registry.takes_attention_impl()}


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_impl_runs_every_variant_and_is_recorded(impl, tmp_path):
    json_path = tmp_path / "r.json"
    args = ["--attention-impl", impl, "--backends", "torch,flax", "--json", str(json_path)]
    proc = main_in_process(args)
    code, out, err = proc.returncode, proc.stdout, proc.stderr
    assert code == 0, err
    assert f"attention impl: {impl}\n" in out and "all 16 checks passed" in out
    report = json.loads(json_path.read_text())
    assert report["passed"] and report["attention_impl"] == impl
    flax_rows = {r["variant"]: r["attention_impl"] for r in report["results"] if r["backend"] == "flax"}
    assert flax_rows == {v.name: (impl if v.name in TAKERS else None) for v in registry.default_run()}


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_impl_on_random_multi_head_inputs(impl, tmp_path):
    json_path = tmp_path / "r.json"
    args = [
        "--attention-impl", impl, "--backends", "torch,flax", "--variant", "MultiHeadAttention",
        "--batch", "2", "--tokens", "40", "--d-in", "16", "--d-out", "16", "--num-heads", "4", "--json", str(json_path),
    ]
    proc = main_in_process(args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(json_path.read_text())
    assert report["attention_impl"] == impl and [r["shape"] for r in report["results"]] == [[2, 40, 16]] * 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention-impl", "flash9"], "unknown attention impl 'flash9'; known: auto, naive, blockwise, xla"),
        (["--attention-impl", "naive", "--variant", "SelfAttentionV1"], "SelfAttentionV1 takes no --attention-impl"),
        (["bundle", "export", "b.safetensors", "--attention-impl", "naive", "--variant", "SimplifiedSelfAttention"],
         "SimplifiedSelfAttention takes no --attention-impl"),
    ],
)
def test_bad_attention_impl_exits_2_with_one_line(args, message, tmp_path):
    proc = main_in_process([*args, "--backends", "torch,flax"] if args[0] != "bundle" else args, tmp_path)
    code, out, err = proc.returncode, proc.stdout, proc.stderr
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crosscheck: error: ") and message in lines[0], err
    assert not (tmp_path / "b.safetensors").exists()


def test_help_documents_the_attention_impl(capsys):
    from crosscheck.cli import build_bundle_parser, build_parser

    text = build_parser().format_help()
    assert "--attention-impl NAME" in text and "jaxattn.implementations.names()" in text
    assert "--attention-impl" in build_bundle_parser()._subparsers._group_actions[0].choices["export"].format_help()
