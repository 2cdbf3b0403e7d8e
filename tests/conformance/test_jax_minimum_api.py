"""jaxattn's public API, every function and class once, on the oldest stack it supports (JAX 0.7.0, Flax 0.11.2).

``make test`` runs this file in ``.venv-ttnn`` instead of the whole ``tests/jaxattn`` suite (~430 s there):
each public function and class of every jaxattn module is called at least once and its numbers are checked
against an independent reference: numpy in float64 (attention, the modules' forwards written out from their
parameters), ``jax.nn.dot_product_attention``, or a second path through jaxattn (decode against the full
forward, NNX against the numpy forward of the Linen parameters). :func:`test_every_public_name_is_covered`
fails when a public function or class appears that no test here claims with :func:`covers`.

Float32 results that sum in another order than their reference are compared with the bounds derived in
:mod:`jaxattn.tolerance` (``attention_bound``, ``projected_attention_bound``, ``attention_grad_bound``,
``linear_error`` for a lone matmul, ``gamma`` for the RoPE and RMS-norm steps), never with a fixed
constant. Exact operations (masks, reshapes, a single rounding) are compared exactly. Shapes are tiny and
most tests trace all their calls into one ``jax.jit``: the time here is XLA compiling, so the programs are
few. Run it in one process (``-p no:xdist``): two workers would each compile the shared module programs.

``tests/conformance/test_jax_minimum.py`` pins the versions and runs the crosscheck registry's variants;
this file does not repeat that.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import math
import pkgutil
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxattn
import jaxattn.nnx as jn
from jaxattn import (
    attention,
    base,
    bucketing,
    causal,
    checks,
    core,
    fused,
    gqa,
    implementations,
    masks,
    multihead,
    nnx_base,
    norms,
    ops,
    rope,
    self_attention,
    sharding,
    tolerance,
)
from jaxattn.kernels import blockwise as kb
from jaxattn.kernels import cudnn, flash, ring
from jaxattn.kernels import naive as kn
from jaxattn.kernels import xla as kx

F32, F64 = np.float32, np.float64
B, T = 2, 6  # the modules' batch and tokens

# --- which test checks which public name -------------------------------------------------------------

#: ``"module.name"`` -> the test that checks it; filled by :func:`covers` as the tests are defined.
COVERED: dict[str, str] = {}

#: Public names this file deliberately does not run, each with the reason. Only what cannot run on a CPU
#: belongs here; today nothing does: the flash kernel runs in Pallas' interpreter and cuDNN's kernel is
#: checked for its refusal and its zero-token edges, which need no GPU.
NOT_COVERED: dict[str, str] = {}


def covers(module: str, *names: str):
    """Claim ``module.name`` for the decorated test (each name once in the file)."""

    def claim(test):
        for name in names:
            key = f"{module}.{name}"
            assert key not in COVERED, f"{key} is claimed by {COVERED[key]} and {test.__name__}"
            COVERED[key] = test.__name__
        return test

    return claim


def public_surface() -> set[str]:
    """``module.name`` of every public (no leading underscore) function and class defined in a jaxattn module."""
    found = set()
    modules = ["jaxattn", "jaxattn.nnx"] + [m.name for m in pkgutil.walk_packages(jaxattn.__path__, "jaxattn.")]
    for module_name in sorted(set(modules)):
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) == module_name:  # defined here, not imported
                found.add(f"{module_name}.{name}")
    return found


def test_every_public_name_is_covered():
    surface = public_surface()
    claimed = set(COVERED) | set(NOT_COVERED)
    assert not surface - claimed, f"public jaxattn names without a check in this file: {sorted(surface - claimed)}"
    assert not claimed - surface, f"claimed here but not public jaxattn names: {sorted(claimed - surface)}"


def test_version_and_top_level_exports():
    assert isinstance(jaxattn.__version__, str) and jaxattn.__version__[0].isdigit()
    assert all(hasattr(jaxattn, name) for name in jaxattn.__all__)
    assert all(issubclass(cls, nn.Module) for cls in jaxattn.VARIANTS)
    assert [cls.__name__ for cls in jn.VARIANTS] == [cls.__name__ for cls in jaxattn.VARIANTS]
    for name in ("core", "implementations", "masks", "tolerance"):
        assert inspect.ismodule(getattr(jaxattn, name))


# --- references: numpy, float64 unless asked otherwise --------------------------------------------------


@contextlib.contextmanager
def without_typecheck():
    """jaxtyping's runtime checks off (as ``tests/conftest.py``'s fixture), to reach the ``ValueError`` a user
    without them gets: with them on, a wrong shape is refused by the hints first."""
    from jaxtyping import config

    config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        config.update("jaxtyping_disable", False)


def rand(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(F32)


def assert_within(got, want, bound, what: str = "") -> None:
    """``|got - want| <= bound`` elementwise (``bound`` a scalar or an array), with the numbers in the message."""
    got, want = np.asarray(got, F64), np.asarray(want, F64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: not finite"
    diff = np.abs(got - want)
    within = bool(np.all(diff <= bound))
    assert within, f"{what}: max |got - want| = {diff.max():.3g}, bound {np.min(bound):.3g}..{np.max(bound):.3g}"


def softmax_rows(s: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of the visible entries; a row with none visible gives zeros."""
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.where(visible, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    total = p.sum(axis=-1, keepdims=True)
    return np.where(total > 0, p / np.where(total > 0, total, 1), 0).astype(s.dtype)


def np_attention(q, k, v, *, bias=None, mask=None, scale=None, causal=False, q_offset=0, dtype=F64):
    """``(out (B, T, N, Hv), weights (B, N, T, S))`` of attention in ``jax.nn``'s layout, in ``dtype``.

    Grouped kv heads: query head ``i`` reads kv head ``i // (N // K)``. Causal: query ``i`` sees keys
    ``j <= q_offset + i``. A row that sees no key gives zeros.
    """
    q, k, v = (np.asarray(a).astype(dtype) for a in (q, k, v))
    tokens, heads, head_dim = q.shape[1:]
    kv_tokens, kv_heads = k.shape[1:3]
    k, v = np.repeat(k, heads // kv_heads, axis=2), np.repeat(v, heads // kv_heads, axis=2)
    scale = dtype(head_dim**-0.5 if scale is None else scale)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias).astype(dtype)
    visible = np.ones(s.shape, bool)
    if mask is not None:
        visible = visible & np.asarray(mask)
    if causal:
        visible = visible & (np.arange(kv_tokens)[None, :] <= q_offset + np.arange(tokens)[:, None])
    weights = softmax_rows(s, visible)
    return np.einsum("bnts,bsnh->btnh", weights, v), weights


def np_attention_grads(q, k, v, d_out, *, scale=None, mask=None, causal=False, q_offset=0, dtype=F64):
    """``{"q", "k", "v"}``: gradients of ``sum(attention(q, k, v) * d_out)``, written out in ``dtype``:
    ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P (dP - rowsum(P dP))``, ``dQ = scale dS K``, ``dK = scale dS^T Q``."""
    q, k, v, d_out = (np.asarray(a).astype(dtype) for a in (q, k, v, d_out))
    heads, kv_heads = q.shape[2], k.shape[2]
    group = heads // kv_heads
    scale = dtype(q.shape[-1] ** -0.5 if scale is None else scale)
    _, p = np_attention(q, k, v, scale=scale, mask=mask, causal=causal, q_offset=q_offset, dtype=dtype)
    k_full, v_full = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    dp = np.einsum("btnh,bsnh->bnts", d_out, v_full)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))

    def per_kv_head(x):  # (B, S, N, d) -> (B, S, K, d): the query heads of a group add up
        return x.reshape((*x.shape[:2], kv_heads, group, x.shape[-1])).sum(axis=3)

    return {
        "q": scale * np.einsum("bnts,bsnh->btnh", ds, k_full),
        "k": per_kv_head(scale * np.einsum("bnts,btnh->bsnh", ds, q)),
        "v": per_kv_head(np.einsum("bnts,btnh->bsnh", p, d_out)),
    }


def one_hot_values(k) -> np.ndarray:
    """Values ``e_j`` for key ``j``: the attention output is then the weight row itself."""
    batch, kv_tokens, kv_heads = np.shape(k)[:3]
    return np.broadcast_to(np.eye(kv_tokens)[None, :, None, :], (batch, kv_tokens, kv_heads, kv_tokens))


def weights_bound(q, k, **kwargs) -> float:
    """Bound on two computations of the attention weights: attention over :func:`one_hot_values`."""
    return tolerance.attention_bound(q, k, one_hot_values(k), **kwargs)


def softmax_bound(scores, scale: float = 1.0) -> float:
    """Bound on two computations of ``softmax(scale * scores)``: queries ``scores`` over one-hot keys and values
    (``scores . e_j = s_j``)."""
    s = np.asarray(scores, F64).reshape(-1, 1, 1, np.shape(scores)[-1])  # (rows, T=1, N=1, H=S)
    one_hot = one_hot_values(np.zeros((s.shape[0], s.shape[-1], 1)))
    return tolerance.attention_bound(s, one_hot, one_hot, scale=scale)


def head_first(x):
    """``(b, heads, T, d)`` <-> ``(b, T, heads, d)``."""
    return np.swapaxes(np.asarray(x), 1, 2)


def dense64(x, kernel, bias=None):
    y = np.asarray(x, F64) @ np.asarray(kernel, F64)
    return y if bias is None else y + np.asarray(bias, F64)


def np_projected(x, q, k, v, out=None, *, num_heads, causal, key_mask=None, scale=None):
    """Project -> attention -> ``out`` projection in float64, and ``projected_attention_bound`` for it.

    ``q``, ``k``, ``v``, ``out``: ``(kernel, bias or None)``, kernels ``(d_in, d_out)`` as Flax stores them.
    """
    x = np.asarray(x, F64)

    def heads(y):
        return y.reshape((*y.shape[:2], num_heads, -1))

    mask = None if key_mask is None else np.asarray(key_mask, bool)[:, None, None, :]
    context, _ = np_attention(*(heads(dense64(x, *w)) for w in (q, k, v)), mask=mask, causal=causal, scale=scale)
    y = context.reshape((*x.shape[:2], -1))
    if out is not None:
        y = dense64(y, *out)
    bound = tolerance.projected_attention_bound(
        x,
        q[0],
        k[0],
        v[0],
        None if out is None else out[0],
        num_heads=num_heads,
        b_query=q[1],
        b_key=k[1],
        b_value=v[1],
        b_out=None if out is None else out[1],
        scale=scale,
    )
    return y, bound


