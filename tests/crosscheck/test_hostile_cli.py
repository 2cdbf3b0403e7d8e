"""Hostile command lines: malformed ``--config`` values and flags, absurd ``--devices`` counts, Ctrl-C.

Every refusal is exit 2 with one stderr line naming the key or flag, its value and what is expected,
before any work; an interrupt is exit 130, one ``crosscheck: interrupted`` line and nothing written,
also when the ``KeyboardInterrupt`` is swallowed where it is raised (JAX's garbage-collection callback
swallows it: the run would go on and write its file).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.pipeline import devices, engine
from crosscheck.pipeline.inputs import RandomInputs
from crosscheck.porting import outputs
from crosscheck.references import hf
from crosscheck.variants import registry
from tests.host_cpu import as_a_cpu_machine

from .cli_in_process import main_in_process

REPO = Path(__file__).resolve().parents[2]


def run_cli(argv, capsys):
    """``(exit code, stderr)`` of ``cli.main(argv)``; argparse's SystemExit gives its code."""
    proc = main_in_process(argv)
    return proc.returncode, proc.stderr


def refused(argv, capsys) -> str:
    code, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("crosscheck: error:"), (code, err)
    assert "Traceback" not in err
    return lines[0]


# --- malformed --config values -------------------------------------------------------------------

LLAMA = {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "rope_theta": 1e4,
         "max_position_embeddings": 16, "model_type": "llama"}
GPT2 = {"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_positions": 16}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}

