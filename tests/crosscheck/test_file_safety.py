"""No run writes over its own inputs, every output path is checked before the work, writes are atomic.

CLI cases run ``cli.main`` in this process (cli_in_process.py) and hash every input before and after; one
``bundle run`` goes through the console script (the ``run`` helper of test_cli.py), another interpreter writing
the outputs this one then overwrites.
"""

import argparse
import hashlib
import json
import os

import numpy as np
import pytest

from crosscheck.benchmarks import bench
from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.pipeline import report as rp
from crosscheck.pipeline.results import Report
from crosscheck.porting import bundle as bd
from crosscheck.porting import outputs

from .cli_in_process import main_in_process
from .test_cli import run


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _case() -> bd.BundleCase:
    rng = np.random.default_rng(0)
    cfg = AttnConfig(d_in=3, d_out=2, context_length=6, num_heads=1, qkv_bias=False, dropout=0.0)
    sd = {f"W_{n}.weight": rng.standard_normal((2, 3)).astype(np.float32) for n in ("query", "key", "value")}
    return bd.BundleCase("CausalAttention", cfg, sd, rng.random((1, 6, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs of every kind: a bundle, an outputs file, weights, an input array, a config, a previous report."""
    d = tmp_path_factory.mktemp("safety")
    case = _case()
    bd.write_bundle(d / "b.safetensors", [case])
    bd.write_outputs(d / "o.safetensors", {case.variant: np.zeros((1, 6, 2), np.float32)},
                     {"backend": "flax", "runtime": "jax"})
    from safetensors.numpy import save_file

    save_file(case.state_dict, str(d / "w.safetensors"))
    np.save(d / "x.npy", case.inputs)
    (d / "config.json").write_text(json.dumps({"num_attention_heads": 1}))
    (d / "sub").mkdir()
    os.symlink("w.safetensors", d / "link.safetensors")
    return d


def _hashes(d) -> dict:
    return {p.name: sha(p) for p in sorted(d.iterdir()) if p.is_file() and not p.is_symlink()}


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("crosscheck: error: ")
    return lines[0]


# --- the CLI never writes onto an input, and says so in one line ---------------------------------

INPUT_CLASHES = {
    "--json is --weights": (["--weights", "w.safetensors", "--json", "w.safetensors"], "--json w.safetensors is also the --weights file"),
    "--json is --weights via ./": (["--weights", "w.safetensors", "--json", "./w.safetensors"], "--json ./w.safetensors is also the --weights file"),
    "--json is --weights via a link": (["--weights", "w.safetensors", "--json", "link.safetensors"], "--json link.safetensors is also the --weights file ("),
    "--json is --input": (["--input", "x.npy", "--json", "x.npy"], "--json x.npy is also the --input file"),
    "--json is --config": (["--config", "config.json", "--json", "sub/../config.json"], "--json sub/../config.json is also the --config file"),
    "export OUT is --weights": (["bundle", "export", "w.safetensors", "--weights", "w.safetensors"], "OUT w.safetensors is also the --weights file"),
    "export OUT is --input": (["bundle", "export", "x.npy", "--input", "x.npy"], "OUT x.npy is also the --input file"),
    "run OUT is BUNDLE": (["bundle", "run", "b.safetensors", "b.safetensors", "--backend", "flax"], "OUT b.safetensors is also the BUNDLE file"),
    "compare --json is BUNDLE": (["bundle", "compare", "b.safetensors", "o.safetensors", "--json", "b.safetensors"], "--json b.safetensors is also the BUNDLE file"),
    "compare --json is OUTPUTS": (["bundle", "compare", "b.safetensors", "o.safetensors", "--json", "o.safetensors"], "--json o.safetensors is also the OUTPUTS file"),
}

BAD_PATHS = {
    "--json empty": (["--json", ""], "--json: empty path"),
    "--json a directory": (["--json", "sub"], "cannot write JSON report sub (--json): it is a directory"),
    "--json missing directory": (["--json", "nodir/r.json"], "cannot write JSON report nodir/r.json (--json): directory"),
    "export OUT a directory": (["bundle", "export", "sub"], "cannot write bundle sub (OUT): it is a directory"),
    "export OUT empty": (["bundle", "export", ""], "OUT: empty path"),
    "export OUT missing directory": (["bundle", "export", "nodir/b.safetensors"], "does not exist"),
    "run OUT a directory": (["bundle", "run", "b.safetensors", "sub", "--backend", "flax"], "cannot write outputs file sub (OUT): it is a directory"),
    "compare --json empty": (["bundle", "compare", "b.safetensors", "o.safetensors", "--json", ""], "--json: empty path"),
    "bench --json missing directory": (["bench", "--tokens", "8", "--json", "nodir/b.json"], "cannot write JSON results nodir/b.json (--json)"),
    "bench --plot missing directory": (["bench", "--tokens", "8", "--plot", "nodir/b.png"], "cannot write plot nodir/b.png (--plot)"),
    "bench --plot is --json": (["bench", "--json", "b.json", "--plot", "./b.json"], "--plot ./b.json is also the --json file"),
    "bench --json empty": (["bench", "--json", ""], "--json: empty path"),
}


@pytest.mark.parametrize("case", sorted(INPUT_CLASHES))
def test_an_input_is_never_an_output(files, case):
    args, message = INPUT_CLASHES[case]
    before = _hashes(files)
    line = _one_error_line(main_in_process(args, files))
    assert message in line and "refusing to overwrite an input" in line
    assert _hashes(files) == before


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_bad_output_paths_fail_first_with_one_line(files, case):
    args, message = BAD_PATHS[case]
    before = _hashes(files)
    line = _one_error_line(main_in_process(args, files))
    assert message in line
    assert _hashes(files) == before
    assert not (files / "nodir").exists() and not [p for p in files.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_bundle_round_trip_leaves_its_inputs_and_overwrites_its_own_outputs(tmp_path):
    """The happy path still works, twice: a previous outputs file or report is the user's output, not an input.
    The first round's ``bundle run`` runs the console script (another interpreter writes the outputs, as the
    ttnn one does); the rest is ``cli.main`` in this process (the same code from argv on, without more
    interpreters importing JAX)."""
    np.save(tmp_path / "x.npy", _case().inputs)
    export = ["bundle", "export", "b.safetensors", "--variant", "CausalAttention", "--input", "x.npy"]
    assert main_in_process(export, tmp_path).returncode == 0
    inputs = {"x.npy": sha(tmp_path / "x.npy"), "b.safetensors": sha(tmp_path / "b.safetensors")}
    for bundle_run in (run, main_in_process):  # through the script, then in this process
        proc = bundle_run(["bundle", "run", "b.safetensors", "o.safetensors", "--backend", "flax"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        proc = main_in_process(["bundle", "compare", "b.safetensors", "o.safetensors", "--json", "r.json"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    assert {k: sha(tmp_path / k) for k in inputs} == inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "o.safetensors", "r.json", "x.npy"]


# --- unit level: check_output_path and atomic_write -----------------------------------------------


def test_check_output_path_compares_resolved_paths_and_inodes(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"weights")
    os.link(tmp_path / "w.pt", tmp_path / "hard.pt")
    for alias in ("w.pt", "./w.pt", "hard.pt"):
        with pytest.raises(BadInputError, match=f"--json .*{alias} is also the --weights file"):
            outputs.check_output_path(os.path.join(tmp_path, alias), "--json", [("--weights", tmp_path / "w.pt")])
    # not-a-path inputs (arrays, state dicts, None) are skipped; a new file next to an input is fine
    ok = outputs.check_output_path(tmp_path / "r.json", "--json", [("--weights", None), ("--input", np.zeros(3))])
    assert ok == str(tmp_path / "r.json")


@pytest.mark.parametrize("path,message", [("", "empty path"), (".", "it is a directory"),
                                          ("no/r.json", "directory .* does not exist"), ("/dev/null", "not a regular file")])
def test_check_output_path_rejects_unwritable_targets(tmp_path, monkeypatch, path, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInputError, match=message):
        outputs.check_output_path(path, "--json")


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "r.json"

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        outputs.atomic_write(target, half_then_fail)
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary
    target.write_text("previous")
    target.chmod(0o640)
    with pytest.raises(RuntimeError):
        outputs.atomic_write(target, half_then_fail)
    assert target.read_text() == "previous" and list(tmp_path.iterdir()) == [target]
    outputs.atomic_write_text(target, "new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o640


def test_os_error_in_a_write_is_one_line_and_leaves_nothing(tmp_path):
    def enospc(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(BadInputError, match="cannot write bundle .*b.safetensors: No space left on device"):
        outputs.atomic_write(tmp_path / "b.safetensors", enospc, what="bundle")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_through_a_link_replaces_the_target_not_the_link(tmp_path):
    (tmp_path / "real.json").write_text("old")
    os.symlink("real.json", tmp_path / "link.json")
    outputs.atomic_write_text(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"


def _half_then_fail(tmp):
    with open(tmp, "w") as f:
        f.write("{half")
    raise RuntimeError("serializer failed")


def test_writers_are_atomic_when_the_serializer_fails(tmp_path, monkeypatch):
    """write_json, write_bundle, write_outputs and bench's JSON and plot leave no partial file."""
    import safetensors.numpy

    def save_half(tensors, path, metadata=None):
        _half_then_fail(path)

    def text_half(path, text, what):
        outputs.atomic_write(path, _half_then_fail, what)

    monkeypatch.setattr(safetensors.numpy, "save_file", save_half)
    with pytest.raises(RuntimeError):
        bd.write_bundle(tmp_path / "b.safetensors", [_case()])
    with pytest.raises(RuntimeError):
        bd.write_outputs(tmp_path / "o.safetensors", {"CausalAttention": np.zeros(2, np.float32)}, {})
    monkeypatch.setattr(rp, "atomic_write_text", text_half)
    with pytest.raises(RuntimeError):
        rp.write_json(Report(results=[], configs={}, input={}, weights="w", versions={}), tmp_path / "r.json")
    monkeypatch.setattr(bench, "atomic_write_text", text_half)
    with pytest.raises(RuntimeError):
        bench._write_json({"x": 1}, str(tmp_path / "bench.json"))
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, **kw: _half_then_fail(path))
    with pytest.raises(RuntimeError):
        bench.write_plot([{"impl": "jax-naive", "tokens": 8, "median_s": 1e-3}], str(tmp_path / "p.png"))
    assert list(tmp_path.iterdir()) == []


def test_bench_checks_its_outputs_before_running(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "_validate", lambda args: ran.append(args) or ([8], ["jax-naive"]))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for argv in (["--json", str(tmp_path / "no" / "b.json")], ["--plot", str(tmp_path)],
                 ["--decode", "--json", str(tmp_path / "no" / "d.json")]):
        with pytest.raises(BadInputError):
            bench.main(parser.parse_args(argv))
    assert ran == []


@pytest.mark.parametrize("content", [b"hello world, not a pickle\n", b"\x80\x02}q\x00(X", b"\x00" * 64])
def test_a_foreign_file_named_pt_is_a_one_line_error(tmp_path, content):
    """A text file named .pt gave `KeyError: 101` from the unpickler, with a traceback."""
    from crosscheck.errors import BadInputError
    from crosscheck.porting import port

    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=r"cannot load .*weights\.pt as a state dict with torch\.load\(weights_only=True\)"):
        port.load_file(path)
