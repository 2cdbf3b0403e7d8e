"""Every variant: Flax on ported weights equals the torch float32 reference.

Two float32 computations in different summation orders, so every comparison is within a bound derived
from the computation (tests/bounds.py, jaxattn.tolerance): forward within the layer's first-order bound
(RoPE/QK-norm variants: within 4x torch's own float32 error against the layer in float64), over shapes,
seeds, batch sizes and ``qkv_bias``; gradients w.r.t. inputs and parameters within 4x torch autograd's own
float32 error against the same gradients in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crosscheck.config import AttnConfig
from crosscheck.porting import port
from crosscheck.seed import INPUTS
from crosscheck.variants import registry
from jaxattn.tolerance import reference_bound
from tests.bounds import chain_length, check_layer, layer_grads64, max_abs
from tests.crosscheck.conftest import make_input, make_pair


def config_for(variant, d_in, head_dim, heads, tokens, qkv_bias, context_extra=0):
    if "head_dim" in variant.fields:  # RoPE rotates pairs: an even head dim
        head_dim *= 2
    return variant.resolve(
        AttnConfig(
            # d_out is d_in where heads split the input width (embed_dim, n_embd)
            d_in=head_dim * heads if variant.splits_heads_of and "d_out" not in variant.fields else d_in,
            d_out=head_dim * heads,
            context_length=tokens + context_extra,
            num_heads=heads,
            qkv_bias=qkv_bias,
            causal=True,
        )
    )


def torch_out(variant, module, x, cfg):
    with torch.no_grad():
        return variant.torch_forward(module, torch.from_numpy(x), cfg).numpy()


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    d_in=st.integers(1, 9),
    head_dim=st.integers(1, 5),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 11),
    batch=st.integers(0, 3),
    qkv_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_torch(variant, d_in, head_dim, heads, tokens, batch, qkv_bias, seed):
    cfg = config_for(variant, d_in, head_dim, heads, tokens, qkv_bias, context_extra=seed % 3)
    torch_module, flax_module, variables = make_pair(variant, cfg, seed)
    x = make_input(variant, cfg, batch, tokens, seed)
    expected = torch_out(variant, torch_module, x, cfg)
    # Jitted: one program per example, not one per operation and shape (dozens; slow to compile on a GPU).
    got = np.asarray(jax.jit(flax_module.apply)(variables, jnp.asarray(x)))
    assert got.shape == expected.shape
    check_layer(flax_module, variables.get("params"), x, got, expected, f"{variant.name} {cfg}")


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_seed_sentence_matches_torch(variant, qkv_bias):
    cfg = variant.resolve(AttnConfig(**{**AttnConfig().to_dict(), **dict(variant.defaults), "qkv_bias": qkv_bias}))
    torch_module, flax_module, variables = make_pair(variant, cfg, seed=123)
    x = INPUTS if variant.unbatched else INPUTS[None]
    expected = torch_out(variant, torch_module, x, cfg)
    got = np.asarray(jax.jit(flax_module.apply)(variables, jnp.asarray(x)))
    check_layer(flax_module, variables.get("params"), x, got, expected, f"{variant.name} seed sentence")


def torch_grads(variant, module, x, cfg, cotangent):
    xt = torch.from_numpy(x).requires_grad_(True)
    module.zero_grad()
    out = variant.torch_forward(module, xt, cfg)
    (out * torch.from_numpy(cotangent)).sum().backward()
    grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    buffers = {k: b.numpy() for k, b in module.named_buffers()}
    return xt.grad.numpy(), {**grads, **buffers}


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_gradients_match_torch_autograd(variant):
    cfg = config_for(variant, d_in=5, head_dim=3, heads=2, tokens=7, qkv_bias=True)
    torch_module, flax_module, variables = make_pair(variant, cfg, seed=11)
    x = make_input(variant, cfg, batch=2, tokens=7, seed=3)
    out_shape = torch_out(variant, torch_module, x, cfg).shape
    cotangent = np.random.default_rng(4).normal(size=out_shape).astype(np.float32)

    def loss(v, x):
        return (flax_module.apply(v, x) * cotangent).sum()

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, jnp.asarray(x))
    t_x, t_state = torch_grads(variant, torch_module, x, cfg, cotangent)
    params = variables.get("params", {})
    exact_params, exact_x = layer_grads64(flax_module, params, x, cotangent)
    length = chain_length(flax_module, params, x) + x.shape[0] * x.shape[1]  # weight gradients sum over B T too

    def check(got, torch32, exact, what):
        bound = reference_bound(torch32, exact, reduction_length=length)
        err = max_abs(got, exact)
        assert err <= bound, (f"{variant.name} d/d {what}: max |flax - float64| {err:.3g} > bound {bound:.3g} "
                              f"(torch float32: {max_abs(torch32, exact):.3g})")

    check(g_x, t_x, exact_x, "x")
    # The torch gradients, ported through the same table as the weights, are the Flax gradients.
    expected = port.port_variables(variant, cfg, t_state)["params"]
    flat_got = jax.tree_util.tree_leaves_with_path(g_params["params"] if "params" in g_params else g_params)
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
    flat_exact = dict(jax.tree_util.tree_leaves_with_path(exact_params))
    assert len(flat_got) == len(flat_expected) == len(flat_exact)
    for path, value in flat_got:
        check(value, flat_expected[path], flat_exact[path], jax.tree_util.keystr(path))


def test_unbatched_variants_accept_the_books_single_sentence():
    for variant in registry.VARIANTS:
        if not variant.unbatched:
            continue
        cfg = AttnConfig()
        torch_module, flax_module, variables = make_pair(variant, cfg, seed=1)
        got = np.asarray(jax.jit(flax_module.apply)(variables, jnp.asarray(INPUTS)))
        assert got.shape == (6, variant.output_dim(cfg))
        expected = torch_out(variant, torch_module, INPUTS, cfg)
        check_layer(flax_module, variables.get("params"), INPUTS, got, expected, variant.name)