# (base, changes as JSON text, what the one line must say)
BAD_CONFIGS = {
    # the sweep's three
    "rope_scaling a string": (LLAMA, '{"rope_scaling": "linear"}', "rope_scaling must be an object", "'linear' (str)"),
    "rope_theta NaN": (LLAMA, '{"rope_theta": NaN}', "rope_theta must be a finite number > 0", "nan"),
    "heads a word": (LLAMA, '{"num_attention_heads": "four"}', "num_attention_heads must be an integer >= 1",
                     "'four' (str)"),
    # siblings: every key read
    "rope_theta 1e400": (LLAMA, '{"rope_theta": 1e400}', "rope_theta must be a finite number > 0", "inf"),
    "rope_parameters theta": (LLAMA, '{"rope_parameters": {"rope_type": "default", "rope_theta": -1}}',
                              "rope_parameters.rope_theta must be a finite number > 0", "-1"),
    "rope_parameters a list": (LLAMA, '{"rope_parameters": [1]}', "rope_parameters must be an object", "[1]"),
    "head_dim negative": (LLAMA, '{"head_dim": -1}', "head_dim must be an integer >= 1", "-1"),
    "head_dim odd": (LLAMA, '{"head_dim": 3}', "head_dim must be an even integer >= 2", "3"),
    "head_dim derived odd": (LLAMA, '{"head_dim": null, "hidden_size": 6}', "hidden_size // num_attention_heads",
                             "= 3"),
    "kv heads 0": (LLAMA, '{"num_key_value_heads": 0}', "num_key_value_heads must be an integer >= 1", "0"),
    "kv heads 3 of 2": (LLAMA, '{"num_key_value_heads": 3}', "num_key_value_heads must divide", "got 3"),
    "hidden_size true": (LLAMA, '{"hidden_size": true}', "hidden_size must be an integer >= 1", "true (bool)"),
    "hidden_size 2^64": (LLAMA, '{"hidden_size": 18446744073709551616}', "hidden_size must be at most 2^63 - 1",
                         "18446744073709551616"),
    "context 1.5": (LLAMA, '{"max_position_embeddings": 1.5}', "max_position_embeddings must be an integer", "1.5"),
    "rms_norm_eps text": (LLAMA, '{"rms_norm_eps": "x"}', "rms_norm_eps must be a finite number > 0", "'x'"),
    "bias a string": (LLAMA, '{"attention_bias": "false"}', "attention_bias must be true or false", "'false'"),
    "sliding a number": (LLAMA, '{"use_sliding_window": 0}', "use_sliding_window must be true or false", "0"),
    "dropout 1": (LLAMA, '{"attention_dropout": 1}', "attention_dropout must be a number in [0, 1)", "1"),
    "llama3 factor NaN": (LLAMA, json.dumps({"rope_scaling": {**LLAMA3, "factor": float("nan")}}),
                          "rope_scaling.factor must be a finite number > 0", "nan"),
    "llama3 high = low": (LLAMA, json.dumps({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}),
                          "rope_scaling.high_freq_factor must be a finite number > low_freq_factor=1.0", "1.0"),
    "llama3 low 0": (LLAMA, json.dumps({"rope_parameters": {**LLAMA3, "rope_theta": 1e4, "low_freq_factor": 0}}),
                     "rope_parameters.low_freq_factor must be a finite number > 0", "0"),
    "llama3 original 2.5": (LLAMA, json.dumps({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 2.5}}),
                            "rope_scaling.original_max_position_embeddings must be an integer", "2.5"),
    "rope_type a number": (LLAMA, '{"rope_scaling": {"type": 5}}', "rope_scaling.type must be a string", "5"),
    "gpt2 n_head a word": (GPT2, '{"n_head": "two"}', "n_head must be an integer >= 1", "'two'"),
    "gpt2 width split": (GPT2, '{"n_head": 3}', "n_embd=8 must be divisible by n_head=3", ""),
    "gpt2 attn_pdrop NaN": (GPT2, '{"attn_pdrop": NaN}', "attn_pdrop must be a number in [0, 1)", "nan"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_malformed_config_values_are_exit_2_naming_the_key(name, tmp_path, capsys):
    base, changes, expected, shown = BAD_CONFIGS[name]
    path = tmp_path / "config.json"
    text = json.dumps(base)
    path.write_text(text[:-1] + ", " + changes.strip()[1:])  # raw JSON text: NaN and 1e400 as a file has them
    variant = "GPT2Attention" if base is GPT2 else "LlamaAttention"
    line = refused(["--config", path, "--variant", variant, "--backends", "torch,flax", "--json", tmp_path / "r.json"],
                   capsys)
    assert f"{path}: " in line and expected in line and shown in line, line
    assert sorted(os.listdir(tmp_path)) == ["config.json"]  # nothing written


def test_well_formed_configs_still_read_exactly():
    """The control: integral floats are integers, null is absent, llama3 scaling is read as the book's keys."""
    found = hf.attn_fields({**LLAMA, "hidden_size": 8.0, "head_dim": None, "rope_scaling": LLAMA3}, "c.json")
    assert found == dict(
        d_in=8, num_heads=2, num_kv_groups=1, head_dim=4, d_out=8, qkv_bias=False, rope_theta=1e4,
        rope_scaling=AttnConfig.encode_freq_config(
            {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 8}),
        context_length=16,
    )
    assert hf.attn_fields(GPT2, "c.json", rope=False) == dict(d_in=8, num_heads=2, d_out=8, qkv_bias=True,
                                                              context_length=16)


@pytest.mark.parametrize("flags, message", [
    (["--rope-theta", "nan"], "argument --rope-theta: must be a finite number > 0, got nan"),
    (["--rope-theta", "inf"], "argument --rope-theta: must be a finite number > 0, got inf"),
    (["--rope-theta", "1e400"], "argument --rope-theta: must be a finite number > 0, got 1e400"),
    (["--num-kv-groups", "0"], "argument --num-kv-groups: must be >= 1, got 0"),
    (["--head-dim", "0"], "argument --head-dim: must be >= 1, got 0"),
    (["--d-in", str(10**30)], "argument --d-in: must be at most 2^63 - 1"),
    (["--seed", str(2**63)], "argument --seed: must be at most 2^63 - 1"),
])
def test_malformed_flags_are_exit_2_naming_the_flag(flags, message, capsys):
    assert message in refused(["--variant", "GroupedQueryAttention", "--backends", "torch,flax", *flags], capsys)


# --- --devices: a ceiling and the work each device needs ------------------------------------------


@pytest.fixture
def xla_flags(monkeypatch):
    """XLA_FLAGS as the test found it, restored after (the CLI sets the device count in it), with JAX
    started first on tests/conftest.py's 8 host devices: a count the CLI sets must not be the one
    JAX starts with, for the tests after this one."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    with as_a_cpu_machine(monkeypatch):
        yield os.environ["XLA_FLAGS"]


@pytest.mark.parametrize("argv", [
    ["--variant", "MultiHeadAttention", "--devices", "9999", "--shard", "batch", "--batch", "1"],
    ["--variant", "MultiHeadAttention", "--devices", "9999", "--shard", "sequence", "--tokens", "20000"],
    ["bench", "--devices", "9999", "--shard", "batch"],
    ["bench", "--devices", "2049", "--shard", "sequence", "--batch", "1", "--tokens", "4096"],
])
def test_too_many_devices_are_refused_before_jax_sees_them(argv, xla_flags, capsys):
    t0 = time.perf_counter()
    line = refused(argv, capsys)
    assert f"--devices {argv[argv.index('--devices') + 1]} is over the limit of {devices.MAX_DEVICES}" in line
    assert os.environ["XLA_FLAGS"] == xla_flags  # refused before the count was asked for
    assert time.perf_counter() - t0 < 30  # was: over 10 minutes at 1.5 GB for 9999


@pytest.mark.parametrize("argv, message", [
    (["--variant", "MultiHeadAttention", "--devices", "4", "--shard", "batch", "--batch", "3", "--tokens", "4"],
     "--devices 4 --shard batch: the batch has 3 row(s) to split, so at most 3 device(s)"),
    (["--variant", "CausalAttention", "--devices", "8", "--shard", "sequence", "--batch", "1", "--tokens", "5"],
     "--devices 8 --shard sequence: the input has 5 token(s) to split"),
    (["bench", "--devices", "4", "--shard", "batch", "--batch", "2", "--tokens", "8"],
     "--devices 4 --shard batch: the batch has 2 row(s) to split"),
    (["bench", "--devices", "8", "--shard", "sequence", "--batch", "1", "--tokens", "16,4"],
     "--devices 8 --shard sequence: the input has 4 token(s) to split"),
    (["--stages", "--variant", "MultiHeadAttention", "--devices", "2", "--shard", "batch", "--batch", "2"],
     "--stages compares each intermediate on one device; drop --devices/--shard"),
])
def test_more_devices_than_the_split_axis_has_are_refused(argv, message, xla_flags, capsys):
    assert message in refused([*argv, "--backends", "torch,flax"] if argv[0] != "bench" else argv, capsys)


def test_device_count_checks_in_order(xla_flags, capsys):
    """Enough rows for 9 devices: then the count of devices JAX has (8, tests/conftest.py) is what refuses."""
    line = refused(["--variant", "MultiHeadAttention", "--devices", "9", "--shard", "batch", "--batch", "9",
                    "--tokens", "2", "--d-in", "2", "--backends", "torch,flax"], capsys)
    assert "--devices 9: JAX sees 8 CPU device(s)" in line
    devices.check_split(3, "batch", batch=3, tokens=1)  # one row each: the boundary is allowed
    devices.check_split(devices.MAX_DEVICES, "sequence", batch=1, tokens=devices.MAX_DEVICES)
    with pytest.raises(BadInputError, match="--devices 2049 is over the limit of 2048"):
        engine.run(["MultiHeadAttention"], inputs=RandomInputs(batch=1, tokens=2, d_in=2), backends=("flax",),
                   devices=2049, shard="batch")


# --- Ctrl-C: exit 130, nothing written ------------------------------------------------------------


def swallowed_interrupt():
    """SIGINT delivered inside a finaliser, as JAX's gc callback gets it: the exception goes nowhere."""

    class Finaliser:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    Finaliser()  # collected at once: KeyboardInterrupt raised in __del__ becomes an "Exception ignored" report


def interrupt_swallowed_by_except():
    with contextlib.suppress(KeyboardInterrupt):  # a callback that catches everything
        signal.raise_signal(signal.SIGINT)


@pytest.fixture
def mha_file(tmp_path):
    variant = registry.get("MultiHeadAttention")
    torch.manual_seed(0)
    module = variant.torch_module(variant.resolve(AttnConfig(d_in=4, d_out=4, num_heads=2, context_length=6)))
    path = tmp_path / "mha.pt"
    torch.save(module.state_dict(), path)
    return path


def assert_interrupted(code, err, tmp_path, keep=("mha.pt",)):
    assert code == 130 and err.strip().splitlines() == ["crosscheck: interrupted"], (code, err)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)  # no output, no temporary file


