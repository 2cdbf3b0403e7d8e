"""``jaxattn.dot_product_attention`` against ``jax.nn.dot_product_attention``, for every implementation.

Every comparison runs under ``jax.default_matmul_precision("highest")``: on a GPU,
float32 matmuls default to TF32, and the derived float32 bounds (jaxattn.tolerance) are only
meaningful in full float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import jaxattn
from jaxattn import implementations
from jaxattn.tolerance import SOFTMAX_OPS, attention_bound, attention_grad_bound, gamma

IMPLS = ("naive", "blockwise", "xla")
HIGHEST = functools.partial(jax.default_matmul_precision, "highest")


@st.composite
def calls(draw):
    """A random attention call: grouped heads, causal or not, mask, bias, T <= S with q_offset."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8]))
    kv_tokens = draw(st.integers(1, 40))
    q_tokens = draw(st.integers(1, kv_tokens))
    q_offset = draw(st.sampled_from([0, kv_tokens - q_tokens]))
    is_causal = draw(st.booleans())
    mask_shape = draw(st.sampled_from([None, (batch, 1, 1, kv_tokens), (batch, heads, q_tokens, kv_tokens), (q_tokens, kv_tokens)]))
    bias_shape = draw(st.sampled_from([None, (1, heads, q_tokens, kv_tokens), (batch, 1, 1, kv_tokens)]))
    seed = draw(st.integers(0, 2**16))
    return dict(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, q_tokens=q_tokens,
                kv_tokens=kv_tokens, q_offset=q_offset, is_causal=is_causal, mask_shape=mask_shape,
                bias_shape=bias_shape, seed=seed)


def arrays(c):
    rng = np.random.default_rng(c["seed"])
    q = rng.normal(size=(c["batch"], c["q_tokens"], c["heads"], c["head_dim"])).astype(np.float32)
    k, v = (rng.normal(size=(c["batch"], c["kv_tokens"], c["kv_heads"], c["head_dim"])).astype(np.float32) for _ in "kv")
    mask = None if c["mask_shape"] is None else rng.random(c["mask_shape"]) < 0.7
    bias = None if c["bias_shape"] is None else rng.normal(size=c["bias_shape"]).astype(np.float32)
    return tuple(None if a is None else jnp.asarray(a) for a in (q, k, v, bias, mask))


def reference(q, k, v, bias, mask, c):
    """jax.nn with q_offset written as an explicit mask (jax.nn's is_causal is q_offset=0)."""
    full_mask, is_causal = mask, c["is_causal"]
    if is_causal and c["q_offset"]:
        causal = jaxattn.masks.make_offset_causal_mask(c["q_tokens"], c["kv_tokens"], c["q_offset"])
        full_mask = causal if mask is None else mask & causal
        is_causal = False
    return jax.nn.dot_product_attention(q, k, v, bias, full_mask, is_causal=is_causal, implementation="xla")


def seen_rows(mask, c):
    """(B, T, N): rows with at least one visible key. In numpy: no eager JAX op to compile per example shape."""
    visible = np.ones((1, 1, c["q_tokens"], c["kv_tokens"]), bool) if mask is None else np.asarray(mask)
    visible = visible.reshape((1,) * (4 - visible.ndim) + visible.shape)
    if c["is_causal"]:  # make_offset_causal_mask: query i sees key j <= q_offset + i
        visible = visible & (np.arange(c["kv_tokens"]) <= c["q_offset"] + np.arange(c["q_tokens"])[:, None])
    seen = np.broadcast_to(visible.any(-1), (c["batch"], c["heads"], c["q_tokens"]))
    return seen.swapaxes(1, 2)


def ours(impl, c):
    def fn(q, k, v, bias, mask):
        return jaxattn.dot_product_attention(
            q, k, v, bias, mask, is_causal=c["is_causal"], q_offset=c["q_offset"], implementation=impl
        )
    return fn


#: Everything at once: grouped heads, causal with an offset, a per-head mask and a bias.
EVERYTHING = dict(batch=2, heads=4, kv_heads=2, head_dim=4, q_tokens=5, kv_tokens=13, q_offset=8, is_causal=True,
                  mask_shape=(2, 4, 5, 13), bias_shape=(1, 4, 5, 13), seed=11)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=calls())
