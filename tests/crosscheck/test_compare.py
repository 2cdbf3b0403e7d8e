"""The compare engine against hand-computed values: metrics, edge cases, the tolerance table."""

import ml_dtypes
import numpy as np
import pytest

from crosscheck.pipeline import compare as cmp

X = np.array([0.1, -2.0, 3.5, 0.25, 7.0], dtype=np.float32)


# --- PCC -------------------------------------------------------------------------------------


def test_pcc_of_affine_images():
    assert cmp.pcc(X, 2 * X + 1) == pytest.approx(1.0, abs=1e-12)
    assert cmp.pcc(X, -X) == pytest.approx(-1.0, abs=1e-12)


def test_pcc_hand_computed():
    # g = (1, 2, 3), c = (1, 3, 2): centred (-1, 0, 1) and (-1, 1, 0) -> r = 1 / (sqrt2 * sqrt2) = 0.5
    assert cmp.pcc(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5, abs=1e-15)


def test_pcc_edge_cases_follow_comp_pcc():
    nan = np.full(4, np.nan, dtype=np.float32)
    assert cmp.pcc(nan, nan) == 1.0  # both all-NaN
    assert cmp.pcc(nan, X[:4]) == 0.0  # exactly one all-NaN
    assert cmp.pcc(np.zeros(4), np.ones(4)) == 0.0  # one all-zero, not allclose
    assert cmp.pcc(np.zeros(4), np.full(4, 1e-6)) == 1.0  # one all-zero, allclose (atol 1e-4)
    assert cmp.pcc(np.full(5, 2.0), np.full(5, 2.1)) == 0.0  # constant, not close
    assert cmp.pcc(np.full(5, 2.0), np.full(5, 2.0)) == 1.0  # identical
    # Constant bf16 tensors: rtol widens to 4 * 2^-7 = 0.03125, so 2.0 vs 2.0625 counts as equal.
    a = np.full(5, 2.0, dtype=ml_dtypes.bfloat16)
    assert cmp.pcc(a, np.full(5, 2.0625, dtype=ml_dtypes.bfloat16)) == 1.0
    assert cmp.pcc(np.full(5, 2.0), np.full(5, 2.0625)) == 0.0  # float64: no widening
    # A non-finite entry is zeroed in both: the rest still correlates perfectly.
    g, c = X.copy(), 3 * X
    c[1] = np.inf
    g[1] = 0.0
    assert cmp.pcc(g, c) == pytest.approx(1.0, abs=1e-12)


# --- ULP -------------------------------------------------------------------------------------


def test_ulp_of_neighbours_and_signed_zero():
    one = np.float32(1.0)
    up = np.nextafter(one, np.float32(2.0))
    assert cmp.ulp_distance(np.array([up]), np.array([one])) == 1
    three = np.nextafter(np.nextafter(up, np.float32(2.0)), np.float32(2.0))
    assert cmp.ulp_distance(np.array([three]), np.array([one])) == 3
    assert cmp.ulp_distance(np.array([-0.0], np.float32), np.array([0.0], np.float32)) == 0
    tiny = np.nextafter(np.float32(0), np.float32(1))  # smallest subnormal
    assert cmp.ulp_distance(np.array([tiny]), np.array([-tiny])) == 2  # across zero
    neg = np.float32(-1.0)
    assert cmp.ulp_distance(np.array([np.nextafter(neg, np.float32(-2))]), np.array([neg])) == 1


def test_ulp_only_for_float32_and_infinite_for_one_sided_nan():
    assert cmp.ulp_distance(X.astype(ml_dtypes.bfloat16), X) is None
    assert cmp.ulp_distance(X.astype(np.float16), X) is None
    assert cmp.metrics(X, X, computed_in="bfloat16").ulp is None  # bf16 math read back as float32
    a = X.copy()
    a[0] = np.nan
    assert cmp.ulp_distance(a, X) == np.iinfo(np.int64).max
    both = X.copy()
    both[0] = np.nan
    assert cmp.ulp_distance(both, both) == 0  # NaN at the same place counts as equal


def test_ulp_reference_is_rounded_to_float32():
    ref64 = np.array([1.0 + 2.0**-30])  # rounds to 1.0 in float32
    assert cmp.ulp_distance(np.array([1.0], np.float32), ref64) == 0


# --- abs / rel -------------------------------------------------------------------------------


def test_max_abs_err():
    assert cmp.max_abs_err(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.0, 2.0])) == 1.0


def test_max_rel_err_definition():
    # ref scale 100: the floor is 1e-2 * 100 = 1, so |r| = 0.5 counts as 1 and |r| = 50 as itself.
    r = np.array([100.0, 50.0, 0.5, 0.0])
    assert cmp.max_rel_err(np.array([101.0, 50.0, 0.5, 0.0]), r) == pytest.approx(0.01)
    assert cmp.max_rel_err(np.array([100.0, 51.0, 0.5, 0.0]), r) == pytest.approx(0.02)
    assert cmp.max_rel_err(np.array([100.0, 50.0, 0.7, 0.0]), r) == pytest.approx(0.2)  # 0.2 / max(0.5, 1)
    assert cmp.max_rel_err(np.array([100.0, 50.0, 0.5, 0.3]), r) == pytest.approx(0.3)  # exact zero: / 1
    # An all-zero reference: only the tiny guard remains, so any error is enormous, not a division by zero.
    assert cmp.max_rel_err(np.array([1e-30]), np.array([0.0])) > 1e7
    assert cmp.max_rel_err(np.zeros(3), np.zeros(3)) == 0.0


