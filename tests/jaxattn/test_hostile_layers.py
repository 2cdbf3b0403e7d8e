"""Hostile inputs to the layers, their NNX twins and jaxattn.sharding: refused alike on every path, or right.

Each class of problem has its example and a sibling:

* a KV cache longer than ``context_length`` (GQA's RoPE table) was decoded with clamped positions;
* sequence sharding took more tokens than the module alone (the padding's ``context_length`` let them in);
* dropout under ring attention was refused on one path and silently run on the naive kernel on another;
* sharded calls with a cache, ``rngs`` or a non-Linen module failed with ``TypeError: unhashable type``;
* NNX ``init_cache`` accepted shapes Linen's ``init`` refuses;
* ``make_mesh(0)`` advised forcing 0 host devices.

Refusals happen while tracing, so most tests here compile nothing; the few that run compare decoding or a
sharded call with the module alone within the bound derived from the computation (``tests/bounds.py``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn
import jaxattn.nnx as jn
from jaxattn import sharding
from jaxattn.rope import apply_rope, compute_rope_params
from tests.bounds import check_layer, inverse_frequencies32, rope_error
from tests.host_cpu import as_a_cpu_machine
from tests.jaxpr_dots import dot_precisions

D = 8
GQA_ARGS = dict(head_dim=4, context_length=6, rope_theta=10_000.0)


def _x(shape, seed=1):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape))


def _message(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


@pytest.fixture
def mesh4(monkeypatch):
    with as_a_cpu_machine(monkeypatch):
        yield sharding.make_mesh(4)


# --- a KV cache longer than context_length (GQA: the RoPE table) ------------------------------------------


def test_nnx_gqa_cache_past_context_length_is_refused_as_linen_init_refuses_it():
    """The example: context_length 6, a cache of 10 decoded tokens 6..9 at position 5's angle."""
    model = jn.GroupedQueryAttention(D, 2, 1, **GQA_ARGS, decode=True, rngs=nnx.Rngs(0))
    nnx_message = _message(lambda: model.init_cache((1, 10, D)))
    linen = jaxattn.GroupedQueryAttention(D, 2, 1, **GQA_ARGS, decode=True)
    linen_message = _message(lambda: jax.eval_shape(linen.init, jax.random.key(0), jnp.zeros((1, 10, D))))
    assert nnx_message == linen_message == "GroupedQueryAttention: tokens=10 exceeds context_length=6"
    assert not hasattr(model, "cached_key")  # nothing made on a refusal


def test_a_cache_made_elsewhere_longer_than_context_length_is_refused_linen_and_nnx():
    """The sibling: a cache that was not made by this module's init (a longer clone's, nnx.update)."""
    x = jnp.zeros((1, 10, D))
    linen = jaxattn.GroupedQueryAttention(D, 2, 1, **GQA_ARGS, decode=True)
    long_linen = linen.clone(context_length=10)
    variables = jax.eval_shape(long_linen.init, jax.random.key(0), x)  # shapes suffice: refused while tracing
    with pytest.raises(ValueError, match=r"max_tokens=10, more than context_length=6"):
        jax.eval_shape(functools.partial(linen.apply, mutable=["cache"]), variables, x[:, :1])

    model = jn.GroupedQueryAttention(D, 2, 1, **GQA_ARGS, decode=True, rngs=nnx.Rngs(0))
    model.init_cache((1, 6, D))
    longer = jn.GroupedQueryAttention(D, 2, 1, **{**GQA_ARGS, "context_length": 10}, decode=True, rngs=nnx.Rngs(0))
    longer.init_cache((1, 10, D))
    nnx.update(model, nnx.state(longer, nnx.Cache))
    with pytest.raises(ValueError, match=r"max_tokens=10, more than context_length=6"):
        model(jnp.asarray(x[:, :1]))
    # MultiHeadAttention has no RoPE, but its mask ends at context_length too: the same rule
    mha = jaxattn.MultiHeadAttention(D, D, 6, 0.0, 2, decode=True)
    variables = jax.eval_shape(mha.clone(context_length=10).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"MultiHeadAttention: the KV cache holds max_tokens=10"):
        jax.eval_shape(functools.partial(mha.apply, mutable=["cache"]), variables, x[:, :1])


