"""TILE padding and logical shapes: the host model against real ttnn on a mock Wormhole n150.

``TT_METAL_MOCK_CLUSTER_DESC_PATH`` (the UMD descriptor in this folder) makes real ttnn
believe one chip exists, which host TILE conversion needs; no kernel runs. It must be set
before ``import ttnn``, so the real side runs in a subprocess (:mod:`mock_probe`).
"""

import json

import numpy as np
import pytest

from crosscheck.tt import host_model as hm
from tests.conformance import mock_probe
from tests.conformance.helpers import MOCK_CLUSTER, ROOT, run_python

#: Ranks 0-4, none of the last two dims a multiple of 32 unless on purpose.
SHAPES = [(), (5,), (1,), (33,), (6, 3), (32, 33), (2, 5, 7), (1, 6, 2), (1, 1, 6, 3), (2, 3, 31, 64), (2, 2, 6, 1)]


@pytest.fixture(scope="module")
def real_report():
    proc = run_python(
        [ROOT / "tests" / "conformance" / "mock_probe.py", json.dumps([list(s) for s in SHAPES])],
        env_extra={"TT_METAL_MOCK_CLUSTER_DESC_PATH": str(MOCK_CLUSTER)},
        timeout=120,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MOCK-PROBE ")]
    assert proc.returncode == 0 and lines, f"mock probe failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return {tuple(r["shape"]): r for r in json.loads(lines[0][len("MOCK-PROBE "):])}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_tile_shapes_equal_real(real_report, shape):
    real = real_report[shape]
    x = mock_probe.sample(shape)
    t = hm.from_torch(x, dtype=hm.bfloat16, layout=hm.TILE_LAYOUT)
    assert real["layout"] == "Layout.TILE" and t.layout == hm.TILE_LAYOUT
    assert list(t.shape) == real["logical"] == list(shape)
    assert list(t.padded_shape) == real["padded"], f"{shape}: host padded {list(t.padded_shape)}, real {real['padded']}"
    assert t.volume() == real["volume"] and t.logical_volume() == real["logical_volume"]
    back = np.asarray(hm.to_torch(t), dtype=np.float32)
    assert list(back.shape) == list(shape)
    np.testing.assert_array_equal(back.ravel(), np.asarray(real["values"], dtype=np.float32))
    np.testing.assert_array_equal(back, x)  # the sample is exact in bfloat16


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_to_layout_row_major_drops_padding_like_real(real_report, shape):
    real = real_report[shape]
    t = hm.to_layout(hm.from_torch(mock_probe.sample(shape), dtype=hm.bfloat16, layout=hm.TILE_LAYOUT), hm.ROW_MAJOR_LAYOUT)
    assert list(t.shape) == real["row_major_logical"]
    assert list(t.padded_shape) == real["row_major_padded"]
    np.testing.assert_array_equal(
        np.asarray(hm.to_torch(t), dtype=np.float32).ravel(), np.asarray(real["row_major_values"], dtype=np.float32)
    )


def test_padding_is_what_the_notes_say(real_report):
    """Independent of the host model: ttnn-notes §1 figures, re-read from the real package."""
    assert real_report[(2, 5, 7)]["padded"] == [2, 32, 32]
    assert real_report[(5,)]["padded"] == [32, 32]
    assert real_report[(2, 3, 31, 64)]["padded"] == [2, 3, 32, 64]
    assert real_report[(2, 5, 7)]["volume"] == 2048 and real_report[(2, 5, 7)]["logical_volume"] == 70


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_row_major_host_tensor_shapes_equal_real(real_ttnn, shape):
    """ROW_MAJOR host tensors need no cluster: checked in this process."""
    x = mock_probe.sample(shape)
    real = real_ttnn.Tensor(tensor=x, data_type=real_ttnn.bfloat16, layout=real_ttnn.ROW_MAJOR_LAYOUT)
    host = hm.from_torch(x, dtype=hm.bfloat16)
    assert list(host.shape) == list(real.shape) == list(shape)
    assert list(host.padded_shape) == list(real.padded_shape), (
        f"{shape}: host padded {list(host.padded_shape)}, real {list(real.padded_shape)}"
    )


@pytest.mark.parametrize("shape", [s for s in SHAPES if s], ids=lambda s: "x".join(map(str, s)))
def test_runtime_numpy_bridge_round_trips_like_host_model(real_report, shape):
    """runtime.NumpyTtnn (real ttnn without torch) from_torch(TILE) -> to_torch gives the host model's bf16 values."""
    x = mock_probe.normal(shape)
    want = np.asarray(hm.to_torch(hm.from_torch(x, dtype=hm.bfloat16, layout=hm.TILE_LAYOUT)), dtype=np.float32)
    got = np.asarray(real_report[shape]["numpy_ttnn_round_trip"], dtype=np.float32)
    np.testing.assert_array_equal(got, want.ravel())
    assert not np.array_equal(want, x)  # bf16 rounding happened: the comparison is not vacuous
