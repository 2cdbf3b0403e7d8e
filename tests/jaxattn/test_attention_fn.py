"""Modules with an injected ``attention_fn`` (Flax's convention) against the torch reference, same weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from tests.bounds import check_layer

torch = pytest.importorskip("torch")
from crosscheck.porting import port  # noqa: E402 - needs torch
from crosscheck.references import torch_ref

# Flax against torch in float32: two summation orders, compared within the derived bound of the layer
# (tests/bounds.py: jaxattn.tolerance.projected_attention_bound on the ported kernels).

ATTENTION_FNS = {
    "jax.nn.dot_product_attention": jax.nn.dot_product_attention,
    **{f"jaxattn {impl}": functools.partial(jaxattn.dot_product_attention, implementation=impl)
       for impl in ("naive", "blockwise", "xla")},
}


def torch_and_flax(name):
    torch.manual_seed(0)
    if name == "MultiHeadAttention":
        ref = torch_ref.MultiHeadAttention(12, 8, 32, 0.0, num_heads=4, qkv_bias=True)
        make = lambda fn: jaxattn.MultiHeadAttention(12, 8, 32, 0.0, 4, True, attention_fn=fn)  # noqa: E731
    elif name == "MultiHeadAttentionCombinedQKV":
        ref = torch_ref.MultiHeadAttentionCombinedQKV(12, 8, 2, 32)
        make = lambda fn: jaxattn.MultiHeadAttentionCombinedQKV(12, 8, 2, 32, attention_fn=fn)  # noqa: E731
    elif name == "CausalAttention":
        ref = torch_ref.CausalAttention(12, 6, 32, 0.0)
        make = lambda fn: jaxattn.CausalAttention(12, 6, 32, 0.0, attention_fn=fn)  # noqa: E731
    else:
        ref = torch_ref.MultiHeadAttentionWrapper(12, 3, 32, 0.0, num_heads=2)
        make = lambda fn: jaxattn.MultiHeadAttentionWrapper(12, 3, 32, 0.0, 2, attention_fn=fn)  # noqa: E731
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    return ref.eval(), make, state


@pytest.mark.parametrize("fn_name", list(ATTENTION_FNS))
@pytest.mark.parametrize(
    "name", ["MultiHeadAttention", "MultiHeadAttentionCombinedQKV", "CausalAttention", "MultiHeadAttentionWrapper"]
)
def test_injected_attention_fn_matches_torch(name, fn_name):
    ref, make, state = torch_and_flax(name)
    module = make(ATTENTION_FNS[fn_name])
    variables = port.load_state_dict(module, state)
    x = np.random.default_rng(1).normal(size=(2, 19, 12)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    with jax.default_matmul_precision("highest"):
        out = jax.jit(module.apply)(variables, jnp.asarray(x))
    check_layer(module, variables["params"], x, out, expected, f"{name} [{fn_name}] vs torch")


@pytest.mark.parametrize("causal", [False, True])
def test_torch_multihead_attention_goes_through_the_core(causal):
    """torch.nn.MultiheadAttention, causal or not, against jaxattn with every implementation."""
    torch.manual_seed(2)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(2, 7, 8)).astype(np.float32))
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7) if causal else None
    with torch.no_grad():
        expected = ref(x, x, x, attn_mask=mask, need_weights=False)[0].numpy()
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    for impl in ("naive", "blockwise", "xla"):
        module = jaxattn.TorchMultiheadAttention(8, 2, causal=causal, attention_impl=impl)
        variables = port.load_state_dict(module, state)
        with jax.default_matmul_precision("highest"):  # jitted: one program, not one per operation (GPU compile time)
            out = jax.jit(module.apply)(variables, jnp.asarray(x.numpy()))
        check_layer(module, variables["params"], x.numpy(), out, expected, f"[{impl}] vs torch")


def test_custom_attention_fn_receives_the_call_and_excludes_attention_impl(without_typecheck):
    seen = {}

    def spy(query, key, value, bias=None, mask=None, *, is_causal=False, **extra):
        seen.update(shape=query.shape, kv=key.shape, is_causal=is_causal, extra=sorted(extra))
        return jax.nn.dot_product_attention(query, key, value, bias, mask, is_causal=is_causal)

    module = jaxattn.MultiHeadAttention(6, 4, 9, 0.5, num_heads=2, attention_fn=spy)
    x = jnp.ones((1, 5, 6))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    jax.jit(module.apply)(variables, x)  # spy sees the call as it is traced
    assert seen == {"shape": (1, 5, 2, 2), "kv": (1, 5, 2, 2), "is_causal": True, "extra": []}
    train = jax.jit(lambda v, x, key: module.apply(v, x, deterministic=False, rngs={"dropout": key}))
    train(variables, x, jax.random.key(1))
    assert seen["extra"] == ["dropout_rate", "dropout_rng"]  # training: Flax's dropout arguments
    with pytest.raises(ValueError, match="attention_impl='xla' chooses among jaxattn.dot_product_attention"):
        module.clone(attention_impl="xla").apply(variables, x)


@pytest.mark.parametrize(
    "cls, positional",
    [
        (jaxattn.CausalAttention, ["d_in", "d_out", "context_length", "dropout", "qkv_bias"]),
        (jaxattn.MultiHeadAttentionWrapper, ["d_in", "d_out", "context_length", "dropout", "num_heads", "qkv_bias"]),
        (jaxattn.MultiHeadAttention, ["d_in", "d_out", "context_length", "dropout", "num_heads", "qkv_bias"]),
        (jaxattn.MultiHeadAttentionCombinedQKV, ["d_in", "d_out", "num_heads", "context_length", "dropout", "qkv_bias"]),
        (jaxattn.TorchMultiheadAttention, ["embed_dim", "num_heads", "dropout", "bias", "causal"]),
    ],
)
def test_shared_base_keeps_the_books_positional_order(cls, positional):
    """The base's fields are keyword-only: the book's (and torch's) positional signatures are unchanged."""
    import inspect

    params = inspect.signature(cls).parameters.values()
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD][: len(positional)] == positional
    keyword_only = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    assert {"attention_impl", "attention_fn", "dtype", "param_dtype"} <= keyword_only
    assert issubclass(cls, jaxattn.AttentionModule)
