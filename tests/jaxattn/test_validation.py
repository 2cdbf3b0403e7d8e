"""Hostile input: the modules validate their fields as the CLI does, and every implementation agrees on edge shapes.

* A dropout outside ``[0, 1)`` (or NaN) and a non-positive size raise ``ValueError`` naming the
  field and the value, once per trace (the fields are static), never per jitted call.
* ``T = 0`` queries, ``S = 0`` keys and ``T = S = 1``: naive, blockwise and xla return the same
  empty / zero / value arrays, as :func:`jaxattn.dot_product_attention` documents.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import base, checks, core
from jaxattn.attention import attention_with_weights
from jaxattn.gqa import RMSNorm
from jaxattn.kernels.blockwise import blockwise_causal_attention, general_blockwise_attention
from jaxattn.tolerance import attention_bound, attention_error
from tests.bounds import check_layer

KEY = jax.random.key(0)
IMPLS = ("naive", "blockwise", "xla")
# Where a test is not about a call's Python-side checks, it runs jitted: one program per shape, not one per
# operation (slow to compile on a GPU).


def init_shapes(module, x):
    """``module.init`` traced, not run: the checks happen at trace time."""
    return jax.eval_shape(module.init, KEY, x)


# --- configuration: dropout and sizes -------------------------------------------------------------

BAD_DROPOUT = [-0.5, math.nan, 1.0, 1.5]


def _dropout_modules(rate):
    return [
        jaxattn.CausalAttention(4, 4, 8, rate),
        jaxattn.MultiHeadAttentionWrapper(4, 4, 8, rate, 2),
        jaxattn.MultiHeadAttention(4, 4, 8, rate, 2),
        jaxattn.MultiHeadAttentionCombinedQKV(4, 4, 2, 8, rate),
        jaxattn.TorchMultiheadAttention(4, 2, rate),
    ]


@pytest.mark.parametrize("rate", BAD_DROPOUT)
@pytest.mark.parametrize("index", range(5))
def test_dropout_outside_unit_interval_names_field_and_value(rate, index):
    module = _dropout_modules(rate)[index]
    pattern = rf"^{type(module).__name__}: dropout={rate!r} must be in \[0, 1\)"
    with pytest.raises(ValueError, match=pattern):
        init_shapes(module, jnp.ones((1, 3, 4)))


def test_the_issues_negative_dropout_no_longer_rescales_in_training():
    module = jaxattn.CausalAttention(4, 2, 8, -0.5)
    with pytest.raises(ValueError, match=r"CausalAttention: dropout=-0\.5 must be in \[0, 1\)"):
        module.init(KEY, jnp.ones((1, 3, 4)))


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.999])
def test_dropout_inside_unit_interval_is_accepted(rate):
    x = np.ones((1, 3, 4), np.float32)
    for module in _dropout_modules(rate):
        variables = jax.jit(module.init)(KEY, x)
        train = jax.jit(lambda v, x, rng: module.apply(v, x, deterministic=False, rngs={"dropout": rng}))
        out = train(variables, x, KEY)
        assert out.shape[:2] == (1, 3)
        assert np.isfinite(np.asarray(out)).all()


SIZE_CASES = [
    (jaxattn.SelfAttentionV1(0, 2), (3, 4), "SelfAttentionV1: d_in=0 must be a positive integer"),
    (jaxattn.SelfAttentionV1(4, -2), (3, 4), "SelfAttentionV1: d_out=-2 must be a positive integer"),
    (jaxattn.SelfAttentionV2(4, 0), (3, 4), "SelfAttentionV2: d_out=0 must be a positive integer"),
    (jaxattn.CausalAttention(4, 0, 8, 0.0), (1, 3, 4), "CausalAttention: d_out=0 must be a positive integer"),
    (jaxattn.CausalAttention(4, 2, 0, 0.0), (1, 0, 4), "CausalAttention: context_length=0 must be a positive integer"),
    (jaxattn.CausalAttention(-4, 2, 8, 0.0), (1, 3, 4), "CausalAttention: d_in=-4 must be a positive integer"),
    (jaxattn.MultiHeadAttentionWrapper(4, 2, 8, 0.0, 0), (1, 3, 4),
     "MultiHeadAttentionWrapper: num_heads=0 must be a positive integer"),
    (jaxattn.MultiHeadAttentionWrapper(4, -2, 8, 0.0, 2), (1, 3, 4),
     "MultiHeadAttentionWrapper: d_out=-2 must be a positive integer"),
    # The reported case: -4 % 2 == 0, so this reached a reshape and a TypeError.
    (jaxattn.MultiHeadAttention(4, -4, 8, 0.0, 2), (1, 3, 4), "MultiHeadAttention: d_out=-4 must be a positive integer"),
    (jaxattn.MultiHeadAttention(4, 4, 8, 0.0, 0), (1, 3, 4), "MultiHeadAttention: num_heads=0 must be a positive integer"),
    (jaxattn.MultiHeadAttention(4, 4, 8, 0.0, -2), (1, 3, 4), "MultiHeadAttention: num_heads=-2 must be a positive integer"),
    (jaxattn.MultiHeadAttentionCombinedQKV(4, 4, 2, 0), (1, 0, 4),
     "MultiHeadAttentionCombinedQKV: context_length=0 must be a positive integer"),
    (jaxattn.MultiHeadAttentionCombinedQKV(4, 4, 0, 8), (1, 3, 4),
     "MultiHeadAttentionCombinedQKV: num_heads=0 must be a positive integer"),
    (jaxattn.TorchMultiheadAttention(-4, 2), (1, 3, 4), "TorchMultiheadAttention: embed_dim=-4 must be a positive integer"),
    (jaxattn.TorchMultiheadAttention(4, 0), (1, 3, 4), "TorchMultiheadAttention: num_heads=0 must be a positive integer"),
    (jaxattn.GroupedQueryAttention(8, 2, 0), (1, 3, 8), "GroupedQueryAttention: num_kv_groups=0 must be a positive integer"),
    (jaxattn.GroupedQueryAttention(8, 0, 1), (1, 3, 8), "GroupedQueryAttention: num_heads=0 must be a positive integer"),
    (jaxattn.GroupedQueryAttention(8, 2, 1, head_dim=0), (1, 3, 8),
     "GroupedQueryAttention: head_dim=0 must be a positive integer"),
    (jaxattn.GroupedQueryAttention(8, 2, 1, context_length=-1), (1, 0, 8),
     "GroupedQueryAttention: context_length=-1 must be a positive integer"),
    (jaxattn.GroupedQueryAttention(8, 2, 1, out_features=0), (1, 3, 8),
     "GroupedQueryAttention: out_features=0 must be a positive integer"),
    (RMSNorm(0), (3, 0), "RMSNorm: emb_dim=0 must be a positive integer"),
]


@pytest.mark.parametrize("module, shape, message", SIZE_CASES, ids=[c[2].split(":")[0] + "-" + c[2].split()[1] for c in SIZE_CASES])
def test_non_positive_sizes_name_field_and_value(module, shape, message, without_typecheck):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(") ):
        init_shapes(module, jnp.ones(shape))


@pytest.mark.parametrize("value", [4.0, np.float64(4.0), True, "4"])
def test_check_sizes_refuses_what_is_not_an_integer(value):
    with pytest.raises(ValueError, match=r"^Owner: d_out=.* must be a positive integer$"):
        checks.check_sizes("Owner", d_out=value)


def test_check_sizes_accepts_numpy_integers_and_skips_none():
    checks.check_sizes("Owner", d_in=np.int64(3), d_out=1, head_dim=None)


@pytest.mark.parametrize("rate", ["0.1x", None, -1e-9, math.inf, -math.inf, 1.0])
def test_check_rate_refuses(rate):
    with pytest.raises(ValueError, match=r"^Owner: dropout=.* must be in \[0, 1\)"):
        checks.check_rate("Owner", "dropout", rate)


def test_check_rate_accepts_numpy_and_concrete_jax_scalars():
    for rate in (0, 0.0, np.float32(0.25), jnp.asarray(0.5)):
        checks.check_rate("Owner", "dropout", rate)


def test_checks_run_at_trace_time_not_per_jitted_call(monkeypatch):
    calls = []
    original = checks.check_sizes

    def counting(owner, **sizes):
        calls.append(owner)
        return original(owner, **sizes)

    monkeypatch.setattr(base, "check_sizes", counting)  # BookAttention.check_config's reference
    module = jaxattn.CausalAttention(4, 2, 8, 0.1)
    x = jnp.ones((1, 3, 4))
    variables = module.init(KEY, x)
    apply = jax.jit(lambda v, x, rng: module.apply(v, x, deterministic=False, rngs={"dropout": rng}))
    apply(variables, x, jax.random.key(1))
    traced = len(calls)
    assert traced >= 1
    for seed in range(2, 5):
        apply(variables, x, jax.random.key(seed))
    assert len(calls) == traced, "the config was re-checked on a jitted call"


def test_ops_dropout_refuses_negative_and_nan_rates():
    for rate in (-0.5, math.nan, 1.5):
        with pytest.raises(ValueError, match=r"dropout: rate=.* must be in \[0, 1\]"):
            core.dropout(jnp.ones(4), rate, KEY, deterministic=False)
    np.testing.assert_array_equal(core.dropout(jnp.ones(4), -0.5, None, deterministic=True), np.ones(4))


# --- edge shapes: every implementation, the same answer -------------------------------------------


def _qkv(batch, q_tokens, kv_tokens, heads, kv_heads, head_dim=4, seed=0):
    rng = np.random.default_rng(seed)  # numpy: no random-number program to compile per shape
    return tuple(
        jnp.asarray(rng.normal(size=(batch, tokens, n, head_dim)).astype(np.float32))
        for tokens, n in ((q_tokens, heads), (kv_tokens, kv_heads), (kv_tokens, kv_heads))
    )


EDGE_CASES = [
    # (q_tokens, kv_tokens, heads, kv_heads, is_causal, q_offset, mask, bias)
    (0, 5, 2, 2, False, 0, False, False),
    (0, 5, 2, 2, True, 0, False, False),
    (0, 5, 4, 2, True, 5, True, True),
    (3, 0, 2, 2, False, 0, False, False),
    (3, 0, 2, 2, True, 0, False, False),
    (3, 0, 4, 2, False, 0, True, True),
    (3, 0, 4, 1, True, 0, True, False),  # q_offset > 0 needs q_offset + T <= S: refused with S = 0
    (0, 0, 2, 2, False, 0, False, False),
    (0, 0, 2, 2, True, 0, False, False),
    (0, 0, 4, 2, True, 0, True, True),
    (1, 1, 2, 2, False, 0, False, False),
    (1, 1, 2, 2, True, 0, False, False),
    (1, 1, 4, 2, True, 0, True, True),
    (1, 5, 4, 2, True, 4, False, False),  # one decode step after four cached keys
    (1, 5, 2, 2, False, 0, True, True),
]


def _call(case, impl, batch=2):
    q_tokens, kv_tokens, heads, kv_heads, is_causal, q_offset, with_mask, with_bias = case
    q, k, v = _qkv(batch, q_tokens, kv_tokens, heads, kv_heads)
    mask = np.ones((batch, 1, 1, kv_tokens), bool) if with_mask else None
    bias = np.zeros((1, heads, q_tokens, kv_tokens), np.float32) if with_bias else None
    fn = functools.partial(jaxattn.dot_product_attention, is_causal=is_causal, q_offset=q_offset, implementation=impl)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(fn)(q, k, v, bias, mask)
    return (q, k, v), out


def _expected(case, q, k, v):
    """The documented contract: T = 0 -> empty, S = 0 -> zeros, S = 1 -> the (grouped) value itself."""
    q_tokens, kv_tokens, heads, kv_heads = case[:4]
    shape = (q.shape[0], q_tokens, heads, v.shape[-1])
    if q_tokens == 0 or kv_tokens == 0:
        return np.zeros(shape, np.float32)
    if kv_tokens == 1:
        return np.repeat(np.asarray(v), heads // kv_heads, axis=2) * np.ones((1, q_tokens, 1, 1), np.float32)
    return None


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: "T{}-S{}-N{}-K{}-causal{}-off{}-mask{}-bias{}".format(*c))
def test_edge_shapes_agree_across_implementations_and_with_the_contract(case):
    results = {}
    for impl in IMPLS:
        (q, k, v), out = _call(case, impl)
        assert out.shape == (2, case[0], case[2], 4), f"{impl}: shape {out.shape}"
        assert out.dtype == v.dtype, f"{impl}: dtype {out.dtype}"
        assert np.isfinite(np.asarray(out)).all(), f"{impl}: non-finite output"
        results[impl] = np.asarray(out)
    expected = _expected(case, q, k, v)
    where = dict(is_causal=case[4], q_offset=case[5])
    for impl, out in results.items():
        if expected is not None:  # exact: one computation's error bound
            np.testing.assert_allclose(out, expected, atol=attention_error(q, k, v, **where), rtol=0,
                                       err_msg=f"{impl} vs the contract")
        np.testing.assert_allclose(out, results["naive"], atol=attention_bound(q, k, v, **where), rtol=0,
                                   err_msg=f"{impl} vs naive")


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_shapes_under_jit(impl):
    for q_tokens, kv_tokens in ((0, 3), (3, 0), (0, 0), (1, 1)):
        q, k, v = _qkv(1, q_tokens, kv_tokens, 2, 2)
        f = jax.jit(lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=q_tokens == kv_tokens,
                                                                  implementation=impl))
        out = np.asarray(f(q, k, v))
        assert out.shape == (1, q_tokens, 2, 4)
        if kv_tokens == 0:
            np.testing.assert_array_equal(out, 0.0)
        if kv_tokens == 1:  # the one weight is 1: the value itself, within one computation's error bound
            np.testing.assert_allclose(out, np.asarray(v), atol=attention_error(q, k, v), rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_shapes_unbatched(impl):
    out = jaxattn.dot_product_attention(jnp.ones((3, 2, 4)), jnp.ones((0, 2, 4)), jnp.ones((0, 2, 4)), implementation=impl)
    np.testing.assert_array_equal(out, np.zeros((3, 2, 4)))


def test_naive_weights_with_no_keys_are_empty_rows():
    q, k, v = _qkv(2, 3, 0, 4, 2)
    out, weights = jax.jit(functools.partial(attention_with_weights, is_causal=True, implementation="naive"))(q, k, v)
    assert weights.shape == (2, 4, 3, 0)
    np.testing.assert_array_equal(out, np.zeros((2, 3, 4, 4)))


def test_naive_dropout_with_no_keys_gives_zeros():
    q, k, v = _qkv(1, 2, 0, 2, 2)
    fn = jax.jit(lambda q, k, v, rng: jaxattn.dot_product_attention(q, k, v, implementation="naive", dropout_rate=0.5,
                                                                    dropout_rng=rng))
    out = fn(q, k, v, KEY)
    np.testing.assert_array_equal(out, np.zeros((1, 2, 2, 4)))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_through_edge_shapes_are_finite_zeros(impl):
    q, k, v = _qkv(1, 3, 0, 2, 2)
    grads = jax.jit(jax.grad(lambda q: jaxattn.dot_product_attention(q, k, v, implementation=impl).sum()))(q)
    np.testing.assert_array_equal(grads, np.zeros_like(q))


def test_blockwise_functions_called_directly():
    causal = jax.jit(blockwise_causal_attention)
    general = jax.jit(functools.partial(general_blockwise_attention, scale=0.5))
    q = np.ones((2, 3, 0, 4), np.float32)  # (*batch, tokens, d)
    assert causal(q, q, np.ones((2, 3, 0, 6), np.float32)).shape == (2, 3, 0, 6)
    assert causal(*[np.ones((0, 5, 4), np.float32)] * 3).shape == (0, 5, 4)
    q, k, v = _qkv(1, 2, 0, 2, 2)
    np.testing.assert_array_equal(general(q, k, v), np.zeros((1, 2, 2, 4)))


MODULES_BY_IMPL = [  # (factory of attention_impl, d_in)
    (lambda impl: jaxattn.CausalAttention(4, 4, 8, 0.0, attention_impl=impl), 4),
    (lambda impl: jaxattn.MultiHeadAttention(4, 4, 8, 0.0, 2, attention_impl=impl), 4),
    (lambda impl: jaxattn.GroupedQueryAttention(8, 4, 2, context_length=8, attention_impl=impl), 8),
]


@pytest.mark.parametrize("tokens", [0, 1])
@pytest.mark.parametrize("factory, d_in", MODULES_BY_IMPL, ids=["causal", "mha", "gqa"])
def test_modules_on_zero_and_one_token_agree_across_implementations(factory, d_in, tokens):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, tokens, d_in)).astype(np.float32))
    variables = jax.jit(factory("naive").init)(KEY, np.ones((2, 1, d_in), np.float32))
    outs = {impl: np.asarray(jax.jit(factory(impl).apply)(variables, x)) for impl in IMPLS}
    for impl, out in outs.items():
        assert out.shape[:2] == (2, tokens), f"{impl}: shape {out.shape}"
        assert np.isfinite(out).all(), f"{impl}: non-finite output"
        check_layer(factory(impl), variables["params"], x, out, outs["naive"], f"{impl} vs naive")
