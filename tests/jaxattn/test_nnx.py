"""jaxattn.nnx: the NNX twins equal the Linen modules bit for bit, and work under nnx.jit, nnx.grad, nnx.vmap.

No torch here (this file also runs on JAX 0.7.0 / flax 0.11.2); NNX against torch is
tests/crosscheck/test_nnx_port.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn
import jaxattn.nnx as jn
from jaxattn.tolerance import reference_bound
from tests.bounds import chain_length, check_layer, layer_bound, layer_grads64
from tests.jaxpr_dots import dot_precisions

B, T, D = 2, 5, 6

#: (id, Linen module, NNX builder, input rank): every variant, biases on, a GQA with QK-norm and its own widths.
CASES = [
    ("simplified", jaxattn.SimplifiedSelfAttention(), lambda r: jn.SimplifiedSelfAttention(rngs=r)),
    ("v1", jaxattn.SelfAttentionV1(D, 4), lambda r: jn.SelfAttentionV1(D, 4, rngs=r)),
    ("v2", jaxattn.SelfAttentionV2(D, 4, True), lambda r: jn.SelfAttentionV2(D, 4, True, rngs=r)),
    ("causal", jaxattn.CausalAttention(D, 4, 8, 0.0, True), lambda r: jn.CausalAttention(D, 4, 8, 0.0, True, rngs=r)),
    ("wrapper", jaxattn.MultiHeadAttentionWrapper(D, 2, 8, 0.0, 3, True),
     lambda r: jn.MultiHeadAttentionWrapper(D, 2, 8, 0.0, 3, True, rngs=r)),
    ("mha", jaxattn.MultiHeadAttention(D, 4, 8, 0.0, 2, True), lambda r: jn.MultiHeadAttention(D, 4, 8, 0.0, 2, True, rngs=r)),
    ("combined", jaxattn.MultiHeadAttentionCombinedQKV(D, 4, 2, 8, 0.0, True),
     lambda r: jn.MultiHeadAttentionCombinedQKV(D, 4, 2, 8, 0.0, True, rngs=r)),
    ("torch_mha", jaxattn.TorchMultiheadAttention(D, 2, causal=True), lambda r: jn.TorchMultiheadAttention(D, 2, causal=True, rngs=r)),
    ("gqa", jaxattn.GroupedQueryAttention(D, 4, 2, head_dim=2, qk_norm=True, context_length=8, qkv_bias=True, out_features=3),
     lambda r: jn.GroupedQueryAttention(D, 4, 2, head_dim=2, qk_norm=True, context_length=8, qkv_bias=True,
                                        out_features=3, rngs=r)),
]
IDS = [c[0] for c in CASES]


def _x(seed=1, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(seed), shape)


# Jitted (a Linen module static): one program per module and shape, shared by the tests that repeat it,
# not one per operation (slow to compile on a GPU).
@functools.partial(jax.jit, static_argnums=0)
def linen_init(linen, x):
    return linen.init(jax.random.key(0), x)


@functools.partial(jax.jit, static_argnums=0)
def linen_apply(linen, params, x, attention_mask=None):
    return linen.apply({"params": params}, x, attention_mask=attention_mask)


def _perturbed(params, seed=3):
    """Every parameter shifted by noise, so a parameter read from the wrong place (or a zero bias) shows.
    In numpy: no program to compile per parameter shape."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: np.asarray(p) + (0.5 * rng.normal(size=p.shape)).astype(p.dtype), params)


def _pair(case):
    _, linen, build = case
    x = _x()
    params = _perturbed(linen_init(linen, x).get("params", {}))
    model = jn.load_params(build(nnx.Rngs(0)), params)
    return linen, model, params, x


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nnx_equals_linen_bit_for_bit_with_the_same_parameter_paths(case):
    linen, model, params, x = _pair(case)
    mask = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=bool)  # left padding in row 1
    fresh = jn.params_of(case[2](nnx.Rngs(5)))  # the NNX module's own tree, before any load
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)  # same names, same shapes
    # The padding mask on one layer of each kind (the self-attention math, the core call, RoPE): fewer compiles.
    for kwargs in ({}, {"attention_mask": mask}) if case[0] in ("v2", "mha", "gqa") else ({},):
        want = linen_apply(linen, params, x, **kwargs)
        got = nnx.jit(lambda m, x: m(x, **kwargs))(model, x)
        assert got.shape == want.shape
        assert np.array_equal(np.asarray(got), np.asarray(want)), float(jnp.max(jnp.abs(got - want)))
    loaded = jn.params_of(model)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))


