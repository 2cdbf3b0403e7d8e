"""Metrics and verdicts from arrays: the compare engine, framework-agnostic.

Every function here takes numpy arrays (float32, float64, float16 or
``ml_dtypes.bfloat16``) and a :class:`Tolerance`; nothing knows which framework
produced them. Metrics are accumulated in float64.

Metrics of a candidate ``a`` against a reference ``r`` (same shape):

* ``max_abs_err`` = ``max_i |a_i - r_i|``.
* ``max_rel_err`` = ``max_i |a_i - r_i| / max(|r_i|, REL_FLOOR * max_j |r_j|, tiny)``:
  the error relative to each reference element, but never relative to less than
  ``REL_FLOOR`` (1/100) of the largest reference magnitude. Context vectors are
  weighted averages that can cancel to ~0; without the floor a rounding error on
  such an element reads as an arbitrarily large relative error. ``tiny`` (the
  smallest normal float32) only guards an all-zero reference.
* ``ref_scale`` = ``max(1, max_j |r_j|)``: absolute bounds are multiplied by it, so
  they are plain absolute bounds for the book's unit-scale data and relative to the
  largest output beyond that (rounding error grows with the magnitudes involved).
* ``pcc`` = Pearson correlation of the flattened arrays (float64), with the edge
  cases of ``ttnn.comparison.comp_pcc``: both all-NaN -> 1.0, one all-NaN -> 0.0,
  one all-zero -> allclose fallback, non-finite entries zeroed in both,
  identical -> 1.0, constant (r undefined) -> allclose fallback with rtol widened
  to ``4 * eps`` for bfloat16/float16.
* ``ulp`` = ``max_i |ord(a_i) - ord(r_i)|`` where ``ord`` maps a float32's bits to
  an integer that is monotonic in the value (so neighbours differ by 1, and +0/-0
  are the same). Only defined when the candidate is float32 (the reference is
  rounded to float32 first); ``None`` otherwise. Reported, never gated: an output
  that cancels to ~1e-6 sits where float32 spacing is ~1e-13, so an honest 1e-7
  error there is ~10^6 ULP (measured: 6e5 ULP for MultiHeadAttention at d=768).

Non-finite values: an element where both arrays hold the same NaN/inf counts as
equal; a NaN or inf on one side only makes the abs/rel/ulp errors ``inf``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

#: Relative errors are measured against at least this fraction of the largest reference magnitude.
REL_FLOOR = 1e-2
_TINY = float(np.finfo(np.float32).tiny)


# --- metrics -------------------------------------------------------------------------------------


def _dtype_name(a: np.ndarray) -> str:
    return str(a.dtype)


def _as64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _elementwise_error(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``|a - r|`` in float64; 0 where both hold the same non-finite value, inf where only one is finite."""
    same = (a == r) | (np.isnan(a) & np.isnan(r))
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a - r)
    err = np.where(same, 0.0, err)
    return np.where(np.isnan(err), np.inf, err)


def max_abs_err(a: np.ndarray, r: np.ndarray) -> float:
    err = _elementwise_error(_as64(a), _as64(r))
    return float(err.max()) if err.size else 0.0


def max_rel_err(a: np.ndarray, r: np.ndarray) -> float:
    """See the module docstring: relative error with a floor of ``REL_FLOOR * max|r|``."""
    a64, r64 = _as64(a), _as64(r)
    err = _elementwise_error(a64, r64)
    if not err.size:
        return 0.0
    finite_r = np.abs(r64[np.isfinite(r64)])
    scale = float(finite_r.max()) if finite_r.size else 0.0
    denom = np.maximum(np.abs(np.where(np.isfinite(r64), r64, 0.0)), max(REL_FLOOR * scale, _TINY))
    with np.errstate(invalid="ignore"):
        rel = np.where(err == 0.0, 0.0, err / denom)
    return float(rel.max())


def _ordered_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 that is monotonic in the value: adjacent floats differ by 1, -0 == +0."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    # Negative floats have the sign bit set and grow in magnitude as the bits grow: mirror them.
    return np.where(bits < 0, np.int64(-(2**31)) - bits, bits)


