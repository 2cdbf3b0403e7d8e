"""The host model of ttnn numerics: bf16 rounding, shapes, op numerics, and ttnn's rules and messages."""

import inspect

import ml_dtypes
import numpy as np
import pytest

from crosscheck.tt import host_model as ttnn


@pytest.fixture
def device():
    dev = ttnn.open_device(device_id=0)
    yield dev
    ttnn.close_device(dev)


def bf16(a):
    """Independent reference: ml_dtypes' RNE cast, as float32."""
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def tile(array, device, dtype=ttnn.bfloat16):
    return ttnn.from_torch(np.asarray(array, dtype=np.float32), dtype=dtype, layout=ttnn.TILE_LAYOUT, device=device)


# --- bfloat16 conversion ---------------------------------------------------------------------------


def test_bf16_round_to_nearest_even_on_ties():
    # 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: even mantissa (1.0) wins; 1 + 3*2^-8 rounds up to 1 + 2^-6.
    out = ttnn.to_bfloat16(np.array([1.00390625, 1.005859375], np.float32)).astype(np.float32)
    np.testing.assert_array_equal(out, [1.0, 1.0078125])


def test_bf16_specials_bits_match_real_ttnn():
    # Bit patterns observed from ttnn 0.81.1's host conversion (from_torch(dtype=bfloat16), read back).
    x = np.array([3.4e38, -3.4e38, np.inf, -np.inf, -1e9, 1e-40, 1e-45, -0.0, 3.3895314e38], np.float32)
    bits = ttnn.to_bfloat16(x).view(np.uint16)
    np.testing.assert_array_equal(bits, [0x7F80, 0xFF80, 0x7F80, 0xFF80, 0xCE6E, 0x0001, 0x0000, 0x8000, 0x7F7F])
    assert float(ttnn.to_bfloat16(np.float32(-1e9)).astype(np.float32)) == -998244352.0


def test_bf16_every_nan_becomes_the_canonical_quiet_nan():
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FC12345], np.uint32).view(np.float32)
    assert set(ttnn.to_bfloat16(nans).view(np.uint16).tolist()) == {0x7FC0}


def test_bf16_equals_rne_on_random_bit_patterns():
    bits = np.random.default_rng(0).integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    # explicit RNE on the bit pattern, an independent derivation of the same rounding
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(ttnn.to_bfloat16(x).view(np.uint16), rounded)


def test_from_torch_keeps_float32_unless_asked(device):
    x = np.array([[1.00390625]], np.float32)
    assert ttnn.from_torch(x).dtype == ttnn.float32
    assert ttnn.to_torch(ttnn.from_torch(x))[0, 0] == np.float32(1.00390625)
    t = ttnn.from_torch(x, dtype=ttnn.bfloat16)
    assert t.dtype == ttnn.bfloat16 and float(ttnn.to_torch(t)[0, 0]) == 1.0


# --- shapes --------------------------------------------------------------------------------------


def test_tile_tensors_carry_logical_and_padded_shapes(device):
    t = tile(np.ones((2, 5, 7)), device)
    assert t.shape == [2, 5, 7] and t.padded_shape == [2, 32, 32]
    assert t.volume() == 2048 and t.logical_volume() == 70
    assert tile(np.ones(5), device).padded_shape == [32, 32]
    assert tile(np.ones(33), device).padded_shape == [32, 64]  # a [1, 33] row, as real ttnn pads it
    rm = ttnn.from_torch(np.ones((2, 5, 7), np.float32))
    assert rm.layout == ttnn.ROW_MAJOR_LAYOUT and rm.padded_shape == rm.shape == (2, 5, 7)
    assert tile(np.ones((33, 64)), device).padded_shape == [64, 64]


def test_to_torch_returns_logical_values(device):
    x = np.random.default_rng(1).normal(size=(2, 5, 7)).astype(np.float32)
    out = ttnn.to_torch(tile(x, device))
    assert out.shape == (2, 5, 7) and out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.astype(np.float32), bf16(x))
    assert ttnn.to_torch(tile(np.ones((1, 1, 3)), device), torch_rank=1).shape == (3,)


# --- op numerics ---------------------------------------------------------------------------------


def test_matmul_is_float32_matmul_of_rounded_inputs_then_rounded(device):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 6, 40)).astype(np.float32), rng.normal(size=(40, 9)).astype(np.float32)
    out = ttnn.matmul(tile(a, device), tile(b, device))
    expected = bf16(np.matmul(bf16(a), bf16(b)))
    np.testing.assert_array_equal(ttnn.to_torch(out).astype(np.float32), expected)
    assert out.layout == ttnn.TILE_LAYOUT and out.dtype == ttnn.bfloat16 and out.shape == [3, 6, 9]
    # rounding is real: not the float32 product
    assert not np.array_equal(ttnn.to_torch(out).astype(np.float32), np.matmul(a, b))


