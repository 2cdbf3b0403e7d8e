"""Blockwise, XLA and auto causal attention against the naive path, a float64 numpy reference and torch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import core
from jaxattn.fused import fuse_qkv_params, fused_mha
from jaxattn.implementations import AUTO_BLOCKWISE_MIN_TOKENS
from jaxattn.kernels.blockwise import blockwise_causal_attention
from jaxattn.tolerance import attention_bound, attention_error, attention_grad_bound
from tests.bounds import check_within, layer_bound, max_abs, one_head

# The kernels, modules and gradients run jitted: one program per shape, not one per operation (slow to
# compile on a GPU); the naive references, shared by several tests, once per shape. Only the tests of
# argument errors call them eagerly.
naive_causal_attention = jax.jit(functools.partial(core.causal_attention, impl="naive"))


@functools.partial(jax.jit, static_argnums=0)
def init_and_apply(module, x):
    variables = module.init(jax.random.key(0), x)
    return variables, module.apply(variables, x)


def causal_bound(q, k, v):
    """Two float32 computations of causal attention on ``(*batch, T, d)`` operands: the derived bound."""
    return attention_bound(one_head(q), one_head(k), one_head(v), is_causal=True)


def causal_error(q, k, v):
    """One float32 computation against the exact (float64) value."""
    return attention_error(one_head(q), one_head(k), one_head(v), is_causal=True)


def qkv(shape, seed=0, dv=None):
    """Random ``(q, k, v)`` of ``shape = (*batch, tokens, d)``; ``v`` may have another last dim."""
    rng = np.random.default_rng(seed)
    q, k = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    v = rng.normal(size=shape[:-1] + (dv or shape[-1],)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def numpy_causal_attention(q, k, v):
    """Independent float64 reference: the book's mask -> scale -> softmax -> @ v."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scores = q @ np.swapaxes(k, -1, -2)
    tokens = q.shape[-2]
    scores = np.where(np.tril(np.ones((tokens, tokens), bool)), scores, -np.inf) / np.sqrt(k.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return weights @ v


# (leading dims, tokens, head_dim, block_size): tokens below, at and off multiples of the block
SHAPES = [
    ((), 1, 4, 4),
    ((2,), 5, 3, 4),
    ((2, 3), 37, 8, 16),
    ((1, 2), 64, 16, 16),
    ((3,), 130, 8, 64),
    ((2,), 19, 5, 1),
    ((11,), 21, 4, 8),  # 11 rows: a prime, so rows go through the loops one at a time
    ((3, 4), 40, 8, 16),  # 12 rows: two groups of 6
]


@pytest.mark.parametrize("method", ["prefix", "online"])
@pytest.mark.parametrize("batch,tokens,head_dim,block_size", SHAPES)
def test_blockwise_matches_naive_and_numpy(batch, tokens, head_dim, block_size, method):
    q, k, v = qkv(batch + (tokens, head_dim), dv=head_dim + 2)
    out = jax.jit(functools.partial(blockwise_causal_attention, block_size=block_size, method=method))(q, k, v)
    naive, _ = naive_causal_attention(q, k, v)
    assert out.shape == naive.shape == batch + (tokens, head_dim + 2)
    np.testing.assert_allclose(out, naive, atol=causal_bound(q, k, v), rtol=0)
    np.testing.assert_allclose(out, numpy_causal_attention(q, k, v), atol=causal_error(q, k, v), rtol=0)


def test_derived_bound_catches_a_wrong_scale_and_a_dropped_causal_mask():
    """The derived bound is tight enough to fail a real bug: scores scaled 1.01x, or the causal mask gone."""
    q, k, v = qkv((2, 3, 37, 8), dv=10)
    out = jax.jit(functools.partial(blockwise_causal_attention, block_size=16, method="online"))(q, k, v)
    bound = causal_bound(q, k, v)
    check_within(out, naive_causal_attention(q, k, v)[0], bound, "blockwise vs naive")
    wrong_scale, _ = naive_causal_attention(q * 1.01, k, v)  # scale * 1.01: the same as queries * 1.01
    assert max_abs(out, wrong_scale) > 10 * bound, (max_abs(out, wrong_scale), bound)
    split = lambda a: jnp.reshape(a, (6, 37, 1, -1))  # noqa: E731 - (*batch, T, d) -> (B, T, N, d), one head
    no_mask = jax.jit(functools.partial(jaxattn.dot_product_attention, implementation="naive"))(*map(split, (q, k, v)))
    assert max_abs(split(out), no_mask) > 10 * bound, (max_abs(split(out), no_mask), bound)


@pytest.mark.parametrize("impl", ["blockwise", "xla", "auto"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_every_impl_matches_numpy(impl, tokens):
    q, k, v = qkv((2, 3, tokens, 8), seed=tokens)
    out, weights = jax.jit(functools.partial(core.causal_attention, impl=impl))(q, k, v)
    np.testing.assert_allclose(out, numpy_causal_attention(q, k, v), atol=causal_error(q, k, v), rtol=0)
    # Only the naive path materialises weights; auto picks it on a CPU below the threshold, never on a
    # GPU (the flash kernel, tests/jaxattn/test_cudnn_and_auto.py).
    naive_chosen = impl == "auto" and jax.default_backend() == "cpu" and tokens < AUTO_BLOCKWISE_MIN_TOKENS
    assert (weights is not None) == naive_chosen


def test_blockwise_matches_torch_sdpa():
    torch = pytest.importorskip("torch")
    q, k, v = qkv((2, 3, 45, 8), seed=3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(np.asarray(a)) for a in (q, k, v)), is_causal=True
    ).numpy()
    out = jax.jit(functools.partial(blockwise_causal_attention, block_size=16))(q, k, v)
    np.testing.assert_allclose(out, expected, atol=causal_bound(q, k, v), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "impl,block_size,method",
    [("blockwise", 4, "online"), ("blockwise", 16, "online"), ("blockwise", 4, "prefix"), ("xla", None, None)],
)
def test_gradients_match_naive(impl, block_size, method):
    q, k, v = qkv((2, 2, 13, 4), seed=7)
    cotangent = jnp.asarray(np.random.default_rng(8).normal(size=(2, 2, 13, 4)).astype(np.float32))

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * cotangent).sum()

    naive = loss(lambda q, k, v: core.causal_attention(q, k, v, impl="naive")[0])
    if impl == "blockwise":
        other = loss(lambda q, k, v: blockwise_causal_attention(q, k, v, block_size=block_size, method=method))
    else:
        other = loss(lambda q, k, v: core.causal_attention(q, k, v, impl=impl)[0])
    expected = jax.jit(jax.grad(naive, argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.grad(other, argnums=(0, 1, 2)))(q, k, v)
    bounds = attention_grad_bound(one_head(q), one_head(k), one_head(v), one_head(cotangent), is_causal=True)
    for name, e, g in zip("qkv", expected, got):
        np.testing.assert_allclose(g, e, atol=bounds[name], rtol=0, err_msg=f"d loss / d {name}")


def test_derived_bound_catches_gradients_with_a_wrong_scale():
    """Gradients of a kernel whose scale is 1.01x the right one: every one outside the derived gradient bound."""
    q, k, v = qkv((2, 2, 13, 4), seed=7)
    cotangent = jnp.asarray(np.random.default_rng(8).normal(size=(2, 2, 13, 4)).astype(np.float32))

    def loss(q_scale):  # queries scaled = scores scaled: the gradient of a kernel with scale * q_scale
        return lambda q, k, v: (blockwise_causal_attention(q * q_scale, k, v, block_size=4) * cotangent).sum()

    right = jax.jit(jax.grad(loss(1.0), argnums=(0, 1, 2)))(q, k, v)
    wrong = jax.jit(jax.grad(loss(1.01), argnums=(0, 1, 2)))(q, k, v)
    bounds = attention_grad_bound(one_head(q), one_head(k), one_head(v), one_head(cotangent), is_causal=True)
    for name, r, w in zip("qkv", right, wrong):
        assert max_abs(r, w) > 10 * bounds[name], (name, max_abs(r, w), bounds[name])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prefix", "online"])
def test_receptive_field_is_causal_across_blocks(method):
    """d out[i] / d x[j] is zero for j > i and non-zero for j <= i, with 4-token blocks over 11 tokens."""
    rng = np.random.default_rng(0)
    w_q, w_k, w_v = (jnp.asarray(rng.normal(size=(5, 4)).astype(np.float32)) for _ in range(3))
    x = jnp.asarray(rng.normal(size=(11, 5)).astype(np.float32))

    def out(x):
        return blockwise_causal_attention(x @ w_q, x @ w_k, x @ w_v, block_size=4, method=method)  # (11, 4)

    jacobian = np.asarray(jax.jit(jax.jacrev(out))(x))  # (11, 4, 11, 5): d out[i, :] / d x[j, :]
    for i in range(11):
        norms = np.abs(jacobian[i]).sum(axis=(0, 2))  # (11,) over j
        assert np.all(norms[i + 1 :] == 0.0), f"token {i} sees the future: {norms}"
        assert np.all(norms[: i + 1] > 0.0), f"token {i} misses its past: {norms}"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["blockwise", "xla", "auto"])
def test_modules_match_naive(impl):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 21, 12)).astype(np.float32))
    for make in (
        lambda i: jaxattn.MultiHeadAttention(12, 8, 32, 0.0, num_heads=2, attention_impl=i),
        lambda i: jaxattn.CausalAttention(12, 6, 32, 0.0, attention_impl=i),
        lambda i: jaxattn.MultiHeadAttentionCombinedQKV(12, 8, 2, 32, attention_impl=i),
    ):
        variables, expected = init_and_apply(make("naive"), x)
        out, state = jax.jit(lambda v, x: make(impl).apply(v, x, mutable=["intermediates"]))(variables, x)
        bound = layer_bound(make(impl), variables["params"], x)
        np.testing.assert_allclose(out, expected, atol=bound, rtol=0)
        naive_chosen = impl == "auto" and jax.default_backend() == "cpu"  # 21 tokens; on a GPU: flash
        assert ("attn_weights" in state["intermediates"]) == naive_chosen


