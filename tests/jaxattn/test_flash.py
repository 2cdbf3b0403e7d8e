"""The Pallas flash kernel (jaxattn/kernels/flash.py), run in Pallas' interpreter on the CPU.

Forward and gradients (through its custom_vjp backward) against the naive kernel at
``highest`` precision, with blocks of 16 so every case crosses several query and key
blocks, a ragged tail, grouped kv heads and a value head dim of its own; masks (key
padding with rows that see nothing, full, shared), bias and its gradient (summed over the
axes it broadcasts along) and ``q_offset`` (static and traced). The GPU run of
the same kernel (compiled through Triton) is under the ``gpu`` marker.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import implementations
from jaxattn.kernels import flash
from jaxattn.kernels.naive import naive_attention
from jaxattn.tolerance import attention_bound, attention_grad_bound
from tests.host_cpu import on_the_host

HIGHEST = jax.lax.Precision.HIGHEST
SMALL_BLOCKS = dict(block_q=16, block_k=16, backward_blocks=(16, 16))

#: (batch, T, S, heads, kv_heads, head_dim, value_head_dim, causal): ragged tails (37 = 2 x 16 + 5),
#: grouped heads (4 query heads on 2 kv heads), T != S and Hv != H without causality.
CASES = [
    (2, 37, 37, 4, 2, 8, 8, True),
    (1, 20, 45, 2, 1, 16, 8, False),
]


#: Tests that run the compiled kernel where JAX's backend is a GPU (besides the ``gpu`` ones).
COMPILED = ("test_flash_off_the_gpu_is_a_value_error_naming_the_backend",)


@pytest.fixture(autouse=True)
def interpreted_on_the_host(request):
    """The interpreted kernel and its references run on the host CPU, on a GPU machine too: there the
    interpreter would launch a loop of tiny GPU programs (minutes for this file)."""
    if request.node.get_closest_marker("gpu") or request.node.originalname in COMPILED:
        yield
        return
    with on_the_host():
        yield


def qkv(case, seed=0, dtype=jnp.float32):
    batch, t, s, heads, kv_heads, head_dim, value_dim, _ = case
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(batch, t, heads, head_dim)), dtype),
        jnp.asarray(rng.normal(size=(batch, s, kv_heads, head_dim)), dtype),
        jnp.asarray(rng.normal(size=(batch, s, kv_heads, value_dim)), dtype),
    )


def run_flash(q, k, v, causal, mask=None, q_offset=0, bias=None, **kw):
    return flash.flash_attention(
        q, k, v, bias, mask, scale=q.shape[-1] ** -0.5, is_causal=causal, q_offset=q_offset, precision=HIGHEST,
        interpret=True, **SMALL_BLOCKS, **kw
    )[0]


def run_naive(q, k, v, causal, mask=None, q_offset=0, bias=None):
    return naive_attention(
        q, k, v, bias, mask, scale=q.shape[-1] ** -0.5, is_causal=causal, q_offset=q_offset, precision=HIGHEST
    )[0]


@pytest.mark.parametrize("case", CASES, ids=["causal-gqa-ragged", "cross-T!=S-Hv!=H"])
def test_forward_and_gradients_equal_the_naive_kernel(case):
    causal = case[-1]
    q, k, v = qkv(case)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(*q.shape[:3], v.shape[-1])), jnp.float32)

    def loss(attend):
        return lambda q, k, v: (attend(q, k, v, causal) * cotangent).sum()

    out = jax.jit(run_flash, static_argnums=3)(q, k, v, causal)
    expected = run_naive(q, k, v, causal)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=attention_bound(q, k, v, is_causal=causal), rtol=0)
    got = jax.jit(jax.grad(loss(run_flash), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(run_naive), argnums=(0, 1, 2))(q, k, v)
    bounds = attention_grad_bound(q, k, v, cotangent, is_causal=causal)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=bounds[name], rtol=0, err_msg=f"d loss / d {name}")


def masks(case, seed=2):
    """Key padding ``(B, 1, 1, S)`` (batch 0's last keys padded, batch 1 with none visible), a full
    ``(B, N, T, S)`` mask with one all-False row, and a ``(1, 1, T, S)`` one."""
    batch, t, s, heads = case[:4]
    rng = np.random.default_rng(seed)
    key_padding = np.ones((batch, 1, 1, s), bool)
    key_padding[0, ..., s - 7:] = False
    key_padding[-1] = False  # every query of the last batch row sees no key: zeros, zero gradients
    full = rng.random((batch, heads, t, s)) > 0.3
    full[0, 1, 3] = False
    return {
        "key-padding": jnp.asarray(key_padding),
        "full": jnp.asarray(full),
        "shared": jnp.asarray(rng.random((1, 1, t, s)) > 0.3),
    }


def assert_matches_naive(q, k, v, causal, mask=None, q_offset=0, traced_offset=False, bias=None, seed=1):
    """Forward and d/dq, dk, dv (and d/dbias) of the interpreted kernel (jitted; the offset an argument
    if traced) = naive's."""
    cotangent = jnp.asarray(np.random.default_rng(seed).normal(size=(*q.shape[:3], v.shape[-1])), jnp.float32)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 4)

    def loss(attend):
        return lambda q, k, v, offset, bias: (attend(q, k, v, causal, mask, offset, bias) * cotangent).sum()

    if traced_offset:  # one compiled kernel for every offset: a decode step's
        forward = jax.jit(lambda q, k, v, offset, bias: run_flash(q, k, v, causal, mask, offset, bias))
        grads = jax.jit(jax.grad(loss(run_flash), argnums=argnums))
        offset = jnp.int32(q_offset)
    else:
        forward = jax.jit(lambda q, k, v, _, bias: run_flash(q, k, v, causal, mask, q_offset, bias))
        grads = jax.jit(jax.grad(lambda q, k, v, _, bias: loss(run_flash)(q, k, v, q_offset, bias), argnums=argnums))
        offset = None
    out = forward(q, k, v, offset, bias)
    expected = run_naive(q, k, v, causal, mask, q_offset, bias)
    where = dict(bias=bias, mask=mask, is_causal=causal, q_offset=q_offset)
    np.testing.assert_allclose(out, expected, atol=attention_bound(q, k, v, **where), rtol=0)
    got = grads(q, k, v, offset, bias)
    want = jax.grad(loss(run_naive), argnums=argnums)(q, k, v, q_offset, bias)
    bounds = attention_grad_bound(q, k, v, cotangent, **where)
    for name, g, w in zip(("q", "k", "v", "bias"), got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=bounds[name], rtol=0, err_msg=f"d loss / d {name}")
    return out, got


