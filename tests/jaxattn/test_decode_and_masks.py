"""KV-cache decoding equals the full forward; padded batches equal their sequences run one by one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from tests.bounds import check_layer, layer_bound, max_abs

IMPLS = ("naive", "blockwise", "xla")
HIGHEST = functools.partial(jax.default_matmul_precision, "highest")

MODULES = {
    "MultiHeadAttention": lambda **kw: jaxattn.MultiHeadAttention(8, 8, 32, 0.0, 2, True, **kw),
    "MultiHeadAttentionCombinedQKV": lambda **kw: jaxattn.MultiHeadAttentionCombinedQKV(8, 8, 4, 32, **kw),
    "CausalAttention": lambda **kw: jaxattn.CausalAttention(8, 6, 32, 0.0, **kw),
    "MultiHeadAttentionWrapper": lambda **kw: jaxattn.MultiHeadAttentionWrapper(8, 3, 32, 0.0, 2, **kw),
    "TorchMultiheadAttention": lambda **kw: jaxattn.TorchMultiheadAttention(8, 2, causal=True, **kw),
}


def inputs(batch=2, tokens=20, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, tokens, 8)).astype(np.float32))


# Jitted with the module static: one program per module and shape, shared by the tests that repeat it,
# not one per operation (slow to compile on a GPU).
@functools.partial(jax.jit, static_argnums=0)
def init(module, key, x):
    return module.init(key, x)


@functools.partial(jax.jit, static_argnums=0)
def apply(module, variables, x, attention_mask=None):
    return module.apply(variables, x, attention_mask=attention_mask)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(MODULES))
def test_decoding_equals_the_full_forward(name, impl):
    x = inputs()
    full_module = MODULES[name](attention_impl=impl)
    params = init(full_module, jax.random.key(0), x)["params"]
    decoder = MODULES[name](attention_impl=impl, decode=True)
    cache = init(decoder, jax.random.key(0), x)["cache"]  # sized by the input: 20 tokens

    @jax.jit
    def step(cache, chunk):
        out, state = decoder.apply({"params": params, "cache": cache}, chunk, mutable=["cache"])
        return out, state["cache"]

    with HIGHEST():
        expected = apply(full_module, {"params": params}, x)
        outs = []
        out, cache = step(cache, x[:, :5])  # a 5-token prompt, then one token at a time
        outs.append(out)
        for t in range(5, 20):
            out, cache = step(cache, x[:, t : t + 1])
            outs.append(out)
    check_layer(full_module, params, x, np.concatenate(outs, axis=1), expected, f"{name} [{impl}] decode vs full")
    assert step._cache_size() == 2  # the prompt and the step: no recompilation per token


def test_derived_bound_catches_a_weight_off_by_one_percent_in_the_decoder():
    """One value-kernel entry 1 % off in the decoding module: outside the derived bound of the full forward."""
    x = inputs()
    module = MODULES["MultiHeadAttention"]()
    params = init(module, jax.random.key(0), x)["params"]
    decoder = MODULES["MultiHeadAttention"](decode=True)
    cache = init(decoder, jax.random.key(0), x)["cache"]
    kernel = np.array(params["W_value"]["kernel"])
    kernel.flat[np.abs(kernel).argmax()] *= 1.01
    wrong = {**params, "W_value": {**params["W_value"], "kernel": kernel}}
    with HIGHEST():
        expected = apply(module, {"params": params}, x)
        got, _ = jax.jit(lambda v, x: decoder.apply(v, x, mutable=["cache"]))({"params": wrong, "cache": cache}, x)
    bound = layer_bound(module, params, x)
    assert max_abs(got, expected) > 10 * bound, (max_abs(got, expected), bound)


def test_a_full_cache_is_a_clear_error():
    x = inputs(tokens=4)
    decoder = MODULES["MultiHeadAttention"](decode=True)
    variables = init(decoder, jax.random.key(0), x)
    step = jax.jit(lambda v, chunk: decoder.apply(v, chunk, mutable=["cache"]))  # the check is a host callback
    _, state = step(variables, x[:, :3])
    variables = {**variables, **state}
    _, state = step(variables, x[:, :1])
    with pytest.raises(Exception, match=r"KV cache full: 4 tokens cached \+ 1 new > max_tokens=4"):
        jax.block_until_ready(step({**variables, **state}, x[:, :1]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(side, impl):
    lengths = (11, 7, 1)
    module = MODULES["MultiHeadAttention"](attention_impl=impl)
    sequences = [inputs(batch=1, tokens=n, seed=i) for i, n in enumerate(lengths)]
    params = init(module, jax.random.key(0), sequences[0])["params"]
    width = max(lengths)
    pad = lambda s: [(0, 0), (width - s.shape[1], 0) if side == "left" else (0, width - s.shape[1]), (0, 0)]  # noqa: E731
    x = np.concatenate([np.pad(s, pad(s)) for s in sequences])
    real = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        real[i, (width - n if side == "left" else 0) : (width if side == "left" else n)] = True
    with HIGHEST():
        out = np.asarray(apply(module, {"params": params}, x, real))
        for i, s in enumerate(sequences):
            alone = np.asarray(apply(module, {"params": params}, s))[0]
            check_layer(module, params, s, out[i][real[i]], alone, f"[{impl}] {side}-padded sequence {i}")
    assert np.isfinite(out).all()
    if side == "left":  # queries before the first real token see no key: their context is 0, then out_proj's bias
        bias = np.asarray(params["out_proj"]["bias"])  # 0 @ kernel + bias is bias exactly: no rounding at all
        np.testing.assert_array_equal(out[2][~real[2]], np.broadcast_to(bias, out[2][~real[2]].shape))


def test_decoding_with_padding_and_an_injected_attention_fn():
    """A left-padded prompt, then tokens, through jax.nn.dot_product_attention: equals the padded full forward."""
    x = inputs(tokens=12)
    real = np.ones((2, 12), bool)
    real[1, :4] = False
    full_module = MODULES["MultiHeadAttention"](attention_fn=jax.nn.dot_product_attention)
    params = init(full_module, jax.random.key(0), x)["params"]
    decoder = MODULES["MultiHeadAttention"](attention_fn=jax.nn.dot_product_attention, decode=True)
    cache = init(decoder, jax.random.key(0), x)["cache"]
    step = jax.jit(lambda v, x, m: decoder.apply(v, x, attention_mask=m, mutable=["cache"]))
    with HIGHEST():
        expected = np.asarray(apply(full_module, {"params": params}, x, real))
        outs = []
        for start, stop in [(0, 6)] + [(t, t + 1) for t in range(6, 12)]:
            out, state = step({"params": params, "cache": cache}, x[:, start:stop], real[:, start:stop])
            cache = state["cache"]
            outs.append(out)
    got = np.concatenate(outs, axis=1)
    check_layer(full_module, params, x, got[real], expected[real], "padded decode vs full", attention_mask=real)


def test_bad_attention_mask_is_named(without_typecheck):
    module = MODULES["MultiHeadAttention"]()
    x = inputs()
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, tokens\) = \(2, 20\), got shape \(2, 19\)"):
        module.apply(variables, x, attention_mask=jnp.ones((2, 19)))


SECTION_3 = {
    "SimplifiedSelfAttention": lambda: jaxattn.SimplifiedSelfAttention(),
    "SelfAttentionV1": lambda: jaxattn.SelfAttentionV1(8, 5),
    "SelfAttentionV2": lambda: jaxattn.SelfAttentionV2(8, 5, qkv_bias=True),
}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(SECTION_3))
def test_section_3_classes_take_a_padding_mask(name, side):
    """Unmasked attention (3.3, 3.4): padded keys are invisible; real tokens equal their sequence alone."""
    module = SECTION_3[name]()
    lengths = (9, 4)
    sequences = [inputs(batch=1, tokens=n, seed=10 + i) for i, n in enumerate(lengths)]
    variables = init(module, jax.random.key(1), sequences[0])
    width = max(lengths)
    junk = inputs(batch=len(lengths), tokens=width, seed=99) * 100  # padding tokens: large, so a leak shows
    real = np.zeros((len(lengths), width), bool)
    x = np.array(junk)
    for i, (s, n) in enumerate(zip(sequences, lengths)):
        where = slice(width - n, width) if side == "left" else slice(0, n)
        x[i, where], real[i, where] = s[0], True
    with HIGHEST():
        out = np.asarray(apply(module, variables, x, real))
        for i, s in enumerate(sequences):
            alone = np.asarray(apply(module, variables, s[0]))  # the book's unbatched call
            check_layer(module, variables.get("params"), s[0], out[i][real[i]], alone, f"{name} {side} sequence {i}")
        # No mask: today's unmasked math, the padding included (its huge scores dominate).
        assert not np.allclose(np.asarray(apply(module, variables, x))[1][real[1]], out[1][real[1]])
    all_padding = np.asarray(apply(module, variables, x[:1], np.zeros((1, width), bool)))
    np.testing.assert_array_equal(all_padding, np.zeros_like(all_padding))  # no visible key: zeros, not NaN


ALL_MODULES = {**{k: (lambda f=f: f()) for k, f in MODULES.items()}, **SECTION_3}


@pytest.mark.xla_optimized
@pytest.mark.parametrize("name", list(ALL_MODULES))
def test_no_nan_for_inputs_scaled_by_1e4_with_padding(name):
    """x1e4 inputs (scores ~1e9), left padding (rows that see no key), jitted: finite everywhere."""
    module = ALL_MODULES[name]()
    x = inputs(tokens=12) * 1e4
    real = np.ones((2, 12), bool)
    real[1, :5] = False
    variables = init(module, jax.random.key(0), x)
    out = np.asarray(jax.jit(lambda v, x, m: module.apply(v, x, attention_mask=m))(variables, x, real))
    assert np.isfinite(out).all()
    with HIGHEST():
        alone = np.asarray(jax.jit(module.apply)(variables, x[1:, 5:]))
        padded = np.asarray(jax.jit(lambda v, x, m: module.apply(v, x, attention_mask=m))(variables, x[1:], real[1:]))
    # Scores ~1e9: a score's float32 rounding is not small, the first-order bound does not apply; within 4x
    # the unpadded float32 run's own error against float64 (tests/bounds.py, jaxattn.tolerance.reference_bound).
    params = variables.get("params")
    check_layer(module, params, x[1:, 5:], padded[:, 5:], alone, f"{name} x1e4 padded vs alone", reference=True)


@pytest.mark.xla_optimized
@pytest.mark.parametrize("name", list(MODULES))
def test_no_nan_when_decoding_inputs_scaled_by_1e4(name):
    x = inputs(tokens=10) * 1e4
    decoder = MODULES[name](decode=True)
    variables = init(decoder, jax.random.key(0), x)
    step = jax.jit(lambda v, chunk: decoder.apply(v, chunk, mutable=["cache"]))
    out, state = step(variables, x[:, :4])
    outs = [out]
    for t in range(4, 10):
        out, state = step({**variables, **state}, x[:, t : t + 1])
        outs.append(out)
    assert np.isfinite(np.concatenate(outs, axis=1)).all()
