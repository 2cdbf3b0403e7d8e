"""Decoding equals the full forward over long decodes: prompts of 1..64 tokens, then one token at a time to 256.

One jitted step function per module serves every prompt length's steps (the cache has a
fixed size), so the sweep costs one compilation per prompt length plus one for the step.
"""

import functools

import jax
import numpy as np
import pytest

import jaxattn
from tests.bounds import layer_bound

MAX_TOKENS = 256
PROMPT_LENGTHS = (1, 2, 31, 64)
HIGHEST = functools.partial(jax.default_matmul_precision, "highest")

MODULES = {
    "MultiHeadAttention": lambda **kw: jaxattn.MultiHeadAttention(8, 8, MAX_TOKENS, 0.0, 2, True, **kw),
    "MultiHeadAttentionCombinedQKV": lambda **kw: jaxattn.MultiHeadAttentionCombinedQKV(8, 8, 4, MAX_TOKENS, **kw),
    "CausalAttention": lambda **kw: jaxattn.CausalAttention(8, 6, MAX_TOKENS, 0.0, **kw),
    "MultiHeadAttentionWrapper": lambda **kw: jaxattn.MultiHeadAttentionWrapper(8, 3, MAX_TOKENS, 0.0, 2, **kw),
    "TorchMultiheadAttention": lambda **kw: jaxattn.TorchMultiheadAttention(8, 2, causal=True, **kw),
}


def decode(cache, params, x, prompt_len, step):
    outs = []
    out, cache = step(params, cache, x[:, :prompt_len])
    outs.append(out)
    for t in range(prompt_len, x.shape[1]):
        out, cache = step(params, cache, x[:, t : t + 1])
        outs.append(out)
    return np.concatenate(outs, axis=1)


CASES = [(name, "naive", PROMPT_LENGTHS if name == "MultiHeadAttention" else (1, 64)) for name in MODULES] + [
    ("MultiHeadAttention", impl, (33,)) for impl in ("xla", "blockwise")
]


@pytest.mark.parametrize("name, impl, prompts", CASES)
def test_long_decodes_equal_the_full_forward(name, impl, prompts):
    # Inputs x3 of unit normals: larger scores than the seed's, so drift over 256 steps would show.
    # numpy: slicing it per token compiles nothing; init and the full forward run jitted (one program each).
    x = 3 * np.random.default_rng(1).standard_normal((2, MAX_TOKENS, 8)).astype(np.float32)
    full_module = MODULES[name](attention_impl=impl)
    params = jax.jit(full_module.init)(jax.random.key(0), x)["params"]
    decoder = MODULES[name](attention_impl=impl, decode=True)
    empty_cache = jax.jit(decoder.init)(jax.random.key(0), x)["cache"]  # each decode starts from it

    @jax.jit
    def step(params, cache, chunk):
        out, state = decoder.apply({"params": params, "cache": cache}, chunk, mutable=["cache"])
        return out, state["cache"]

    bound = layer_bound(full_module, params, x)  # two float32 computations of the layer (jaxattn.tolerance)
    with HIGHEST():
        expected = np.asarray(jax.jit(full_module.apply)({"params": params}, x))
        for prompt_len in prompts:
            got = decode(empty_cache, params, x, prompt_len, step)
            worst = np.abs(got - expected).max(axis=(0, 2))
            assert worst.max() <= bound, (
                f"prompt {prompt_len}: token {int(worst.argmax())} off by {worst.max():.2e} > derived bound {bound:.2e}"
            )
    # One compilation per prompt length and one for the one-token step (a 1-token prompt is that step's shape).
    assert step._cache_size() == len(set(prompts) | {1})