MASK_CASE = (2, 21, 37, 4, 2, 8, 8, False)  # ragged T and S (neither a multiple of 16), grouped heads


@pytest.mark.parametrize("kind, causal, q_offset", [
    ("key-padding", False, 0), ("full", False, 0), ("shared", True, 16),
])
def test_masks_equal_the_naive_kernel(kind, causal, q_offset):
    q, k, v = qkv(MASK_CASE, seed=7)
    mask = masks(MASK_CASE)[kind]
    out, (dq, dk, dv) = assert_matches_naive(q, k, v, causal, mask, q_offset)
    if kind == "key-padding":  # the batch row with no visible key: zeros out, zero gradients (naive agrees)
        assert not bool(out[-1].any()) and not bool(dq[-1].any()) and not bool(dk[-1].any())
        assert bool(out[0].all())
    if kind == "full":
        assert not bool(out[0, 3, 1].any()) and bool(out[0, 3, 0].all())


@pytest.mark.parametrize("q_offset, traced", [(16, False), (5, True), (-3, True)])
def test_q_offset_static_and_traced_with_grouped_heads(q_offset, traced):
    """Causal with the diagonal shifted (a chunk after a cache); -3: the first three queries see no key."""
    q, k, v = qkv(MASK_CASE, seed=8)
    out, _ = assert_matches_naive(q, k, v, True, q_offset=q_offset, traced_offset=traced)
    if q_offset < 0:
        assert not bool(out[:, :3].any()) and bool(out[:, 3:].all())


def test_one_compiled_kernel_serves_every_traced_offset():
    q, k, v = qkv(MASK_CASE, seed=9)
    forward = jax.jit(lambda q, k, v, offset: run_flash(q, k, v, True, q_offset=offset))
    for offset in (0, 7, 16):
        np.testing.assert_allclose(forward(q, k, v, jnp.int32(offset)), run_naive(q, k, v, True, q_offset=offset),
                                   atol=attention_bound(q, k, v, is_causal=True, q_offset=offset), rtol=0)
    assert forward._cache_size() == 1