def test_unbatched_input_as_in_the_book():
    linen, model, params, _ = _pair(CASES[2])  # SelfAttentionV2 takes (tokens, d_in)
    x = _x(shape=(T, D))
    got = nnx.jit(lambda m, x: m(x))(model, x)
    assert np.array_equal(np.asarray(got), np.asarray(linen_apply(linen, params, x)))


def test_load_params_names_missing_unexpected_and_misshaped_paths():
    model = jn.MultiHeadAttention(D, 4, 8, 0.0, 2, rngs=nnx.Rngs(0))
    params = jax.tree.map(np.asarray, jn.params_of(model))
    params["W_query"]["kernel"] = np.zeros((D, 5), np.float32)
    params["W_key"]["bias"] = np.zeros((4,), np.float32)  # no qkv_bias
    del params["out_proj"]["bias"]
    with pytest.raises(ValueError) as err:
        jn.load_params(model, params)
    text = str(err.value)
    assert "W_query/kernel: expected shape (6, 4), found (6, 5)" in text
    assert "unexpected parameter W_key/bias" in text and "missing parameter out_proj/bias" in text


@pytest.mark.parametrize("case", [CASES[5], CASES[8]], ids=["mha", "gqa"])
def test_nnx_grad_equals_jax_grad_of_linen(case):
    linen, model, params, x = _pair(case)
    weights = jax.random.normal(jax.random.key(9), jax.eval_shape(linen.apply, {"params": params}, x).shape)

    def linen_loss(p):
        return jnp.sum(linen.apply({"params": p}, x) * weights)

    want = jax.jit(jax.grad(linen_loss))(params)
    got = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * weights)))(model)
    got = jn.params_of(got)
    # Two programs, two summation orders: each gradient within 4x the Linen one's own float32 error against
    # float64 (tests/bounds.py; a first-order bound through the backward pass is impractical).
    exact, _ = layer_grads64(linen, params, x, weights)
    assert jax.tree.structure(got) == jax.tree.structure(want) == jax.tree.structure(exact)
    length = chain_length(linen, params, x) + B * T
    for got_leaf, want_leaf, exact_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(exact)):
        bound = reference_bound(want_leaf, exact_leaf, reduction_length=length)
        np.testing.assert_allclose(np.asarray(got_leaf), exact_leaf, rtol=0, atol=bound)
    assert any(np.abs(np.asarray(g)).max() > 1e-3 for g in jax.tree.leaves(got))  # not trivially zero


def test_nnx_vmap_over_a_stack_of_inputs_equals_one_call_each():
    linen, model, params, _ = _pair(CASES[5])
    xs = np.asarray(_x(seed=4, shape=(3, B, T, D)))
    got = np.asarray(nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(None, 0)))(model, xs))
    one = nnx.jit(lambda m, x: m(x))
    for i in range(3):
        check_layer(linen, params, xs[i], got[i], np.asarray(one(model, xs[i])), f"vmap row {i} vs one call")


def test_dropout_draws_from_the_rngs_dropout_stream_as_the_core_applies_it():
    rate = 0.5
    model = jn.CausalAttention(D, 4, 8, rate, rngs=nnx.Rngs(0, dropout=7))
    x = _x()
    out_train = model(x, deterministic=False)
    # Independent reference: the projections by hand, the naive core with the stream's first key.
    key = nnx.Rngs(0, dropout=7).dropout()
    kernels = [jn.value_of(getattr(model, n).kernel) for n in ("W_query", "W_key", "W_value")]

    @jax.jit  # the reference as one program (the module's own calls stay eager, as a user makes them)
    def reference(x, kernels, key):
        q, k, v = (x @ kernel for kernel in kernels)
        split = lambda t: t.reshape(B, T, 1, 4)  # noqa: E731
        return jaxattn.dot_product_attention(
            split(q), split(k), split(v), is_causal=True, dropout_rate=rate, dropout_rng=key, implementation="naive"
        ).reshape(B, T, 4)

    want = reference(x, kernels, key)
    # The same dropped weights, scaled by 1 / (1 - rate) (so are their errors; the scaling's rounding is one
    # more per weight, inside SOFTMAX_OPS): the layer's derived bound, scaled likewise.
    linen = jaxattn.CausalAttention(D, 4, 8, 0.0)
    params = {n: {"kernel": np.asarray(kernel)} for n, kernel in zip(("W_query", "W_key", "W_value"), kernels)}
    bound = layer_bound(linen, params, x) / (1 - rate)
    np.testing.assert_allclose(np.asarray(out_train), np.asarray(want), rtol=0, atol=bound)
    assert not np.allclose(np.asarray(model(x, deterministic=False)), np.asarray(out_train))  # the stream advanced
    assert np.array_equal(np.asarray(model(x)), np.asarray(model(x, deterministic=True)))  # default: inference
    model.train()  # nnx's mode switch sets the deterministic attribute
    assert not np.allclose(np.asarray(model(x)), np.asarray(model(x, deterministic=True)))
    model.eval()
    assert np.array_equal(np.asarray(model(x)), np.asarray(model(x, deterministic=True)))


