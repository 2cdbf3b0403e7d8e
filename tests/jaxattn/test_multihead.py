"""Section 3.6.2 and the fused layouts: identities between the variants, jit/vmap/grad, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from tests.bounds import check_layer, layer_bound, max_abs

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(42), (2, 7, 6))  # deliberately unequal dims: d_in=6, T=7


# Jitted with the module static: one program per module and shape, shared by every test that calls it,
# not one per operation (slow to compile on a GPU).
@functools.partial(jax.jit, static_argnums=0)
def jit_init(module, x):
    return module.init(KEY, x)


@functools.partial(jax.jit, static_argnums=0)
def jit_apply(module, variables, x):
    return module.apply(variables, x)


def init(module, x=X):
    return jax.tree.map(np.asarray, jit_init(module, x)["params"])


def mha_params_with_bias(d_in=6, d_out=4, heads=2):
    mha = jaxattn.MultiHeadAttention(d_in, d_out, 8, 0.0, heads, qkv_bias=True)
    params = init(mha)
    rng = np.random.default_rng(0)
    for name in ("W_query", "W_key", "W_value", "out_proj"):
        params[name]["bias"] = rng.normal(size=params[name]["bias"].shape).astype(np.float32)
    return mha, params


class TestMultiHeadAttention:
    def test_heads_are_column_slices_of_the_projections(self):
        """Before out_proj, head h is a CausalAttention over columns h*hd:(h+1)*hd of W_query/W_key/W_value."""
        mha = jaxattn.MultiHeadAttention(6, 6, 8, 0.0, num_heads=3)
        params = init(mha)
        params["out_proj"] = {"kernel": np.eye(6, dtype=np.float32), "bias": np.zeros(6, np.float32)}
        out = np.asarray(jit_apply(mha, {"params": params}, X))
        head = jaxattn.CausalAttention(6, 2, 8, 0.0)
        for h in range(3):
            cols = slice(2 * h, 2 * h + 2)
            head_params = {n: {"kernel": params[n]["kernel"][:, cols]} for n in ("W_query", "W_key", "W_value")}
            # The identity out_proj adds no rounding (one non-zero product per sum): two computations of the head.
            got = jit_apply(head, {"params": head_params}, X)
            check_layer(head, head_params, X, out[..., cols], got, f"head {h} vs CausalAttention")

    def test_combined_qkv_with_concatenated_kernels_is_the_same_layer(self):
        mha, p = mha_params_with_bias()
        fused = jaxattn.MultiHeadAttentionCombinedQKV(6, 4, num_heads=2, context_length=8, qkv_bias=True)
        names = ("W_query", "W_key", "W_value")
        fused_params = {
            "qkv": {
                "kernel": np.concatenate([p[n]["kernel"] for n in names], axis=1),  # (d_in, 3 * d_out)
                "bias": np.concatenate([p[n]["bias"] for n in names]),
            },
            "proj": p["out_proj"],
        }
        got, want = jit_apply(fused, {"params": fused_params}, X), jit_apply(mha, {"params": p}, X)
        check_layer(mha, p, X, got, want, "combined qkv vs MultiHeadAttention")

    def test_torch_layout_causal_mha_is_the_same_layer(self):
        mha, p = mha_params_with_bias(d_in=6, d_out=6, heads=3)
        torch_style = jaxattn.TorchMultiheadAttention(6, 3, causal=True)
        names = ("W_query", "W_key", "W_value")
        tp = {
            "in_proj": {
                "kernel": np.concatenate([p[n]["kernel"] for n in names], axis=1),
                "bias": np.concatenate([p[n]["bias"] for n in names]),
            },
            "out_proj": p["out_proj"],
        }
        expected = jit_apply(mha, {"params": p}, X)
        got = jit_apply(torch_style, {"params": tp}, X)
        check_layer(mha, p, X, got, expected, "torch layout vs MultiHeadAttention")

    def test_non_causal_torch_layout_lets_the_first_token_see_everything(self):
        module = jaxattn.TorchMultiheadAttention(6, 2, causal=False)
        variables = jit_init(module, X)
        grad = jax.jit(jax.grad(lambda x: module.apply(variables, x)[0, 0].sum()))(X)
        assert np.all(np.abs(np.asarray(grad[0])).sum(-1) > 0)


ALL_BATCHED = [
    jaxattn.CausalAttention(6, 4, 8, 0.0, qkv_bias=True),
    jaxattn.MultiHeadAttentionWrapper(6, 4, 8, 0.0, 2),
    jaxattn.MultiHeadAttention(6, 4, 8, 0.0, 2),
    jaxattn.MultiHeadAttentionCombinedQKV(6, 4, 2, 8),
    jaxattn.TorchMultiheadAttention(6, 2, causal=True),
    jaxattn.SelfAttentionV1(6, 4),
    jaxattn.SelfAttentionV2(6, 4),
    jaxattn.SimplifiedSelfAttention(),
]


@pytest.mark.parametrize("module", ALL_BATCHED, ids=lambda m: type(m).__name__)
class TestFunctionalTransforms:
    def test_jit_equals_eager(self, module):
        variables = jit_init(module, X)
        got, want = jit_apply(module, variables, X), module.apply(variables, X)
        check_layer(module, variables.get("params"), X, got, want, "jitted vs eager")

    def test_vmap_over_the_batch_equals_the_batched_call(self, module):
        variables = jit_init(module, X)
        per_example = jax.jit(jax.vmap(lambda x: module.apply(variables, x[None])[0]))(X)
        check_layer(module, variables.get("params"), X, per_example, jit_apply(module, variables, X), "vmap vs batch")

    def test_gradients_are_finite_and_nonzero(self, module):
        variables = jit_init(module, X)
        grads = jax.jit(jax.grad(lambda v, x: module.apply(v, x).sum(), argnums=(0, 1)))(variables, X)
        leaves = jax.tree.leaves(grads)
        assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
        assert np.abs(np.asarray(grads[1])).sum() > 0


def test_derived_bound_catches_a_weight_off_by_one_percent():
    """One out_proj entry 1 % off (or one of W_query's): the layer moves outside its derived bound. (Jitted both:
    the program is the one already compiled for these shapes.)"""
    module = jaxattn.MultiHeadAttention(6, 4, 8, 0.0, 2, qkv_bias=True)
    params = init(module)
    bound = layer_bound(module, params, X)
    jitted = jit_apply(module, {"params": params}, X)
    for name in ("out_proj", "W_query"):
        kernel = np.array(params[name]["kernel"])
        kernel.flat[np.abs(kernel).argmax()] *= 1.01
        wrong = {**params, name: {**params[name], "kernel": kernel}}
        err = max_abs(jit_apply(module, {"params": wrong}, X), jitted)
        assert err > 10 * bound, f"{name} 1 % off moved the output by {err:.3g}; the bound is {bound:.3g}"


@pytest.mark.parametrize("module", ALL_BATCHED, ids=lambda m: type(m).__name__)
def test_bfloat16_compute_stays_close_to_float32(module):
    """Every module has a ``dtype`` option: projections in bf16, softmax still in float32."""
    variables = jit_init(module, X)
    low = module.clone(dtype=jnp.bfloat16)
    out = jit_apply(low, variables, X)
    assert out.dtype == jnp.bfloat16
    ref = jit_apply(module, variables, X)
    # bf16 keeps 8 bits of mantissa: relative error ~2^-8 per op on O(1) values.
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=6e-2)
    assert not np.array_equal(np.asarray(out, np.float32), np.asarray(ref))


@pytest.mark.parametrize(
    "module, pattern",
    [
        (jaxattn.MultiHeadAttention(6, 5, 8, 0.0, 2), r"d_out=5 must be divisible by num_heads=2"),
        (jaxattn.MultiHeadAttentionCombinedQKV(6, 4, 3, 8), r"d_out=4 must be divisible by num_heads=3"),
        (jaxattn.TorchMultiheadAttention(6, 4), r"embed_dim=6 must be divisible by num_heads=4"),
        (jaxattn.MultiHeadAttention(6, 4, 5, 0.0, 2), r"tokens=7 exceeds context_length=5"),
        (jaxattn.MultiHeadAttention(5, 4, 8, 0.0, 2), r"d_in=5, got shape \(2, 7, 6\)"),
    ],
)
def test_bad_configuration_names_the_numbers(module, pattern, without_typecheck):
    with pytest.raises(ValueError, match=pattern):
        module.init(KEY, X)
