"""The device route against the real ttnn package on a machine without a Tenstorrent device.

Each check runs in a fresh interpreter, as a user's run would: detection must answer
"no device" with a reason, ``open_runtime("device")`` must raise ``BadInputError``,
``open_runtime("auto")`` must fall back to the host model, and nothing may print a traceback
or kill the process (real ttnn raises, and sometimes crashes, on chip queries).
"""

import json

from crosscheck.porting import bundle as bd
from crosscheck.variants import registry
from tests.conformance.helpers import random_case, run_python, seed_config

PROBE = """
import json
from crosscheck.errors import BadInputError
from crosscheck.tt import runtime

ok, reason = runtime.detect_device()
result = {"ok": ok, "reason": reason, "versions": runtime.ttnn_versions()}
try:
    with runtime.open_runtime("device") as rt:
        result["device"] = rt.description
except BadInputError as err:
    result["device_error"] = str(err)
with runtime.open_runtime("auto") as rt:
    result["auto"] = [rt.name, rt.description, rt.ttnn.__name__]
print("ROUTE " + json.dumps(result))
"""


def _route(env_extra=None):
    proc = run_python(PROBE, env_extra=env_extra, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROUTE ")]
    return json.loads(line[len("ROUTE "):])


def test_no_device_is_reported_cleanly():
    result = _route({"TT_METAL_SIMULATOR": ""})
    assert result["ok"] is False
    assert "/dev/tenstorrent" in result["reason"]
    assert result["device_error"].startswith("ttnn runtime 'device' is not available: ")
    assert result["auto"][0] == "host" and result["auto"][2] == "crosscheck.tt.host_model"
    assert result["versions"]["ttnn"] == "0.81.1"


def test_real_ttnn_chip_query_failure_is_reported_cleanly(tmp_path):
    """A simulator path that is no simulator makes detection import real ttnn and ask it for chips."""
    fake = tmp_path / "libttsim_wh.so"
    fake.write_bytes(b"")
    result = _route({"TT_METAL_SIMULATOR": str(fake)})
    assert result["ok"] is False
    assert result["reason"].startswith("ttnn found no usable chip: ")
    assert "ttnn found no usable chip" in result["device_error"]
    assert result["auto"][0] == "host"


def test_worker_with_device_runtime_exits_2_with_one_line(tmp_path):
    variant = registry.get("CausalAttention")
    cfg = seed_config(variant)
    state_dict, x = random_case(variant, cfg)
    bundle = tmp_path / "b.safetensors"
    bd.write_bundle(bundle, [bd.BundleCase(variant.name, cfg, state_dict, x)])
    proc = run_python(
        ["-m", "crosscheck.tt.worker", bundle, tmp_path / "o.safetensors", "--ttnn-runtime", "device"],
        env_extra={"TT_METAL_SIMULATOR": ""},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error: ttnn runtime 'device' is not available: ")
    assert not (tmp_path / "o.safetensors").exists()