def test_causal_block_skipping_follows_the_offset():
    """q_offset 16: the first query block (positions 16..31) must not read NaN keys from token 32 on."""
    q, k, v = qkv((1, 32, 64, 2, 2, 8, 8, True), seed=10)
    k_nan, v_nan = k.at[:, 32:].set(jnp.nan), v.at[:, 32:].set(jnp.nan)
    out = jax.jit(lambda *a: run_flash(*a, True, q_offset=16))(q, k_nan, v_nan)
    np.testing.assert_allclose(out[:, :16], run_naive(q[:, :16], k[:, :32], v[:, :32], True, q_offset=16),
                               atol=attention_bound(q[:, :16], k[:, :32], v[:, :32], is_causal=True, q_offset=16),
                               rtol=0)
    assert bool(jnp.isnan(out[:, 16:]).all())  # the second block does read them: the test can see a leak
    dq = jax.jit(jax.grad(lambda q: run_flash(q, k_nan, v_nan, True, q_offset=16)[:, :16].sum()))(q)
    assert bool(jnp.isfinite(dq[:, :16]).all())  # the dq kernel stops at the shifted diagonal too


def test_a_key_padding_mask_reaches_the_kernels_unbroadcast():
    """Every pallas_call (forward, dq, dk/dv) gets the (B, 1, 1, S') mask, never a (B, N, T, S)-sized copy."""
    q, k, v = qkv(MASK_CASE, seed=11)
    mask = masks(MASK_CASE)["key-padding"]
    jaxpr = jax.make_jaxpr(jax.grad(lambda q: run_flash(q, k, v, False, mask).sum()))(q)
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                shapes.append([tuple(x.aval.shape) for x in eqn.invars])
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr.jaxpr)
    assert len(shapes) == 3, shapes
    for call_shapes in shapes:
        assert (2, 1, 1, 48) in call_shapes  # S = 37 padded to whole blocks of 16
        assert not any(len(sh) == 4 and sh[1:] == (4, 32, 48) for sh in call_shapes)


@pytest.mark.parametrize("shape, mask_kind, causal, q_offset", [
    ((2, 4, 21, 37), None, False, 0),  # a bias per (batch, head, query, key)
    ((1, 1, 21, 37), None, True, 16),  # shared (an ALiBi-like position bias): dbias sums batches and heads
    ((2, 1, 1, 37), "key-padding", False, 0),  # per key: dbias sums heads and queries; a batch row sees nothing
    ((1, 4, 1, 37), "full", False, 0),  # per head and key: dbias sums batches and queries
])
def test_bias_and_its_gradient_equal_the_naive_kernel(shape, mask_kind, causal, q_offset):
    q, k, v = qkv(MASK_CASE, seed=12)
    bias = jnp.asarray(np.random.default_rng(13).normal(size=shape), jnp.float32)
    mask = None if mask_kind is None else masks(MASK_CASE)[mask_kind]
    _, grads = assert_matches_naive(q, k, v, causal, mask, q_offset, bias=bias)
    assert float(jnp.abs(grads[3]).max()) > 1e-2  # a gradient that is there, not zeros on both sides
    if mask_kind == "key-padding":
        assert not bool(grads[3][1].any())  # the batch row with no visible key: no gradient reaches its bias


def test_dropout_is_a_value_error():
    q = jnp.ones((1, 8, 2, 8))
    with pytest.raises(ValueError, match="no dropout"):
        flash.flash_attention(q, q, q, scale=1.0, dropout_rate=0.1, interpret=True)


