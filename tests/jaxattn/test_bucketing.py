"""Bucketing: bucket lengths by hand, and padded causal attention equal to unpadded on the real tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.bucketing import bucket_tokens, bucketed, pad_tokens
from tests.bounds import check_layer


@pytest.mark.parametrize(
    "tokens,policy,expected",
    [(1, "pow2", 1), (5, "pow2", 8), (128, "pow2", 128), (129, "pow2", 256),
     (1, "multiple", 128), (128, "multiple", 128), (129, "multiple", 256), (37, "none", 37)],
)
def test_bucket_tokens(tokens, policy, expected):
    assert bucket_tokens(tokens, policy=policy) == expected


def test_bucket_is_capped_by_maximum_and_errors_name_the_numbers(without_typecheck):
    assert bucket_tokens(129, policy="pow2", maximum=200) == 200
    assert bucket_tokens(30, policy="multiple", multiple=16) == 32
    with pytest.raises(ValueError, match="tokens=201 exceeds maximum=200"):
        bucket_tokens(201, maximum=200)
    with pytest.raises(ValueError, match="tokens must be >= 1, got 0"):
        bucket_tokens(0)
    with pytest.raises(ValueError, match="policy must be"):
        bucket_tokens(3, policy="fib")


def test_pad_tokens_keeps_array_kind_and_values():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    padded = pad_tokens(x, 5)
    assert isinstance(padded, np.ndarray) and padded.shape == (1, 5, 4)
    np.testing.assert_array_equal(padded[:, :3], x)
    assert not padded[:, 3:].any()
    assert isinstance(pad_tokens(jnp.asarray(x), 5), jax.Array)
    with pytest.raises(ValueError, match="length=2 is shorter than tokens=3"):
        pad_tokens(x, 2)


@pytest.mark.parametrize("impl", ["naive", "blockwise", "xla"])
@pytest.mark.parametrize("tokens", [5, 37, 100])
def test_bucketed_equals_unpadded_on_real_tokens(impl, tokens):
    module = jaxattn.MultiHeadAttention(8, 8, 128, 0.0, num_heads=2, attention_impl=impl)
    x = np.random.default_rng(tokens).normal(size=(2, tokens, 8)).astype(np.float32)
    # init and the reference run jitted, as the bucketed call: one program each, not one per operation.
    variables = jax.jit(module.init)(jax.random.key(0), x)
    expected = jax.jit(module.apply)(variables, x)
    out = bucketed(jax.jit(lambda x: module.apply(variables, x)), policy="pow2", maximum=128)(x)
    assert out.shape == (2, tokens, 8)
    check_layer(module, variables["params"], x, out, expected, f"[{impl}] bucketed vs unpadded")


def test_trailing_tokens_are_invisible_to_real_tokens():
    """Whatever follows the real tokens (not only zeros) leaves their outputs unchanged: causality, not luck."""
    module = jaxattn.MultiHeadAttention(8, 8, 64, 0.0, num_heads=2, attention_impl="blockwise")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 20, 8)).astype(np.float32)
    apply = jax.jit(module.apply)
    variables = jax.jit(module.init)(jax.random.key(0), x)
    expected = np.asarray(apply(variables, x))
    for tail in (np.zeros((1, 12, 8), np.float32), 100 * rng.normal(size=(1, 44, 8)).astype(np.float32)):
        out = np.asarray(apply(variables, np.concatenate([x, tail], axis=1)))[:, :20]
        check_layer(module, variables["params"], x, out, expected, f"{tail.shape[1]} trailing tokens")
    # and the converse, so the check above can fail: a change *inside* the real tokens does show
    changed = np.asarray(apply(variables, np.concatenate([x[:, :19], x[:, 19:] + 1.0], axis=1)))
    assert not np.allclose(changed[:, 19], expected[:, 19])


def test_bucketing_bounds_compilations():
    traces = []
    module = jaxattn.MultiHeadAttention(4, 4, 64, 0.0, num_heads=1)
    variables = jax.jit(module.init)(jax.random.key(0), np.zeros((1, 1, 4), np.float32))

    @jax.jit
    def apply(x):
        traces.append(x.shape[-2])  # once per trace = once per compilation
        return module.apply(variables, x)

    call = bucketed(apply, policy="pow2", maximum=64)
    for tokens in (3, 4, 5, 7, 8, 9, 16, 17, 33):
        call(np.ones((1, tokens, 4), np.float32))
    assert traces == [4, 8, 16, 32, 64]
