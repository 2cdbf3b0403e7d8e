"""The Pallas flash kernel (jaxattn/kernels/flash.py), run in Pallas' interpreter on the CPU.

Forward and gradients (through its custom_vjp backward) against the naive kernel at
``highest`` precision, with blocks of 16 so every case crosses several query and key
blocks, a ragged tail, grouped kv heads and a value head dim of its own. The GPU run of
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

HIGHEST = jax.lax.Precision.HIGHEST
SMALL_BLOCKS = dict(block_q=16, block_k=16, backward_blocks=(16, 16))

#: (batch, T, S, heads, kv_heads, head_dim, value_head_dim, causal): ragged tails (37 = 2 x 16 + 5),
#: grouped heads (4 query heads on 2 kv heads), T != S and Hv != H without causality.
CASES = [
    (2, 37, 37, 4, 2, 8, 8, True),
    (1, 20, 45, 2, 1, 16, 8, False),
]


def qkv(case, seed=0, dtype=jnp.float32):
    batch, t, s, heads, kv_heads, head_dim, value_dim, _ = case
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(batch, t, heads, head_dim)), dtype),
        jnp.asarray(rng.normal(size=(batch, s, kv_heads, head_dim)), dtype),
        jnp.asarray(rng.normal(size=(batch, s, kv_heads, value_dim)), dtype),
    )


def run_flash(q, k, v, causal, **kw):
    return flash.flash_attention(
        q, k, v, scale=q.shape[-1] ** -0.5, is_causal=causal, precision=HIGHEST, interpret=True, **SMALL_BLOCKS, **kw
    )[0]


def run_naive(q, k, v, causal):
    return naive_attention(q, k, v, scale=q.shape[-1] ** -0.5, is_causal=causal, precision=HIGHEST)[0]


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
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    got = jax.jit(jax.grad(loss(run_flash), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(run_naive), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"d loss / d {name}")


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
    np.testing.assert_allclose(out[:, :16], run_naive(q[:, :16], k[:, :16], v[:, :16], True), atol=1e-5, rtol=0)
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
        "flash-interpret", interpreted, mask=False, bias=False, q_offset=False, mixed_dtypes=False,
    ))
    try:
        q, k, v = qkv(CASES[0], seed=5)
        with jax.default_matmul_precision("highest"):
            got = jaxattn.dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation="flash-interpret")
            want = jaxattn.dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation="naive")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # unbatched (T, N, H) too
        empty = jaxattn.dot_product_attention(q[:, :0], k, v, implementation="flash-interpret")
        assert empty.shape == (2, 0, 4, 8)
        no_keys = jaxattn.dot_product_attention(q, k[:, :0], v[:, :0], implementation="flash-interpret")
        assert no_keys.shape == (2, 37, 4, 8) and not bool(no_keys.any())
        with pytest.raises(ValueError, match="'flash-interpret' cannot serve this call: it does not support a mask"):
            jaxattn.dot_product_attention(q, k, v, mask=jnp.ones((37, 37), bool), implementation="flash-interpret")
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
    tol = 1e-5 if dtype == "float32" else 4e-2

    def attend(impl):
        return lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                                             precision="highest")

    np.testing.assert_allclose(
        np.asarray(jax.jit(attend("flash"))(q, k, v), np.float32),
        np.asarray(attend("naive")(q, k, v), np.float32), atol=tol, rtol=0,
    )
    got = jax.jit(jax.grad(lambda *a: attend("flash")(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: attend("naive")(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.abs(g - w).max() <= tol * max(1.0, np.abs(w).max())