@example(c=EVERYTHING)
def test_forward_matches_jax_nn(impl, c):
    q, k, v, bias, mask = arrays(c)
    with HIGHEST():  # jitted: one compilation per example, not one per eager op (3-4x faster here)
        out = np.asarray(jax.jit(ours(impl, c))(q, k, v, bias, mask))
        expected = np.asarray(jax.jit(lambda *a: reference(*a, c))(q, k, v, bias, mask))
    seen = seen_rows(mask, c)
    assert out.shape == expected.shape == (c["batch"], c["q_tokens"], c["heads"], c["head_dim"])
    assert np.isfinite(out).all()
    where = dict(bias=bias, mask=mask, is_causal=c["is_causal"], q_offset=c["q_offset"])
    np.testing.assert_allclose(out[seen], expected[seen], atol=attention_bound(q, k, v, **where), rtol=0)
    assert np.all(out[~seen] == 0.0), "a row with no visible key must give zeros"


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=calls())
@example(c=EVERYTHING)
def test_gradients_match_jax_nn(impl, c):
    q, k, v, bias, mask = arrays(c)
    seen = seen_rows(mask, c)[..., None]
    cotangent = np.random.default_rng(c["seed"] + 1).normal(size=q.shape).astype(np.float32)
    # Rows with no visible key differ by contract (zeros here, the mean of the values in jax.nn): no weight on them.
    cotangent = jnp.asarray(np.where(seen, cotangent, np.float32(0.0)))

    def loss(fn):
        return lambda q, k, v, bias: (fn(q, k, v, bias, mask) * cotangent).sum()

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    with HIGHEST():
        got = jax.jit(jax.grad(loss(ours(impl, c)), argnums))(q, k, v, bias)
        expected = jax.jit(jax.grad(loss(lambda *a: reference(*a, c)), argnums))(q, k, v, bias)
    where = dict(bias=bias, mask=mask, is_causal=c["is_causal"], q_offset=c["q_offset"])
    bounds = attention_grad_bound(q, k, v, cotangent, **where)
    for name, g, e in zip(("q", "k", "v", "bias"), got, expected):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, e, atol=bounds[name], rtol=0, err_msg=f"d loss / d {name} ({impl})")


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_give_zeros_and_finite_gradients(impl):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 4)).astype(np.float32)) for _ in range(3))
    mask = np.ones((2, 1, 5, 5), bool)
    mask[0, :, 1, :] = False  # batch 0, query 1 sees nothing
    mask[1] = False  # batch 1 sees nothing at all
    bias = np.zeros((2, 2, 5, 5), np.float32)
    bias[0, 1, 3, :] = -np.inf  # batch 0, head 1, query 3: masked by an additive -inf bias
    args = (q, k, v, jnp.asarray(bias), jnp.asarray(mask))
    fn = functools.partial(jaxattn.dot_product_attention, implementation=impl)
    out = np.asarray(jax.jit(fn)(*args))  # jitted, as the rest of the file: one program, not one per operation
    assert np.all(out[0, 1] == 0) and np.all(out[1] == 0) and np.all(out[0, 3, 1] == 0)
    assert np.all(out[0, 3, 0] != 0) and np.all(out[0, 0] != 0)
    grads = jax.jit(jax.grad(lambda q, k, v, bias, mask: fn(q, k, v, bias, mask).sum(), (0, 1, 2)))(*args)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_naive_matches_hand_computed_grouped_heads():
    """Two query heads read one kv head: both see the same keys, weights computed by hand."""
    q = jnp.asarray([[[[1.0, 0.0], [0.0, 1.0]]]])  # (1, T=1, N=2, H=2)
    k = jnp.asarray([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, S=2, K=1, H=2)
    v = jnp.asarray([[[[10.0, 0.0]], [[0.0, 10.0]]]])
    naive = functools.partial(jaxattn.core.attention_with_weights, scale=1.0, implementation="naive")
    out, weights = (np.asarray(a) for a in jax.jit(naive)(q, k, v))
    e = np.exp(1.0)
    # Exact values (float64) against float32 ops on exact inputs: a softmax's roundings over 2 keys, then
    # a 2-term weighted sum (jaxattn.tolerance.SOFTMAX_OPS counts the softmax's).
    weights_rtol, out_rtol = gamma(SOFTMAX_OPS + 2), gamma(SOFTMAX_OPS + 4)
    np.testing.assert_allclose(weights[0, :, 0], [[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]],
                               rtol=weights_rtol)
    np.testing.assert_allclose(out[0, 0], [[10 * e / (e + 1), 10 / (e + 1)], [10 / (e + 1), 10 * e / (e + 1)]],
                               rtol=out_rtol)


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_q_offset_under_jit(impl):
    """A KV cache's offset is a traced scalar: one compiled function serves every offset."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 2, 2, 4)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(1, 9, 2, 4)).astype(np.float32)) for _ in "kv")
    fn = jax.jit(lambda q, k, v, off: jaxattn.dot_product_attention(q, k, v, is_causal=True, q_offset=off, implementation=impl))
    for offset in (0, 3, 7):
        c = dict(is_causal=True, q_offset=offset, q_tokens=2, kv_tokens=9)
        with HIGHEST():
            expected = jax.jit(lambda q, k, v: reference(q, k, v, None, None, c))(q, k, v)
            bound = attention_bound(q, k, v, is_causal=True, q_offset=offset)
            np.testing.assert_allclose(fn(q, k, v, jnp.int32(offset)), expected, atol=bound, rtol=0)


def test_unbatched_rank3_like_jax_nn():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.normal(size=(6, 2, 4)).astype(np.float32)) for _ in range(3))
    with HIGHEST():
        expected = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True))(q, k, v)
        for impl in IMPLS:
            fn = functools.partial(jaxattn.dot_product_attention, is_causal=True, implementation=impl)
            np.testing.assert_allclose(jax.jit(fn)(q, k, v), expected, atol=attention_bound(q, k, v, is_causal=True),
                                       rtol=0)


def test_auto_picks_by_length_and_dropout():
    def picked(tokens, **kw):
        call = implementations.Call(
            platform="cpu", dtype="float32", batch=1, q_tokens=tokens, kv_tokens=tokens, heads=2, kv_heads=2,
            head_dim=8, value_head_dim=8, has_mask=False, has_bias=False, is_causal=True, q_offset=False,
            dropout=False, same_dtypes=True,
        )
        return implementations.select(None, implementations.Call(**{**call.__dict__, **kw})).name

    assert picked(255) == "naive"
    assert picked(implementations.AUTO_BLOCKWISE_MIN_TOKENS) == "blockwise"
    assert picked(4096, dropout=True) == "naive"  # only naive has the weights to drop


def test_explicit_choice_that_cannot_serve_names_implementation_and_reason(without_typecheck):
    q = jnp.ones((1, 3, 2, 4))
    v_wide = jnp.ones((1, 3, 2, 6))
    with pytest.raises(ValueError, match=r"'xla' cannot serve this call: .*value head_dim \(6\) other than the query's \(4\)"):
        jaxattn.dot_product_attention(q, q, v_wide, implementation="xla")
    with pytest.raises(ValueError, match=r"'blockwise' cannot serve this call: .*dropout"):
        jaxattn.dot_product_attention(q, q, q, implementation="blockwise", dropout_rate=0.5, dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash3'; known: naive, blockwise, xla, flash, cudnn"):
        jaxattn.dot_product_attention(q, q, q, implementation="flash3")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (((1, 3, 3, 4), (1, 3, 2, 4), (1, 3, 2, 4)), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
        (((1, 3, 2, 4), (1, 3, 2, 5), (1, 3, 2, 5)), r"share head_dim"),
        (((1, 3, 2, 4), (1, 4, 2, 4), (1, 3, 2, 4)), r"key and value must agree"),
        (((3, 2, 4), (1, 3, 2, 4), (1, 3, 2, 4)), r"must all be"),
    ],
)
def test_bad_shapes_are_named(args, pattern, without_typecheck):
    with pytest.raises(ValueError, match=pattern):
        jaxattn.dot_product_attention(*(jnp.ones(s) for s in args))


def test_bad_mask_and_bias_are_named(without_typecheck):
    q = jnp.ones((2, 3, 2, 4))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 3, 4\) does not broadcast to .* = \(2, 2, 3, 3\)"):
        jaxattn.dot_product_attention(q, q, q, mask=jnp.ones((3, 4), bool))
    with pytest.raises(ValueError, match="mask must be boolean"):
        jaxattn.dot_product_attention(q, q, q, mask=jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="q_offset must be >= 0, got -1"):
        jaxattn.dot_product_attention(q, q, q, is_causal=True, q_offset=-1)


def test_a_registered_implementation_is_chosen_by_name_and_by_auto():
    calls_seen = []

    def mine(query, key, value, bias, mask, **kw):
        calls_seen.append(kw["is_causal"])
        return implementations.get("naive").kernel(query, key, value, bias, mask, **kw)

    implementations.register(implementations.Implementation("mine", mine, auto=lambda call: 99.0))
    try:
        q = jnp.asarray(np.random.default_rng(5).normal(size=(1, 4, 2, 4)).astype(np.float32))
        with pytest.raises(ValueError, match="already registered"):
            implementations.register(implementations.Implementation("mine", mine))
        out = jaxattn.dot_product_attention(q, q, q, is_causal=True)  # auto: the highest score
        naive = jaxattn.dot_product_attention(q, q, q, is_causal=True, implementation="naive")
        np.testing.assert_allclose(out, naive, atol=attention_bound(q, q, q, is_causal=True), rtol=0)
        jaxattn.dot_product_attention(q, q, q, implementation="mine")
        assert calls_seen == [True, False]
    finally:
        implementations.unregister("mine")
    assert "mine" not in implementations.names()


@pytest.mark.xla_optimized
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 6, 1, 2), (2, 40, 2, 8), (2, 300, 2, 8)])
def test_huge_finite_inputs_give_finite_outputs(impl, shape):
    """At inputs x1e5 the scores reach ~1e10; ``logits * scale - max`` fused into one FMA under jit made
    ``exp(512) = inf`` and NaN ((1, 6, 1, 2) did so through jax.nn before the kernels scaled the queries)."""
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.normal(size=shape).astype(np.float32) * 1e5) for _ in range(3))
    fn = jax.jit(lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))
    assert np.isfinite(np.asarray(fn(q, k, v))).all()