def test_gqa_decoding_to_context_length_equals_the_forward_linen_and_nnx():
    """A cache as long as context_length: every position within the RoPE table, each token as the forward."""
    x = _x((1, 6, D))
    model = jn.GroupedQueryAttention(D, 2, 1, **GQA_ARGS, decode=True, rngs=nnx.Rngs(0))
    params = jn.params_of(model)
    linen = jaxattn.GroupedQueryAttention(D, 2, 1, **GQA_ARGS)
    full = jax.jit(linen.apply)({"params": params}, x)

    decoder = linen.clone(decode=True)
    shapes = jax.eval_shape(decoder.init, jax.random.key(0), x)["cache"]  # init's cache, not run
    cache = jax.tree.map(lambda s: (np.ones if s.dtype == bool else np.zeros)(s.shape, s.dtype), shapes)
    step = jax.jit(lambda cache, chunk: decoder.apply({"params": params, "cache": cache}, chunk, mutable=["cache"]))
    outs = []
    for chunk in [x[:, :2]] + [x[:, t : t + 1] for t in range(2, 6)]:  # a prompt, then one token at a time
        out, state = step(cache, chunk)
        cache = state["cache"]
        outs.append(out)
    check_layer(linen, params, x, np.concatenate(outs, axis=1), full, "Linen GQA decode")

    model.init_cache(x.shape)
    nnx_step = nnx.jit(lambda m, token: m(token))
    outs = [nnx_step(model, x[:, t : t + 1]) for t in range(6)]
    check_layer(linen, params, x, np.concatenate(outs, axis=1), full, "NNX GQA decode")


def test_rope_past_its_table_is_refused_when_known_and_nan_when_traced(without_typecheck):
    cos, sin = compute_rope_params(4, 10_000.0, 6)
    x = jnp.asarray(_x((1, 2, 1, 4)))
    # a NumPy or JAX integer offset used to take the clamped path: the rows of positions 4..5, silently
    for offset in (5, np.int64(5), jnp.int32(5)):
        with pytest.raises(ValueError, match=r"positions 5\.\.6 exceed the tables' 6 rows"):
            apply_rope(x, cos, sin, offset=offset)
    with pytest.raises(ValueError, match=r"positions -1\.\.0 start before position 0"):
        apply_rope(x, cos, sin, offset=-1)
    with pytest.raises(ValueError, match=r"offset must be an integer scalar, got 1\.5"):
        apply_rope(x, cos, sin, offset=1.5)
    rotate = jax.jit(lambda offset: apply_rope(x, cos, sin, offset=offset))
    inside, past = np.asarray(rotate(4)), np.asarray(rotate(5))
    # the rotation of position 4 from the book's float32 angles (the float64 reference of tests/bounds.py)
    angles = (np.float32(4.0) * inverse_frequencies32(4, 10_000.0)).astype(np.float64)
    c, s = np.cos(np.concatenate([angles, angles])), np.sin(np.concatenate([angles, angles]))
    x0 = np.asarray(x[0, 0, 0], np.float64)
    expected = x0 * c + np.concatenate([-x0[2:], x0[:2]]) * s
    assert np.all(np.abs(inside[0, 0, 0] - expected) <= rope_error(x0))
    assert np.isfinite(past[0, 0]).all() and np.isnan(past[0, 1]).all()  # position 6: no row, no clamped angle


# --- sharded calls refuse what the module alone refuses, with its message ------------------------------


