"""Run under ``TT_METAL_MOCK_CLUSTER_DESC_PATH``: real ttnn TILE host tensors, reported as JSON.

    python tests/conformance/mock_probe.py '[[5], [2, 5, 7]]'

For each shape: ``arange``-based float32 data (exact in bfloat16) converted by the real
``ttnn.from_torch(..., dtype=bfloat16, layout=TILE)`` (numpy stand-in for torch, as in
test_bfloat16) and read back: logical and padded shapes, the values ``to_list`` gives,
and the shapes after ``ttnn.to_layout(..., ROW_MAJOR)``. The mock must be configured before
``import ttnn`` creates the cluster, hence a separate process.
"""

import json
import sys

import numpy as np


def sample(shape) -> np.ndarray:
    """Distinct values exact in bfloat16 (integers below 256 and their negatives, scaled by powers of two)."""
    n = int(np.prod(shape)) if shape else 1
    k = np.arange(n, dtype=np.float32)
    return (((k % 255) - 127) * 2.0 ** ((k // 255) % 8 - 4)).astype(np.float32).reshape(shape)


def normal(shape) -> np.ndarray:
    """N(0, 1) float32 data, the same in the probe and in the test process."""
    return np.random.default_rng(len(shape) * 1000 + sum(shape)).standard_normal(shape).astype(np.float32)


def main() -> None:
    import ttnn

    from crosscheck.tt.runtime import NumpyTtnn
    from tests.conformance.helpers import numpy_as_torch

    numpy_ttnn = NumpyTtnn(ttnn)  # what a device runtime hands the programs when torch is absent

    report = []
    for shape in json.loads(sys.argv[1]):
        x = sample(tuple(shape))
        with numpy_as_torch():
            t = ttnn.from_torch(x, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT)
        rm = ttnn.to_layout(t, ttnn.ROW_MAJOR_LAYOUT)
        report.append(
            {
                "shape": list(shape),
                "layout": str(t.layout),
                "logical": list(t.shape),
                "padded": list(t.padded_shape),
                "volume": int(t.volume()),
                "logical_volume": int(t.logical_volume()),
                "values": np.asarray(t.to_list(), dtype=np.float32).ravel().tolist(),
                "row_major_logical": list(rm.shape),
                "row_major_padded": list(rm.padded_shape),
                "row_major_values": np.asarray(rm.to_list(), dtype=np.float32).ravel().tolist(),
                "numpy_ttnn_round_trip": numpy_ttnn.to_torch(
                    numpy_ttnn.from_torch(normal(tuple(shape)), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT)
                ).ravel().tolist(),
            }
        )
    print("MOCK-PROBE " + json.dumps(report))


if __name__ == "__main__":
    main()
