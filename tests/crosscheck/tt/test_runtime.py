"""Runtime selection, device detection that never crashes, input checks, and the device route."""

import os
import subprocess
import sys

import numpy as np
import pytest

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.seed import INPUTS
from crosscheck.tt import host_model, runtime
from crosscheck.variants import registry

HAS_DEVICE, DEVICE_REASON = runtime.detect_device()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_detect_device_answers_without_crashing():
    ok, reason = runtime.detect_device()
    assert isinstance(ok, bool) and reason and "\n" not in reason


def test_host_runtime_is_described_honestly():
    with runtime.open_runtime("host") as rt:
        assert rt.name == "host" and rt.ttnn is host_model
        assert "not a Tenstorrent device" in rt.description
        device = rt.device
        assert device.is_open
    assert not device.is_open  # closed on exit


def test_host_runtime_closes_its_device_on_errors():
    with pytest.raises(ZeroDivisionError):
        with runtime.open_runtime("host") as rt:
            device = rt.device
            1 / 0  # noqa: B018
    assert not device.is_open


def test_auto_picks_device_only_when_one_is_detected():
    with runtime.open_runtime("auto") as rt:
        assert rt.name == ("device" if HAS_DEVICE else "host")


def test_unknown_kind_is_bad_input():
    with pytest.raises(BadInputError, match="auto, device, host; got 'gpu'"):
        with runtime.open_runtime("gpu"):
            pass


@pytest.mark.skipif(HAS_DEVICE, reason="a device is present")
def test_device_kind_without_device_is_one_clear_line():
    with pytest.raises(BadInputError) as err:
        with runtime.open_runtime("device"):
            pass
    assert "not available" in str(err.value) and "\n" not in str(err.value)


def test_versions_keys():
    v = runtime.ttnn_versions()
    assert set(v) == {"ttnn", "ttnn_reason"} and v["ttnn_reason"]


def test_bad_inputs_are_named():
    mha = registry.get("MultiHeadAttention")
    with runtime.open_runtime("host") as rt:
        with pytest.raises(BadInputError, match=r"\(batch, tokens, d_in\), got shape \(6, 3\)"):
            runtime.run_variant(rt, mha, AttnConfig(), {}, INPUTS)
        with pytest.raises(BadInputError, match="tokens=7 exceeds context_length=6"):
            runtime.run_variant(rt, mha, AttnConfig(), {}, np.zeros((1, 7, 3), np.float32))
        with pytest.raises(BadInputError, match="d_out=2 must be divisible by num_heads=3"):
            runtime.run_variant(rt, mha, AttnConfig(num_heads=3), {}, INPUTS[None])
        with pytest.raises(BadInputError, match="d_in=3"):
            runtime.run_variant(rt, mha, AttnConfig(), {}, np.zeros((1, 6, 4), np.float32))


def test_package_imports_without_torch_or_jax():
    """As the ttnn worker's interpreter does: no torch by design, so it sets CROSSCHECK_WORKER=1."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['jax'] = None; sys.modules['flax'] = None\n"
        "from crosscheck.tt import runtime, programs, port, host_model\n"
        "from crosscheck.variants import registry\n"
        "from crosscheck.config import AttnConfig\n"
        "from crosscheck.seed import INPUTS\n"
        "v = registry.get('SimplifiedSelfAttention')\n"
        "with runtime.open_runtime('host') as rt:\n"
        "    print(runtime.run_variant(rt, v, AttnConfig(), {}, INPUTS).shape)\n"
    )
    env = {**os.environ, "CROSSCHECK_WORKER": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(6, 3)"


@pytest.mark.ttnn_device
@pytest.mark.skipif(not HAS_DEVICE, reason=f"no ttnn device: {DEVICE_REASON}")
@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_device_runs_the_same_programs(variant):
    torch = pytest.importorskip("torch", reason="the torch reference needs torch")
    from tests.crosscheck.tt.test_programs import check

    cfg = AttnConfig().replace(**dict(variant.defaults))
    x = INPUTS if variant.unbatched else INPUTS[None]
    assert torch is not None
    with runtime.open_runtime("device") as rt:
        assert rt.name == "device"
        check(variant, cfg, x, rt)


@pytest.mark.ttnn_device
@pytest.mark.skipif(not HAS_DEVICE, reason=f"no ttnn device: {DEVICE_REASON}")
@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_device_agrees_with_the_host_model(variant):
    """Needs no torch: the ttnn interpreter can run it. Same program, device vs host model."""
    from crosscheck.variants.registry import TTNN_BF16_TOLERANCE

    cfg = variant.resolve(AttnConfig().replace(**dict(variant.defaults)))
    rng = np.random.default_rng(0)
    pmap = variant.portmap(cfg)
    state_dict = {e.torch_key: rng.uniform(-1, 1, e.torch_shape).astype(np.float32) for e in pmap.entries}
    x = INPUTS if variant.unbatched else INPUTS[None]
    with runtime.open_runtime("host") as rt:
        host = runtime.run_variant(rt, variant, cfg, state_dict, x)
    with runtime.open_runtime("device") as rt:
        device = runtime.run_variant(rt, variant, cfg, state_dict, x)
    budget, min_pcc = TTNN_BF16_TOLERANCE[variant.name]
    r = float(np.corrcoef(host.ravel(), device.ravel())[0, 1])
    assert r >= min_pcc, f"{variant.name}: device vs host model PCC {r:.6f}"
    assert np.max(np.abs(host - device)) <= budget
