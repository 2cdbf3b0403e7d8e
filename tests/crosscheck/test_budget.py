"""Hostile input: the memory budget, loop bounds, expanded storage, bundles, bf16 files.

Every size repro of the issue is run through ``crosscheck.cli.main`` in process and must end
with exit 2 and one ``crosscheck: error:`` line naming the flag or file, the estimate and the
limit, quickly: the refusal comes before any allocation (a ``--context-length 40000`` mask is
6.4 GB; a refused run here takes milliseconds). ``--max-memory 2G`` keeps the limits the same
on every machine.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from crosscheck import cli
from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.pipeline import budget
from crosscheck.porting import bundle as bd

LIMIT = ["--max-memory", "2G"]


def _refused(capsys, argv, *needles, seconds=20.0):
    t0 = time.perf_counter()
    code = cli.main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crosscheck: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert elapsed < seconds, f"refusal took {elapsed:.1f}s: {argv}"
    return lines[0]


# --- repro 1: sizes from flags ---------------------------------------------------------------------

RUN_REPROS = {
    "context-length": (["--variant", "CausalAttention", "--context-length", "40000"],
                       ["mask buffers (1 x context_length 40000^2)", "lower --context-length", "2 GiB (--max-memory"]),
    "d-out": (["--d-out", "300000000"], ["weights", "lower --d-in/--d-out"]),
    "tokens": (["--tokens", "16384", "--d-in", "4"], ["attention scores", "tokens 16384^2", "lower --tokens/--batch"]),
    "batch": (["--batch", "1000000000"], ["random inputs (batch 1000000000", "lower --batch"]),
    "wrapper-heads": (["--variant", "MultiHeadAttentionWrapper", "--num-heads", "1000000000"],
                      ["--num-heads 1000000000 is over the limit of 1024"]),
}


@pytest.mark.parametrize("name", sorted(RUN_REPROS))
def test_run_sizes_are_refused_before_allocation(capsys, name):
    argv, needles = RUN_REPROS[name]
    _refused(capsys, argv + LIMIT, *needles)


def test_the_estimate_is_the_documented_formula(capsys):
    # CausalAttention, context 40000: mask 40000^2 x 16 B; the message states it and the limit.
    line = _refused(capsys, ["--variant", "CausalAttention", "--context-length", "40000", "--backends", "torch"] + LIMIT)
    assert f"{budget.format_bytes(40000 ** 2 * 16)}" in line
    assert "over the memory budget of 2 GiB" in line


def test_the_default_limit_is_half_the_physical_memory(capsys):
    line = _refused(capsys, ["--variant", "CausalAttention", "--context-length", "400000"])
    assert f"default: 0.5 of {budget.format_bytes(budget.physical_memory())} physical memory" in line
    assert budget.default_budget().limit == int(budget.physical_memory() * 0.5)


def test_an_address_space_limit_below_that_is_the_default(monkeypatch):
    """A process limited to 1 GiB of address space (RLIMIT_AS) cannot hold more, whatever the machine has."""
    monkeypatch.setattr(budget, "address_space_limit", lambda: 1 << 30)
    limited = budget.default_budget()
    assert limited.limit == 1 << 30 and "address-space limit (RLIMIT_AS)" in limited.source
    monkeypatch.setattr(budget, "address_space_limit", lambda: None)  # none: half the memory
    assert budget.default_budget().limit == int(budget.physical_memory() * 0.5)


def test_a_run_inside_the_budget_still_runs(capsys):
    assert cli.main(["--variant", "CausalAttention", "--backends", "torch,flax", "--context-length", "64", "-q",
                     "--max-memory", "1G"]) == 0
    assert "passed" in capsys.readouterr().out


def test_max_memory_parsing(capsys):
    assert budget.parse_size("8G") == 8 << 30 and budget.parse_size("512MiB") == 512 << 20
    assert budget.parse_size("1.5gb") == 3 << 29 and budget.parse_size("1000") == 1000
    for bad in ("", "12X", "-1G", "0", "nan"):
        with pytest.raises(ValueError):
            budget.parse_size(bad)
    with pytest.raises(SystemExit) as exit_info:  # argparse's own exit, one line
        cli.main(["--max-memory", "12X"])
    assert exit_info.value.code == 2
    assert "argument --max-memory: not a size: '12X'" in capsys.readouterr().err
    _refused(capsys, ["--max-memory", "100"], "over the memory budget of 100 B (--max-memory 100 B)")


def test_engine_run_takes_max_memory():
    from crosscheck.pipeline import engine

    with pytest.raises(BadInputError, match="over the memory budget of 1 KiB"):
        engine.run(["CausalAttention"], backends=("torch",), max_memory="1K")
    assert engine.run(["CausalAttention"], backends=("torch",), max_memory="1G").passed


# --- bench -------------------------------------------------------------------------------------------

BENCH_REPROS = {
    "batch": (["--batch", "100000000", "--tokens", "128"], ["activations (batch 100000000", "lower --batch/--tokens"]),
    "d-model": (["--d-model", "1200000", "--tokens", "128"], ["weights (4 x d_model 1200000^2)", "lower --d-model"]),
    "tokens-book": (["--tokens", "65536", "--impls", "torch-book"], ["attention scores", "tokens 65536^2"]),
    "repeats": (["--repeats", "1000000000"], ["--repeats 1000000000 is over the limit of 1000"]),
    "sweep-value": (["--recompile-sweep", "100000000"], ["--recompile-sweep: 100000000 is outside"]),
    "sweep-length": (["--recompile-sweep", ",".join(["128"] * 1001)], ["number of token counts 1001 is over"]),
    "heads": (["--heads", "1000000000", "--d-model", "1000000000"], ["--heads 1000000000 is over the limit"]),
    "decode-steps": (["--decode", "--steps", "1000000000"], ["--steps 1000000000 is over the limit"]),
}


@pytest.mark.parametrize("name", sorted(BENCH_REPROS))
def test_bench_sizes_and_counts_are_refused_before_work(capsys, name):
    argv, needles = BENCH_REPROS[name]
    _refused(capsys, ["bench", *argv, *LIMIT], *needles)


# --- repro 2 and 11: files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from crosscheck.references import torch_ref

    d = tmp_path_factory.mktemp("budget")
    torch.save({"W_query.weight": torch.zeros(1).expand(60000, 60000)}, d / "expanded_w.pt")
    torch.save(torch.zeros(1).expand(60000, 60000), d / "expanded_x.pt")
    torch.manual_seed(0)
    x = torch.rand(1, 6, 3)
    save_file({"x": x.to(torch.bfloat16)}, str(d / "x_bf16.safetensors"))
    torch.save(x.to(torch.bfloat16), d / "x_bf16.pt")
    module = torch_ref.CausalAttention(3, 2, 6, 0.0)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(d / "w_bf16.safetensors"))
    torch.save(sd, d / "w_bf16.pt")
    return d


def test_expanded_storage_is_refused_without_materialising(capsys, files):
    assert (files / "expanded_w.pt").stat().st_size < 10_000  # a few KB on disk, 13.4 GiB dense
    _refused(capsys, ["--weights", str(files / "expanded_w.pt")] + LIMIT,
             "weights file", "'W_query.weight' of shape (60000, 60000)", "over the memory budget")
    _refused(capsys, ["--input", str(files / "expanded_x.pt")] + LIMIT, "input file", "shape (60000, 60000)")


def test_bf16_safetensors_read_as_pt_is(files):
    from crosscheck.pipeline import inputs
    from crosscheck.porting import port

    st, pt = inputs.load_input(files / "x_bf16.safetensors"), inputs.load_input(files / "x_bf16.pt")
    assert st.dtype == np.float32 and np.array_equal(st, pt)
    w_st, w_pt = port.load_file(files / "w_bf16.safetensors"), port.load_file(files / "w_bf16.pt")
    assert sorted(w_st) == sorted(w_pt)
    for key in w_st:
        assert str(w_st[key].dtype) == "bfloat16"
        assert np.array_equal(w_st[key].astype(np.float32), w_pt[key].astype(np.float32)), key


def test_bf16_safetensors_weights_and_inputs_run(capsys, files):
    code = cli.main(["--weights", str(files / "w_bf16.safetensors"), "--input", str(files / "x_bf16.safetensors"),
                     "--backends", "torch,flax", "-q"])
    assert code == 0, capsys.readouterr().err


# --- repro 8 and bundle configs ------------------------------------------------------------------------


def _case(**changes) -> bd.BundleCase:
    rng = np.random.default_rng(0)
    cfg = AttnConfig(d_in=3, d_out=2, context_length=6, num_heads=1)
    sd = {f"W_{n}.weight": rng.standard_normal((2, 3)).astype(np.float32) for n in ("query", "key", "value")}
    x = rng.random((1, 6, 3)).astype(np.float32)
    case = bd.BundleCase("CausalAttention", cfg, sd, x)
    for key, value in changes.items():
        if key in AttnConfig.__dataclass_fields__:
            case.config = case.config.replace(**{key: value})
        else:
            setattr(case, key, value)
    return case


BAD_BUNDLES = {
    "width-vs-d_in": ({"inputs": np.zeros((1, 6, 5), np.float32)}, "inputs have width 5 but the config's d_in is 3"),
    "dropout-nan": ({"dropout": float("nan")}, "config dropout must be in [0, 1), found nan"),
    "nan-inputs": ({"inputs": np.full((1, 6, 3), np.nan, np.float32)}, "inputs contain NaN"),
    "integer-inputs": ({"inputs": np.ones((1, 6, 3), np.int32)}, "inputs have dtype int32"),
    "nan-weights": ({"state_dict": {f"W_{n}.weight": np.full((2, 3), np.nan, np.float32)
                                    for n in ("query", "key", "value")}}, "has NaN or infinite values"),
    "context-over-budget": ({"context_length": 40000}, "mask buffers (1 x context_length 40000^2)"),
    "heads-over-limit": ({"num_heads": 1_000_000_000}, "config num_heads 1000000000 is over the limit"),
}


@pytest.mark.parametrize("name", sorted(BAD_BUNDLES))
def test_bundles_are_validated_on_read(tmp_path, capsys, name):
    changes, message = BAD_BUNDLES[name]
    path = tmp_path / "b.safetensors"
    bd.write_bundle(path, [_case(**changes)])
    with budget.limited("2G"), pytest.raises(BadInputError, match=None) as info:
        bd.read_bundle(path)
    assert message in str(info.value)
    # The CLI refuses it the same way, for `bundle run` and `bundle compare` alike.
    _refused(capsys, ["bundle", "run", str(path), str(tmp_path / "o.safetensors"), "--backend", "flax", *LIMIT], message)
    out = tmp_path / "o2.safetensors"
    bd.write_outputs(out, {"CausalAttention": np.zeros((1, 6, 2), np.float32)}, {"backend": "flax"})
    _refused(capsys, ["bundle", "compare", str(path), str(out), *LIMIT], message)


def test_duplicate_cases_are_refused(tmp_path):
    import json

    from safetensors.numpy import save_file

    case = _case()
    tensors = {f"CausalAttention/weights/{k}": v for k, v in case.state_dict.items()}
    tensors["CausalAttention/inputs"] = case.inputs
    entry = {"variant": "CausalAttention", "config": case.config.to_dict()}
    header = {"format": bd.BUNDLE_FORMAT, "version": bd.FORMAT_VERSION, "cases": [entry, entry], "meta": {}}
    save_file(tensors, str(tmp_path / "dup.safetensors"), metadata={"crosscheck": json.dumps(header)})
    with pytest.raises(BadInputError, match="case 'CausalAttention' appears twice"):
        bd.read_bundle(tmp_path / "dup.safetensors")


def test_bundle_export_takes_max_memory(tmp_path, capsys):
    _refused(capsys, ["bundle", "export", str(tmp_path / "b.safetensors"), "--variant", "CausalAttention",
                      "--context-length", "40000", *LIMIT], "lower --context-length")
    assert not (tmp_path / "b.safetensors").exists()


def test_lying_npy_header_is_one_line(tmp_path, capsys):
    """A .npy whose header claims (60000, 60000) float32 over 24 bytes of data: refused, nothing allocated."""
    from numpy.lib import format as npy_format

    path = tmp_path / "x.npy"
    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (60000, 60000)})
        f.write(np.zeros(6, np.float32).tobytes())
    _refused(capsys, ["--input", str(path), *LIMIT], f"input file {path}")


def test_big_npy_header_is_checked_before_reading(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1, 4096, 4096)).flush()  # sparse on disk
    _refused(capsys, ["--input", str(path), "--max-memory", "100M"], "input file", "'array' of shape (1, 4096, 4096)")


def test_legacy_pt_files_still_read(tmp_path):
    torch = pytest.importorskip("torch")
    from crosscheck.porting import port

    torch.save({"W_query.weight": torch.arange(6.0).reshape(2, 3)}, tmp_path / "w.pt", _use_new_zipfile_serialization=False)
    sd = port.load_file(tmp_path / "w.pt")
    np.testing.assert_array_equal(sd["W_query.weight"], np.arange(6.0, dtype=np.float32).reshape(2, 3))