def ulp_distance(a: np.ndarray, r: np.ndarray) -> int | None:
    """Max ULP distance in float32, or ``None`` when ``a`` is not float32."""
    if np.asarray(a).dtype != np.float32:
        return None
    a32 = np.asarray(a, dtype=np.float32)
    r32 = np.asarray(r).astype(np.float32)
    if not a32.size:
        return 0
    same = (a32 == r32) | (np.isnan(a32) & np.isnan(r32))
    finite = np.isfinite(a32) & np.isfinite(r32)
    if np.any(~same & ~finite):
        # A NaN or inf on one side only: no finite number of ULPs separates them.
        return int(np.iinfo(np.int64).max)
    diff = np.abs(_ordered_bits(a32) - _ordered_bits(r32))
    return int(np.where(same, 0, diff).max())


def _low_precision(a: np.ndarray) -> bool:
    return _dtype_name(a) in ("bfloat16", "float16")


def _allclose(g: np.ndarray, c: np.ndarray, rtol: float, atol: float) -> bool:
    return bool(np.allclose(c, g, rtol=rtol, atol=atol, equal_nan=True))


def pcc(golden: np.ndarray, calculated: np.ndarray, rtol: float = 1e-5, atol: float = 1e-4) -> float:
    """Pearson correlation with ``ttnn.comparison.comp_pcc``'s edge cases (see module docstring)."""
    low = _low_precision(golden) or _low_precision(calculated)
    g, c = _as64(golden).ravel(), _as64(calculated).ravel()
    if g.size == 0:
        return 1.0
    g_nan, c_nan = np.isnan(g).all(), np.isnan(c).all()
    if g_nan and c_nan:
        return 1.0
    if g_nan or c_nan:
        return 0.0
    g_zero, c_zero = not g.any(), not c.any()
    if g_zero != c_zero:
        return float(_allclose(g, c, rtol, atol))
    bad = ~np.isfinite(g) | ~np.isfinite(c)
    if bad.any():
        g, c = np.where(bad, 0.0, g), np.where(bad, 0.0, c)
    if np.array_equal(g, c):
        return 1.0
    gd, cd = g - g.mean(), c - c.mean()
    denom = np.sqrt(np.sum(gd * gd) * np.sum(cd * cd))
    if denom == 0.0 or not np.isfinite(denom):
        # A constant tensor: correlation is undefined, fall back to closeness.
        eps = 2.0**-7 if low else 0.0
        return float(_allclose(g, c, max(rtol, 4 * eps), atol))
    return float(np.clip(np.sum(gd * cd) / denom, -1.0, 1.0))


@dataclass(frozen=True)
class Metrics:
    max_abs_err: float
    max_rel_err: float
    pcc: float
    ulp: int | None
    ref_scale: float = 1.0


def ref_scale(r: np.ndarray) -> float:
    r64 = _as64(r)
    finite = np.abs(r64[np.isfinite(r64)])
    return max(1.0, float(finite.max()) if finite.size else 0.0)


def metrics(candidate: np.ndarray, reference: np.ndarray, computed_in: str | None = None) -> Metrics:
    """All four metrics of ``candidate`` against ``reference`` (shapes must match).

    ``computed_in``: the dtype the candidate was computed in when it differs from the
    array's (a bfloat16 result read back as float32); ULP is only defined for float32.
    """
    float32 = computed_in in (None, "float32")
    return Metrics(
        max_abs_err=max_abs_err(candidate, reference),
        max_rel_err=max_rel_err(candidate, reference),
        pcc=pcc(reference, candidate),
        ulp=ulp_distance(candidate, reference) if float32 else None,
        ref_scale=ref_scale(reference),
    )


# --- the tolerance policy -------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Bounds a result must meet; ``None`` means "not checked" for that metric.

    ``max_abs`` is scaled by the reference's ``ref_scale`` (see the module docstring).
    """

    max_abs: float | None = None
    max_rel: float | None = None
    min_pcc: float | None = None
    max_ulp: int | None = None
    why: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("why")
        return d


def _ttnn_policy(variant: str | None) -> Tolerance:
    """ttnn's row is read off the variants' entries, which count their ttnn programs' bf16 roundings."""
    from crosscheck.tt import TTNN_MIN_PCC
    from crosscheck.variants.registry import TTNN_BF16_ABS_BUDGET, TTNN_BF16_TOLERANCE

    budget, min_pcc = TTNN_BF16_TOLERANCE.get(variant or "", (TTNN_BF16_ABS_BUDGET, TTNN_MIN_PCC))
    return Tolerance(
        max_abs=float(budget),
        min_pcc=float(min_pcc),
        why="bfloat16 on Tenstorrent math: n bf16 roundings on the variant's longest path x 2^-8 "
        "(crosscheck.variants.registry.TTNN_BF16_TOLERANCE); PCC 0.999 as tt-metal's bf16 linear tests",
    )