@pytest.mark.parametrize("mode", sharding.MODES)
def test_every_shard_mode_refuses_tokens_past_context_length_as_the_module(mesh4, mode):
    """The example (sequence, 10 tokens, context_length 6 on 4 devices) and the other modes."""
    module = jaxattn.MultiHeadAttention(D, D, 6, 0.0, 2)
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 6, D)))
    x = jnp.zeros((1, 10, D))
    alone = _message(lambda: jax.eval_shape(module.apply, variables, x))
    assert alone == "MultiHeadAttention: tokens=10 exceeds context_length=6"
    split = sharding.shard(module, mesh4, mode)
    assert _message(lambda: jax.eval_shape(split.call, variables, x)) == alone
    # the sibling: a mask the module refuses, which sequence mode used to pad and pass on
    mask = jnp.ones((1, 5), bool)
    alone = _message(lambda: jax.eval_shape(functools.partial(module.apply, attention_mask=mask), variables, x[:, :4]))
    got = _message(lambda: jax.eval_shape(functools.partial(split.call, attention_mask=mask), variables, x[:, :4]))
    assert got == alone and "attention_mask must be (batch, tokens) = (1, 4)" in alone


def test_sequence_padding_past_context_length_still_equals_the_module(mesh4):
    """6 real tokens = context_length, padded to 8 for 4 devices: the padding may pass it, the tokens may not."""
    module = jaxattn.MultiHeadAttention(D, D, 6, 0.0, 2)
    x = _x((1, 6, D))
    params = jax.jit(module.init)(jax.random.key(0), x)["params"]
    want = jax.jit(module.apply)({"params": params}, x)
    got = sharding.shard(module, mesh4, "sequence").apply({"params": params}, x)
    check_layer(module, params, x, got, want, "sequence, 6 tokens padded to 8")


# --- dropout under ring attention: refused on every path ----------------------------------------------


def test_sequence_sharding_refuses_dropout_through_apply_call_and_jit(mesh4):
    module = jaxattn.MultiHeadAttention(D, D, 8, 0.5, 2)
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, D)))
    x, rngs = jnp.zeros((1, 8, D)), {"dropout": jax.random.key(1)}
    split = sharding.shard(module, mesh4, "sequence")
    refused = r"dropout is not supported \(MultiHeadAttention dropout=0\.5 with deterministic=False\)"
    with pytest.raises(ValueError, match=refused):
        split.apply(variables, x, deterministic=False, rngs=rngs)
    with pytest.raises(ValueError, match=refused):  # no rngs: the same refusal, not flax's missing-RNG error
        split.apply(variables, x, deterministic=False)
    with pytest.raises(ValueError, match=refused):  # the example: .call inside jax.jit ran the naive kernel
        step = jax.jit(lambda v, x, key: split.call(v, x, deterministic=False, rngs={"dropout": key}))
        step(variables, x, rngs["dropout"])
    with pytest.raises(ValueError, match=refused):
        jax.eval_shape(functools.partial(split.call, deterministic=False, rngs=rngs), variables, x)


@pytest.mark.parametrize("mode", ["batch", "heads"])
def test_the_other_shard_modes_refuse_dropout_alike(mesh4, mode):
    module = jaxattn.MultiHeadAttention(D, D, 8, 0.5, 4)
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, D)))
    with pytest.raises(ValueError, match=rf"shard mode '{mode}': dropout is not supported"):
        sharding.shard(module, mesh4, mode).call(variables, jnp.zeros((1, 8, D)), deterministic=False)


def test_ring_attention_refuses_dropout_in_linen_and_nnx_modules(mesh4):
    """The sibling under the sharding wrapper: a module of either API set to ring attention by hand."""
    x = jnp.zeros((1, 8, D))
    linen = jaxattn.MultiHeadAttention(D, D, 8, 0.5, 2, attention_impl="ring")
    variables = jax.eval_shape(linen.clone(attention_impl="auto").init, jax.random.key(0), x)
    refused = r"dropout=0\.5 is active \(deterministic=False\) but attention_impl='ring'"
    with sharding.ring_mesh(mesh4):
        with pytest.raises(ValueError, match=refused):  # with or without a 'dropout' stream
            jax.eval_shape(functools.partial(linen.apply, deterministic=False), variables, x)
        with pytest.raises(ValueError, match=refused):
            jax.eval_shape(
                functools.partial(linen.apply, deterministic=False, rngs={"dropout": jax.random.key(0)}), variables, x
            )
        model = jn.MultiHeadAttention(D, D, 8, 0.5, 2, attention_impl="ring", rngs=nnx.Rngs(0))
        model.train()
        with pytest.raises(ValueError, match=refused):
            nnx.jit(lambda m, x: m(x))(model, x)


