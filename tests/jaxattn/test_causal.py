"""Sections 3.5-3.6.1: causality, dropout and stacked heads, from identities that need no torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.tolerance import SOFTMAX_OPS, gamma
from tests.bounds import check_layer, check_within, layer_bound

KEY = jax.random.key(0)
# init and apply run jitted: one program per shape, not one per operation (slow to compile on a GPU).


def batch(seed_inputs, b=2):
    return jnp.asarray(np.stack([seed_inputs] * b))


class TestCausalAttention:
    def test_first_token_context_is_its_own_value(self, seed_inputs):
        module = jaxattn.CausalAttention(3, 2, 6, 0.0)
        variables = jax.jit(module.init)(KEY, batch(seed_inputs))
        out = np.asarray(jax.jit(module.apply)(variables, batch(seed_inputs)))
        w_value = np.asarray(variables["params"]["W_value"]["kernel"])
        x = np.asarray(batch(seed_inputs))
        # Token 0 sees one key (weight 1): the layer on that token alone, computed twice, bounds the difference.
        bound = layer_bound(module, variables["params"], x[:, :1])
        check_within(out[:, 0], x[:, 0] @ w_value, bound, "first token vs its own value")

    @pytest.mark.slow
    def test_receptive_field_is_causal(self):
        """d context_vec[i] / d x[j] is zero for every j > i and non-zero for j <= i."""
        module = jaxattn.CausalAttention(4, 3, 8, 0.0)
        x = jax.random.normal(jax.random.key(1), (1, 8, 4))
        variables = jax.jit(module.init)(KEY, x)
        grad_of_token = jax.jit(jax.grad(lambda x, i: module.apply(variables, x)[0, i].sum()))  # one program for all i
        for i in range(8):
            grad = grad_of_token(x, i)[0]
            norms = np.abs(np.asarray(grad)).sum(-1)
            assert np.all(norms[i + 1 :] == 0.0), f"token {i} sees the future: {norms}"
            assert np.all(norms[: i + 1] > 0.0), f"token {i} misses its past: {norms}"

    def test_weights_are_lower_triangular_and_rows_sum_to_one(self, seed_inputs):
        # naive: the kernel that has weights to sow (auto's choice here on a CPU; on a GPU auto takes flash)
        module = jaxattn.CausalAttention(3, 2, 6, 0.0, attention_impl="naive")
        variables = jax.jit(module.init)(KEY, batch(seed_inputs))
        _, state = jax.jit(lambda v, x: module.apply(v, x, mutable=["intermediates"]))(variables, batch(seed_inputs))
        w = np.asarray(state["intermediates"]["attn_weights"][0])
        assert np.all(np.triu(w[0], k=1) == 0)
        # Each weight is within gamma(T + SOFTMAX_OPS) of exact (relative), the sum of T of them adds gamma(T).
        tokens = w.shape[-1]
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=gamma(2 * tokens + SOFTMAX_OPS), rtol=0)

    def test_shorter_input_than_context_length_uses_the_mask_prefix(self, seed_inputs):
        module = jaxattn.CausalAttention(3, 2, 6, 0.0)
        variables = jax.jit(module.init)(KEY, batch(seed_inputs))
        x, apply = np.asarray(batch(seed_inputs)), jax.jit(module.apply)
        full, prefix = np.asarray(apply(variables, x)), np.asarray(apply(variables, x[:, :4]))
        check_layer(module, variables["params"], x[:, :4], prefix, full[:, :4], "prefix")  # causality: unaffected


class TestDropout:
    """Dropout acts on the attention weights: with one-hot tokens and identity values the
    output *is* the dropped weight matrix, which we compare with the sown pre-dropout weights."""

    T, RATE = 48, 0.4

    def setup_module_and_params(self):
        module = jaxattn.CausalAttention(self.T, self.T, self.T, self.RATE)
        x = jnp.asarray(np.eye(self.T, dtype=np.float32)[None])  # one-hot tokens: values = W_value = identity
        variables = jax.jit(module.init)(KEY, x)
        params = jax.tree.map(np.asarray, variables["params"])
        params["W_value"]["kernel"] = np.eye(self.T, dtype=np.float32)
        return module, {"params": params}, x

    def test_training_zeroes_about_rate_and_rescales_the_rest(self):
        module, variables, x = self.setup_module_and_params()
        out, state = jax.jit(
            lambda v, x, key: module.apply(v, x, deterministic=False, rngs={"dropout": key}, mutable=["intermediates"])
        )(variables, x, jax.random.key(7))
        weights = np.asarray(state["intermediates"]["attn_weights"][0])[0]
        out = np.asarray(out)[0]
        causal = np.tril(np.ones((self.T, self.T), bool))
        kept = (out != 0) & causal
        dropped_fraction = 1 - kept.sum() / causal.sum()
        assert abs(dropped_fraction - self.RATE) < 0.05  # 1176 draws: 4 sigma ~ 0.057
        # Values are the identity exactly (one-hot tokens, identity kernel: one non-zero product per sum), so
        # each output is the kept weight divided by 1 - rate: a division (or a reciprocal and a product) here,
        # one division in numpy, a few roundings in all.
        np.testing.assert_allclose(out[kept], weights[kept] / (1 - self.RATE), rtol=gamma(4), atol=0)
        assert np.all(out[~causal] == 0)

    def test_deterministic_equals_dropout_free_module(self):
        module, variables, x = self.setup_module_and_params()
        no_dropout = jaxattn.CausalAttention(self.T, self.T, self.T, 0.0)
        np.testing.assert_array_equal(jax.jit(module.apply)(variables, x), jax.jit(no_dropout.apply)(variables, x))

    def test_same_key_same_result(self):
        module, variables, x = self.setup_module_and_params()
        train = jax.jit(lambda v, x, key: module.apply(v, x, deterministic=False, rngs={"dropout": key}))
        run = lambda k: train(variables, x, jax.random.key(k))  # noqa: E731
        np.testing.assert_array_equal(run(3), run(3))
        assert not np.array_equal(run(3), run(4))

    def test_training_without_dropout_rng_fails_clearly(self):
        module, variables, x = self.setup_module_and_params()
        with pytest.raises(Exception, match="dropout"):
            module.apply(variables, x, deterministic=False)


class TestMultiHeadAttentionWrapper:
    def test_output_is_the_concatenation_of_independent_heads(self, seed_inputs):
        wrapper = jaxattn.MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=3)
        x = batch(seed_inputs)
        variables = jax.jit(wrapper.init)(KEY, x)
        assert set(variables["params"]) == {"heads_0", "heads_1", "heads_2"}
        out = np.asarray(jax.jit(wrapper.apply)(variables, x))
        assert out.shape == (2, 6, 6)  # num_heads * d_out, as in the book
        head_module = jaxattn.CausalAttention(3, 2, 6, 0.0)
        head = jax.jit(head_module.apply)
        for i in range(3):
            params = variables["params"][f"heads_{i}"]
            one = head({"params": params}, x)
            check_layer(head_module, params, x, out[..., 2 * i : 2 * i + 2], one, f"head {i}")


@pytest.mark.parametrize(
    "module, shape, pattern",
    [
        (jaxattn.CausalAttention(3, 2, 6, 0.0), (1, 7, 3), r"tokens=7 exceeds context_length=6"),
        (jaxattn.CausalAttention(3, 2, 6, 0.0), (6, 3), r"rank 3 \(batch, tokens, d_in\), got shape \(6, 3\)"),
        (jaxattn.CausalAttention(3, 2, 6, 0.0), (1, 6, 5), r"d_in=3, got shape \(1, 6, 5\)"),
        (jaxattn.MultiHeadAttentionWrapper(3, 2, 4, 0.0, 2), (2, 5, 3), r"tokens=5 exceeds context_length=4"),
    ],
)
def test_bad_input_names_the_numbers(module, shape, pattern, without_typecheck):
    with pytest.raises(ValueError, match=pattern):
        module.init(KEY, jnp.ones(shape))
