"""Host float32 -> bfloat16 conversion: the host model is bit-equal to real ttnn 0.81.1.

Real side: ``ttnn.from_torch(np_array, dtype=ttnn.bfloat16)`` (a ROW_MAJOR host tensor; no
device needed). The real ``from_torch`` imports torch before handing the array to the nanobind
``ttnn.Tensor`` constructor, so it runs here with a numpy stand-in for those two steps
(:func:`helpers.numpy_as_torch`), and the constructor is also called directly. The raw words are
read back through ``ttnn.dump_tensor`` (``to_list`` loses NaN signs and payloads; ``to_numpy``
refuses bf16), cross-checked against ``to_list`` for every non-NaN value.
"""

import numpy as np
import pytest

from crosscheck.tt import host_model as hm
from tests.conformance.helpers import host_tensor_bits, numpy_as_torch

F32_MAX = np.finfo(np.float32).max


def _from_bits(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def special_values() -> np.ndarray:
    """Ties, subnormals, ±0, ±inf, NaNs with signs and payloads, and values past the bfloat16 range."""
    ties = [
        0x3F808000,  # 1 + 2^-8: tie, even below -> rounds down to 1.0
        0x3F818000,  # tie, odd below -> rounds up
        0xBF818000,  # negative tie -> away from zero to even
        0x3F80C000,  # above the tie -> up
        0x3F807FFF,  # just below the tie -> down
        0x7F7F8000,  # tie above the largest bfloat16 (0x7F7F) -> overflows to inf
        0x7F7F7FFF,  # just below it -> stays finite
        0xFF7F8000,
        0x00008000,  # subnormal tie, even below -> 0
        0x00018000,  # subnormal tie, odd below -> up
        0x007FFFFF,  # largest float32 subnormal -> rounds to the smallest normal bfloat16
        0x00000001,  # smallest float32 subnormal -> +0
        0x80000001,  # -> -0
        0x00010000,  # smallest bfloat16 subnormal, exact
    ]
    nans = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FC00001, 0xFFFFFFFF, 0x7FFF0000]
    named = np.array([0.0, -0.0, np.inf, -np.inf, F32_MAX, -F32_MAX, 3.4e38, 1e-40, -1e-45, -1e9, 1.00390625,
                      1.005859375], dtype=np.float32)
    return np.concatenate([_from_bits(ties), _from_bits(nans), named])


def random_values(seed: int, n: int = 40_000) -> np.ndarray:
    """Uniform float32 bit patterns (every exponent, NaN payloads, subnormals) plus normal data with exact ties."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    tie_bits = (rng.integers(0, 2**16, size=n // 4, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    normal = rng.standard_normal(n // 4).astype(np.float32)
    return np.concatenate([_from_bits(bits), _from_bits(tie_bits), normal, special_values()])


def real_bits(ttnn, values: np.ndarray, tmp_path, *, through_from_torch: bool) -> np.ndarray:
    if through_from_torch:
        with numpy_as_torch():
            tensor = ttnn.from_torch(values, dtype=ttnn.bfloat16)
    else:
        tensor = ttnn.Tensor(tensor=values, data_type=ttnn.bfloat16, layout=ttnn.ROW_MAJOR_LAYOUT)
    assert tensor.dtype == ttnn.bfloat16 and tensor.layout == ttnn.ROW_MAJOR_LAYOUT
    assert tensor.storage_type() == ttnn.StorageType.HOST
    assert tuple(tensor.shape) == values.shape
    bits = host_tensor_bits(ttnn, tensor, tmp_path)
    # the dump's raw words must be the values to_list reports (NaN only as "some NaN")
    listed = np.asarray(tensor.to_list(), dtype=np.float32)
    decoded = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(np.isnan(listed), np.isnan(decoded))
    finite = ~np.isnan(listed)
    np.testing.assert_array_equal(listed[finite].view(np.uint32), decoded[finite].view(np.uint32))
    return bits


def _mismatch_report(values, got, want) -> str:
    bad = np.flatnonzero(got != want)
    rows = [f"{values.view(np.uint32)[i]:#010x} ({values[i]!r}): host {got[i]:#06x}, real {want[i]:#06x}" for i in bad[:10]]
    return f"{bad.size} of {values.size} differ:\n  " + "\n  ".join(rows)


@pytest.mark.parametrize("seed", [0, 1])
def test_to_bfloat16_bit_equal_to_real_from_torch(real_ttnn, tmp_path, seed):
    values = random_values(seed)
    want = real_bits(real_ttnn, values, tmp_path, through_from_torch=True)
    got = hm.to_bfloat16(values).view(np.uint16)
    assert np.array_equal(got, want), _mismatch_report(values, got, want)


def test_host_from_torch_bit_equal_to_real(real_ttnn, tmp_path):
    values = random_values(2)
    values = values[: values.size // 6 * 6].reshape(-1, 6)  # rank 2
    want = real_bits(real_ttnn, values, tmp_path, through_from_torch=True)
    host = hm.from_torch(values, dtype=hm.bfloat16)
    assert host.dtype == hm.bfloat16 and host.layout == hm.ROW_MAJOR_LAYOUT
    got = np.asarray(hm.to_torch(host)).view(np.uint16)
    assert got.shape == want.shape
    assert np.array_equal(got, want), _mismatch_report(values.ravel(), got.ravel(), want.ravel())


def test_nanobind_constructor_agrees_with_from_torch(real_ttnn, tmp_path):
    """The stand-in for torch changes nothing: the constructor gives the same words."""
    values = special_values()
    direct = real_bits(real_ttnn, values, tmp_path, through_from_torch=False)
    via = real_bits(real_ttnn, values, tmp_path, through_from_torch=True)
    np.testing.assert_array_equal(direct, via)


def test_documented_cases_hold_in_real_ttnn(real_ttnn, tmp_path):
    """ttnn-notes §1, re-checked: nearest-even, inf passes, FLT_MAX overflows, -1e9 -> -998244352, NaN -> 0x7FC0."""
    values = np.array([1.00390625, 1.005859375, np.inf, F32_MAX, -1e9], dtype=np.float32)
    values = np.concatenate([values, _from_bits([0xFFC00001])])
    bits = real_bits(real_ttnn, values, tmp_path, through_from_torch=True)
    decoded = (bits.astype(np.uint32) << 16).view(np.float32)
    assert decoded[:5].tolist() == [1.0, 1.0078125, np.inf, np.inf, -998244352.0]
    assert bits[5] == 0x7FC0  # a negative NaN with a payload loses both
