"""GroupedQueryAttention against the book's Llama 3 and Qwen3 classes (crosscheck/references/torch_gqa.py, llms-from-scratch 1.0.19)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import implementations
from jaxattn.tolerance import reference_bound
from tests.bounds import chain_length, check_layer, layer64, layer_grads64

torch = pytest.importorskip("torch")
torch_gqa = pytest.importorskip("crosscheck.references.torch_gqa")

HIGHEST = functools.partial(jax.default_matmul_precision, "highest")
# ring needs a mesh (tests/jaxattn/test_ring.py); flash and cudnn run on a GPU only and refuse masks
# (tests/jaxattn/test_flash.py, test_cudnn_and_auto.py).
IMPLS = tuple(n for n in implementations.names() if n != "ring" and implementations.get(n).platforms is None)
SCALED = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 64}


def port(book) -> dict:
    """The book's state dict as Flax params: Linear ``weight`` -> ``kernel`` = ``weight.T``; RMSNorm ``scale`` as is."""
    params = {}
    for key, tensor in book.state_dict().items():
        module, leaf = key.split(".")
        array = tensor.detach().numpy()
        params[module] = {"kernel": array.T} if leaf == "weight" else {leaf: array}
    return params


def book_and_flax(kind, d_in, num_heads, kv_groups, head_dim, *, qk_norm=False, d_out=None, seed=0, **flax_kw):
    """A book module with random weights (norm scales too) and the matching Flax module and params."""
    torch.manual_seed(seed)
    if kind == "llama3":
        book = torch_gqa.Llama3GroupedQueryAttention(d_in, d_out, num_heads, kv_groups)
        module = jaxattn.GroupedQueryAttention(
            d_in, num_heads, kv_groups, head_dim=d_out // num_heads, out_features=d_out, **flax_kw
        )
    else:
        book = torch_gqa.Qwen3GroupedQueryAttention(d_in, num_heads, kv_groups, head_dim=head_dim, qk_norm=qk_norm)
        module = jaxattn.GroupedQueryAttention(d_in, num_heads, kv_groups, head_dim, qk_norm, **flax_kw)
    with torch.no_grad():
        for name, p in book.named_parameters():
            if name.endswith("scale"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    return book, module, port(book)


def inputs(batch, tokens, d_in, seed=1):
    return np.random.default_rng(seed).normal(size=(batch, tokens, d_in)).astype(np.float32)


def max_abs(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# RoPE and QK-norm rule out a first-order bound here: each comparison is against the layer in float64
# (tests/bounds.py, from the book's formulas) within 4x the float32 reference's own error
# (jaxattn.tolerance.reference_bound).


# (id, kind, d_in, num_heads, kv_groups, head_dim, qk_norm, d_out, rope_theta, freq_config, tokens)
CASES = [
    ("qwen3-mha", "qwen3", 16, 4, 4, None, False, None, 10_000.0, None, 7),
    ("qwen3-gqa-qknorm-hd8-T1", "qwen3", 12, 6, 2, 8, True, None, 1_000_000.0, None, 1),
    ("qwen3-mqa-qknorm-hd6-scaled", "qwen3", 10, 4, 1, 6, True, None, 10_000.0, SCALED, 45),
    ("llama3-mha", "llama3", 8, 2, 2, None, False, 8, 10_000.0, None, 5),
    ("llama3-gqa-scaled-T300", "llama3", 12, 4, 2, None, False, 16, 500_000.0, SCALED, 300),
    ("llama3-mqa-T1", "llama3", 6, 3, 1, None, False, 12, 10_000.0, None, 1),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_the_books_class(case, impl):
    _, kind, d_in, heads, kv, head_dim, qk_norm, d_out, theta, freq, tokens = case
    book, module, params = book_and_flax(
        kind, d_in, heads, kv, head_dim, qk_norm=qk_norm, d_out=d_out,
        context_length=512, rope_theta=theta, freq_config=freq, attention_impl=impl,
    )
    x = inputs(2, tokens, d_in)
    with torch.no_grad():
        expected = torch_gqa.causal_forward(
            book, torch.from_numpy(x), rope_theta=theta, freq_config=freq, context_length=512
        ).numpy()
    with HIGHEST():
        got = jax.jit(module.apply)({"params": params}, jnp.asarray(x))
    assert got.shape == expected.shape
    check_layer(module, params, x, got, expected, f"{case[0]} [{impl}]: flax {got.shape} vs book")


def test_derived_bound_catches_a_weight_off_by_one_percent():
    """The float64 route's bound (RoPE and QK-norm) still fails a real bug: one W_value entry 1 % off."""
    book, module, params = book_and_flax("qwen3", 12, 6, 2, 8, qk_norm=True, context_length=32)
    x = inputs(2, 9, 12)
    with torch.no_grad():
        expected = torch_gqa.causal_forward(book, torch.from_numpy(x), context_length=32).numpy()
    exact = layer64(module, params, x)
    bound = reference_bound(expected, exact, reduction_length=chain_length(module, params, x))
    kernel = np.array(params["W_value"]["kernel"])
    kernel.flat[np.abs(kernel).argmax()] *= 1.01
    with HIGHEST():
        got = jax.jit(module.apply)({"params": {**params, "W_value": {"kernel": kernel}}}, jnp.asarray(x))
    assert max_abs(got, exact) > 10 * bound, (max_abs(got, exact), bound)


def test_parameter_tree_is_the_books_state_dict():
    book, module, params = book_and_flax("qwen3", 12, 6, 2, 8, qk_norm=True)
    variables = jax.jit(module.init)(jax.random.key(0), jnp.ones((1, 3, 12)))
    shapes = jax.tree.map(lambda a: a.shape, variables["params"])
    assert shapes == {
        "W_query": {"kernel": (12, 48)}, "W_key": {"kernel": (12, 16)}, "W_value": {"kernel": (12, 16)},
        "out_proj": {"kernel": (48, 12)}, "q_norm": {"scale": (8,)}, "k_norm": {"scale": (8,)},
    }
    assert shapes == jax.tree.map(lambda a: a.shape, params)
    np.testing.assert_array_equal(variables["params"]["q_norm"]["scale"], np.ones(8, np.float32))


def test_gradients_equal_the_books():
    book, module, params = book_and_flax("qwen3", 12, 6, 2, 8, qk_norm=True, freq_config=SCALED)
    x = inputs(2, 9, 12)
    weights = np.random.default_rng(5).normal(size=(2, 9, 12)).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_(True)
    (torch_gqa.causal_forward(book, tx, freq_config=SCALED) * torch.from_numpy(weights)).sum().backward()
    expected = {"x": tx.grad.numpy(), **{k: v for k, v in port_grads(book).items()}}

    def loss(params, x):
        return jnp.sum(module.apply({"params": params}, x) * weights)

    with HIGHEST():
        grads_p, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
    got = {"x": grad_x, **{f"{m}/{leaf}": g for m, leaves in grads_p.items() for leaf, g in leaves.items()}}
    exact_p, exact_x = layer_grads64(module, params, x, weights)
    exact = {"x": exact_x, **{f"{m}/{leaf}": g for m, leaves in exact_p.items() for leaf, g in leaves.items()}}
    assert set(got) == set(expected) == set(exact)
    length = chain_length(module, params, x) + x.shape[0] * x.shape[1]  # weight gradients sum over B T too
    for name in expected:
        bound = reference_bound(expected[name], exact[name], reduction_length=length)
        err = max_abs(got[name], exact[name])
        assert err <= bound, (
            f"d loss / d {name} {np.shape(got[name])}: max |flax - float64| = {err:.3g} > bound {bound:.3g} "
            f"(torch float32: {max_abs(expected[name], exact[name]):.3g})"
        )


def port_grads(book):
    out = {}
    for key, p in book.named_parameters():
        module, leaf = key.split(".")
        out[f"{module}/kernel" if leaf == "weight" else f"{module}/{leaf}"] = (
            p.grad.numpy().T if leaf == "weight" else p.grad.numpy()
        )
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_decoding_equals_the_full_forward(impl):
    """A 5-token prompt, then one token at a time; keys are rotated at their own positions before caching."""
    _, full, params = book_and_flax("qwen3", 12, 6, 2, 8, qk_norm=True, context_length=32, freq_config=SCALED)
    x = inputs(2, 14, 12)  # numpy: its slices compile nothing
    decoder = full.clone(decode=True, attention_impl=impl)
    cache = jax.jit(decoder.init)(jax.random.key(0), x)["cache"]  # sized by the input: 14 tokens

    @jax.jit
    def step(cache, chunk):
        out, state = decoder.apply({"params": params, "cache": cache}, chunk, mutable=["cache"])
        return out, state["cache"]

    with HIGHEST():
        expected = jax.jit(full.clone(attention_impl=impl).apply)({"params": params}, x)
        outs = []
        out, cache = step(cache, x[:, :5])
        outs.append(out)
        for t in range(5, 14):
            out, cache = step(cache, x[:, t : t + 1])
            outs.append(out)
    check_layer(full, params, x, np.concatenate(outs, axis=1), expected, f"[{impl}] decode vs full forward")
    assert cache["cached_key"].shape == (2, 14, 2, 8)  # kv_groups heads, never repeated
    assert step._cache_size() == 2  # the prompt and the step: no recompilation per token


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(side, impl):
    """Right padding keeps positions; left padding shifts them, and RoPE scores depend on distance only."""
    _, module, params = book_and_flax("qwen3", 12, 4, 2, 6, qk_norm=True, attention_impl=impl)
    lengths = (7, 1)
    sequences = [inputs(1, n, 12, seed=10 + i) for i, n in enumerate(lengths)]
    width = max(lengths)
    x = inputs(len(lengths), width, 12, seed=99) * 100  # padding tokens: large, so a leak shows
    real = np.zeros((len(lengths), width), bool)
    for i, (s, n) in enumerate(zip(sequences, lengths)):
        where = slice(width - n, width) if side == "left" else slice(0, n)
        x[i, where], real[i, where] = s[0], True
    apply = jax.jit(module.apply)
    with HIGHEST():
        out = np.asarray(apply({"params": params}, jnp.asarray(x), attention_mask=jnp.asarray(real)))
        for i, s in enumerate(sequences):
            alone = np.asarray(apply({"params": params}, jnp.asarray(s)))[0]
            check_layer(module, params, s, out[i][real[i]], alone, f"[{impl}] {side}-padded sequence {i}")
    assert np.isfinite(out).all()


@pytest.mark.xla_optimized
@pytest.mark.parametrize("qk_norm", [False, True])
def test_jitted_forward_is_finite_for_inputs_scaled_by_1e4(qk_norm):
    _, module, params = book_and_flax("qwen3", 12, 6, 2, 8, qk_norm=qk_norm, freq_config=SCALED)
    x = jnp.asarray(inputs(2, 20, 12) * 1e4)
    real = np.ones((2, 20), bool)
    real[1, :6] = False
    out = jax.jit(lambda p, x, m: module.apply({"params": p}, x, attention_mask=m))(params, x, real)
    assert np.isfinite(np.asarray(out)).all()


def test_freq_config_dict_is_stored_hashable():
    as_dict = jaxattn.GroupedQueryAttention(8, 2, 1, freq_config=SCALED)
    as_pairs = jaxattn.GroupedQueryAttention(8, 2, 1, freq_config=tuple(reversed(list(SCALED.items()))))
    assert as_dict.freq_config == as_pairs.freq_config == tuple(sorted(SCALED.items()))
    assert hash(as_dict) == hash(as_pairs)


@pytest.mark.parametrize(
    "kwargs, tokens, message",
    [
        (dict(d_in=12, num_heads=6, num_kv_groups=4), 3, r"num_heads=6 must be divisible by num_kv_groups=4"),
        (dict(d_in=12, num_heads=4, num_kv_groups=2, head_dim=5), 3, r"head_dim=5 must be even"),
        (dict(d_in=12, num_heads=4, num_kv_groups=2), 3, r"head_dim=3 must be even"),
        (dict(d_in=10, num_heads=4, num_kv_groups=2), 3, r"d_in=10 must be divisible by num_heads=4"),
        (dict(d_in=12, num_heads=6, num_kv_groups=2, context_length=8), 9, r"tokens=9 exceeds context_length=8"),
        (dict(d_in=12, num_heads=6, num_kv_groups=2, freq_config={"factor": 8.0}), 3, r"freq_config needs exactly"),
    ],
)
def test_bad_configs_name_the_numbers(kwargs, tokens, message, without_typecheck):
    module = jaxattn.GroupedQueryAttention(**kwargs)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, tokens, kwargs["d_in"])))
