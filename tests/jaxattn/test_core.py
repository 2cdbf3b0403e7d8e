"""The functional core: scores, masked softmax, dropout, head reshapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import core
from jaxattn.masks import make_causal_mask
from jaxattn.tolerance import SOFTMAX_OPS, attention_error, gamma, linear_error
from tests.bounds import one_head, weights_bound


def np_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class TestScoresAndWeights:
    def test_scores_are_query_key_dot_products(self):
        q = np.arange(6, dtype=np.float32).reshape(2, 3)
        k = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
        bound = 2 * linear_error(q, k.T)[1].max()  # two float32 computations of a 3-term dot product
        np.testing.assert_allclose(core.attention_scores(jnp.asarray(q), jnp.asarray(k)), q @ k.T, atol=bound, rtol=0)

    def test_default_scale_is_inverse_sqrt_head_dim(self):
        rng = np.random.default_rng(0)
        q, k = rng.normal(size=(2, 5, 8)).astype(np.float32), rng.normal(size=(2, 7, 8)).astype(np.float32)
        expected = np_softmax(np.einsum("bqd,bkd->bqk", q, k) / np.sqrt(8))  # numpy, in float32 too
        bound = weights_bound(one_head(q), one_head(k))
        np.testing.assert_allclose(core.attention_weights(jnp.asarray(q), jnp.asarray(k)), expected, atol=bound, rtol=0)

    def test_masked_positions_get_zero_weight_and_rows_sum_to_one(self):
        scores = jnp.asarray(np.random.default_rng(1).normal(size=(5, 5)), jnp.float32)
        w = core.masked_softmax(scores, make_causal_mask(5))
        assert np.all(np.triu(np.asarray(w), k=1) == 0)
        # Each weight within gamma(T + SOFTMAX_OPS) of exact (relative), the sum of T of them adds gamma(T).
        np.testing.assert_allclose(w.sum(-1), np.ones(5), atol=gamma(2 * 5 + SOFTMAX_OPS), rtol=0)
        # Row i is a softmax over its first i+1 scores only: two float32 softmaxes of the same scores.
        s = np.asarray(scores)
        for i in range(5):
            bound = 2 * gamma(i + 1 + SOFTMAX_OPS)  # weights <= 1, each off by that relative error at most
            np.testing.assert_allclose(w[i, : i + 1], np_softmax(s[i, : i + 1]), atol=bound, rtol=0)

    def test_fully_masked_row_gives_nan_like_torch(self):
        mask = jnp.array([[True, False], [False, False]])
        w = core.masked_softmax(jnp.zeros((2, 2)), mask)
        assert np.isnan(np.asarray(w[1])).all() and np.isfinite(np.asarray(w[0])).all()

    def test_softmax_runs_in_float32_for_bfloat16_scores(self):
        scores = jnp.asarray([[100.0, 100.5, 99.0]], jnp.bfloat16)
        w = core.masked_softmax(scores)
        assert w.dtype == jnp.float32
        # bf16-exact scores, softmax in float32 against float64: the weights' own roundings.
        expected = np_softmax(np.array([100.0, 100.5, 99.0]))
        np.testing.assert_allclose(w[0], expected, atol=gamma(3 + SOFTMAX_OPS), rtol=0)


class TestDropout:
    def test_zeroes_about_rate_and_rescales_survivors(self):
        x = jnp.full((200, 200), 0.25, jnp.float32)
        y = np.asarray(core.dropout(x, 0.3, jax.random.key(0), deterministic=False))
        dropped = (y == 0).mean()
        assert abs(dropped - 0.3) < 0.01  # 40k draws: 5 sigma is ~0.011
        # 1 - rate rounded to float32, then a division (or a reciprocal and a product): three roundings.
        np.testing.assert_allclose(y[y != 0], 0.25 / 0.7, rtol=gamma(3))

    def test_same_key_same_result_other_key_other_result(self):
        x = jnp.ones((50, 50))
        a = core.dropout(x, 0.5, jax.random.key(3), deterministic=False)
        b = core.dropout(x, 0.5, jax.random.key(3), deterministic=False)
        c = core.dropout(x, 0.5, jax.random.key(4), deterministic=False)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)

    def test_deterministic_and_zero_rate_are_identity(self):
        x = jnp.arange(10.0)
        np.testing.assert_array_equal(core.dropout(x, 0.5, None, deterministic=True), x)
        np.testing.assert_array_equal(core.dropout(x, 0.0, jax.random.key(0), deterministic=False), x)

    def test_rate_one_drops_everything(self):
        np.testing.assert_array_equal(core.dropout(jnp.ones(4), 1.0, jax.random.key(0), False), np.zeros(4))

    def test_training_without_rng_is_an_error(self):
        with pytest.raises(ValueError, match="needs an rng"):
            core.dropout(jnp.ones(4), 0.5, None, deterministic=False)


class TestHeads:
    def test_split_heads_matches_view_then_transpose(self):
        x = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
        expected = x.reshape(2, 5, 3, 2).transpose(0, 2, 1, 3)  # torch: view(b, T, H, hd).transpose(1, 2)
        np.testing.assert_array_equal(core.split_heads(jnp.asarray(x), 3), expected)

    def test_merge_heads_inverts_split_heads(self):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 12)), jnp.float32)
        for heads in (1, 2, 3, 4, 6, 12):
            np.testing.assert_array_equal(core.merge_heads(core.split_heads(x, heads)), x)


def test_causal_attention_first_token_sees_only_itself():
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 9, 4)), jnp.float32) for _ in range(3))
    out, weights = core.causal_attention(q, k, v)
    bound = attention_error(one_head(q), one_head(k), one_head(v), is_causal=True)  # against the exact v[:, 0]
    np.testing.assert_allclose(out[:, 0], v[:, 0], atol=bound, rtol=0)
    np.testing.assert_allclose(weights[:, 0, 0], 1.0, atol=gamma(1 + SOFTMAX_OPS), rtol=0)  # exp(0) / exp(0)