def test_matmul_output_dtype_follows_input_a(device):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 4)).astype(np.float32), rng.normal(size=(4, 4)).astype(np.float32)
    out = ttnn.matmul(tile(a, device, ttnn.float32), tile(b, device))
    assert out.dtype == ttnn.float32
    np.testing.assert_array_equal(ttnn.to_torch(out), np.matmul(a, bf16(b)))


def test_linear_adds_bias_before_the_single_rounding(device):
    rng = np.random.default_rng(4)
    x, w, bias = (rng.normal(size=s).astype(np.float32) for s in ((5, 3), (3, 2), (1, 2)))
    out = ttnn.linear(tile(x, device), tile(w, device), bias=tile(bias, device))
    np.testing.assert_array_equal(ttnn.to_torch(out).astype(np.float32), bf16(bf16(x) @ bf16(w) + bf16(bias)))
    wt = ttnn.linear(tile(x, device), tile(w.T, device), transpose_b=True)
    np.testing.assert_array_equal(ttnn.to_torch(wt).astype(np.float32), bf16(bf16(x) @ bf16(w)))


def test_softmax_rounds_a_float32_softmax(device):
    s = np.random.default_rng(5).normal(size=(2, 6, 6)).astype(np.float32)
    e = np.exp(bf16(s) - bf16(s).max(-1, keepdims=True))
    out = ttnn.to_torch(ttnn.softmax(tile(s, device), dim=-1)).astype(np.float32)
    np.testing.assert_array_equal(out, bf16(e / e.sum(-1, keepdims=True)))


def test_multiply_rounds_the_scalar_to_bf16_first(device):
    x = tile([[3.0]], device)
    out = ttnn.to_torch(ttnn.multiply(x, 1 / np.sqrt(2)))
    assert float(out[0, 0]) == float(bf16(3.0 * bf16(1 / np.sqrt(2))))


def test_sdpa_matches_masked_softmax_attention(device):
    rng = np.random.default_rng(6)
    q, k, v = (rng.normal(size=(1, 2, 7, 32)).astype(np.float32) for _ in range(3))
    out = ttnn.transformer.scaled_dot_product_attention(tile(q, device), tile(k, device), tile(v, device))
    qb, kb, vb = bf16(q), bf16(k), bf16(v)
    s = qb @ kb.swapaxes(-1, -2) / np.sqrt(32) + np.triu(np.full((7, 7), -np.inf, np.float32), 1)
    w = np.exp(s - s.max(-1, keepdims=True))
    expected = (w / w.sum(-1, keepdims=True)) @ vb
    np.testing.assert_allclose(ttnn.to_torch(out).astype(np.float32), expected, atol=2 ** -7, rtol=2 ** -7)


# --- the rules a device enforces -------------------------------------------------------------------


