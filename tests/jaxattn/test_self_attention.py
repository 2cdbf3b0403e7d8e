"""Sections 3.3-3.4: the seed sentence's numbers, as printed in the book's notebooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from crosscheck.seed import CONTEXT_VECS  # notebook 002, In [51]
from jaxattn.tolerance import SOFTMAX_OPS, gamma
from tests.bounds import check_layer, layer_error

# shared/seeds/001 and 002: "journey" (x^2) as the query.
JOURNEY_SCORES = [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865]
JOURNEY_WEIGHTS = [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]
JOURNEY_CONTEXT = [0.4419, 0.6515, 0.5683]

# shared/seeds/002: the full 6x6 scores, weights and 6x3 context vectors.
ALL_SCORES = [
    [0.9995, 0.9544, 0.9422, 0.4753, 0.4576, 0.6310],
    [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865],
    [0.9422, 1.4754, 1.4570, 0.8296, 0.7154, 1.0605],
    [0.4753, 0.8434, 0.8296, 0.4937, 0.3474, 0.6565],
    [0.4576, 0.7070, 0.7154, 0.3474, 0.6654, 0.2935],
    [0.6310, 1.0865, 1.0605, 0.6565, 0.2935, 0.9450],
]
ALL_WEIGHTS = [
    [0.2098, 0.2006, 0.1981, 0.1242, 0.1220, 0.1452],
    [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581],
    [0.1390, 0.2369, 0.2326, 0.1242, 0.1108, 0.1565],
    [0.1435, 0.2074, 0.2046, 0.1462, 0.1263, 0.1720],
    [0.1526, 0.1958, 0.1975, 0.1367, 0.1879, 0.1295],
    [0.1385, 0.2184, 0.2128, 0.1420, 0.0988, 0.1896],
]

PRINTED = dict(atol=5e-5 + 1e-9)  # the notebooks print 4 decimals


@jax.jit  # as the applies below: one program, not one per operation (slow to compile on a GPU)
def _simplified(x):
    out, state = jaxattn.SimplifiedSelfAttention().apply({}, x, mutable=["intermediates"])
    inter = state["intermediates"]
    return out, inter["attn_scores"][0], inter["attn_weights"][0]


def run_simplified(x):
    return tuple(np.asarray(a) for a in _simplified(x))


class TestSimplifiedSelfAttention:
    def test_journey_scores_weights_and_context(self, seed_inputs):
        out, scores, weights = run_simplified(jnp.asarray(seed_inputs))
        np.testing.assert_allclose(scores[1], JOURNEY_SCORES, **PRINTED)
        np.testing.assert_allclose(weights[1], JOURNEY_WEIGHTS, **PRINTED)
        np.testing.assert_allclose(out[1], JOURNEY_CONTEXT, **PRINTED)

    def test_full_tables(self, seed_inputs):
        out, scores, weights = run_simplified(jnp.asarray(seed_inputs))
        np.testing.assert_allclose(scores, ALL_SCORES, **PRINTED)
        np.testing.assert_allclose(weights, ALL_WEIGHTS, **PRINTED)
        np.testing.assert_allclose(out, CONTEXT_VECS, **PRINTED)

    def test_weights_rows_sum_to_one(self, seed_inputs):
        _, _, weights = run_simplified(jnp.asarray(seed_inputs))
        # Each weight within gamma(T + SOFTMAX_OPS) of exact (relative), the sum of T = 6 adds gamma(T).
        np.testing.assert_allclose(weights.sum(-1), np.ones(6), atol=gamma(2 * 6 + SOFTMAX_OPS), rtol=0)

    def test_naive_normalisation_differs_from_softmax(self, seed_inputs):
        # The book's first attempt (scores / sum) gives 0.1455, ... — softmax must not.
        _, scores, weights = run_simplified(jnp.asarray(seed_inputs))
        naive = scores[1] / scores[1].sum()
        np.testing.assert_allclose(naive, [0.1455, 0.2278, 0.2249, 0.1285, 0.1077, 0.1656], **PRINTED)
        assert np.abs(np.asarray(weights[1]) - np.asarray(naive)).max() > 5e-3

    def test_batched_equals_each_sentence(self, seed_inputs):
        x = np.stack([seed_inputs, seed_inputs[::-1]])
        out = np.asarray(jax.jit(jaxattn.SimplifiedSelfAttention().apply)({}, x))
        np.testing.assert_allclose(out[0], CONTEXT_VECS, **PRINTED)
        np.testing.assert_allclose(out[1], np.asarray(CONTEXT_VECS)[::-1], **PRINTED)


def explicit_attention(x, wq, wk, wv, bias=None):
    """Hand-written scaled attention over numpy float64: the independent reference."""
    q, k, v = x @ wq, x @ wk, x @ wv
    if bias is not None:
        q, k, v = q + bias[0], k + bias[1], v + bias[2]
    s = q @ k.T / np.sqrt(k.shape[-1])
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


class TestSelfAttentionV1:
    def test_parameters_are_raw_matrices(self):
        variables = jax.jit(jaxattn.SelfAttentionV1(3, 2).init)(jax.random.key(0), np.ones((6, 3), np.float32))
        params = variables["params"]
        assert set(params) == {"W_query", "W_key", "W_value"}
        assert all(p.shape == (3, 2) for p in params.values())
        # torch.rand-like initialisation: uniform in [0, 1)
        assert all(np.min(p) >= 0.0 and np.max(p) < 1.0 for p in params.values())

    def test_matches_explicit_formula(self, seed_inputs):
        rng = np.random.default_rng(0)
        wq, wk, wv = (rng.random((3, 2), dtype=np.float32) for _ in range(3))
        params = {"W_query": wq, "W_key": wk, "W_value": wv}
        module = jaxattn.SelfAttentionV1(3, 2)
        out = jax.jit(module.apply)({"params": params}, jnp.asarray(seed_inputs))
        expected = explicit_attention(seed_inputs.astype(np.float64), wq, wk, wv)  # float64: one float32 error
        np.testing.assert_allclose(out, expected, atol=layer_error(module, params, seed_inputs), rtol=0)


class TestSelfAttentionV2:
    @pytest.mark.parametrize("qkv_bias", [False, True])
    def test_matches_explicit_formula(self, seed_inputs, qkv_bias):
        module = jaxattn.SelfAttentionV2(3, 2, qkv_bias=qkv_bias)
        variables = jax.jit(module.init)(jax.random.key(1), jnp.asarray(seed_inputs))
        p = jax.tree.map(np.asarray, variables["params"])
        if qkv_bias:  # make the biases non-zero so they are really exercised
            for name in p:
                p[name]["bias"] = np.full(2, 0.1 * (1 + list(p).index(name)), np.float32)
        bias = [p[n]["bias"] for n in ("W_query", "W_key", "W_value")] if qkv_bias else None
        out = jax.jit(module.apply)({"params": p}, jnp.asarray(seed_inputs))
        expected = explicit_attention(
            seed_inputs.astype(np.float64), p["W_query"]["kernel"], p["W_key"]["kernel"], p["W_value"]["kernel"], bias
        )
        np.testing.assert_allclose(out, expected, atol=layer_error(module, p, seed_inputs), rtol=0)

    def test_unbatched_and_batched_agree(self, seed_inputs):
        module = jaxattn.SelfAttentionV2(3, 2)
        variables = jax.jit(module.init)(jax.random.key(2), jnp.asarray(seed_inputs))
        apply = jax.jit(module.apply)
        single = apply(variables, jnp.asarray(seed_inputs))
        batched = apply(variables, jnp.asarray(seed_inputs[None].repeat(3, 0)))
        check_layer(module, variables["params"], seed_inputs, batched, np.broadcast_to(single, (3, 6, 2)), "batched")


@pytest.mark.parametrize(
    "module, shape, message",
    [
        (jaxattn.SelfAttentionV1(3, 2), (6, 4), "d_in=3"),
        (jaxattn.SelfAttentionV2(3, 2), (1, 1, 6, 3), "rank 2 (tokens, d_in) or rank 3"),
        (jaxattn.SimplifiedSelfAttention(), (3,), "got shape (3,)"),
    ],
)
def test_bad_input_is_named(module, shape, message, without_typecheck):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        module.init(jax.random.key(0), jnp.ones(shape))


def test_shape_annotations_are_checked_under_pytest():
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError):
        jaxattn.SimplifiedSelfAttention().apply({}, jnp.ones((3,)))