def test_bfloat16_stays_within_the_bf16_budget():
    """bf16 in, float32 softmax and accumulation inside: within bf16's budget of float32 on the same inputs."""
    case = CASES[0]
    q, k, v = qkv(case, seed=3, dtype=jnp.bfloat16)
    out = jax.jit(run_flash, static_argnums=3)(q, k, v, True)
    assert out.dtype == jnp.bfloat16
    exact = run_naive(*(x.astype(jnp.float32) for x in (q, k, v)), True)
    err = float(jnp.abs(out.astype(jnp.float32) - exact).max())
    assert err <= 4e-2 * max(1.0, float(jnp.abs(exact).max())), err  # crosscheck's ("flax", "bfloat16") row
    assert err > 0.0  # it did compute in bf16
    grads = jax.jit(jax.grad(lambda q, k, v: run_flash(q, k, v, True).astype(jnp.float32).sum(), argnums=(0, 1, 2)))(
        q, k, v)
    exact_grads = jax.grad(lambda *a: run_naive(*a, True).sum(), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, g, w in zip("qkv", grads, exact_grads):
        assert g.dtype == jnp.bfloat16, name
        err = float(jnp.abs(g.astype(jnp.float32) - w).max())
        assert err <= 4e-2 * max(1.0, float(jnp.abs(w).max())), f"d/d{name}: {err}"


def test_causal_blocks_above_the_diagonal_are_never_read():
    """NaN keys and values from token 16 on: the first query block (16 queries) must not touch them.

    Computing a future block and masking it would not do: ``0 * NaN`` in ``p @ v`` is NaN.
    """
    q, k, v = qkv((1, 48, 48, 2, 2, 8, 8, True), seed=4)
    k_nan, v_nan = k.at[:, 16:].set(jnp.nan), v.at[:, 16:].set(jnp.nan)
    out = jax.jit(run_flash, static_argnums=3)(q, k_nan, v_nan, True)
    np.testing.assert_allclose(out[:, :16], run_naive(q[:, :16], k[:, :16], v[:, :16], True),
                               atol=attention_bound(q[:, :16], k[:, :16], v[:, :16], is_causal=True), rtol=0)
    assert bool(jnp.isnan(out[:, 16:]).all())  # the later blocks do read the NaNs: the test can see a leak
    dq = jax.jit(jax.grad(lambda q: run_flash(q, k_nan, v_nan, True)[:, :16].sum()))(q)
    assert bool(jnp.isfinite(dq[:, :16]).all())


def test_block_sizes_must_be_powers_of_two():
    q = jnp.ones((1, 8, 1, 8))
    with pytest.raises(ValueError, match="block_q must be powers of two >= 16, got 48"):
        flash.flash_attention(q, q, q, scale=1.0, block_q=48, interpret=True)
    with pytest.raises(ValueError, match="backward_blocks must be powers of two >= 16, got 8"):
        flash.flash_attention(q, q, q, scale=1.0, backward_blocks=(8, 16), interpret=True)


def test_key_blocks_seen_stops_at_the_diagonal():
    assert flash._key_blocks_seen(16, 16, 4, causal=True) == 1
    assert flash._key_blocks_seen(17, 16, 4, causal=True) == 2
    assert flash._key_blocks_seen(64, 16, 3, causal=True) == 3  # never past the last block
    assert flash._key_blocks_seen(16, 16, 4, causal=False) == 4


def test_through_dot_product_attention_and_edges():
    """The table's call path (validation, layout, grouped heads) into the interpreted kernel; 0-token edges."""
    interpreted = functools.partial(flash.flash_attention, interpret=True, **SMALL_BLOCKS)
    implementations.register(implementations.Implementation(
        "flash-interpret", interpreted, mixed_dtypes=False,
    ))
    try:
        q, k, v = qkv(CASES[0], seed=5)
        with jax.default_matmul_precision("highest"):
            got = jaxattn.dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation="flash-interpret")
            want = jaxattn.dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation="naive")
            bound = attention_bound(q[0], k[0], v[0], is_causal=True)
            np.testing.assert_allclose(got, want, atol=bound, rtol=0)  # unbatched (T, N, H) too
            mask = jnp.arange(37)[None, :] < jnp.array([30, 0])[:, None]  # (B, S) lengths; batch 1 sees nothing
            tail = q[:, 3:]  # the queries at positions 3 .. 36: q_offset + T must stay <= S
            got, want = (
                jaxattn.dot_product_attention(tail, k, v, mask=mask[:, None, None, :], q_offset=3, is_causal=True,
                                              implementation=impl)
                for impl in ("flash-interpret", "naive")
            )
        bound = attention_bound(tail, k, v, mask=mask[:, None, None, :], q_offset=3, is_causal=True)
        np.testing.assert_allclose(got, want, atol=bound, rtol=0)
        assert not bool(got[1].any())
        empty = jaxattn.dot_product_attention(q[:, :0], k, v, implementation="flash-interpret")
        assert empty.shape == (2, 0, 4, 8)
        no_keys = jaxattn.dot_product_attention(q, k[:, :0], v[:, :0], implementation="flash-interpret")
        assert no_keys.shape == (2, 37, 4, 8) and not bool(no_keys.any())
        with pytest.raises(ValueError, match="'flash-interpret' cannot serve this call: it does not support dropout"):
            jaxattn.dot_product_attention(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0),
                                          implementation="flash-interpret")
    finally:
        implementations.unregister("flash-interpret")