def np_gqa(p, x, cos, sin, *, num_heads, num_kv_groups, eps=1e-6):
    """``GroupedQueryAttention(qk_norm=True)`` in float64 from its parameters and RoPE tables, and the bound on
    two float32 computations of it.

    The bound follows :func:`jaxattn.tolerance.projected_attention_error` with the two steps between the
    projections and the attention propagated elementwise, first order (``dy`` far below ``r``): the RMS norm
    ``n = s y / r`` turns an input error ``dy`` into ``|s| (|dy| + |y| rms(dy) / r) / r`` plus its own
    ``gamma(head_dim + 4)``; RoPE's ``y cos + rot(y) sin`` takes ``|dy| |cos| + |rot dy| |sin|`` plus
    ``gamma(3)`` of its terms. The tables are the module's own (``compute_rope_params``, checked against
    numpy in :func:`test_rope_and_rms_norm_against_numpy`).
    """
    x = np.asarray(x, F64)
    batch, tokens, _ = x.shape
    head_dim = cos.shape[-1]
    half = head_dim // 2
    c, s = np.asarray(cos, F64)[None, :tokens, None, :], np.asarray(sin, F64)[None, :tokens, None, :]

    def project(name, heads):
        w, bias = p[name]["kernel"], p[name].get("bias")
        magnitude, err = tolerance.linear_error(x, w, bias)
        shape = (batch, tokens, heads, head_dim)
        return dense64(x, w, bias).reshape(shape), magnitude.reshape(shape), err.reshape(shape)

    def rms_normed(y, err, scale):
        r = np.sqrt(np.mean(y**2, axis=-1, keepdims=True) + eps)
        n = y / r * np.asarray(scale, F64)
        dn = np.abs(scale) * (err + np.abs(y) * np.sqrt(np.mean(err**2, axis=-1, keepdims=True)) / r) / r
        return n, dn + tolerance.gamma(head_dim + 4) * np.abs(n)

    def rotated(y, err):
        rot = np.concatenate([-y[..., half:], y[..., :half]], axis=-1)
        rot_err = np.concatenate([err[..., half:], err[..., :half]], axis=-1)
        out = y * c + rot * s
        return out, err * np.abs(c) + rot_err * np.abs(s) + tolerance.gamma(3) * (np.abs(y * c) + np.abs(rot * s))

    q, _, dq = project("W_query", num_heads)
    k, _, dk = project("W_key", num_kv_groups)
    v, v_magnitude, dv = project("W_value", num_kv_groups)
    q, dq = rotated(*rms_normed(q, dq, p["q_norm"]["scale"]))
    k, dk = rotated(*rms_normed(k, dk, p["k_norm"]["scale"]))
    context, _ = np_attention(q, k, v, causal=True)
    err = tolerance.attention_error(q, k, v_magnitude, q_err=dq, k_err=dk, v_err=dv)
    context_magnitude = np.full((batch, tokens, num_heads * head_dim), v_magnitude.max())
    w_out, b_out = p["out_proj"]["kernel"], p["out_proj"].get("bias")
    _, out_err = tolerance.linear_error(context_magnitude, w_out, b_out, x_err=err)
    return dense64(context.reshape(batch, tokens, -1), w_out, b_out), 2 * float(out_err.max())


def random_params(module, x, seed: int, scale: float = 0.5):
    """Parameters in ``module``'s Linen layout, drawn in numpy (shapes from ``jax.eval_shape`` of its init:
    nothing compiles); random biases and norm scales, so a parameter read from the wrong place shows."""
    shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x).get("params", {})
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(s.dtype), shapes)


# --- the tolerance helpers themselves --------------------------------------------------------------------


@covers(
    "jaxattn.tolerance",
    "unit_roundoff",
    "gamma",
    "linear_error",
    "attention_error",
    "attention_bound",
    "projected_attention_error",
    "projected_attention_bound",
    "attention_grad_error",
    "attention_grad_bound",
    "reference_bound",
)
def test_tolerance_bounds_hold_for_numpy_float32_and_are_tight_enough_to_see_a_wrong_mask():
    assert tolerance.unit_roundoff() == 2.0**-24 and tolerance.unit_roundoff(np.float64) == 2.0**-53
    u = 2.0**-24
    assert tolerance.gamma(10) == pytest.approx(10 * u / (1 - 10 * u), rel=1e-12)
    with pytest.raises(ValueError, match="unbounded"):
        tolerance.gamma(2**24)

    x, w, bias = rand(1, 2, 5, 8), rand(2, 8, 6), rand(3, 6)
    magnitude, err = tolerance.linear_error(x, w, bias)
    exact = dense64(x, w, bias)
    assert np.all(np.abs(exact) <= magnitude)
    assert np.all(np.abs((x @ w + bias) - exact) <= err)  # numpy's float32 matmul

    q, k, v = rand(4, 2, 5, 4, 8, scale=2.0), rand(5, 2, 7, 2, 8, scale=2.0), rand(6, 2, 7, 2, 8)
    single = tolerance.attention_error(q, k, v)
    assert tolerance.attention_bound(q, k, v) == 2 * single
    out32, _ = np_attention(q, k, v, causal=True, q_offset=2, dtype=F32)
    out64, _ = np_attention(q, k, v, causal=True, q_offset=2)
    assert np.abs(out32 - out64).max() <= single
    # ... and a wrong mask (no causal mask) moves the output by far more than the bound
    assert np.abs(np_attention(q, k, v)[0] - out64).max() > 100 * tolerance.attention_bound(q, k, v)

    wq, wk, wv, wo = (rand(7 + i, 8, 8) for i in range(4))
    one = tolerance.projected_attention_error(x, wq, wk, wv, wo, num_heads=2)
    assert tolerance.projected_attention_bound(x, wq, wk, wv, wo, num_heads=2) == 2 * one
    heads = lambda y: y.reshape(2, 5, 2, 4)  # noqa: E731
    ctx32, _ = np_attention(heads(x @ wq), heads(x @ wk), heads(x @ wv), causal=True, dtype=F32)
    want, bound = np_projected(x, (wq, None), (wk, None), (wv, None), (wo, None), num_heads=2, causal=True)
    assert bound == 2 * one
    assert np.abs(ctx32.reshape(2, 5, 8) @ wo - want).max() <= one

    # gradients: numpy's float32 backward against float64, within the bound of one computation
    d_out = rand(11, 2, 5, 4, 8)
    grads32 = np_attention_grads(q, k, v, d_out, causal=True, q_offset=2, dtype=F32)
    grads64 = np_attention_grads(q, k, v, d_out, causal=True, q_offset=2)
    single = tolerance.attention_grad_error(q, k, v, d_out, is_causal=True, q_offset=2)
    assert tolerance.attention_grad_bound(q, k, v, d_out, is_causal=True, q_offset=2) == {
        name: 2 * e for name, e in single.items()
    }
    for name in ("q", "k", "v"):
        assert np.abs(grads32[name] - grads64[name]).max() <= single[name], name

    # reference_bound: from a float32 reference's measured error, for another float32 order (keys reversed)
    estimate = tolerance.reference_bound(out32, out64, reduction_length=8 + 2 * 7)
    measured = np.abs(out32.astype(F64) - out64).max()
    assert estimate == 4 * max(measured, tolerance.gamma(8 + 2 * 7) * np.abs(out64).max())
    reversed32, _ = np_attention(q, k[:, ::-1], v[:, ::-1], mask=np.tril(np.ones((5, 7), bool), 2)[:, ::-1], dtype=F32)
    assert np.abs(reversed32 - out64).max() <= estimate


# --- masks, array primitives, the head-first core --------------------------------------------------------