# --- sharded calls with a cache, rngs, other modules: a ValueError saying the limit -------------------------


@pytest.mark.parametrize("mode", sharding.MODES)
def test_sharding_a_cache_is_refused_with_its_reason(mesh4, mode):
    module = jaxattn.MultiHeadAttention(D, D, 8, 0.0, 2)
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, D)))
    with pytest.raises(ValueError, match=r"mutable=\['cache'\] is not supported: a sharded call is one"):
        sharding.shard(module, mesh4, mode).apply(variables, jnp.zeros((1, 8, D)), mutable=["cache"])
    with pytest.raises(ValueError, match=r"decode=True, and a KV cache is not supported.*ring attention"):
        sharding.shard(module.clone(decode=True), mesh4, mode)


def test_sharded_apply_takes_rngs_as_the_module_does_and_names_unhashable_arguments(mesh4, without_typecheck):
    module = jaxattn.MultiHeadAttention(D, D, 8, 0.0, 2)
    x = _x((3, 8, D))
    params = jax.jit(module.init)(jax.random.key(0), x)["params"]
    want = jax.jit(module.apply)({"params": params}, x)
    split = sharding.shard(module, mesh4, "batch")
    # rngs with no dropout to draw: the module alone accepts them, so the sharded call does (traced, not static)
    got = split.apply({"params": params}, x, rngs={"dropout": jax.random.key(2)}, deterministic=False)
    check_layer(module, params, x, got, want, "batch mode with rngs")
    with pytest.raises(ValueError, match=r"method=\[\] is a static argument of the jitted call and must be hashable"):
        split.apply({"params": params}, x, method=[])
    with pytest.raises(ValueError, match=r"got jaxattn\.nnx\.MultiHeadAttention; for a jaxattn\.nnx module, shard its"):
        sharding.shard(jn.MultiHeadAttention(D, D, 8, 0.0, 2, rngs=nnx.Rngs(0)), mesh4, "batch")
    with pytest.raises(ValueError, match=r"has its own attention_fn \('dot_product_attention'\)"):
        sharding.shard(module.clone(attention_fn=jax.nn.dot_product_attention), mesh4, "sequence")


# --- NNX init_cache refuses what Linen's init refuses -------------------------------------------------------

LINEN_SHAPES = [(1, 6), (1, 100, D), (1, 6, 5), (1, 0, D), (0, 3, D)]


@pytest.mark.parametrize("shape", LINEN_SHAPES, ids=["rank2", "100_tokens", "wrong_d_in", "0_tokens", "0_rows"])
@pytest.mark.parametrize("name", ["MultiHeadAttention", "GroupedQueryAttention", "MultiHeadAttentionWrapper"])
def test_nnx_init_cache_refuses_as_linen_init(shape, name, without_typecheck):
    build = {
        "MultiHeadAttention": lambda cls, **kw: cls(D, D, 6, 0.0, 2, decode=True, **kw),
        "GroupedQueryAttention": lambda cls, **kw: cls(D, 2, 1, **GQA_ARGS, decode=True, **kw),
        "MultiHeadAttentionWrapper": lambda cls, **kw: cls(D, 2, 6, 0.0, 2, decode=True, **kw),
    }[name]
    model = build(getattr(jn, name), rngs=nnx.Rngs(0))
    nnx_message = _message(lambda: model.init_cache(shape))
    linen = build(getattr(jaxattn, name))
    linen_message = _message(lambda: jax.eval_shape(linen.init, jax.random.key(0), jnp.zeros(shape)))
    owner = "CausalAttention" if name == "MultiHeadAttentionWrapper" else name  # the wrapper's heads check
    assert nnx_message == linen_message and nnx_message.startswith(f"{owner}: ")