#: THE tolerance table: (backend, dtype the backend computes in) -> bounds against the torch float32
#: reference. The ``torch`` row is the float32 reference against the same module run in float64.
#: ``max_abs`` is scaled by ``max(1, max|ref|)``; ``max_rel`` uses the ``REL_FLOOR`` definition.
#: Bounds come from the arithmetic (eps = 2^-24 float32, 2^-11 float16, 2^-8 bfloat16 unit roundoff
#: times the ~4 rounded stages of attention: projections, scores, softmax, weighted sum), not from
#: whatever a run happened to produce; see README "How numbers compare" for the measurements.
POLICY: dict[tuple[str, str], Tolerance] = {
    ("torch", "float32"): Tolerance(
        max_abs=1e-5,
        max_rel=1e-4,
        min_pcc=0.99999,
        why="float32 rounding of the reference itself (vs float64); same bound as Flax float32",
    ),
    ("flax", "float32"): Tolerance(
        max_abs=1e-5,
        max_rel=1e-4,
        min_pcc=0.99999,
        why="same math in float32, other kernels and summation order: HF's 1e-5 Flax<->PyTorch bar; "
        "rel 1e-4 = ~16 ulps of float32 at the 1/100 floor",
    ),
    # --grad (crosscheck.checks.grad_check): gradients of sum(output * R), jax.grad vs torch autograd.
    # Widened per parameter by GRAD_REFERENCE_FACTOR x the torch gradient's own float32 error (below).
    ("flax grad", "float32"): Tolerance(
        max_abs=2e-5,
        why="twice the float32 forward bound: the backward pass rounds each forward product twice "
        "(dA = dC B^T and dB = A^T dC) and the softmax again (w * (g - sum w g)), ~8 rounded stages "
        "against the forward's ~4; abs scaled by max(1, max|ref grad|), and at least "
        "GRAD_REFERENCE_FACTOR x |torch float32 grad - torch float64 grad| (see there). rel and PCC "
        "reported, not gated: the softmax backward subtracts nearly equal terms, so a gradient "
        "(d W_key above all) can be far smaller than the terms whose rounding it carries",
    ),
    # --devices N --shard MODE (crosscheck.checks.sharding_check): the sharded Flax output vs the same module on
    # 1 device.
    ("flax sharded", "float32"): Tolerance(
        max_abs=1e-6,
        min_pcc=0.99999,
        why="the same float32 program split over devices: only the order of sums changes (ring attention "
        "folds key blocks in another order, heads mode sums out_proj's partial products): ~8 ulps at unit scale",
    ),
    ("flax", "float16"): Tolerance(
        max_abs=5e-3,
        min_pcc=0.9999,
        why="float16 compute (unit roundoff 4.9e-4) over ~4 rounded stages: ~10 eps; elementwise rel "
        "error of a ~0 output is O(1) in float16, so rel is reported, not gated",
    ),
    # --matmul-precision default|high on a GPU: float32 arrays, products of TF32-rounded operands
    # (crosscheck.pipeline.placement.tolerance_dtype picks this row for float32 below "highest").
    ("flax", "tensorfloat32"): Tolerance(
        max_abs=5e-3,
        min_pcc=0.9999,
        why="TF32 products (10-bit mantissa: unit roundoff 2^-11 = 4.9e-4 on each operand, float32 sums) over "
        "~4 matmul stages, two rounded operands each: ~10 eps, as the float16 row; rel reported, not gated",
    ),
    ("flax", "bfloat16"): Tolerance(
        max_abs=4e-2,
        min_pcc=0.999,
        why="bfloat16 compute (unit roundoff 3.9e-3) over ~4 rounded stages: ~10 eps; PCC as tt-metal's "
        "bf16 linear tests; rel reported, not gated (O(1) on ~0 outputs)",
    ),
}


#: Gradients through a saturated softmax are ill-conditioned: their float32 rounding error follows the
#: size of the scores and terms, not of the gradient (measured: torch.rand weights at d_in=32 give
#: |d W_query| ~1e-4 with 8e-5 float32 error in torch itself). So each gradient's abs bound is at least
#: this factor times torch's own float32 error against float64 on the same masks: Flax and torch
#: float32 are each about that far from the exact gradient, on either side (2x), and sum in other
#: orders (2x). A wrong gradient on a well-conditioned parameter still meets the plain 2e-5 bound.
GRAD_REFERENCE_FACTOR = 4.0