def test_ops_need_device_tensors_with_ttnn_messages(device):
    host = ttnn.from_torch(np.ones((4, 4), np.float32), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT)
    on = tile(np.ones((4, 4)), device)
    cases = [
        (lambda: ttnn.matmul(host, on), "Operand to matmul must be on device"),
        (lambda: ttnn.linear(on, host), "Operand to matmul must be on device"),
        (lambda: ttnn.softmax(host), "No device found, move input_tensor to device"),
        (lambda: ttnn.add(host, on), "Input tensor A must be on device, got storage type: StorageType::HOST"),
        (lambda: ttnn.multiply(host, 2.0), "Input tensor A must be on device"),
        (lambda: ttnn.permute(host, (1, 0)), "Tensor must already be on device"),
        (lambda: ttnn.transpose(host, 0, 1), "Device Operations expect device tensors as inputs"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    assert ttnn.reshape(host, (2, 8)).shape == [2, 8]  # reshape works on host, as in ttnn


def test_matmul_refuses_row_major(device):
    rm = ttnn.from_torch(np.ones((4, 4), np.float32), dtype=ttnn.bfloat16, device=device)
    with pytest.raises(RuntimeError, match="Inputs to matmul must be tilized"):
        ttnn.matmul(rm, tile(np.ones((4, 4)), device))


def test_sdpa_refuses_unaligned_head_dim_and_float32(device):
    q = tile(np.ones((1, 1, 6, 2)), device)
    with pytest.raises(RuntimeError, match="Padding is not supported on the head_dim dimension"):
        ttnn.transformer.scaled_dot_product_attention(q, q, q)
    f = tile(np.ones((1, 1, 6, 32)), device, ttnn.float32)
    with pytest.raises(RuntimeError, match="BFLOAT16"):
        ttnn.transformer.scaled_dot_product_attention(f, f, f)


def test_width_mismatch_message(device):
    with pytest.raises(RuntimeError, match="width=3 height=4"):
        ttnn.matmul(tile(np.ones((2, 3)), device), tile(np.ones((4, 2)), device))


def test_keyword_rules_raise_ttnns_type_error(device):
    t = tile(np.ones((4, 4)), device)
    with pytest.raises(TypeError, match=r"ttnn.matmul\(\): incompatible function arguments"):
        ttnn.matmul(t, t, foo=1)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ttnn.matmul(t, t, True)  # transpose_a is keyword-only
    with pytest.raises(TypeError, match=r"softmax\(ttnn.Tensor, axis=-1\)"):
        ttnn.softmax(t, axis=-1)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ttnn.matmul(np.ones((4, 4), np.float32), t)  # numpy is not a ttnn.Tensor
    with pytest.raises(TypeError, match=r"(?s)open_device\(\): incompatible function arguments.*Invoked with types: int"):
        ttnn.open_device(0)


def test_signatures_are_ttnns():
    # Names, kinds and defaults printed from ttnn 0.81.1's nanobind signatures (ttnn-notes §2).
    def described(fn):
        return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]

    kw = "KEYWORD_ONLY"
    pk = "POSITIONAL_OR_KEYWORD"
    assert described(ttnn.softmax) == [
        ("input_tensor", pk, inspect.Parameter.empty), ("dim", pk, -1),
        ("memory_config", kw, None), ("compute_kernel_config", kw, None), ("numeric_stable", kw, True),
    ]
    assert described(ttnn.transpose)[:3] == [
        ("input_tensor", pk, inspect.Parameter.empty), ("dim1", pk, inspect.Parameter.empty),
        ("dim2", pk, inspect.Parameter.empty),
    ]
    mm = described(ttnn.matmul)
    assert [n for n, _, _ in mm][:6] == [
        "input_tensor_a", "input_tensor_b", "transpose_a", "transpose_b", "memory_config", "dtype"
    ]
    assert all(k == kw for _, k, _ in mm[2:]) and mm[-1] == ("prefetcher_pipes", kw, [])
    lin = described(ttnn.linear)
    assert lin[2] == ("bias", kw, None) and lin[-1] == ("in0_column_offset", kw, None)
    assert described(ttnn.add)[2] == ("fast_and_approximate_mode", kw, True)
    assert described(ttnn.multiply)[2] == ("fast_and_approximate_mode", kw, False)
    sdpa = described(ttnn.transformer.scaled_dot_product_attention)
    assert sdpa[3] == ("attn_mask", kw, None) and sdpa[4] == ("is_causal", kw, True) and sdpa[5] == ("scale", kw, None)
    assert described(ttnn.open_device)[0] == ("device_id", kw, inspect.Parameter.empty)
    fields = described(ttnn.WormholeComputeKernelConfig)
    assert fields[0] == ("math_fidelity", kw, ttnn.MathFidelity.Invalid) and fields[1] == ("math_approx_mode", kw, True)


def test_implemented_names_resolve():
    assert "linear" in ttnn.IMPLEMENTED and "transformer.scaled_dot_product_attention" in ttnn.IMPLEMENTED
    for name in ttnn.IMPLEMENTED:
        obj = ttnn
        for part in name.split("."):
            obj = getattr(obj, part)
        assert callable(obj), name


def test_closed_device_refuses_ops():
    dev = ttnn.open_device(device_id=3)
    t = tile(np.ones((2, 2)), dev)
    ttnn.close_device(dev)
    with pytest.raises(RuntimeError, match="closed"):
        ttnn.matmul(t, t)


def test_python_layer_functions_raise_pythons_type_error():
    # from_torch/to_torch are Python functions in ttnn: an unknown keyword is Python's own TypeError.
    with pytest.raises(TypeError, match="from_torch\\(\\) got an unexpected keyword argument 'foo'"):
        ttnn.from_torch(np.ones(2, np.float32), foo=1)


def test_from_torch_refuses_float64_instead_of_aborting():
    with pytest.raises(RuntimeError, match="float64"):
        ttnn.from_torch(np.ones(2))
