"""jaxattn on the oldest supported stack: JAX 0.7.0 with its newest Flax (0.11.2), numpy<2.

``make test`` also runs the whole ``tests/jaxattn`` suite in this interpreter; these
checks pin the versions and cover what that suite does not: the seed table under jit,
every registry variant's init/apply/jit, and crosscheck's numpy state dict -> Flax port.
"""

import math

import numpy as np
import pytest

from crosscheck.porting.port import port_variables, to_state_dict
from crosscheck.seed import CONTEXT_VECS, INPUTS
from crosscheck.variants import registry
from tests.bounds import check_layer, layer_error
from tests.conformance.helpers import random_case, seed_config

jax = pytest.importorskip("jax")
jnp = jax.numpy



def test_versions_are_the_minimum_pair():
    import flax

    assert jax.__version__ == "0.7.0"
    assert flax.__version__ == "0.11.2"
    assert np.__version__.startswith("1.")


def test_seed_table_under_jit():
    import jaxattn

    module = jaxattn.SimplifiedSelfAttention()
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(INPUTS))
    out = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(INPUTS)))
    np.testing.assert_allclose(out, CONTEXT_VECS, atol=1e-4)


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def test_ported_causal_attention_equals_numpy_formula():
    """Port a numpy state dict, apply under jit, compare with the book's formula written in float64 numpy."""
    variant = registry.get("CausalAttention")
    cfg = seed_config(variant).replace(qkv_bias=True)
    state_dict, x = random_case(variant, cfg, seed=3)
    variables = port_variables(variant, cfg, state_dict)
    out = np.asarray(jax.jit(variant.flax_module(cfg).apply)(variables, jnp.asarray(x)))

    def lin(name):  # torch nn.Linear: x @ W.T + b
        return x.astype(np.float64) @ state_dict[f"{name}.weight"].T + state_dict[f"{name}.bias"]

    q, k, v = lin("W_query"), lin("W_key"), lin("W_value")
    scores = q @ np.swapaxes(k, -1, -2)
    tokens = x.shape[-2]
    scores = np.where(np.triu(np.ones((tokens, tokens), bool), 1), -np.inf, scores)
    expected = _softmax(scores / math.sqrt(cfg.d_out)) @ v
    bound = layer_error(variant.flax_module(cfg), variables["params"], x)  # one float32 computation's error
    np.testing.assert_allclose(out, expected, atol=bound, rtol=0)


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_every_variant_inits_applies_jits_and_ports_back(variant):
    cfg = seed_config(variant)
    state_dict, x = random_case(variant, cfg, seed=1)
    module = variant.flax_module(cfg)
    x = jnp.asarray(x)
    init_vars = module.init(jax.random.PRNGKey(0), x)
    eager = np.asarray(module.apply(init_vars, x))
    jitted = np.asarray(jax.jit(module.apply)(init_vars, x))
    check_layer(module, init_vars.get("params"), x, jitted, eager, f"{variant.name}: jitted vs eager")
    assert eager.shape == (*x.shape[:-1], variant.output_dim(cfg))
    # numpy state dict -> Flax -> state dict is the identity, and the ported weights are the ones used
    variables = port_variables(variant, cfg, state_dict)
    back = to_state_dict(module, variables, variant=variant.name)
    assert sorted(back) == sorted(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value)
    ported = np.asarray(jax.jit(module.apply)(variables, x))
    assert np.all(np.isfinite(ported))
    if state_dict and variant.name != "SimplifiedSelfAttention":
        assert not np.allclose(ported, eager, atol=1e-3)  # different weights, different output
