"""The bundle worker in this interpreter (Python 3.12, real ttnn installed, JAX 0.7.0) against the main venv.

All eight variants go into one bundle. The ttnn backend (auto -> host model, no device here)
must give exactly what the main venv's interpreter (Python 3.11, numpy 2, torch) gives for the
same bundle; the flax backend on JAX 0.7.0 must agree with the main venv's newest JAX.
"""

import numpy as np
import pytest

from crosscheck.porting import bundle as bd
from crosscheck.tt import runtime, worker
from crosscheck.variants import registry
from tests.bounds import case_layer, check_layer
from tests.conformance.helpers import MAIN_PYTHON, random_case, seed_config

needs_main_venv = pytest.mark.skipif(not MAIN_PYTHON.exists(), reason=f"{MAIN_PYTHON} does not exist (make venv)")


def bundle_cases():
    cases = []
    for i, variant in enumerate(registry.VARIANTS):
        cfg = seed_config(variant)
        state_dict, x = random_case(variant, cfg, seed=10 + i, batch=0 if variant.unbatched else 2)
        cases.append(bd.BundleCase(variant.name, cfg, state_dict, x))
    return cases


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "all.safetensors"
    bd.write_bundle(path, bundle_cases())
    return path


@pytest.fixture(scope="module")
def here(bundle_path, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("here")
    results = {}
    for backend in ("ttnn", "flax"):
        meta = worker.run_bundle(bundle_path, out_dir / f"{backend}.safetensors", backend=backend, runtime="auto")
        results[backend] = bd.read_outputs(out_dir / f"{backend}.safetensors")
        assert results[backend][1] == meta
    return results


def test_ttnn_worker_runs_here_on_the_host_model(here):
    outputs, meta = here["ttnn"]
    assert meta["runtime"] == "host" and meta["versions"]["ttnn"] == "0.81.1"
    assert sorted(outputs) == sorted(v.name for v in registry.VARIANTS)
    assert all(np.all(np.isfinite(v)) for v in outputs.values())


@needs_main_venv
def test_ttnn_outputs_equal_the_main_venv_host_model(bundle_path, here, tmp_path):
    outputs, meta = worker.run_in_interpreter(MAIN_PYTHON, bundle_path, tmp_path / "main.safetensors", runtime="host")
    assert meta["versions"]["python"].startswith("3.11") and meta["versions"]["numpy"].startswith("2.")
    for name, value in here["ttnn"][0].items():
        np.testing.assert_array_equal(value, outputs[name], err_msg=name)


@needs_main_venv
@pytest.mark.slow  # starts the main venv's interpreter with JAX and torch (~5-10 s)
def test_flax_on_jax_070_equals_the_main_venv_flax(bundle_path, here, tmp_path):
    outputs, meta = worker.run_in_interpreter(MAIN_PYTHON, bundle_path, tmp_path / "main.safetensors", backend="flax")
    assert here["flax"][1]["versions"]["jax"] == "0.7.0" and meta["versions"]["jax"] != "0.7.0"
    cases = {case.variant: case for case in bundle_cases()}
    for name, value in here["flax"][0].items():  # two XLA versions: two summation orders, the derived bound
        module, params = case_layer(cases[name])
        check_layer(module, params, cases[name].inputs, value, outputs[name], f"{name}: JAX 0.7.0 vs the main venv")


def test_ttnn_and_flax_agree_at_bf16_precision(here):
    for name, value in here["flax"][0].items():
        err = float(np.max(np.abs(here["ttnn"][0][name] - value)))
        assert err < 0.05, f"{name}: max |ttnn host - flax| = {err}"


@needs_main_venv
def test_padded_decode_bundle_equals_the_main_venv_host_model(tmp_path):
    """Masks and decode_prompt_len through the worker: numpy<2 / 3.12 here, numpy 2 / 3.11 there, same bits."""
    cases = []
    for i, variant in enumerate(registry.VARIANTS):
        cfg = seed_config(variant)
        if not runtime.has_decode(variant, cfg):
            continue
        state_dict, x = random_case(variant, cfg, seed=30 + i, batch=2)
        real = np.ones(x.shape[:-1], np.int64)
        real[1, :2] = 0
        cases.append(bd.BundleCase(variant.name, cfg, state_dict, x, real))
    path = tmp_path / "decode.safetensors"
    bd.write_bundle(path, cases, decode_prompt_len=2)
    meta = worker.run_bundle(path, tmp_path / "here.safetensors", backend="ttnn", runtime="host")
    here, _ = bd.read_outputs(tmp_path / "here.safetensors")
    there, there_meta = worker.run_in_interpreter(MAIN_PYTHON, path, tmp_path / "main.safetensors", runtime="host")
    assert meta["decode_prompt_len"] == there_meta["decode_prompt_len"] == 2 and len(here) == len(cases) >= 5
    for name, value in here.items():
        assert np.isfinite(value).all(), name
        np.testing.assert_array_equal(value, there[name], err_msg=name)