@pytest.mark.parametrize("swallow", [swallowed_interrupt, interrupt_swallowed_by_except])
def test_a_swallowed_interrupt_during_convert_is_exit_130_and_writes_nothing(swallow, mha_file, monkeypatch, capsys):
    from crosscheck.porting import convert

    real = convert.flax_bytes

    def flax_bytes(*args, **kwargs):
        swallow()
        return real(*args, **kwargs)  # the run goes on, as it did, to its write

    monkeypatch.setattr(convert, "flax_bytes", flax_bytes)
    before = signal.getsignal(signal.SIGINT)
    code, err = run_cli(["convert", mha_file, mha_file.parent / "sig.msgpack", "--num-heads", "2", "--no-check"],
                        capsys)
    assert_interrupted(code, err, mha_file.parent)
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    assert not outputs.interrupted()  # and the record ends with the run


def test_a_swallowed_interrupt_stops_the_run_report_and_bundle_export(tmp_path, monkeypatch, capsys):
    from crosscheck.pipeline import backends

    real = backends.torch_outputs

    def torch_outputs(case):
        interrupt_swallowed_by_except()
        return real(case)

    monkeypatch.setattr(backends, "torch_outputs", torch_outputs)
    small = ["--variant", "CausalAttention", "--tokens", "3", "--d-in", "2", "--backends", "torch,flax"]
    code, err = run_cli([*small, "--json", tmp_path / "r.json"], capsys)
    assert_interrupted(code, err, tmp_path, keep=())

    real_build = engine.build_cases

    def build_cases(*args, **kwargs):
        swallowed_interrupt()
        return real_build(*args, **kwargs)

    monkeypatch.setattr(engine, "build_cases", build_cases)
    code, err = run_cli(["bundle", "export", tmp_path / "b.safetensors", "--variant", "CausalAttention"], capsys)
    assert_interrupted(code, err, tmp_path, keep=())