def grad_policy(reference_error: float, ref_scale_: float) -> Tolerance:
    """The ``("flax grad", "float32")`` row widened to ``GRAD_REFERENCE_FACTOR x reference_error``.

    ``reference_error``: max |torch float32 grad - torch float64 grad|; ``ref_scale_``: the
    reference's :func:`ref_scale` (``max_abs`` is multiplied by it in :func:`verdict`).
    """
    base = POLICY[("flax grad", "float32")]
    assert base.max_abs is not None  # the grad row is bounded in max abs error
    widened = GRAD_REFERENCE_FACTOR * float(reference_error) / ref_scale_
    return Tolerance(
        max_abs=max(base.max_abs, widened),
        max_rel=base.max_rel,
        min_pcc=base.min_pcc,
        max_ulp=base.max_ulp,
        why=base.why,
    )


def policy_for(backend: str, dtype: str, variant: str | None = None) -> Tolerance:
    """The row of :data:`POLICY` for ``backend`` computing in ``dtype`` (ttnn: per ``variant``)."""
    if backend == "ttnn":
        return _ttnn_policy(variant)
    try:
        return POLICY[(backend, dtype)]
    except KeyError:
        known = ", ".join(f"{b}/{d}" for b, d in POLICY)
        raise KeyError(f"no tolerance for backend {backend!r} in {dtype}; known: {known}, ttnn/bfloat16") from None


# --- verdicts -------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """One candidate against its reference: metrics (None on a shape mismatch), verdict and why."""

    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    metrics: Metrics | None
    tolerance: Tolerance
    passed: bool
    failures: list[str] = field(default_factory=list)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def verdict(
    m: Metrics, tol: Tolerance, shape: tuple[int, ...], reference_shape: tuple[int, ...] | None = None
) -> list[str]:
    """The failure messages of ``m`` under ``tol`` (empty when it passes); each names value, bound and shapes."""
    where = f"(output {shape} vs reference {reference_shape or shape})"
    out = []
    if tol.max_abs is not None and not m.max_abs_err <= tol.max_abs * m.ref_scale:
        bound = (
            _fmt(tol.max_abs)
            if m.ref_scale == 1.0
            else f"{_fmt(tol.max_abs * m.ref_scale)} (= {_fmt(tol.max_abs)} x max|ref| {_fmt(m.ref_scale)})"
        )
        out.append(f"max abs err {_fmt(m.max_abs_err)} > {bound} {where}")
    if tol.max_rel is not None and not m.max_rel_err <= tol.max_rel:
        out.append(f"max rel err {_fmt(m.max_rel_err)} > {_fmt(tol.max_rel)} {where}")
    if tol.min_pcc is not None and not m.pcc >= tol.min_pcc:
        out.append(f"PCC {m.pcc:.6f} < {tol.min_pcc} {where}")
    if tol.max_ulp is not None and m.ulp is not None and not m.ulp <= tol.max_ulp:
        out.append(f"ULP {m.ulp} > {tol.max_ulp} {where}")
    return out


def compare(candidate: np.ndarray, reference: np.ndarray, tol: Tolerance, computed_in: str | None = None) -> Comparison:
    """Metrics and verdict of ``candidate`` against ``reference``; a shape mismatch is a failure."""
    shape, ref_shape = tuple(np.shape(candidate)), tuple(np.shape(reference))
    if shape != ref_shape:
        msg = f"shape mismatch: output {shape} vs reference {ref_shape}"
        return Comparison(shape, ref_shape, None, tol, False, [msg])
    candidate, reference = np.asarray(candidate), np.asarray(reference)
    m = metrics(candidate, reference, computed_in)
    failures = non_finite(candidate, "output") + non_finite(reference, "reference") + verdict(m, tol, shape, ref_shape)
    return Comparison(shape, ref_shape, m, tol, not failures, failures)


def non_finite(array: np.ndarray, what: str) -> list[str]:
    """A failure naming how many NaN/Inf ``array`` holds and where the first is; NaN equal to NaN never passes."""
    values = np.asarray(array, dtype=np.float64) if np.asarray(array).dtype != np.float64 else np.asarray(array)
    bad = ~np.isfinite(values)
    if not bad.any():
        return []
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    kinds = "/".join(k for k, present in (("NaN", np.isnan(values).any()), ("Inf", np.isinf(values).any())) if present)
    return [f"{int(bad.sum())} non-finite ({kinds}) value(s) in the {what}, the first at index {first}"]