def test_nnx_init_cache_refuses_what_no_cache_can_serve(without_typecheck):
    with pytest.raises(ValueError, match=r"has decode=False \(construct it with decode=True\)"):
        jn.MultiHeadAttention(D, D, 6, 0.0, 2, rngs=nnx.Rngs(0)).init_cache((1, 6, D))
    wrapper = jn.MultiHeadAttentionWrapper(D, 2, 6, 0.0, 2, rngs=nnx.Rngs(0))
    wrapper.decode = True  # the heads would still not decode: each chunk would attend only to itself
    with pytest.raises(ValueError, match=r"decode is True here and \[False, False\] in heads_0"):
        wrapper.init_cache((1, 6, D))
    model = jn.MultiHeadAttention(D, D, 6, 0.0, 2, decode=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dtype must be a floating dtype, got <class 'jax.numpy.int32'>"):
        model.init_cache((1, 6, D), jnp.int32)
    with pytest.raises(ValueError, match=r"as integers, got \(1, 2\.5, 8\)"):
        model.init_cache((1, 2.5, D))


def test_non_causal_torch_mha_refuses_to_decode_linen_and_nnx():
    """The cache's unwritten slots were visible keys: a one-token step attended to zeros (silently wrong)."""
    refused = r"TorchMultiheadAttention: decode=True needs causal=True"
    linen = jaxattn.TorchMultiheadAttention(D, 2, causal=False, decode=True)
    with pytest.raises(ValueError, match=refused):
        jax.eval_shape(linen.init, jax.random.key(0), jnp.zeros((1, 4, D)))
    with pytest.raises(ValueError, match=refused):
        jn.TorchMultiheadAttention(D, 2, causal=False, decode=True, rngs=nnx.Rngs(0))
    model = jn.TorchMultiheadAttention(D, 2, causal=False, rngs=nnx.Rngs(0))
    model.decode = True
    with pytest.raises(ValueError, match=refused):
        model.init_cache((1, 4, D))


# --- make_mesh: a count below 1 is refused as such; the XLA_FLAGS hint only where it helps ---------------------


def test_make_mesh_refuses_counts_below_one_without_the_xla_hint(monkeypatch, without_typecheck):
    with as_a_cpu_machine(monkeypatch):
        for count in (0, -2, True, 2.5):
            message = _message(functools.partial(sharding.make_mesh, count))
            assert message == f"make_mesh: devices={count!r} must be a positive integer"
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=9" in _message(lambda: sharding.make_mesh(9))
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # GPUs cannot be forced into being
        message = _message(lambda: sharding.make_mesh(9))
        assert message == "asked for 9 devices, JAX sees 8 (gpu)"


def test_the_linen_wrappers_heads_get_its_precision():
    """Found on the way: the wrapper passed every option to its heads but precision."""
    module = jaxattn.MultiHeadAttentionWrapper(D, 2, 6, 0.0, 2, precision="highest", attention_impl="naive")
    x = jnp.zeros((1, 3, D))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    with jax.default_matmul_precision("default"):
        precisions = dot_precisions(module.apply, variables, x)
    assert precisions and all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in precisions)


# --- the book's unmasked modules: NaN in, NaN out, as jax.nn ----------------------------------------


@pytest.mark.xla_optimized
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("row", [0, 2])
def test_book_self_attention_gives_the_jax_nn_nan_pattern(value, row):
    """``SimplifiedSelfAttention`` (section 3.3: ``softmax(x @ x.T) @ x``) with one non-finite input row: its
    non-finite outputs are exactly those of the same formula through ``jax.nn.softmax``. The book's softmax
    zeroed a row whose scores were all ``-inf`` (a ``-inf`` query), where jax.nn and torch give NaN."""
    x = _x((5, 3)).copy()
    x[row] = value
    reference = jax.nn.softmax(x @ x.T, axis=-1) @ x
    out = np.asarray(jaxattn.SimplifiedSelfAttention().apply({}, jnp.asarray(x)))
    assert (~np.isfinite(out) == ~np.isfinite(np.asarray(reference))).all(), out
    assert not np.isfinite(out).all()