def test_files_written_before_the_interrupt_are_removed_and_replaced_ones_kept(tmp_path):
    old = tmp_path / "old.json"
    old.write_text("before")
    with pytest.raises(KeyboardInterrupt), outputs.sigint_guard() as guard:
        outputs.atomic_write_text(tmp_path / "a.png", "a")  # --plot's first picture
        outputs.atomic_write_text(old, "after")  # an earlier output, replaced
        interrupt_swallowed_by_except()
        assert guard.interrupted
        outputs.atomic_write_text(tmp_path / "b.png", "b")  # refused: raises KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["old.json"] and old.read_text() == "after"
    outputs.atomic_write_text(tmp_path / "c.json", "c")  # outside the guard: no record, writes as ever
    assert (tmp_path / "c.json").read_text() == "c"


def test_an_interrupt_during_an_import_waits_for_the_import(tmp_path, monkeypatch):
    """Raised into a native module's initialisation (jaxlib's) it aborts the process: it comes after the import."""
    (tmp_path / "interrupted_module.py").write_text(
        "import signal\nsignal.raise_signal(signal.SIGINT)\nFINISHED = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "interrupted_module", raising=False)
    with outputs.sigint_guard() as guard:
        try:
            import interrupted_module  # noqa: F401

            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the signal, sent again 50 ms later
                time.sleep(0.01)
            pytest.fail("the interrupt was not delivered again after the import")
        except KeyboardInterrupt:
            pass
    assert guard.interrupted
    assert sys.modules["interrupted_module"].FINISHED  # an interrupted import is not in sys.modules


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="waits for the process's libraries in /proc")
def test_sigint_to_a_real_convert_is_exit_130_with_nothing_written(mha_file):
    out = mha_file.parent / "sig.msgpack"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "NO_COLOR": "1"}
    argv = [sys.executable, "-m", "crosscheck", "convert", str(mha_file), str(out), "--num-heads", "2"]
    proc = subprocess.Popen(argv, cwd=mha_file.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # under way: torch loaded, the check to come
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            if "libtorch" in maps or "jaxlib" in maps:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and err.decode().strip().splitlines() == ["crosscheck: interrupted"], err
    assert sorted(os.listdir(mha_file.parent)) == ["mha.pt"]


def test_a_guard_entered_during_an_import_raises_at_once(tmp_path, monkeypatch):
    """Only imports begun inside the guard hold the interrupt back: main() run by an importing module still stops."""
    (tmp_path / "guarded_module.py").write_text(
        "import signal\nfrom crosscheck.porting import outputs\nRAISED = False\n"
        "with outputs.sigint_guard():\n"
        "    try:\n        signal.raise_signal(signal.SIGINT)\n    except KeyboardInterrupt:\n        RAISED = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "guarded_module", raising=False)
    import guarded_module

    assert guarded_module.RAISED