def test_flash_off_the_gpu_is_a_value_error_naming_the_backend():
    q = jnp.ones((1, 4, 2, 8))
    backend = jax.default_backend()
    if backend == "gpu":  # there it runs (compared with naive below)
        assert jaxattn.dot_product_attention(q, q, q, implementation="flash").shape == (1, 4, 2, 8)
        return
    with pytest.raises(ValueError, match=f"'flash' cannot serve this call: it runs on gpu, not on {backend}"):
        jaxattn.dot_product_attention(q, q, q, implementation="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_on_the_gpu_equals_naive(dtype):
    """The Triton-compiled kernel, default blocks, 1000 tokens: forward and gradients against naive."""
    q, k, v = qkv((2, 1000, 1000, 8, 2, 64, 64, True), seed=6, dtype=jnp.dtype(dtype))
    # float32: the derived bounds; bfloat16: crosscheck's ("flax", "bfloat16") row, 4e-2 x max(1, |ref|).
    f32 = [np.asarray(a, np.float32) for a in (q, k, v)]
    tol = attention_bound(*f32, is_causal=True) if dtype == "float32" else 4e-2
    grad_tols = (attention_grad_bound(*f32, np.ones((2, 1000, 8, 64)), is_causal=True) if dtype == "float32"
                 else dict.fromkeys("qkv", 4e-2))

    def attend(impl):
        return lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                                             precision="highest")

    np.testing.assert_allclose(
        np.asarray(jax.jit(attend("flash"))(q, k, v), np.float32),
        np.asarray(attend("naive")(q, k, v), np.float32), atol=tol, rtol=0,
    )
    got = jax.jit(jax.grad(lambda *a: attend("flash")(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: attend("naive")(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = 1.0 if dtype == "float32" else max(1.0, np.abs(w).max())
        assert np.abs(g - w).max() <= grad_tols[name] * scale, (name, np.abs(g - w).max(), grad_tols[name] * scale)


@pytest.mark.gpu
def test_compiled_on_the_gpu_with_mask_bias_and_traced_offset_equals_naive():
    """Triton-compiled, default blocks: a key-padding mask, a shared bias (and its gradient), a traced q_offset."""
    q, k, v = qkv((2, 500, 1000, 8, 2, 64, 64, True), seed=14)
    rng = np.random.default_rng(15)
    mask = jnp.asarray(np.arange(1000)[None, None, None, :] < np.array([900, 1000])[:, None, None, None])
    bias = jnp.asarray(rng.normal(size=(1, 1, 500, 1000)), jnp.float32)

    def attend(impl):
        return lambda q, k, v, bias, offset: jaxattn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, is_causal=True, q_offset=offset, implementation=impl, precision="highest")

    offset = jnp.int32(500)
    where = dict(bias=bias, mask=mask, is_causal=True, q_offset=500)
    np.testing.assert_allclose(jax.jit(attend("flash"))(q, k, v, bias, offset), attend("naive")(q, k, v, bias, 500),
                               atol=attention_bound(q, k, v, **where), rtol=0)
    got = jax.jit(jax.grad(lambda *a: attend("flash")(*a).sum(), argnums=(0, 1, 2, 3)))(q, k, v, bias, offset)
    want = jax.grad(lambda *a: attend("naive")(*a).sum(), argnums=(0, 1, 2, 3))(q, k, v, bias, 500)
    bounds = attention_grad_bound(q, k, v, np.ones((2, 500, 8, 64)), **where)
    for name, g, w in zip(("q", "k", "v", "bias"), got, want):
        err = np.abs(np.asarray(g) - np.asarray(w)).max()
        assert err <= bounds[name], f"d/d{name}: max |diff| {err:.3g} > derived bound {bounds[name]:.3g}"
