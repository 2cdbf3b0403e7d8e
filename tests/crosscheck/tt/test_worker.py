"""The bundle worker: in-process, as a subprocess, and in the ttnn interpreter (.venv-ttnn) when present.

Outputs are checked against the torch reference (an independent implementation): the flax
backend at float32 precision, the ttnn host model at bfloat16 precision.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.porting import bundle as bd
from crosscheck.tt import worker
from crosscheck.variants import registry
from tests.bounds import case_layer, check_layer

torch = pytest.importorskip("torch", reason="the torch reference needs torch")

ROOT = Path(__file__).resolve().parents[3]
TTNN_PYTHON = ROOT / ".venv-ttnn" / "bin" / "python"
needs_ttnn_venv = pytest.mark.skipif(
    not TTNN_PYTHON.exists(), reason=f"{TTNN_PYTHON} does not exist (built by `make test`)"
)

#: Three variants that together use every kind of program step (no weights, causal + bias, fused heads).
NAMES = ("SimplifiedSelfAttention", "CausalAttention", "MultiHeadAttention")


def _case(name: str, seed: int) -> bd.BundleCase:
    variant = registry.get(name)
    cfg = AttnConfig(**dict(variant.defaults)).replace(qkv_bias=True, d_out=4)
    rng = np.random.default_rng(seed)
    portmap = variant.portmap(cfg)
    sd = {e.torch_key: rng.uniform(-1, 1, e.torch_shape).astype(np.float32) for e in portmap.entries}
    sd.update({b.torch_key: b.expected().astype(np.float32) for b in portmap.buffers})
    x = rng.standard_normal((2, 6, cfg.d_in)).astype(np.float32)
    return bd.BundleCase(name, cfg, sd, x)


def _torch_reference(case: bd.BundleCase) -> np.ndarray:
    variant = registry.get(case.variant)
    module = variant.torch_module(case.config).eval()
    if case.state_dict:
        module.load_state_dict({k: torch.from_numpy(v) for k, v in case.state_dict.items()})
    with torch.no_grad():
        return variant.torch_forward(module, torch.from_numpy(case.inputs), case.config).numpy()


@pytest.fixture(scope="module")
def cases():
    return [_case(name, seed) for seed, name in enumerate(NAMES)]


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory, cases):
    path = tmp_path_factory.mktemp("bundle") / "cases.safetensors"
    bd.write_bundle(path, cases, meta={"test": "worker"})
    return path


@pytest.fixture(scope="module")
def host_outputs(bundle_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "host.safetensors"
    meta = worker.run_bundle(bundle_path, out, backend="ttnn", runtime="host")
    outputs, read_meta = bd.read_outputs(out)
    assert read_meta == meta
    return outputs, meta


def test_ttnn_host_backend_matches_torch_at_bf16(cases, host_outputs):
    outputs, meta = host_outputs
    assert meta["backend"] == "ttnn" and meta["runtime"] == "host"
    assert "host model" in meta["runtime_description"]
    for case in cases:
        ref = _torch_reference(case)
        assert outputs[case.variant].shape == ref.shape
        err = float(np.max(np.abs(outputs[case.variant] - ref)))
        assert err < 0.05, f"{case.variant}: max |host ttnn - torch| = {err}"
        assert not np.array_equal(outputs[case.variant], ref)  # bf16 really rounded


def test_flax_backend_matches_torch(cases, bundle_path, tmp_path):
    meta = worker.run_bundle(bundle_path, tmp_path / "flax.safetensors", backend="flax")
    outputs, _ = bd.read_outputs(tmp_path / "flax.safetensors")
    assert meta["backend"] == "flax" and meta["versions"]["jax"]
    for case in cases:
        module, params = case_layer(case)
        check_layer(module, params, case.inputs, outputs[case.variant], _torch_reference(case), case.variant)


def test_worker_subprocess_equals_in_process(bundle_path, host_outputs, tmp_path):
    out = tmp_path / "o.safetensors"
    outputs, meta = worker.run_in_interpreter(sys.executable, bundle_path, out, backend="ttnn", runtime="host")
    assert meta["python"] == sys.executable
    for name, value in host_outputs[0].items():
        np.testing.assert_array_equal(outputs[name], value)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "crosscheck.tt.worker", *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_foreign_file_exits_2(tmp_path):
    bogus = tmp_path / "weights.safetensors"
    bogus.write_bytes(b"not safetensors")
    line = _one_error_line(_cli(bogus, tmp_path / "o.safetensors"))
    assert line.startswith("error: cannot read bundle") and "weights.safetensors" in line


def test_cli_unknown_variant_exits_2(tmp_path):
    path = tmp_path / "b.safetensors"
    bd.write_bundle(path, [bd.BundleCase("SelfAttentionV9", AttnConfig(), {}, np.zeros((6, 3), np.float32))])
    line = _one_error_line(_cli(path, tmp_path / "o.safetensors", "--ttnn-runtime", "host"))
    assert "unknown variant 'SelfAttentionV9'" in line


def test_cli_state_dict_problems_on_one_line(tmp_path, cases):
    broken = bd.BundleCase(cases[1].variant, cases[1].config, dict(cases[1].state_dict), cases[1].inputs)
    del broken.state_dict["W_key.weight"]
    broken.state_dict["W_key.weight_typo"] = np.zeros((4, 3), np.float32)
    path = tmp_path / "b.safetensors"
    bd.write_bundle(path, [broken])
    for backend in ("ttnn", "flax"):
        line = _one_error_line(_cli(path, tmp_path / "o.safetensors", "--backend", backend, "--ttnn-runtime", "host"))
        assert "missing key 'W_key.weight'" in line and "unexpected key 'W_key.weight_typo'" in line


def test_run_in_interpreter_errors(bundle_path, tmp_path):
    with pytest.raises(BadInputError, match="python interpreter not found or not executable: /no/such/python"):
        worker.run_in_interpreter("/no/such/python", bundle_path, tmp_path / "o.safetensors")
    with pytest.raises(BadInputError, match=r"failed with exit 2: error: bundle not found: .*missing\.safetensors"):
        worker.run_in_interpreter(sys.executable, tmp_path / "missing.safetensors", tmp_path / "o.safetensors")
    with pytest.raises(BadInputError, match="backend must be one of ttnn, flax; got 'tpu'"):
        worker.run_in_interpreter(sys.executable, bundle_path, tmp_path / "o.safetensors", backend="tpu")


@needs_ttnn_venv
def test_ttnn_interpreter_host_model_equals_this_one(bundle_path, host_outputs, tmp_path):
    """The same host model under Python 3.12 + numpy 1.x (next to the real ttnn) gives the same outputs."""
    outputs, meta = worker.run_in_interpreter(TTNN_PYTHON, bundle_path, tmp_path / "o.safetensors", runtime="auto")
    assert meta["runtime"] == "host"  # no device here: auto falls back
    assert meta["versions"]["ttnn"] == "0.81.1" and meta["versions"]["python"].startswith("3.12")
    for name, value in host_outputs[0].items():
        np.testing.assert_allclose(outputs[name], value, rtol=0, atol=0, err_msg=name)


@needs_ttnn_venv
def test_ttnn_interpreter_flax_backend_on_jax_070(cases, bundle_path, tmp_path):
    outputs, meta = worker.run_in_interpreter(TTNN_PYTHON, bundle_path, tmp_path / "o.safetensors", backend="flax")
    assert meta["versions"]["jax"] == "0.7.0"
    for case in cases:
        module, params = case_layer(case)
        check_layer(module, params, case.inputs, outputs[case.variant], _torch_reference(case), case.variant)