def test_non_finite_elements():
    r = np.array([1.0, np.inf, np.nan])
    assert cmp.max_abs_err(np.array([1.0, np.inf, np.nan]), r) == 0.0  # same non-finite values: equal
    assert cmp.max_abs_err(np.array([1.0, 5.0, np.nan]), r) == np.inf
    assert cmp.max_abs_err(np.array([1.0, np.inf, 0.0]), r) == np.inf


# --- verdicts --------------------------------------------------------------------------------


F32 = cmp.POLICY[("flax", "float32")]


def test_float32_verdict_passes_rounding_and_fails_beyond():
    ref = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    ok = cmp.compare(ref + np.float32(3e-7), ref, F32)
    assert ok.passed and ok.failures == []
    bad = ref.copy()
    bad[1, 2] += 2e-5
    c = cmp.compare(bad, ref, F32)
    assert not c.passed
    msg = c.failures[0]
    assert "max abs err 2e-05 > 1e-05" in msg and "(2, 6)" in msg


def test_abs_bound_scales_with_large_outputs_only():
    ref = np.array([200.0, -150.0, 3.0], dtype=np.float32)
    # 1e-4 absolute on values of 200 is 5e-7 relative: float32 rounding, allowed (1e-5 x 200 = 2e-3).
    assert cmp.compare(ref + np.float32(1e-4), ref, F32).passed
    c = cmp.compare(ref + np.float32(4e-3), ref, F32)
    assert not c.passed and "(= 1e-05 x max|ref| 200)" in c.failures[0]


def test_shape_mismatch_is_a_failure_naming_both_shapes():
    c = cmp.compare(np.zeros((1, 6, 4)), np.zeros((1, 6, 2)), F32)
    assert not c.passed and c.metrics is None
    assert c.failures == ["shape mismatch: output (1, 6, 4) vs reference (1, 6, 2)"]


def test_bfloat16_result_passes_bf16_policy_but_not_float32():
    rng = np.random.default_rng(0)
    ref = rng.random((4, 6, 8)).astype(np.float32)
    out = ref.astype(ml_dtypes.bfloat16)  # one bf16 rounding: up to 2^-8 relative
    assert cmp.compare(out, ref, cmp.POLICY[("flax", "bfloat16")]).passed
    assert not cmp.compare(out.astype(np.float32), ref, F32).passed


def test_pcc_failure_is_reported():
    ref = np.linspace(0, 1, 50)
    out = ref[::-1].copy()  # same values, wrong order: PCC -1
    c = cmp.compare(out, ref, cmp.POLICY[("flax", "bfloat16")])
    assert not c.passed
    assert any(f.startswith("PCC -1.000000 < 0.999") for f in c.failures)


def test_policy_table_orders_by_precision():
    f32, f16, bf16 = (cmp.POLICY[("flax", d)] for d in ("float32", "float16", "bfloat16"))
    assert f32.max_abs < f16.max_abs < bf16.max_abs
    assert f32.min_pcc >= f16.min_pcc >= bf16.min_pcc
    assert all(t.why for t in cmp.POLICY.values())
    with pytest.raises(KeyError, match="no tolerance for backend 'flax' in int8"):
        cmp.policy_for("flax", "int8")


def test_ttnn_policy_comes_from_the_ttnn_path():
    from crosscheck.variants.registry import TTNN_BF16_TOLERANCE

    budget, min_pcc = TTNN_BF16_TOLERANCE["MultiHeadAttention"]
    tol = cmp.policy_for("ttnn", "bfloat16", "MultiHeadAttention")
    assert (tol.max_abs, tol.min_pcc) == (budget, min_pcc)
    assert tol.max_abs <= 0.04 and tol.min_pcc >= 0.999  # never looser than the documented bf16 budget


def test_help_text_quotes_the_table():
    """`crosscheck --help` prints the tolerance table: it must say what POLICY says."""
    from crosscheck.cli import EPILOG

    f32, f16, bf16 = (cmp.POLICY[("flax", d)] for d in ("float32", "float16", "bfloat16"))
    assert cmp.POLICY[("torch", "float32")].to_dict() == f32.to_dict()
    assert (f32.max_abs, f32.max_rel, f32.min_pcc) == (1e-5, 1e-4, 0.99999)
    assert (f16.max_abs, f16.max_rel, f16.min_pcc) == (5e-3, None, 0.9999)
    assert (bf16.max_abs, bf16.max_rel, bf16.min_pcc) == (4e-2, None, 0.999)
    assert "max abs 1e-5, max rel 1e-4, PCC >= 0.99999" in EPILOG
    assert "max abs 5e-3, PCC >= 0.9999\n" in EPILOG and "max abs 4e-2, PCC >= 0.999\n" in EPILOG
    assert cmp.REL_FLOOR == 0.01 and "0.01 * max|r|" in EPILOG


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_never_pass_even_when_both_sides_agree(bad):
    """NaN == NaN used to count as max abs err 0, PCC 1, PASS."""
    out = np.array([[0.5, bad], [1.0, 2.0]], np.float32)
    c = cmp.compare(out, out.copy(), cmp.policy_for("flax", "float32"))
    assert not c.passed
    assert any("non-finite" in f and "output" in f and "(0, 1)" in f for f in c.failures)
    assert any("non-finite" in f and "reference" in f for f in c.failures)


def test_weights_that_overflow_fail_the_run_instead_of_passing():
    torch = pytest.importorskip("torch")
    from crosscheck.pipeline import engine
    from crosscheck.references import torch_ref

    torch.manual_seed(0)
    module = torch_ref.MultiHeadAttention(3, 2, 6, 0.0, 2)
    huge = {k: v * 1e20 if k != "mask" else v for k, v in module.state_dict().items()}
    report = engine.run(["MultiHeadAttention"], weights=huge, backends=("torch", "flax"))
    assert not report.passed
    assert all(any("non-finite" in f for f in r.failures) for r in report.results)