def test_dropout_under_nnx_jit_advances_the_stream():
    model = jn.MultiHeadAttention(D, 4, 8, 0.3, 2, rngs=nnx.Rngs(0))
    step = nnx.jit(lambda m, x: m(x, deterministic=False))
    x = _x()
    a, b = step(model, x), step(model, x)
    assert not np.allclose(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("case", [CASES[4], CASES[8]], ids=["wrapper", "gqa"])
def test_decode_through_the_nnx_cache_equals_the_full_forward(case):
    linen, model, params, x = _pair(case)
    full = linen_apply(linen, params, x)
    x = np.asarray(x)  # numpy slices: no slicing program per token
    name, _, build = case
    decoder = jn.load_params(build(nnx.Rngs(0)), params)
    for m in [decoder] + (decoder.heads if name == "wrapper" else []):
        m.decode = True
    decoder.init_cache(x.shape)
    step = nnx.jit(lambda m, chunk: m(chunk))
    chunks = [step(decoder, x[:, :2])] + [step(decoder, x[:, t:t + 1]) for t in range(2, T)]
    check_layer(linen, params, x, np.concatenate(chunks, axis=1), full, f"{name}: decode vs full forward")
    cache_holder = decoder.heads[0] if name == "wrapper" else decoder
    assert int(jn.value_of(cache_holder.cache_index)) == T


def test_decode_without_init_cache_says_what_to_call():
    model = jn.MultiHeadAttention(D, 4, 8, 0.0, 2, decode=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"init_cache"):
        model(_x())


HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_precision_reaches_every_projection(api):
    x = _x()
    if api == "linen":
        module = jaxattn.MultiHeadAttention(D, 4, 8, 0.0, 2, precision="highest", attention_impl="naive")
        params = jax.jit(module.init)(jax.random.key(0), x)
        fn = lambda x: module.apply(params, x)  # noqa: E731
        plain = jaxattn.MultiHeadAttention(D, 4, 8, 0.0, 2, attention_impl="naive")
        fn_plain = lambda x: plain.apply(params, x)  # noqa: E731
    else:
        module = jn.MultiHeadAttention(D, 4, 8, 0.0, 2, precision="highest", attention_impl="naive", rngs=nnx.Rngs(0))
        fn = lambda x: module(x)  # noqa: E731
        plain = jn.MultiHeadAttention(D, 4, 8, 0.0, 2, attention_impl="naive", rngs=nnx.Rngs(0))
        fn_plain = lambda x: plain(x)  # noqa: E731
    with jax.default_matmul_precision("default"):
        precisions = dot_precisions(fn, x)
        plain_precisions = dot_precisions(fn_plain, x)
    assert sum(p == HIGHEST for p in precisions) >= 4  # W_query, W_key, W_value, out_proj at least
    assert not any(p == HIGHEST for p in plain_precisions)  # None stays JAX's default


@pytest.mark.parametrize("build", [
    lambda p: jn.SimplifiedSelfAttention(precision=p),
    lambda p: jn.SelfAttentionV1(D, 4, precision=p, rngs=nnx.Rngs(0)),
    lambda p: jn.SelfAttentionV2(D, 4, precision=p, rngs=nnx.Rngs(0)),
], ids=["simplified", "v1", "v2"])
def test_precision_reaches_every_product_of_the_section_3_4_modules(build):
    x = _x()
    module = build("highest")
    precisions = dot_precisions(lambda x: module(x), x)
    assert len(precisions) >= 3 and all(p == HIGHEST for p in precisions), precisions


def test_bad_config_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"d_out=5 must be divisible by num_heads=2"):
        jn.MultiHeadAttention(D, 5, 8, 0.0, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"needs rngs"):
        jn.MultiHeadAttention(D, 4, 8, 0.0, 2)