@pytest.mark.slow
def test_dropout_in_training_falls_back_to_naive():
    """With dropout active every impl draws the book's dropout mask on the full weights: outputs are identical."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 6)).astype(np.float32))
    key = jax.random.key(5)
    module = jaxattn.MultiHeadAttention(6, 4, 9, 0.5, num_heads=2)
    variables = jax.jit(module.init)(jax.random.key(0), x)

    def train(module):
        return jax.jit(lambda v, x, key: module.apply(v, x, deterministic=False, rngs={"dropout": key}))

    expected = train(module)(variables, x, key)
    assert not np.allclose(expected, jax.jit(module.apply)(variables, x)), "dropout did nothing"
    for impl in ("blockwise", "xla", "auto"):
        module = jaxattn.MultiHeadAttention(6, 4, 9, 0.5, num_heads=2, attention_impl=impl)
        out = train(module)(variables, x, key)
        np.testing.assert_array_equal(out, expected)


def test_fused_mha_matches_module():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 40, 16)).astype(np.float32))
    for bias in (False, True):
        module = jaxattn.MultiHeadAttention(16, 16, 64, 0.0, num_heads=4, qkv_bias=bias)
        variables = jax.jit(module.init)(jax.random.key(1), x)
        fused = fuse_qkv_params(variables["params"])
        assert fused["W_qkv"]["kernel"].shape == (16, 48)
        out = jax.jit(lambda p, x: fused_mha(p, x, num_heads=4))(fused, x)
        bound = layer_bound(module, variables["params"], x)
        np.testing.assert_allclose(out, jax.jit(module.apply)(variables, x), atol=bound, rtol=0)


def test_bad_impl_and_block_size_are_named(without_typecheck):
    """The errors a user without jaxtyping's runtime checks gets."""
    q, k, v = qkv((4, 2))
    with pytest.raises(ValueError, match="impl must be"):
        core.causal_attention(q, k, v, impl="flash3")  # "flash" is a (GPU) implementation now
    with pytest.raises(ValueError, match="method must be 'auto', 'prefix' or 'online', got 'flash'"):
        blockwise_causal_attention(q, k, v, method="flash")
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        blockwise_causal_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="as many keys as queries"):
        blockwise_causal_attention(q, k[:3], v[:3])