@covers(
    "jaxattn.masks",
    "make_causal_mask",
    "book_causal_mask",
    "from_book_mask",
    "to_book_mask",
    "to_additive_mask",
    "from_additive_mask",
    "make_offset_causal_mask",
)
@covers(
    "jaxattn.ops",
    "attention_scores",
    "masked_softmax",
    "scale_queries",
    "safe_softmax",
    "dropout",
    "attention_weights",
    "split_heads",
    "merge_heads",
    "accumulation_dtype",
    "nonfinite_rows",
)
@covers("jaxattn.core", "naive_attention", "causal_attention")
def test_masks_primitives_and_the_head_first_core():
    q, k, v = rand(11, 2, 3, 5, 4), rand(12, 2, 3, 5, 4), rand(13, 2, 3, 5, 3)  # (batch, heads, tokens, d)
    x, scores = rand(14, 2, 5, 6), rand(15, 2, 4, 4, scale=3.0)
    row0_masked = np.tril(np.ones((4, 4), bool))
    row0_masked[0] = False
    key = jax.random.PRNGKey(7)
    # nonfinite_rows: (B, T, N, H) queries over (B, S, K, H) keys, query head n reading kv head n // 2
    nf_q, nf_k = rand(16, 2, 4, 4, 3), rand(17, 2, 5, 2, 3)
    nf_q[0, 1, 2, 0], nf_q[1, 3, 0, 1] = np.nan, np.inf  # two bad queries
    nf_k[0, 0, 1, 2], nf_k[0, 1, 1, 0] = np.inf, np.nan  # kv head 1 of batch 0: keys 0 and 1 bad, 2..4 finite
    nf_k[1, :, 0, 1] = -np.inf  # kv head 0 of batch 1: every key bad

    @jax.jit
    def run(q, k, v, x, scores, row0_masked, key, offset, nf_q, nf_k):
        causal5 = masks.make_causal_mask(5)
        book = masks.book_causal_mask(5)
        additive = masks.to_additive_mask(causal5)
        return {
            "causal": causal5,
            "book": book,
            "from_book": masks.from_book_mask(book),
            "to_book": masks.to_book_mask(causal5),
            "additive": additive,
            "from_additive": masks.from_additive_mask(additive),
            "offset": masks.make_offset_causal_mask(2, 5, offset),
            "scores": ops.attention_scores(q, k),
            "masked_softmax": ops.masked_softmax(scores, row0_masked, scale=0.5),
            "safe_softmax": ops.safe_softmax(jnp.where(row0_masked, scores, -jnp.inf)),
            "scaled": ops.scale_queries(q, 0.3),
            "scaled_bf16": ops.scale_queries(q.astype(jnp.bfloat16), 0.3),
            "weights": ops.attention_weights(q, k, causal5),
            "dropout": ops.dropout(x, 0.5, key, False),
            "keep": jax.random.bernoulli(key, 0.5, x.shape),
            "split": ops.split_heads(x, 3),
            "merged": ops.merge_heads(ops.split_heads(x, 3)),
            "naive": core.naive_attention(q, k, v, causal5),
            "causal_naive": core.causal_attention(q, k, v, impl="naive"),
            "causal_blockwise": core.causal_attention(q, k, v, impl="blockwise"),
            "nonfinite": ops.nonfinite_rows(nf_q, nf_k),
            "nonfinite_causal": ops.nonfinite_rows(nf_q, nf_k, causal=True),
        }

    r = jax.tree.map(np.asarray, run(q, k, v, x, scores, row0_masked, key, jnp.int32(3), nf_q, nf_k))
    tril = np.tril(np.ones((5, 5), bool))
    np.testing.assert_array_equal(r["causal"], tril)
    np.testing.assert_array_equal(r["book"], np.triu(np.ones((5, 5), F32), 1))
    np.testing.assert_array_equal(r["from_book"], tril)
    np.testing.assert_array_equal(r["to_book"], r["book"])
    np.testing.assert_array_equal(r["additive"], np.where(tril, 0.0, masks.ADDITIVE_MASK_VALUE).astype(F32))
    np.testing.assert_array_equal(r["from_additive"], tril)
    np.testing.assert_array_equal(r["offset"], np.arange(5)[None, :] <= 3 + np.arange(2)[:, None])

    for i in np.ndindex(2, 3):  # a lone matmul: tolerance.linear_error, twice for two computations
        assert_within(r["scores"][i], dense64(q[i], k[i].T), 2 * tolerance.linear_error(q[i], k[i].T)[1], "scores")
    assert np.all(np.isnan(r["masked_softmax"][:, 0]))  # the book's softmax: a row with no key is NaN
    want = softmax_rows(scores.astype(F64) * 0.5, row0_masked)
    assert_within(r["masked_softmax"][:, 1:], want[:, 1:], softmax_bound(scores, 0.5), "masked_softmax")
    assert np.all(r["safe_softmax"][:, 0] == 0)  # safe_softmax: zeros
    assert_within(r["safe_softmax"], softmax_rows(scores.astype(F64), row0_masked), softmax_bound(scores), "safe")
    np.testing.assert_array_equal(r["scaled"], q * F32(0.3))  # one rounding, as numpy's
    assert r["scaled_bf16"].dtype == jnp.bfloat16
    assert ops.accumulation_dtype(jnp.bfloat16) == ops.accumulation_dtype(jnp.float32) == jnp.float32
    assert ops.accumulation_dtype(jnp.float64) == jnp.float64

    qt, kt, vt = head_first(q), head_first(k), head_first(v)  # (b, T, heads, d) for the references
    want_out, want_w = np_attention(qt, kt, vt, causal=True)
    assert_within(r["weights"], want_w, weights_bound(qt, kt), "attention_weights")
    assert r["keep"].any() and not r["keep"].all()
    np.testing.assert_array_equal(r["dropout"], np.where(r["keep"], x / F32(0.5), 0))
    jx = jnp.asarray(x)  # eager calls take JAX arrays (the jaxtyping hints are checked here)
    with pytest.raises(ValueError, match="rate"):
        ops.dropout(jx, -0.1, key, False)
    with pytest.raises(ValueError, match="needs an rng"):
        ops.dropout(jx, 0.5, None, False)
    assert ops.dropout(jx, 0.5, None, True) is jx
    np.testing.assert_array_equal(r["split"], x.reshape(2, 5, 3, 2).transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(r["merged"], x)

    bound = tolerance.attention_bound(qt, kt, vt)
    for name in ("naive", "causal_naive"):
        context, weights = r[name]
        assert_within(head_first(context), want_out, bound, name)
        assert_within(weights, want_w, weights_bound(qt, kt), name)
    context, weights = r["causal_blockwise"]
    assert weights is None
    assert_within(head_first(context), want_out, bound, "causal_attention(impl='blockwise')")
    jq, jk, jv = (jnp.asarray(a) for a in (q, k, v))
    with pytest.raises(ValueError, match="impl must be one of"):
        core.causal_attention(jq, jk, jv, impl="fast")
    with pytest.raises(ValueError, match="float32 or wider"):
        core.causal_attention(jq, jk, jv, softmax_dtype=jnp.bfloat16)

    # nonfinite_rows: a query with a non-finite entry, or a row whose every visible key has one; in float64
    # IEEE attention (masked scores -inf, no guard) each such row is NaN throughout, whatever its other scores
    group = nf_q.shape[2] // nf_k.shape[2]
    finite_key = np.repeat(np.isfinite(nf_k).all(axis=-1), group, axis=2)  # (B, S, N)
    bad_query = ~np.isfinite(nf_q).all(axis=-1)  # (B, T, N)
    q64, k64 = nf_q.astype(F64), np.repeat(nf_k.astype(F64), group, axis=2)
    for name, is_causal in (("nonfinite", False), ("nonfinite_causal", True)):
        visible = np.ones((4, 5), bool) if not is_causal else np.arange(5)[None, :] <= np.arange(4)[:, None]  # (T, S)
        sees_finite = (finite_key[:, None, :, :] & visible[None, :, :, None]).any(axis=2)  # (B, T, N)
        want = bad_query | ~sees_finite
        assert r[name].dtype == np.bool_ and r[name].shape == (2, 4, 4)
        np.testing.assert_array_equal(r[name], want, err_msg=name)
        with np.errstate(invalid="ignore", over="ignore"):
            s = np.where(visible, np.einsum("btnh,bsnh->bnts", q64, k64), -np.inf)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p = p / p.sum(axis=-1, keepdims=True)
        assert np.all(np.isnan(p).all(axis=-1).swapaxes(1, 2)[want]), name
    # batch 0, head 3 (kv head 1: keys 0, 1 bad): causal rows 0, 1 see no finite key, rows 2, 3 and the full rows do
    assert list(r["nonfinite_causal"][0, :, 3]) == [True, True, False, False] and not r["nonfinite"][0, :, 3].any()
    assert r["nonfinite"][1, :, :2].all() and r["nonfinite"][0, 1, 2] and r["nonfinite"][1, 3, 0]
    assert r["nonfinite"].sum() == 8 + 1  # batch 1's heads 0, 1 (the bad query (1, 3, 0) among them), (0, 1, 2)


# --- RoPE and RMS norm -------------------------------------------------------------------------------------

#: Llama 3's frequency scaling, in the book's keys and in transformers' ``rope_scaling``.
FREQ_CONFIG = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 64}
ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@covers("jaxattn.rope", "inverse_frequencies", "compute_rope_params", "apply_rope", "freq_config_from_rope_scaling")
@covers("jaxattn.norms", "rms_norm")
def test_rope_and_rms_norm_against_numpy():
    head_dim, theta, positions = 16, 10_000.0, 12
    inv = np.asarray(rope.inverse_frequencies(head_dim, theta), F64)
    want = theta ** -(np.arange(0, head_dim, 2) / head_dim)
    # float32 theta ** e: the exponent's rounding becomes ln(theta) u relative, the power and the division a few u
    assert_within(inv, want, tolerance.gamma(math.ceil(math.log(theta)) + 4) * want, "inverse_frequencies")

    # Llama 3 scaling: short waves kept, long waves divided by factor (the same float32 division), the rest between
    scaled = np.asarray(rope.inverse_frequencies(head_dim, theta, FREQ_CONFIG))
    inv32 = np.asarray(rope.inverse_frequencies(head_dim, theta))
    wavelength = 2 * np.pi / inv
    short, long = wavelength < 64 / 4.0, wavelength > 64 / 1.0
    medium = ~short & ~long
    assert short.any() and long.any() and medium.any()
    np.testing.assert_array_equal(scaled[short], inv32[short])
    np.testing.assert_array_equal(scaled[long], inv32[long] / F32(8.0))
    assert np.all((scaled[medium] > inv32[medium] / 8) & (scaled[medium] < inv32[medium]))

    assert rope.freq_config_from_rope_scaling(ROPE_SCALING) == FREQ_CONFIG
    older = {("type" if key == "rope_type" else key): value for key, value in ROPE_SCALING.items()}
    assert rope.freq_config_from_rope_scaling(older) == FREQ_CONFIG
    assert rope.freq_config_from_rope_scaling(None) is None
    assert rope.freq_config_from_rope_scaling({"rope_type": "default"}) is None
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        rope.freq_config_from_rope_scaling({"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="needs"):
        rope.freq_config_from_rope_scaling({"rope_type": "llama3", "factor": 8.0})

    x = rand(16, 2, 4, 3, head_dim)  # (batch, tokens, heads, head_dim)
    scale, shift = rand(17, head_dim), rand(18, head_dim)

    @jax.jit
    def run(x, offset, scale, shift):
        cos, sin = rope.compute_rope_params(head_dim, theta, positions, FREQ_CONFIG)
        return {
            "cos": cos,
            "sin": sin,
            "rope": rope.apply_rope(x, cos, sin),
            "rope_offset": rope.apply_rope(x, cos, sin, offset=offset),
            "norm": norms.rms_norm(x, scale),
            "norm_shift": norms.rms_norm(x, scale, 1e-5, shift),
        }

    r = jax.tree.map(np.asarray, run(x, jnp.int32(5), scale, shift))
    # The tables from the (checked) float32 frequencies: the angle's product rounds once (u |angle|), and
    # cos/sin are within 2 ulp (as tolerance.SOFTMAX_OPS assumes of exp).
    angles = np.arange(positions)[:, None] * scaled.astype(F64)
    angles = np.concatenate([angles, angles], axis=1)
    table_bound = 2 * (tolerance.unit_roundoff() * np.abs(angles) + tolerance.gamma(2))
    assert_within(r["cos"], np.cos(angles), table_bound, "cos table")
    assert_within(r["sin"], np.sin(angles), table_bound, "sin table")

    x64 = x.astype(F64)
    rot = np.concatenate([-x64[..., head_dim // 2 :], x64[..., : head_dim // 2]], axis=-1)
    for name, start in (("rope", 0), ("rope_offset", 5)):
        cos = r["cos"][start : start + 4].astype(F64)[None, :, None, :]
        sin = r["sin"][start : start + 4].astype(F64)[None, :, None, :]
        terms = np.abs(x64 * cos) + np.abs(rot * sin)  # two products and a sum: gamma(3), as tolerance says of RoPE
        assert_within(r[name], x64 * cos + rot * sin, 2 * tolerance.gamma(3) * terms, name)
    with pytest.raises(ValueError, match="exceed the tables"):
        rope.apply_rope(jnp.asarray(x), jnp.asarray(r["cos"]), jnp.asarray(r["sin"]), offset=positions)

    def normed(eps):
        return x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps) * scale

    n = normed(1e-6)  # an RMS norm: gamma(dim + 4) relative (tolerance's qk_rel_err)
    assert_within(r["norm"], n, 2 * tolerance.gamma(head_dim + 4) * np.abs(n), "rms_norm")
    n = normed(1e-5)
    assert_within(
        r["norm_shift"], n + shift, 2 * tolerance.gamma(head_dim + 5) * (np.abs(n) + np.abs(shift)), "rms_norm+shift"
    )


# --- the attention core and its kernels ---------------------------------------------------------------------


@covers("jaxattn.kernels.blockwise", "online_softmax_step")
def test_online_softmax_steps_over_two_key_blocks_give_softmax_attention():
    """Two folds of the step shared by the blockwise and ring kernels, normalised at the end, against numpy."""
    batch, tokens, kv_tokens, heads, head_dim, scale = 2, 3, 8, 2, 4, 0.5
    q, k, v = rand(41, batch, tokens, heads, head_dim), rand(42, batch, kv_tokens, heads, head_dim), rand(
        43, batch, kv_tokens, heads, head_dim
    )
    q_i = jnp.asarray(q * F32(scale)).transpose(0, 2, 1, 3)[:, :, None]  # (B, K, G=1, T, H), scaled
    k_h, v_h = (jnp.asarray(a).transpose(0, 2, 1, 3) for a in (k, v))  # (B, K, S, H)
    shape = (batch, heads, 1, tokens)
    carry = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, head_dim)), jnp.zeros(shape, bool))
    half = kv_tokens // 2
    for j in range(2):
        keys = slice(j * half, (j + 1) * half)
        carry = kb.online_softmax_step(
            carry, q_i, k_h[:, :, keys], v_h[:, :, keys], jnp.arange(tokens), jnp.arange(kv_tokens)[keys], None,
            None, kv_tokens=kv_tokens, is_causal=False, precision="highest",
        )  # fmt: skip
    m, l, acc, seen = (np.asarray(c) for c in carry)
    got = (acc / l[..., None])[:, :, 0].transpose(0, 2, 1, 3)  # (B, T, N, H)
    want, _ = np_attention(q, k, v, scale=scale)
    assert seen.all()
    assert_within(got, want, tolerance.attention_bound(q, k, v, scale=scale), "two online softmax steps")


@covers("jaxattn.attention", "dot_product_attention", "attention_with_weights")
@covers("jaxattn.kernels.naive", "naive_attention")
@covers("jaxattn.kernels.blockwise", "blockwise_attention", "blockwise_causal_attention", "general_blockwise_attention")
@covers("jaxattn.kernels.xla", "xla_attention")
def test_dot_product_attention_and_its_kernels_against_numpy_and_jax_nn():
    batch, tokens, kv_tokens, heads, kv_heads, head_dim = 2, 5, 7, 4, 2, 8
    q, k, v = (
        rand(21, batch, tokens, heads, head_dim),
        rand(22, batch, kv_tokens, kv_heads, head_dim),
        rand(23, batch, kv_tokens, kv_heads, head_dim),
    )
    mask = np.random.default_rng(24).random((batch, 1, tokens, kv_tokens)) > 0.3
    mask[1, 0, 2] = False  # a query that sees no key: zeros from every implementation
    bias = rand(25, 1, heads, tokens, kv_tokens)
    square = (
        rand(26, batch, 20, heads, head_dim),
        rand(27, batch, 20, kv_heads, head_dim),
        rand(28, batch, 20, kv_heads, head_dim),
    )
    rows = rand(29, batch, 3, 20, head_dim)  # head-first (batch, heads, tokens, d), for the causal schedules
    scale = 0.3

    d_out = rand(30, batch, tokens, heads, head_dim)

    @jax.jit
    def run(q, k, v, mask, bias, offset, square, rows, dropout_rng, d_out):
        call = dict(scale=scale, is_causal=True, q_offset=offset)
        r = {
            impl: jaxattn.dot_product_attention(q, k, v, bias, mask, implementation=impl, **call)
            for impl in ("naive", "blockwise", "xla")
        }
        r["auto"] = jaxattn.dot_product_attention(
            q, k, v, mask=mask, is_causal=True, q_offset=offset, precision="highest"
        )
        r["unbatched"] = jaxattn.dot_product_attention(q[0], k[0], v[0])
        r["with_weights"] = attention.attention_with_weights(q, k, v, bias, mask, scale=scale)
        r["dropout"] = jaxattn.dot_product_attention(
            q, k, v, implementation="naive", dropout_rate=0.5, dropout_rng=dropout_rng
        )
        # the naive kernel draws its keep-mask over its (B*K, G*T, S) weights, head i = kv head i // G
        r["keep"] = jax.random.bernoulli(dropout_rng, 0.5, (batch * kv_heads, tokens * heads // kv_heads, kv_tokens))
        r["empty"] = jaxattn.dot_product_attention(q[:, :0], k, v)
        r["no_keys"] = jaxattn.dot_product_attention(q, k[:, :0], v[:, :0])
        r["square"] = jaxattn.dot_product_attention(*square, is_causal=True)
        r["jax_nn"] = jax.nn.dot_product_attention(*square, is_causal=True)
        kernel_call = dict(scale=scale, is_causal=True, q_offset=2)  # the kernels' own signature
        r["k_naive"] = kn.naive_attention(q, k, v, bias, mask, **kernel_call)
        r["k_blockwise"] = kb.blockwise_attention(q, k, v, bias, mask, **kernel_call)[0]
        r["k_xla"] = kx.xla_attention(q, k, v, bias, mask, **kernel_call)[0]
        r["k_general"] = kb.general_blockwise_attention(
            *square, scale=scale, is_causal=True, query_block=8, key_block=8
        )  # 3 x 3 blocks, those above the diagonal skipped
        r["k_prefix"] = kb.blockwise_causal_attention(rows, rows, rows, method="prefix", block_size=8)
        r["k_online"] = kb.blockwise_causal_attention(rows, rows, rows, method="online", block_size=8)
        for impl in ("naive", "blockwise"):  # JAX's autodiff through each kernel (lax loops for blockwise)

            def loss(q, k, v, impl=impl):
                out = jaxattn.dot_product_attention(
                    q, k, v, mask=mask, is_causal=True, q_offset=offset, implementation=impl
                )
                return jnp.sum(out * d_out)

            r[f"grad_{impl}"] = dict(zip("qkv", jax.grad(loss, argnums=(0, 1, 2))(q, k, v), strict=True))
        return r

    r = jax.tree.map(np.asarray, run(q, k, v, mask, bias, jnp.int32(2), square, rows, jax.random.PRNGKey(5), d_out))

    want, _ = np_attention(q, k, v, bias=bias, mask=mask, scale=scale, causal=True, q_offset=2)
    bound = tolerance.attention_bound(q, k, v, scale=scale, bias=bias)
    for name in ("naive", "blockwise", "xla", "k_blockwise", "k_xla"):
        assert_within(r[name], want, bound, name)
        assert np.all(r[name][1, 2] == 0), f"{name}: a row with no visible key must be zeros"
    context, weights = r["k_naive"]
    assert_within(context, want, bound, "naive kernel")
    want_causal_w = np_attention(q, k, v, bias=bias, mask=mask, scale=scale, causal=True, q_offset=2)[1]
    assert_within(weights, want_causal_w, weights_bound(q, k, scale=scale, bias=bias), "naive kernel weights")

    assert_within(
        r["auto"],
        np_attention(q, k, v, mask=mask, causal=True, q_offset=2)[0],
        tolerance.attention_bound(q, k, v),
        "auto",
    )
    assert_within(r["unbatched"], np_attention(q[:1], k[:1], v[:1])[0][0], tolerance.attention_bound(q, k, v), "rank 3")
    context, weights = r["with_weights"]
    want_ctx, want_w = np_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    assert_within(context, want_ctx, bound, "attention_with_weights")
    assert_within(weights, want_w, weights_bound(q, k, scale=scale, bias=bias), "attention_with_weights weights")

    plain_out, plain_w = np_attention(q, k, v)
    keep = r["keep"].reshape(batch, heads, tokens, kv_tokens)
    dropped = np.einsum("bnts,bsnh->btnh", plain_w * keep * 2, np.repeat(v.astype(F64), heads // kv_heads, axis=2))
    # kept weights scaled by 1 / (1 - 0.5) = 2: twice the weights' error, twice their sum
    assert_within(r["dropout"], dropped, 2 * tolerance.attention_bound(q, k, v), "dropout")
    assert not np.allclose(r["dropout"], plain_out)

    want_grads = np_attention_grads(q, k, v, d_out, mask=mask, causal=True, q_offset=2)
    grad_bounds = tolerance.attention_grad_bound(q, k, v, d_out, mask=mask, is_causal=True, q_offset=2)
    for impl in ("naive", "blockwise"):
        for name in "qkv":
            assert_within(r[f"grad_{impl}"][name], want_grads[name], grad_bounds[name], f"d{name} through {impl}")

    assert r["empty"].shape == (batch, 0, heads, head_dim)
    np.testing.assert_array_equal(r["no_keys"], np.zeros((batch, tokens, heads, head_dim)))
    square_bound = tolerance.attention_bound(*square)
    assert_within(r["square"], r["jax_nn"], square_bound, "jaxattn vs jax.nn")
    assert_within(
        r["k_general"],
        np_attention(*square, scale=scale, causal=True)[0],
        tolerance.attention_bound(*square, scale=scale),
        "general_blockwise_attention",
    )
    rows_t = head_first(rows)
    want_rows = head_first(np_attention(rows_t, rows_t, rows_t, causal=True)[0])
    for name in ("k_prefix", "k_online"):
        assert_within(r[name], want_rows, tolerance.attention_bound(rows_t, rows_t, rows_t), name)

    # refusals: checked before anything runs (eager calls take JAX arrays: the jaxtyping hints are checked here)
    q, k, v, mask, rows = (jnp.asarray(a) for a in (q, k, v, mask, rows))
    with without_typecheck(), pytest.raises(ValueError, match="share head_dim"):
        jaxattn.dot_product_attention(q, k[..., :4], v)
    with without_typecheck(), pytest.raises(ValueError, match="must be boolean"):
        jaxattn.dot_product_attention(q, k, v, mask=mask.astype(np.int32))
    with pytest.raises(ValueError, match="q_offset must be >= 0"):
        jaxattn.dot_product_attention(q, k, v, q_offset=-1)
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        jaxattn.dot_product_attention(q, k, v, dropout_rate=0.1)
    with pytest.raises(ValueError, match="unknown attention implementation 'fast'"):
        jaxattn.dot_product_attention(q, k, v, implementation="fast")
    with pytest.raises(ValueError, match="precision must be"):
        jaxattn.dot_product_attention(q, k, v, precision="float16")
    with pytest.raises(ValueError, match="'xla' cannot serve this call: it does not support a value head_dim"):
        jaxattn.dot_product_attention(q, k, v[..., :4], implementation="xla")
    for kernel in (kb.blockwise_attention, kx.xla_attention):
        with pytest.raises(ValueError, match="dropout"):
            kernel(q, k, v, scale=1.0, dropout_rate=0.1)
    with pytest.raises(ValueError, match="method must be"):
        kb.blockwise_causal_attention(rows, rows, rows, method="fast")


@covers(
    "jaxattn.implementations",
    "Call",
    "Implementation",
    "register",
    "unregister",
    "names",
    "get",
    "select",
    "scores_bytes",
    "for_dropout",
    "requested",
)
@covers("jaxattn.kernels.cudnn", "refusal", "cudnn_attention")
@covers("jaxattn.kernels.flash", "default_blocks")
def test_the_implementation_table_auto_choice_and_the_gpu_kernels_refusals():
    assert {"naive", "blockwise", "xla", "flash", "cudnn", "ring"} <= set(implementations.names())
    shape = dict(batch=2, q_tokens=16, kv_tokens=16, heads=4, kv_heads=4, head_dim=64, value_head_dim=64)
    flags = dict(has_mask=False, has_bias=False, is_causal=True, q_offset=False, dropout=False, same_dtypes=True)

    def call(**changes):
        return implementations.Call(**{"platform": "cpu", "dtype": "float32", **shape, **flags, **changes})

    def picked(**changes):
        return implementations.select(None, call(**changes)).name

    many = implementations.AUTO_BLOCKWISE_MIN_TOKENS
    assert picked() == "naive" and picked(q_tokens=many, kv_tokens=many) == "blockwise"
    assert picked(platform="gpu") == "flash" and picked(platform="gpu", dtype="bfloat16") == "cudnn"
    assert picked(platform="gpu", has_mask=True) == "xla"  # while its (T, S) scores fit
    assert picked(platform="gpu", dtype="bfloat16", head_dim=12, value_head_dim=12) == "flash"  # cuDNN refuses 12
    assert implementations.scores_bytes(call(kv_tokens=7)) == 4 * 2 * 4 * 16 * 7
    assert implementations.get("naive").returns_weights and implementations.get("naive").dropout
    assert implementations.for_dropout() == "naive"  # the first row that takes dropout
    assert implementations.requested("blockwise", dropout=True) == "naive"
    assert implementations.requested("auto", dropout=False) is None
    assert implementations.requested("xla", dropout=False) == "xla"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        implementations.get("fast")
    with pytest.raises(ValueError, match="'flash' cannot serve this call: it runs on gpu, not on cpu"):
        implementations.select("flash", call())
    assert "a mask" in implementations.Implementation("maskless", kn.naive_attention, mask=False).refusal(
        call(has_mask=True)
    )

    seen = {}

    def probe(query, key, value, bias, mask, **kwargs):  # returns the query: nothing to compute or compile
        seen.update(kwargs, bias=bias, mask=mask)
        return query, None

    registered = implementations.register(implementations.Implementation("compat-probe", probe, q_offset=False))
    try:
        assert implementations.names()[-1] == "compat-probe" and implementations.get("compat-probe") is registered
        with pytest.raises(ValueError, match="already registered"):
            implementations.register(registered)
        assert implementations.register(registered, replace=True) is registered
        q = jnp.asarray(rand(41, 1, 3, 2, 16))
        np.testing.assert_array_equal(
            jaxattn.dot_product_attention(q, q, q, is_causal=True, implementation="compat-probe"), q
        )
        assert seen["scale"] == 16**-0.5 and seen["is_causal"] and seen["mask"] is None
        with pytest.raises(ValueError, match="q_offset=1 puts the last query at position 3, past the S=3 keys"):
            jaxattn.dot_product_attention(q, q, q, q_offset=1, implementation="compat-probe")  # checked first
        kv = jnp.asarray(rand(43, 1, 4, 2, 16))  # S=4: q_offset=1 keeps the 3 queries among the keys
        with pytest.raises(ValueError, match="does not support a q_offset"):
            jaxattn.dot_product_attention(q, kv, kv, q_offset=1, implementation="compat-probe")
    finally:
        implementations.unregister("compat-probe")
    assert "compat-probe" not in implementations.names()
    with pytest.raises(ValueError, match="other than 'auto'"):
        implementations.register(implementations.Implementation("auto", probe))

    # cuDNN: what it refuses, and (off a GPU) the refusal that names the backend
    assert cudnn.refusal(64, 64) is None
    assert "one head dim" in cudnn.refusal(64, 32)
    assert "multiples of 8 up to 128" in cudnn.refusal(12, 12) and "multiples of 8" in cudnn.refusal(256, 256)
    q = jnp.asarray(rand(42, 1, 4, 2, 8), jnp.bfloat16)
    if jax.default_backend() != "gpu":
        with pytest.raises(
            ValueError, match=f"'cudnn' cannot serve this call: it runs on gpu, not on {jax.default_backend()}"
        ):
            jaxattn.dot_product_attention(q, q, q, implementation="cudnn")
    with pytest.raises(ValueError, match="no mask, bias, q_offset or dropout"):
        cudnn.cudnn_attention(q, q, q, mask=jnp.ones((1, 1, 4, 4), bool), scale=0.3)
    assert cudnn.cudnn_attention(q[:, :0], q, q, scale=0.3)[0].shape == (1, 0, 2, 8)  # zero-token edges, no call
    assert not np.asarray(cudnn.cudnn_attention(q, q[:, :0], q[:, :0], scale=0.3)[0], F32).any()

    # the flash kernel's block sizes: (block, head_dim) tiles within TILE_BYTES (forward) / TILE_BYTES_BACKWARD
    for head_dim, itemsize, forward, backward in (
        (64, 4, 128, 64),
        (128, 4, 64, 32),
        (256, 4, 32, 16),
        (128, 2, 128, 64),
    ):
        block_q, block_k, (back_q, back_k) = flash.default_blocks(head_dim, itemsize)
        assert (block_q, back_q) == (forward, backward), (head_dim, itemsize)
        assert block_k <= block_q and back_k <= back_q
        assert block_q * head_dim * itemsize <= max(flash.TILE_BYTES, 16 * head_dim * itemsize)


@covers("jaxattn.kernels.flash", "flash_attention")
def test_flash_kernel_in_pallas_interpret_mode():
    q, k, v = rand(51, 1, 20, 4, 8), rand(52, 1, 24, 2, 8), rand(53, 1, 24, 2, 8)
    mask = np.random.default_rng(54).random((1, 1, 20, 24)) > 0.2
    bias = rand(55, 1, 4, 1, 24)  # broadcast over queries: read tile by tile at index 0
    scale = 0.4

    @jax.jit
    def run(q, k, v, bias, mask, offset):
        return flash.flash_attention(
            q, k, v, bias, mask, scale=scale, is_causal=True, q_offset=offset, interpret=True, block_q=16, block_k=16
        )[0]  # 2 query x 2 key blocks, padded tails

    got = run(q, k, v, bias, mask, jnp.int32(3))
    want, _ = np_attention(q, k, v, bias=bias, mask=mask, scale=scale, causal=True, q_offset=3)
    assert_within(got, want, tolerance.attention_bound(q, k, v, scale=scale, bias=bias), "flash (interpret)")
    q, k, v = (jnp.asarray(a) for a in (q, k, v))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'flash' cannot serve this call: it runs on gpu"):
            jaxattn.dot_product_attention(q, q, q, implementation="flash")
    with pytest.raises(ValueError, match="powers of two >= 16"):
        flash.flash_attention(q, k, v, scale=1.0, block_q=48, interpret=True)
    with pytest.raises(ValueError, match="no dropout"):
        flash.flash_attention(q, k, v, scale=1.0, dropout_rate=0.1, interpret=True)


# --- ring attention and the shard modes on the 8 forced host devices (tests/conftest.py) -----------------


@covers("jaxattn.kernels.ring", "ring_attention", "ring_layout", "zigzag_positions", "shard_map")
@covers("jaxattn.sharding", "make_mesh", "ring_mesh", "current_ring_mesh", "ring_refusal", "ring_kernel")
def test_ring_attention_over_eight_host_devices():
    mesh = sharding.make_mesh(8)
    assert dict(mesh.shape) == {"devices": 8}
    with pytest.raises(ValueError, match=f"asked for {len(jax.devices()) + 1} devices"):
        sharding.make_mesh(len(jax.devices()) + 1)
    assert ring.ring_layout(1000, 8) == (64, 64) and ring.ring_layout(65536, 8) == (4096, 512)
    np.testing.assert_array_equal(ring.zigzag_positions(1, 4, 2), [2, 3, 12, 13])  # chunks 1 and 2n - 1 - 1 = 6

    tokens = 12  # not a multiple of 2 x 8 chunks: padded and masked
    q, k, v = rand(61, 2, tokens, 4, 4), rand(62, 2, tokens, 2, 4), rand(63, 2, tokens, 2, 4)
    key_mask = np.ones((2, 1, 1, tokens), bool)
    key_mask[1, ..., :3] = False
    bias = rand(64, 1, 4, tokens, tokens)
    x = np.arange(16, dtype=F32)
    shape = dict(batch=2, heads=4, kv_heads=2, head_dim=4, value_head_dim=4)
    flags = dict(has_mask=True, has_bias=False, is_causal=True, q_offset=False, dropout=False, same_dtypes=True)
    ok = implementations.Call("cpu", "float32", q_tokens=tokens, kv_tokens=tokens, **shape, **flags)
    cross = implementations.Call("cpu", "float32", q_tokens=3, kv_tokens=tokens, **shape, **flags)
    assert sharding.current_ring_mesh() is None and "needs a mesh" in sharding.ring_refusal(ok)
    with pytest.raises(ValueError, match="needs a mesh"):
        sharding.ring_kernel(
            q, k, v, None, None, scale=1.0, is_causal=False, q_offset=0, dropout_rate=0.0, dropout_rng=None
        )
    with sharding.ring_mesh(mesh):
        assert sharding.current_ring_mesh() == (mesh, "devices")
        assert sharding.ring_refusal(ok) is None and "self-attention" in sharding.ring_refusal(cross)

    @jax.jit
    def run(q, k, v, key_mask, bias, x):
        with sharding.ring_mesh(mesh, "devices"):  # around the tracing, inside the jitted function
            via_table = jaxattn.dot_product_attention(q, k, v, mask=key_mask, is_causal=True, implementation="ring")
        direct = ring.ring_attention(q, k, v, bias, None, scale=0.5, is_causal=False, mesh=mesh, axis_name="devices")
        indexed = ring.shard_map(
            lambda y: y + jax.lax.axis_index("devices").astype(y.dtype),
            mesh,
            in_specs=P("devices"),
            out_specs=P("devices"),
        )(x)
        return via_table, direct, indexed

    via_table, direct, indexed = run(q, k, v, key_mask, bias, x)
    want = np_attention(q, k, v, mask=key_mask, causal=True)[0]
    assert_within(via_table, want, tolerance.attention_bound(q, k, v), "ring via implementation='ring'")
    assert np.all(np.asarray(via_table)[1, :3] == 0)  # queries before the first real key
    assert_within(
        direct,
        np_attention(q, k, v, bias=bias, scale=0.5)[0],
        tolerance.attention_bound(q, k, v, scale=0.5, bias=bias),
        "ring_attention",
    )
    np.testing.assert_array_equal(indexed, x + np.repeat(np.arange(8), 2))


@covers(
    "jaxattn.sharding",
    "Sharded",
    "shard",
    "check_mode",
    "default_rules",
    "logical_axes",
    "boxed",
    "param_shardings",
)
def test_shard_modes_batch_heads_sequence_equal_the_numpy_forward():
    mesh = sharding.make_mesh(8)
    mha = jaxattn.MultiHeadAttention(4, 16, 8, 0.0, 8, qkv_bias=True)  # 8 heads: one per device in "heads"
    params = random_params(mha, X4, seed=71)
    variables = {"params": params}

    assert sharding.check_mode("heads") == "heads"
    with pytest.raises(ValueError, match="unknown shard mode 'tokens'"):
        sharding.check_mode("tokens")
    rules = dict(sharding.default_rules("heads", "devices"))
    assert rules["heads"] == rules["kv_heads"] == "devices" and rules["batch"] is None and rules["length"] is None
    axes = sharding.logical_axes(variables)["params"]
    assert axes["W_query"]["kernel"] == P("embed", "heads") and axes["out_proj"]["bias"] == P("embed")
    boxed = sharding.boxed(variables)["params"]["W_key"]["kernel"]
    assert isinstance(boxed, nn.LogicallyPartitioned) and tuple(boxed.names) == ("embed", "kv_heads")
    placed = sharding.param_shardings(variables, mesh, "heads")["params"]
    assert placed["W_query"]["kernel"].spec == P(None, "devices") and placed["out_proj"]["kernel"].spec == P(
        "devices", None
    )
    with pytest.raises(ValueError, match="cannot be split over 8 devices"):
        sharding.param_shardings({"params": {"W_query": {"kernel": np.zeros((4, 6), F32)}}}, mesh, "heads")
    with pytest.raises(ValueError, match="has no attention_impl"):
        sharding.shard(jaxattn.SelfAttentionV2(4, 4), mesh, "sequence")

    weights = [(params[n]["kernel"], params[n]["bias"]) for n in ("W_query", "W_key", "W_value", "out_proj")]
    x3 = rand(72, 3, T, 4)  # 3 rows over 8 devices: padded
    for mode, x, mask in (("batch", x3, None), ("heads", X4, None), ("sequence", X4, PADDING)):
        sharded = sharding.shard(mha, mesh, mode)
        assert isinstance(sharded, sharding.Sharded)
        got = sharded.apply(variables, x, attention_mask=mask)
        want, bound = np_projected(x, *weights, num_heads=8, causal=True, key_mask=mask)
        assert_within(got, want, bound, f"shard mode {mode!r}")


# --- the Linen modules, the plain functions they are made of, and their NNX twins -----------------------

X4, X6, X8 = rand(31, B, T, 4), rand(32, B, T, 6), rand(33, B, T, 8)
PADDING = np.array([[1] * T, [0, 0] + [1] * (T - 2)], bool)  # left padding in row 1
GQA_ARGS = dict(head_dim=4, qk_norm=True, context_length=T, freq_config=FREQ_CONFIG, qkv_bias=True, out_features=6)
GQA = jaxattn.GroupedQueryAttention(8, 4, 2, **GQA_ARGS)

#: name -> (Linen module, input, attention_mask or None, NNX twin from rngs).
MODULES = {
    "SimplifiedSelfAttention": (
        jaxattn.SimplifiedSelfAttention(),
        X4,
        None,
        lambda r: jn.SimplifiedSelfAttention(rngs=r),
    ),
    "SelfAttentionV1": (jaxattn.SelfAttentionV1(4, 6), X4, None, lambda r: jn.SelfAttentionV1(4, 6, rngs=r)),
    "SelfAttentionV2": (
        jaxattn.SelfAttentionV2(4, 6, qkv_bias=True),
        X4,
        PADDING,
        lambda r: jn.SelfAttentionV2(4, 6, True, rngs=r),
    ),
    "CausalAttention": (
        jaxattn.CausalAttention(4, 6, T, 0.0, qkv_bias=True),
        X4,
        None,
        lambda r: jn.CausalAttention(4, 6, T, 0.0, True, rngs=r),
    ),
    "MultiHeadAttentionWrapper": (
        jaxattn.MultiHeadAttentionWrapper(4, 3, T, 0.0, 2, qkv_bias=True),
        X4,
        None,
        lambda r: jn.MultiHeadAttentionWrapper(4, 3, T, 0.0, 2, True, rngs=r),
    ),
    "MultiHeadAttention": (
        jaxattn.MultiHeadAttention(4, 6, T, 0.0, 2, qkv_bias=True),
        X4,
        PADDING,
        lambda r: jn.MultiHeadAttention(4, 6, T, 0.0, 2, True, rngs=r),
    ),
    "MultiHeadAttentionCombinedQKV": (
        jaxattn.MultiHeadAttentionCombinedQKV(4, 6, 2, T, 0.0, qkv_bias=True),
        X4,
        None,
        lambda r: jn.MultiHeadAttentionCombinedQKV(4, 6, 2, T, 0.0, True, rngs=r),
    ),
    "TorchMultiheadAttention": (
        jaxattn.TorchMultiheadAttention(6, 2),
        X6,
        PADDING,
        lambda r: jn.TorchMultiheadAttention(6, 2, rngs=r),
    ),
    "GroupedQueryAttention": (GQA, X8, None, lambda r: jn.GroupedQueryAttention(8, 4, 2, **GQA_ARGS, rngs=r)),
    "RMSNorm": (gqa.RMSNorm(4), X4, None, lambda r: jn.RMSNorm(4)),
}


def ignore(name: str, value) -> None:
    """A ``sow`` that keeps nothing (the NNX shells pass the same)."""


def jax_dense(p):
    """``nn.Linear`` from Linen parameters, as a plain function."""
    return (lambda y: y @ p["kernel"] + p["bias"]) if "bias" in p else (lambda y: y @ p["kernel"])


def plain(name: str, p, x, mask):
    """The module's math as the plain function that its Linen and NNX shells both call, fed its parameters."""
    key_mask = None if mask is None else mask[:, None, None, :]

    def attend(queries, keys, values, *, is_causal):
        return jaxattn.dot_product_attention(queries, keys, values, mask=key_mask, is_causal=is_causal)

    def qkv():  # the three nn.Linear projections (SelfAttentionV1 has raw matrices instead)
        return [jax_dense(p[n]) for n in ("W_query", "W_key", "W_value")]

    if name == "SimplifiedSelfAttention":
        projections = (self_attention.no_projection,) * 3
        return self_attention.self_attention(x, *projections, scale=None, attention_mask=mask, owner=name, sow=ignore)
    if name == "SelfAttentionV1":
        projections = [self_attention.raw_projection(p[n], jnp.float32, None) for n in ("W_query", "W_key", "W_value")]
        return self_attention.self_attention(
            x, *projections, scale=6**-0.5, attention_mask=mask, owner=name, sow=ignore
        )
    if name == "SelfAttentionV2":
        return self_attention.self_attention(x, *qkv(), scale=6**-0.5, attention_mask=mask, owner=name, sow=ignore)
    if name == "CausalAttention":
        return causal.causal_attention(x, *qkv(), attend, d_out=6)
    if name == "MultiHeadAttentionWrapper":

        def head(i):
            weights = [jax_dense(p[f"heads_{i}"][n]) for n in ("W_query", "W_key", "W_value")]
            return lambda x: causal.causal_attention(x, *weights, attend, d_out=3)

        return causal.concatenate_heads(x, [head(0), head(1)])
    if name == "MultiHeadAttention":
        return multihead.multi_head_attention(x, *qkv(), jax_dense(p["out_proj"]), attend, num_heads=2)
    if name == "MultiHeadAttentionCombinedQKV":
        return multihead.combined_qkv_attention(x, jax_dense(p["qkv"]), jax_dense(p["proj"]), attend, num_heads=2)
    if name == "TorchMultiheadAttention":
        return multihead.torch_multihead_attention(
            x, jax_dense(p["in_proj"]), jax_dense(p["out_proj"]), attend, num_heads=2, causal=False
        )
    if name == "GroupedQueryAttention":
        return gqa.grouped_query_attention(
            x,
            *qkv(),
            jax_dense(p["out_proj"]),
            attend,
            q_norm=lambda y: norms.rms_norm(y, p["q_norm"]["scale"]),
            k_norm=lambda y: norms.rms_norm(y, p["k_norm"]["scale"]),
            num_heads=4,
            num_kv_groups=2,
            rope=gqa.rope_tables(GQA, tokens=x.shape[1]),
            offset=0,
        )
    assert name == "RMSNorm"
    return norms.rms_norm(x, p["scale"])


def reference(name: str, p, x, mask, tables):
    """``(float64 output, bound on two float32 computations)`` of module ``name`` from its parameters."""

    def w(n, where=p):
        return where[n]["kernel"], where[n].get("bias")

    if name == "SimplifiedSelfAttention":
        x1 = x[:, :, None, :]  # one head, no projection, no scaling
        return np_attention(x1, x1, x1, scale=1.0)[0][:, :, 0], tolerance.attention_bound(x1, x1, x1, scale=1.0)
    if name == "SelfAttentionV1":
        return np_projected(x, *((p[n], None) for n in ("W_query", "W_key", "W_value")), num_heads=1, causal=False)
    if name == "SelfAttentionV2":
        return np_projected(x, w("W_query"), w("W_key"), w("W_value"), num_heads=1, causal=False, key_mask=mask)
    if name == "CausalAttention":
        return np_projected(x, w("W_query"), w("W_key"), w("W_value"), num_heads=1, causal=True)
    if name == "MultiHeadAttentionWrapper":
        heads = [
            np_projected(x, *(w(n, p[f"heads_{i}"]) for n in ("W_query", "W_key", "W_value")), num_heads=1, causal=True)
            for i in range(2)
        ]
        return np.concatenate([y for y, _ in heads], axis=-1), max(bound for _, bound in heads)
    if name == "MultiHeadAttention":
        return np_projected(
            x, w("W_query"), w("W_key"), w("W_value"), w("out_proj"), num_heads=2, causal=True, key_mask=mask
        )
    if name in ("MultiHeadAttentionCombinedQKV", "TorchMultiheadAttention"):
        fused_name, out = ("qkv", "proj") if name == "MultiHeadAttentionCombinedQKV" else ("in_proj", "out_proj")
        kernel, bias = w(fused_name)
        d = kernel.shape[1] // 3  # q, k, v stacked along the output: (3, heads, head_dim)
        split = [(kernel[:, i * d : (i + 1) * d], bias[i * d : (i + 1) * d]) for i in range(3)]
        causal_ = name == "MultiHeadAttentionCombinedQKV"
        return np_projected(x, *split, w(out), num_heads=2, causal=causal_, key_mask=mask)
    if name == "GroupedQueryAttention":
        return np_gqa(p, x, *tables, num_heads=4, num_kv_groups=2)
    assert name == "RMSNorm"
    x64 = x.astype(F64)
    n = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6) * p["scale"]
    return n, 2 * tolerance.gamma(x.shape[-1] + 4) * np.abs(n)


@functools.cache
def linen_run():
    """Random parameters per module, and every module's ``apply`` and plain function, all in one program."""
    params = {
        name: random_params(module, x, seed=80 + i) for i, (name, (module, x, _, _)) in enumerate(MODULES.items())
    }
    xs = {name: case[1] for name, case in MODULES.items()}
    attention_masks = {name: case[2] for name, case in MODULES.items()}
    via_jax_nn = MODULES["MultiHeadAttention"][0].clone(attention_fn=jax.nn.dot_product_attention)

    @jax.jit
    def run(params, xs, attention_masks):
        out = {}
        for name, (module, *_) in MODULES.items():
            mask = attention_masks[name]
            kwargs = {} if mask is None or name == "RMSNorm" else {"attention_mask": mask}
            out[name] = (
                module.apply({"params": params[name]}, xs[name], **kwargs),
                plain(name, params[name], xs[name], mask),
            )
        out["MultiHeadAttention[jax.nn]"] = via_jax_nn.apply(
            {"params": params["MultiHeadAttention"]}, xs["MultiHeadAttention"]
        )
        out["rope_tables"] = gqa.rope_tables(GQA, tokens=T)
        return out

    outputs = jax.tree.map(np.asarray, run(params, xs, attention_masks))
    references = {
        name: reference(name, params[name], x, mask, outputs["rope_tables"])
        for name, (_, x, mask, _) in MODULES.items()
    }
    return params, outputs, references


@covers(
    "jaxattn.self_attention",
    "SimplifiedSelfAttention",
    "SelfAttentionV1",
    "SelfAttentionV2",
    "self_attention",
    "no_projection",
    "raw_projection",
)
@covers("jaxattn.causal", "CausalAttention", "MultiHeadAttentionWrapper", "causal_attention", "concatenate_heads")
@covers(
    "jaxattn.multihead",
    "MultiHeadAttention",
    "MultiHeadAttentionCombinedQKV",
    "TorchMultiheadAttention",
    "multi_head_attention",
    "combined_qkv_attention",
    "torch_multihead_attention",
)
@covers("jaxattn.gqa", "GroupedQueryAttention", "RMSNorm", "grouped_query_attention", "rope_tables")
@covers("jaxattn.base", "AttentionModule", "BookAttention")
def test_linen_modules_and_their_plain_functions_equal_the_numpy_forward():
    params, outputs, references = linen_run()
    for name, (_module, *_) in MODULES.items():
        want, bound = references[name]
        linen_out, plain_out = outputs[name]
        assert_within(linen_out, want, bound, f"{name}.apply")
        assert_within(plain_out, want, bound, f"{name}'s plain function")
    # attention_fn=jax.nn.dot_product_attention (no mask: jax.nn gives a row without keys the mean, not zeros)
    weights = [
        (params["MultiHeadAttention"][n]["kernel"], params["MultiHeadAttention"][n]["bias"])
        for n in ("W_query", "W_key", "W_value", "out_proj")
    ]
    want, bound = np_projected(X4, *weights, num_heads=2, causal=True)
    assert_within(outputs["MultiHeadAttention[jax.nn]"], want, bound, "MultiHeadAttention(attention_fn=jax.nn...)")
    for name in ("CausalAttention", "MultiHeadAttention", "MultiHeadAttentionWrapper"):
        assert issubclass(type(MODULES[name][0]), base.BookAttention)
    for name in ("MultiHeadAttentionCombinedQKV", "TorchMultiheadAttention", "GroupedQueryAttention"):
        assert issubclass(type(MODULES[name][0]), base.AttentionModule)
    with pytest.raises(ValueError, match="exceeds context_length"):  # the book's mask size, checked before any work
        MODULES["CausalAttention"][0].apply({"params": params["CausalAttention"]}, jnp.asarray(rand(34, 1, T + 1, 4)))


@covers("jaxattn.checks", "check_sizes", "check_rate", "check_divisible", "check_input")
@covers("jaxattn.base", "check_book_config", "check_cache_shape", "check_cache_length", "check_dropout_supported")
@covers("jaxattn.multihead", "check_mha_config", "check_combined_qkv_config", "check_torch_mha_config")
@covers("jaxattn.gqa", "check_gqa_config")
def test_config_checks_name_the_numbers():
    checks.check_sizes("M", d_in=4, d_out=np.int64(2), head_dim=None)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=f"M: d_out={bad!r} must be a positive integer"):
            checks.check_sizes("M", d_in=4, d_out=bad)
    checks.check_rate("M", "dropout", 0.0)
    for bad in (-0.5, 1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
            checks.check_rate("M", "dropout", bad)
    checks.check_divisible("M", 6, 3)
    with pytest.raises(ValueError, match="d_out=6 must be divisible by num_heads=4"):
        checks.check_divisible("M", 6, 4)
    checks.check_input("M", (2, 5, 4), d_in=4, ranks=(3,), context_length=5)
    with pytest.raises(ValueError, match="expected input of rank 3"):
        checks.check_input("M", (5, 4), d_in=4, ranks=(3,))
    with pytest.raises(ValueError, match="d_in=4"):
        checks.check_input("M", (2, 5, 3), d_in=4, ranks=(3,))
    with pytest.raises(ValueError, match="tokens=6 exceeds context_length=5"):
        checks.check_input("M", (2, 6, 4), d_in=4, ranks=(3,), context_length=5)

    base.check_book_config(jaxattn.CausalAttention(4, 6, 8, 0.1))
    with pytest.raises(ValueError, match="CausalAttention: context_length=0"):
        base.check_book_config(jaxattn.CausalAttention(4, 6, 0, 0.1))
    multihead.check_mha_config(jaxattn.MultiHeadAttention(4, 6, 8, 0.0, 2))
    with pytest.raises(ValueError, match="MultiHeadAttention: d_out=6 must be divisible by num_heads=4"):
        multihead.check_mha_config(jaxattn.MultiHeadAttention(4, 6, 8, 0.0, 4))
    with pytest.raises(ValueError, match=r"dropout=1\.5"):
        multihead.check_combined_qkv_config(jaxattn.MultiHeadAttentionCombinedQKV(4, 6, 2, 8, 1.5))
    with pytest.raises(ValueError, match="embed_dim=6 must be divisible by num_heads=4"):
        multihead.check_torch_mha_config(jaxattn.TorchMultiheadAttention(6, 4))
    gqa.check_gqa_config(GQA)
    with pytest.raises(ValueError, match="num_heads=4 must be divisible by num_kv_groups=3"):
        gqa.check_gqa_config(jaxattn.GroupedQueryAttention(8, 4, 3))
    with pytest.raises(ValueError, match="head_dim=3 must be even"):
        gqa.check_gqa_config(jaxattn.GroupedQueryAttention(8, 4, 2, head_dim=3))

    base.check_cache_shape("M", (1, 1))
    base.check_cache_shape("M", (2, 8))
    for bad in ((0, 8), (2, 0)):
        message = f"M: a KV cache needs batch >= 1 and max_tokens >= 1, got (batch, max_tokens) = {bad}"
        with pytest.raises(ValueError, match=re.escape(message)):
            base.check_cache_shape("M", bad)
    base.check_cache_length("M", 8, 8)
    base.check_cache_length("M", 1000, None)  # no context_length: any length
    with pytest.raises(ValueError, match="M: the KV cache holds max_tokens=9, more than context_length=8"):
        base.check_cache_length("M", 9, 8)
    for impl in ("auto", "naive", "blockwise", "xla", "flash"):
        base.check_dropout_supported("M", impl, 0.1)
    message = "M: dropout=0.1 is active (deterministic=False) but attention_impl='ring' (ring attention"
    with pytest.raises(ValueError, match=re.escape(message)):
        base.check_dropout_supported("M", "ring", 0.1)


@covers("jaxattn.base", "KVCache", "append_to_cache", "key_mask", "call_attention")
def test_the_shells_cache_and_core_call():
    batch, max_tokens, kv_heads, head_dim = 2, 8, 2, 4
    cache = base.KVCache(
        np.zeros((batch, max_tokens, kv_heads, head_dim), F32),
        rand(91, batch, max_tokens, kv_heads, head_dim),
        np.ones((batch, max_tokens), bool),
        np.int32(3),
    )
    keys, values, q = (
        rand(92, batch, 2, kv_heads, head_dim),
        rand(93, batch, 2, kv_heads, head_dim),
        rand(94, batch, 2, 4, head_dim),
    )
    chunk_mask = base.key_mask("Probe", np.array([[1, 0], [1, 1]]), (batch, 2))
    assert chunk_mask.dtype == jnp.bool_
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, tokens\) = \(2, 3\)"):
        base.key_mask("Probe", chunk_mask, (batch, 3))
    with without_typecheck(), pytest.raises(ValueError, match="does not fit the cache"):
        base.append_to_cache("Probe", cache, jnp.asarray(keys[:, :, :1]), jnp.asarray(values), None)

    @jax.jit
    def run(cache, keys, values, chunk_mask, q):
        new, index = base.append_to_cache("Probe", cache, keys, values, chunk_mask)
        context, weights = base.call_attention(
            "Probe",
            q,
            new.key,
            new.value,
            key_mask=new.mask,
            is_causal=True,
            q_offset=index,
            attention_fn=jax.nn.dot_product_attention,
            attention_impl="auto",
            precision=None,
            dropout_rate=0.0,
            dropout_rng=None,
        )  # a custom attention_fn: q_offset becomes an explicit causal mask (jax.nn has none)
        assert weights is None
        return new, index, context

    new, index, context = jax.tree.map(np.asarray, run(cache, keys, values, chunk_mask, q))
    assert index == 3 and new.index == 5
    np.testing.assert_array_equal(new.key[:, 3:5], keys)
    np.testing.assert_array_equal(new.key[:, 5:], 0)
    np.testing.assert_array_equal(new.value[:, :3], cache.value[:, :3])
    np.testing.assert_array_equal(new.mask[:, 3:5], np.asarray(chunk_mask))
    want = np_attention(q, new.key, new.value, mask=new.mask[:, None, None, :], causal=True, q_offset=3)[0]
    assert_within(context, want, tolerance.attention_bound(q, new.key, new.value), "call_attention")
    # the traced index is checked when the step runs (same program): a full cache stops it, not a clamped write
    for index, message in (
        (7, "Probe: KV cache full: 7 tokens cached + 2 new > max_tokens=8 (init the cache on a longer input)"),
        (-1, "Probe: KV cache index -1 is negative (the number of tokens cached starts at 0)"),
    ):
        with pytest.raises(ValueError) as raised, checks.clean_errors():
            jax.block_until_ready(run(cache._replace(index=np.int32(index)), keys, values, chunk_mask, q))
        assert type(raised.value) is ValueError and str(raised.value) == message
    with pytest.raises(ValueError, match="with a custom attention_fn, choose inside it"):
        base.call_attention(
            "Probe",
            *(jnp.asarray(a) for a in (q, keys, values)),
            key_mask=None,
            is_causal=True,
            q_offset=0,
            attention_fn=jax.nn.dot_product_attention,
            attention_impl="naive",
            precision=None,
            dropout_rate=0.0,
            dropout_rng=None,
        )


@covers("jaxattn.checks", "RuntimeCheckError", "check_at_run_time", "clean_errors", "mark_range", "known_range")
def test_run_time_checks_of_traced_values(caplog):
    def problem(x):  # any shape: under vmap the callback sees the whole batch
        x = np.asarray(x)
        return None if np.all((x >= 0) & (x <= 4)) else f"Probe: index {x.tolist()} outside [0, 4]"

    ranges = {}

    @jax.jit
    def run(i, many):
        checked = checks.check_at_run_time(i, problem)
        checks.mark_range(checked, 0, 4)
        ranges.update(marked=checks.known_range(checked), unmarked=checks.known_range(i))
        ranges["other"] = checks.known_range(i + 0)  # another tracer of the same value
        return checked * 2, jax.vmap(lambda j: checks.check_at_run_time(j, problem))(many)

    doubled, many = run(np.int32(3), np.arange(3, dtype=np.int32))  # in range: the values, unchanged
    assert int(doubled) == 6
    np.testing.assert_array_equal(many, np.arange(3))
    assert ranges == {"marked": (0, 4), "unmarked": None, "other": None}

    caplog.set_level(logging.DEBUG)
    # out of range when the program runs: JAX's runtime error, its message ending with ours ...
    with pytest.raises(Exception, match=r"RuntimeCheckError: Probe: index 7 outside \[0, 4\]") as raised:
        jax.block_until_ready(run(np.int32(7), np.arange(3, dtype=np.int32)))
    assert str(raised.value) != "Probe: index 7 outside [0, 4]"
    # ... and inside clean_errors a ValueError with only our message (the whole vmapped batch in one callback)
    for i, many, message in (
        (9, np.arange(3), "Probe: index 9 outside [0, 4]"),
        (2, np.arange(3, 6), "Probe: index [3, 4, 5] outside [0, 4]"),
    ):
        with pytest.raises(ValueError) as raised, checks.clean_errors():
            jax.block_until_ready(run(np.int32(i), many.astype(np.int32)))
        assert type(raised.value) is ValueError and str(raised.value) == message
    with pytest.raises(ValueError, match=r"^Probe: index 5 outside \[0, 4\]$"):
        checks.clean_errors()(run)(np.int32(5), np.arange(3, dtype=np.int32))  # a ContextDecorator too
    assert not [rec for rec in caplog.records if "RuntimeCheckError" in rec.getMessage() + str(rec.exc_info)], (
        "a failed check's callback traceback must not be logged"
    )

    # concrete values are checked at once, a plain ValueError; marks apply to tracers only
    assert checks.check_at_run_time(3, problem) == 3
    with pytest.raises(ValueError, match=r"Probe: index -1 outside \[0, 4\]") as raised:
        checks.check_at_run_time(np.int32(-1), problem)
    assert not isinstance(raised.value, checks.RuntimeCheckError)
    concrete = jnp.int32(3)
    checks.mark_range(concrete, 0, 4)
    assert checks.known_range(concrete) is None
    # clean_errors passes other exceptions, and our own, through unchanged
    assert issubclass(checks.RuntimeCheckError, ValueError)
    with pytest.raises(checks.RuntimeCheckError, match="^ours$"), checks.clean_errors():
        raise checks.RuntimeCheckError("ours")
    with pytest.raises(KeyError), checks.clean_errors():
        raise KeyError("other")
    with pytest.raises(ValueError, match="^other$"), checks.clean_errors():
        raise ValueError("other")
    with checks.clean_errors():
        pass


def test_gqa_decode_token_by_token_equals_the_full_forward_linen_and_nnx():
    """Linen's ``'cache'`` collection and NNX's ``init_cache``: RoPE at the cache index, keys cached rotated."""
    params, outputs, references = linen_run()
    p, full = params["GroupedQueryAttention"], outputs["GroupedQueryAttention"][0]
    _, bound = references["GroupedQueryAttention"]  # decode and the full forward: two computations of one layer

    decoder = GQA.clone(decode=True)
    shapes = jax.eval_shape(lambda x: decoder.init(jax.random.PRNGKey(0), x), X8)["cache"]  # init's cache, unrun
    cache = jax.tree.map(lambda s: (np.ones if s.dtype == bool else np.zeros)(s.shape, s.dtype), shapes)
    step = jax.jit(lambda variables, token: decoder.apply(variables, token, mutable=["cache"]))
    decoded = []
    for t in range(T):
        y, mutated = step({"params": p, "cache": cache}, X8[:, t : t + 1])
        cache = mutated["cache"]
        decoded.append(np.asarray(y))
    assert int(cache["cache_index"]) == T
    assert_within(np.concatenate(decoded, axis=1), full, bound, "Linen decode")
    with pytest.raises(Exception, match="KV cache full"):  # the host check stops the step that would overflow
        np.asarray(step({"params": p, "cache": cache}, X8[:, :1])[0])

    model = jn.load_params(jn.GroupedQueryAttention(8, 4, 2, **GQA_ARGS, decode=True, rngs=nnx.Rngs(0)), p)
    with pytest.raises(ValueError, match="init_cache"):
        model(jnp.asarray(X8[:, :1]))
    model.init_cache(X8.shape)
    nnx_step = nnx.jit(lambda m, token: m(token))
    decoded = np.concatenate([np.asarray(nnx_step(model, X8[:, t : t + 1])) for t in range(T)], axis=1)
    assert int(jn.value_of(model.cache_index)) == T
    assert_within(decoded, full, bound, "NNX decode")


@covers(
    "jaxattn.nnx",
    "CausalAttention",
    "GroupedQueryAttention",
    "MultiHeadAttention",
    "MultiHeadAttentionCombinedQKV",
    "MultiHeadAttentionWrapper",
    "RMSNorm",
    "TorchMultiheadAttention",
    "SelfAttentionV1",
    "SelfAttentionV2",
    "SimplifiedSelfAttention",
)
@covers("jaxattn.nnx_base", "AttentionModule", "load_params", "params_of", "value_of", "required_rngs", "no_sow")
def test_nnx_twins_load_the_linen_params_and_equal_the_numpy_forward():
    params, _, references = linen_run()
    models = {name: jn.load_params(case[3](nnx.Rngs(0)), params[name]) for name, case in MODULES.items()}
    for name, model in models.items():
        loaded = jn.params_of(model)
        assert jax.tree.structure(loaded) == jax.tree.structure(params[name]), name
        jax.tree.map(np.testing.assert_array_equal, loaded, params[name])
    np.testing.assert_array_equal(jn.value_of(models["SelfAttentionV1"].W_query), params["SelfAttentionV1"]["W_query"])
    from_state = jn.params_of(nnx.state(models["RMSNorm"], nnx.Param))
    np.testing.assert_array_equal(from_state["scale"], jn.value_of(models["RMSNorm"].scale))

    @nnx.jit
    def run(models, xs):
        return {
            name: model(xs[name]) if MODULES[name][2] is None else model(xs[name], attention_mask=MODULES[name][2])
            for name, model in models.items()
        }

    outputs = run(models, {name: case[1] for name, case in MODULES.items()})
    for name, (want, bound) in references.items():
        assert_within(outputs[name], want, bound, f"nnx.{name}")

    assert all(
        issubclass(type(models[name]), jn.AttentionModule) for name in ("CausalAttention", "GroupedQueryAttention")
    )
    with pytest.raises(NotImplementedError, match="has no KV cache"):
        jn.AttentionModule().kv_shape()
    with pytest.raises(ValueError, match="Probe: needs rngs=nnx.Rngs"):
        nnx_base.required_rngs(None, "Probe")
    assert nnx_base.no_sow("attn_weights", jnp.ones(2)) is None
    wrong = dict(params["SelfAttentionV2"], W_key={"kernel": np.zeros((4, 5), F32), "bias": np.zeros(6, F32)})
    with pytest.raises(ValueError, match=r"parameter W_key/kernel: expected shape \(4, 6\), found \(4, 5\)"):
        jn.load_params(models["SelfAttentionV2"], wrong)


# --- inference helpers: fused Q/K/V and bucketed lengths -----------------------------------------------------


@covers("jaxattn.fused", "fuse_qkv_params", "fused_mha")
@covers("jaxattn.bucketing", "bucket_tokens", "pad_tokens", "bucketed")
def test_fused_qkv_and_bucketed_lengths_equal_the_numpy_forward():
    params, _, _ = linen_run()
    p = params["MultiHeadAttention"]
    qkv = fused.fuse_qkv_params(p)
    names = ("W_query", "W_key", "W_value")
    np.testing.assert_array_equal(qkv["W_qkv"]["kernel"], np.concatenate([p[n]["kernel"] for n in names], axis=-1))
    np.testing.assert_array_equal(qkv["W_qkv"]["bias"], np.concatenate([p[n]["bias"] for n in names], axis=-1))

    assert bucketing.bucket_tokens(5) == 8 and bucketing.bucket_tokens(8) == 8
    assert (
        bucketing.bucket_tokens(130, policy="multiple") == 256
        and bucketing.bucket_tokens(5, policy="multiple", multiple=4) == 8
    )
    assert bucketing.bucket_tokens(5, policy="none") == 5 and bucketing.bucket_tokens(5, maximum=6) == 6
    for kwargs, message in (
        (dict(tokens=0), "tokens must be >= 1"),
        (dict(tokens=9, maximum=8), "exceeds maximum=8"),
        (dict(tokens=5, policy="multiple", multiple=0), "multiple must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            bucketing.bucket_tokens(**kwargs)
    padded = bucketing.pad_tokens(X4, 8)
    assert isinstance(padded, np.ndarray)  # numpy in, numpy out: no program per length
    np.testing.assert_array_equal(padded, np.concatenate([X4, np.zeros((B, 2, 4), F32)], axis=1))
    assert isinstance(bucketing.pad_tokens(jnp.asarray(X4), 6), jax.Array)
    with pytest.raises(ValueError, match="shorter than tokens"):
        bucketing.pad_tokens(X4, 5)

    apply = jax.jit(lambda x: fused.fused_mha(qkv, x, num_heads=2, impl="auto"))
    weights = [(p[n]["kernel"], p[n]["bias"]) for n in (*names, "out_proj")]
    want, bound = np_projected(X4, *weights, num_heads=2, causal=True)
    assert_within(bucketing.bucketed(apply)(X4), want, bound, "bucketed fused_mha (6 -> 8 tokens)")
    want, bound = np_projected(padded, *weights, num_heads=2, causal=True)
    assert_within(apply(padded), want, bound, "fused_mha")  # the same program: one compile for both
