"""Hostile inputs at the attention core: NaN and inf, out-of-range offsets, a full KV cache, empty dims, refusals.

* NaN in means NaN out, from every implementation (naive, blockwise, xla, the Pallas flash kernel in
  interpret mode, ring attention on the 8 forced host CPU devices) in every mode: a hypothesis property
  against ``jax.nn.dot_product_attention(implementation="xla")``, applied row by row to the keys each row
  sees (see :func:`reference_rows` for the library's deliberate differences from jax.nn).
* ``q_offset`` must keep the queries among the keys (``0 <= q_offset``, ``q_offset + T <= S``, or 0):
  static offsets at once, traced ones when the program runs.
* A full KV cache is a ``ValueError`` whose first line names the cache, and nothing on stderr: eagerly, and
  under ``jit``, ``lax.scan`` and ``nnx.jit`` through :class:`jaxattn.checks.clean_errors`.
* Empty dims (head_dim 0, no heads) are ``ValueError``s naming the dim; a refusal names every reason.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.sharding import Mesh

import jaxattn
import jaxattn.nnx as jn
from jaxattn import checks, implementations, sharding
from jaxattn.kernels import cudnn, flash
from tests.host_cpu import on_the_host

# --- 1. NaN in, NaN out ------------------------------------------------------------------------------

#: One set of arrays, every mode a view of it (fixed shapes: the NaN positions are data, so each
#: implementation compiles one program for all examples). B=1, T=S=6, N=2 heads, H=4.
T, N, H = 6, 2, 4
OFFSET = 3  # the "offset" mode: the last T - OFFSET queries at positions OFFSET.. among the T keys
IMPLS = ("naive", "blockwise", "xla", "flash-interpret", "ring")
SPECIALS = (np.nan, np.inf, -np.inf)


def modes(q, k, v, bias, mask):
    """``name -> (q, k, v, bias, mask, keyword arguments)``: plain, causal, grouped kv heads with a key mask
    and a bias, and causal with a q_offset (grouped, masked, biased)."""
    k1, v1 = k[:, :, :1], v[:, :, :1]  # one kv head for both query heads
    return {
        "plain": (q, k, v, None, None, {}),
        "causal": (q, k, v, None, None, {"is_causal": True}),
        "masked": (q, k1, v1, bias, mask, {}),
        "offset": (q[:, OFFSET:], k1, v1, bias[:, :, OFFSET:], mask, {"is_causal": True, "q_offset": OFFSET}),
    }


def mode_names(impl):
    return ("plain", "causal", "masked") if impl == "ring" else ("plain", "causal", "masked", "offset")


@pytest.fixture(scope="module")
def attend_all():
    """``impl -> jitted (q, k, v, bias, mask) -> {mode: output}``, with the flash kernel registered in
    Pallas interpret mode (the table's ``flash`` is GPU-only) and ring attention on 8 host devices."""
    implementations.register(implementations.Implementation(
        "flash-interpret",
        functools.partial(flash.flash_attention, interpret=True, block_q=16, block_k=16, backward_blocks=(16, 16)),
        mixed_dtypes=False,
    ), replace=True)
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("seq",))

    def programs(impl):
        def run(q, k, v, bias, mask):
            with sharding.ring_mesh(mesh, "seq") if impl == "ring" else on_the_host():
                views = modes(q, k, v, bias, mask)
                return {name: jaxattn.dot_product_attention(*views[name][:5], **views[name][5], implementation=impl)
                        for name in mode_names(impl)}
        return jax.jit(run)

    with on_the_host():
        yield {impl: programs(impl) for impl in IMPLS}
    implementations.unregister("flash-interpret")


def visible_keys(mask, bias, kv_tokens, q_tokens, *, is_causal=False, q_offset=0):
    """``(N, T, S)`` numpy: where each row attends (the key mask, causality at ``q_offset``, bias != -inf)."""
    visible = np.ones((N, q_tokens, kv_tokens), bool)
    if mask is not None:
        visible &= np.asarray(mask)[0]
    if is_causal:
        visible &= np.arange(kv_tokens)[None, :] <= q_offset + np.arange(q_tokens)[:, None]
    if bias is not None:
        visible &= np.asarray(bias)[0] != -np.inf
    return visible


@jax.jit
def _jax_nn_rows(q, k, v, bias):
    """jax.nn, one row at a time: ``q (R, H)``, ``k``/``v (R, S, H)``, ``bias (R, S)`` -> ``(R, H)``."""
    def one(q, k, v, bias):
        return jax.nn.dot_product_attention(q[None, None, None], k[None, :, None], v[None, :, None],
                                            bias=bias[None, None, None], implementation="xla")[0, 0, 0]
    return jax.vmap(one)(q, k, v, bias)


def reference_rows(q, k, v, bias, mask, kw):
    """``(seen (T, N), nonfinite (T, N, H))``: which rows see a key, and where jax.nn's output is non-finite.

    jax.nn runs one row at a time, its masked keys zeroed and their scores an exact ``-inf`` (an additive
    bias, not jax.nn's mask), every value as it is: a masked key's weight is 0, and ``0 x NaN`` is NaN as
    in jax.nn's own product. That encodes the library's deliberate differences from jax.nn on the whole
    call: (1) a row that sees no key gives zeros (jax.nn: the mean of the values, or NaN); (2) a row
    whose visible scores are all ``-inf`` is NaN, IEEE's softmax (jax.nn's large finite fill of masked
    scores would weigh the masked keys instead); (3) a ``-inf`` bias entry masks its key.
    """
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    q_tokens, kv_tokens, kv_heads = q.shape[1], k.shape[1], k.shape[2]
    visible = visible_keys(mask, bias, kv_tokens, q_tokens, is_causal=kw.get("is_causal", False),
                           q_offset=kw.get("q_offset", 0))  # (N, T, S)
    heads = np.arange(N) // (N // kv_heads)  # each query head's kv head
    vis = visible.transpose(1, 0, 2)  # (T, N, S)
    keys = np.where(vis[..., None], k[0][:, heads].transpose(1, 0, 2)[None], 0)  # (T, N, S, H)
    values = np.broadcast_to(v[0][:, heads].transpose(1, 0, 2)[None], keys.shape)
    scores_bias = np.zeros((N, q_tokens, kv_tokens), np.float32) if bias is None else np.asarray(bias)[0]
    scores_bias = np.where(vis, scores_bias.transpose(1, 0, 2), -np.inf)
    out = np.asarray(_jax_nn_rows(q[0].reshape(-1, H), keys.reshape(-1, kv_tokens, H),
                                  values.reshape(-1, kv_tokens, H), scores_bias.reshape(-1, kv_tokens)))
    seen = vis.any(axis=-1)  # (T, N)
    return seen, ~np.isfinite(out).reshape(q_tokens, N, H)


def base_arrays():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, T, N, H)).astype(np.float32)
    # Positive keys: a -inf query entry then makes every score -inf (the all -inf row), not NaN.
    k = (np.abs(rng.normal(size=(1, T, N, H))) + 0.1).astype(np.float32)
    v = rng.normal(size=(1, T, N, H)).astype(np.float32)
    bias = rng.normal(size=(1, N, T, T)).astype(np.float32)
    return q, k, v, bias


@st.composite
def hostile_inputs(draw):
    """Base arrays with 1-3 NaN/inf entries (or whole rows) in q, k, v, bias, and a drawn key mask."""
    q, k, v, bias = base_arrays()
    index = st.integers(0, T - 1)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["bias", "q", "k", "v", "q row", "k row", "bias row"]))
        value = draw(st.sampled_from(SPECIALS))
        t, n, h = draw(index), draw(st.integers(0, N - 1)), draw(st.integers(0, H - 1))
        if target == "q":
            q[0, t, n, h] = value
        elif target == "q row":  # the whole query vector: -inf gives -inf scores on positive keys
            q[0, t, n, :] = value
        elif target == "k":
            k[0, t, n, h] = value
        elif target == "k row":
            k[0, t, n, :] = value
        elif target == "v":
            v[0, t, n, h] = value
        elif target == "bias":
            bias[0, n, draw(index), t] = value
        else:
            bias[0, n, t, :] = value  # -inf: a row masked by its bias alone
    mask = np.ones((1, 1, 1, T), bool)
    mask[..., sorted(draw(st.sets(index, max_size=T)))] = False  # from none to every key masked
    return q, k, v, bias, mask


def assert_nan_pattern(impl, outputs, q, k, v, bias, mask):
    views = modes(q, k, v, bias, mask)
    for name in mode_names(impl):
        out = np.asarray(outputs[name])[0]  # (T', N, H)
        seen, nonfinite = reference_rows(*views[name][:5], views[name][5])
        got = ~np.isfinite(out)  # (T', N, H)
        assert (out[~seen] == 0).all(), f"{impl} {name}: a row that sees no key must give zeros\n{out}"
        assert (got[seen] == nonfinite[seen]).all(), (
            f"{impl} {name}: non-finite (row, head, column) {np.argwhere(got & seen[..., None]).tolist()}, "
            f"jax.nn on the visible keys: {np.argwhere(nonfinite & seen[..., None]).tolist()}"
        )


@pytest.mark.xla_optimized
@settings(max_examples=30, deadline=None)
@given(inputs=hostile_inputs())
def test_nan_and_inf_give_jax_nn_pattern_in_every_implementation_and_mode(attend_all, inputs):
    for impl in IMPLS:
        assert_nan_pattern(impl, attend_all[impl](*inputs), *inputs)


@pytest.mark.xla_optimized
def test_the_swept_examples(attend_all):
    """The sweep's cases: blockwise zeroed a NaN query row, a NaN key and a NaN bias entry; xla made a NaN bias
    entry ordinary numbers; the ring hid NaN; an all -inf query row gave 0 (naive, blockwise), NaN (xla) or
    2.1 (causal xla: jax.nn's mean of masked values)."""
    q, k, v, bias = base_arrays()
    mask = np.ones((1, 1, 1, T), bool)
    cases = {"nan query row": ("q", (0, 2, 0, slice(None)), np.nan), "nan key": ("k", (0, 1, 0, 2), np.nan),
             "nan bias": ("bias", (0, 0, 4, 1), np.nan), "-inf query row": ("q", (0, 5, 1, slice(None)), -np.inf)}
    for case, (name, where, value) in cases.items():
        arrays = {"q": q.copy(), "k": k.copy(), "v": v.copy(), "bias": bias.copy()}
        arrays[name][where] = value
        inputs = (arrays["q"], arrays["k"], arrays["v"], arrays["bias"], mask)
        for impl in IMPLS:
            outputs = attend_all[impl](*inputs)
            assert_nan_pattern(impl, outputs, *inputs)
            if case != "nan bias":  # the bias reaches the masked and offset modes only
                assert np.isnan(np.asarray(outputs["plain"])).any(), f"{impl}: {case} hidden"
            else:
                assert np.isnan(np.asarray(outputs["masked"])).any(), f"{impl}: {case} hidden"


@pytest.mark.xla_optimized
def test_masked_keys_are_not_read_and_values_reach_every_row(attend_all):
    """A NaN key or bias entry a row does not see (masked, causally future) never reaches it; a non-finite
    value reaches its column in every row, as jax.nn's product ``0 x inf = NaN`` gives it, also from the
    kernels that skip the future key blocks (blockwise, flash, ring); a row that sees no key is zeros,
    even with a NaN query."""
    q, k, v, bias = base_arrays()
    k[0, 5, 0, 1], v[0, 4, 0, 2] = np.nan, np.inf  # key 5 NaN, value 4 inf in column 2 (kv head 0)
    q[0, 1, 1, 0] = np.nan
    mask = np.asarray([True, False, True, True, False, False]).reshape(1, 1, 1, T)
    bias[0, 1, 1, :] = -np.inf  # row 1 of head 1 (its NaN query) sees nothing through its bias
    bias[0, 0, 2, 1] = np.nan  # at a masked key
    columns = np.arange(H) != 2
    for impl in IMPLS:
        out = {name: np.asarray(o)[0] for name, o in attend_all[impl](q, k, v, bias, mask).items()}
        causal = out["causal"][:, 0]  # head 0 reads kv head 0; rows 0-4 do not see key 5
        assert np.isfinite(causal[:5][:, columns]).all() and not np.isfinite(causal[5]).any(), impl
        assert not np.isfinite(causal[:, 2]).any(), impl  # the inf value: every row's column 2
        masked = out["masked"]  # keys 4 and 5 masked for every row, both heads read kv head 0
        assert np.isfinite(masked[:, 0][:, columns]).all() and not np.isfinite(masked[:, 0, 2]).any(), impl
        assert (masked[1, 1] == 0).all(), impl  # the NaN query row saw nothing: zeros


@pytest.mark.parametrize("impl, q_tokens, kv_tokens", [
    ("blockwise", 136, 136),  # the prefix schedule: two query blocks of 72, the first never reads keys 72..
    ("blockwise", 2, 600),  # the general kernel: key block 512.. is after both queries, skipped
    ("flash-interpret", 40, 40),  # blocks of 16
    ("ring", 32, 32),  # 8 devices: a device's later chunks are skipped by the earlier ones
], ids=["blockwise-prefix", "blockwise-general", "flash", "ring"])
@pytest.mark.xla_optimized
def test_a_value_in_a_skipped_causal_block_still_reaches_every_row(attend_all, impl, q_tokens, kv_tokens):
    """The kernels that skip the key blocks a causal mask hides never multiply those values; the result must
    still be jax.nn's, where ``0 x inf`` puts NaN in that column of every row."""
    rng = np.random.default_rng(4)
    q = rng.normal(size=(1, q_tokens, 2, H)).astype(np.float32)
    k, v = (rng.normal(size=(1, kv_tokens, 2, H)).astype(np.float32) for _ in "kv")
    v[0, -1, 1, 3] = np.inf  # the last key's value, kv head 1, column 3
    fn = functools.partial(jaxattn.dot_product_attention, is_causal=True, implementation=impl)
    with sharding.ring_mesh(Mesh(np.array(jax.devices("cpu")[:8]), ("seq",)), "seq") if impl == "ring" else on_the_host():
        out = np.asarray(jax.jit(fn)(q, k, v))[0]
    expected = np.asarray(jax.nn.dot_product_attention(q, k, v, is_causal=True))[0]
    np.testing.assert_array_equal(~np.isfinite(out), ~np.isfinite(expected))
    assert not np.isfinite(out[:, 1, 3]).any() and np.isfinite(out[:, 0]).all()


def test_the_cudnn_wrapper_gives_nan_where_ieee_does(monkeypatch):
    """cuDNN's causal mask is a finite fill, as jax.nn's: a row whose visible scores are all -inf would weigh
    its masked keys. jax.nn's xla path stands in for cuDNN here (this machine may have no GPU)."""
    q, k, v, _ = base_arrays()  # positive keys
    q[0, 3, 1, :] = -np.inf  # row 3, head 1: every score -inf
    k[0, 0, 0, :] = np.inf  # key 0 of head 0, against negative queries: a -inf score
    q[0, :2, 0, :] = -np.abs(q[0, :2, 0, :])  # row 0 sees key 0 only (all -inf); row 1 also key 1 (finite)
    _, expected = reference_rows(q, k, v, None, None, {"is_causal": True})  # (T, N, H)
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, k, v, bias=None, mask=None, *, scale, is_causal,
                        implementation: real(q, k, v, scale=scale, is_causal=is_causal, implementation="xla"))
    with on_the_host():
        out = np.asarray(jax.jit(functools.partial(cudnn.cudnn_attention, scale=H**-0.5, is_causal=True))(q, k, v)[0])
    nonfinite = ~np.isfinite(out)[0]  # (T, N, H)
    np.testing.assert_array_equal(nonfinite, expected)
    assert nonfinite[3, 1].all() and nonfinite[0, 0].all() and not nonfinite[1, 0].any()


# --- 2. q_offset keeps the queries among the keys ----------------------------------------------------


def small(q_tokens, kv_tokens):
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.normal(size=(1, q_tokens, 2, 4)), jnp.float32),
            *(jnp.asarray(rng.normal(size=(1, kv_tokens, 2, 4)), jnp.float32) for _ in "kv"))


@pytest.mark.parametrize("impl", ["naive", "blockwise", "xla"])
def test_a_static_q_offset_past_the_keys_is_a_value_error(impl):
    q, k, v = small(7, 5)
    with pytest.raises(ValueError, match=r"q_offset=100 .* past the S=5 keys.*T=7 query tokens"):
        jaxattn.dot_product_attention(q, k, v, is_causal=True, q_offset=100, implementation=impl)
    q, k, v = small(5, 5)
    with pytest.raises(ValueError, match=r"q_offset=1 puts the last query at position 5, past the S=5 keys"):
        jaxattn.dot_product_attention(q, k, v, is_causal=True, q_offset=1, implementation=impl)
    with pytest.raises(ValueError, match=r"q_offset must be >= 0, got -2 \(T=5 query tokens"):
        jaxattn.dot_product_attention(q, k, v, q_offset=-2, implementation=impl)  # causal or not


def test_q_offsets_that_keep_the_queries_among_the_keys_are_served():
    """``q_offset + T = S`` (the last chunk of a cache) and ``q_offset = 0`` with ``T > S`` (jax.nn's
    top-left alignment, cross-attention) are served: traced only (eval_shape compiles nothing)."""
    q, k, v = small(3, 5)
    for offset in (0, 1, 2):
        out = jax.eval_shape(functools.partial(jaxattn.dot_product_attention, is_causal=True, q_offset=offset), q, k, v)
        assert out.shape == q.shape
    q, k, v = small(7, 5)
    assert jax.eval_shape(functools.partial(jaxattn.dot_product_attention, is_causal=True), q, k, v).shape == q.shape


def test_a_traced_q_offset_is_checked_when_the_program_runs(capfd):
    """Under jit a negative or too large offset used to give zero rows; now the step stops, with our message
    and nothing on stderr. An offset in range runs as before; a concrete array offset is checked at once."""
    q, k, v = small(2, 6)
    step = jax.jit(lambda q, k, v, offset: jaxattn.dot_product_attention(
        q, k, v, is_causal=True, q_offset=offset, implementation="naive"))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_array_equal(
            step(q, k, v, jnp.int32(4)),
            jax.jit(lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True, q_offset=4,
                                                                  implementation="naive"))(q, k, v))
    for offset, pattern in ((-1, "q_offset must be >= 0, got -1"), (5, "q_offset=5 puts the last query at position 6")):
        with pytest.raises(ValueError) as raised, checks.clean_errors():
            jax.block_until_ready(step(q, k, v, jnp.int32(offset)))
        first = str(raised.value).splitlines()[0]
        assert first.startswith("dot_product_attention: " + pattern), first
        with pytest.raises(Exception, match=pattern):  # without the wrapper: JAX's error, our message last
            jax.block_until_ready(step(q, k, v, jnp.int32(offset)))
    with pytest.raises(ValueError, match="q_offset must be >= 0, got -3"):
        jaxattn.dot_product_attention(q, k, v, is_causal=True, q_offset=jnp.int32(-3))
    assert capfd.readouterr().err == ""


# --- 3. A full KV cache ------------------------------------------------------------------------------

FULL = r"MultiHeadAttention: KV cache full: 4 tokens cached \+ 1 new > max_tokens=4"


def linen_decoder():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 8)), jnp.float32)
    decoder = jaxattn.MultiHeadAttention(8, 8, 8, 0.0, 2, True, decode=True)
    variables = decoder.init(jax.random.key(0), x)  # a cache of 4 tokens
    return decoder, variables, x


def fill(step, variables, x):
    """Run the prompt (all 4 tokens): the cache is full after it."""
    _, state = step(variables, x)
    return {**variables, **state}


def assert_clean(raised, capfd):
    first = str(raised.value).splitlines()[0]
    assert raised.type is ValueError, raised.type
    assert re.match(FULL, first), first
    assert capfd.readouterr().err == ""


def test_a_full_cache_eagerly_is_a_clean_value_error(capfd):
    decoder, variables, x = linen_decoder()
    step = lambda v, chunk: decoder.apply(v, chunk, mutable=["cache"])  # noqa: E731
    full = fill(step, variables, x)
    with pytest.raises(ValueError) as raised:  # no wrapper: the index is concrete, checked at once
        step(full, x[:, :1])
    assert_clean(raised, capfd)


def test_a_full_cache_under_jit_and_scan_is_a_clean_value_error(capfd):
    decoder, variables, x = linen_decoder()
    step = jax.jit(lambda v, chunk: decoder.apply(v, chunk, mutable=["cache"]))
    full = fill(step, variables, x)
    with pytest.raises(ValueError) as raised, checks.clean_errors():
        jax.block_until_ready(step(full, x[:, :1]))
    assert_clean(raised, capfd)
    with pytest.raises(Exception, match=FULL):  # JAX's own error still ends with the message; stderr stays quiet
        jax.block_until_ready(step(full, x[:, :1]))
    assert capfd.readouterr().err == ""

    def scanned(variables, chunks):  # a decode loop: one token per scan step
        def body(variables, chunk):
            out, state = decoder.apply(variables, chunk[:, None], mutable=["cache"])
            return {**variables, **state}, out
        return lax.scan(body, variables, jnp.swapaxes(chunks, 0, 1))

    half = fill(step, variables, x[:, :3])
    with pytest.raises(ValueError) as raised, checks.clean_errors():
        jax.block_until_ready(scanned(half, x[:, :2]))  # the second token does not fit
    assert_clean(raised, capfd)


def test_a_full_nnx_cache_under_nnx_jit_is_a_clean_value_error(capfd):
    model = jn.MultiHeadAttention(8, 8, 8, 0.0, 2, True, decode=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 8)), jnp.float32)
    model.init_cache(x.shape)
    step = nnx.jit(lambda m, chunk: m(chunk))
    step(model, x)
    with pytest.raises(ValueError) as raised, checks.clean_errors():
        jax.block_until_ready(step(model, x[:, :1]))
    assert_clean(raised, capfd)
    with pytest.raises(ValueError) as raised:  # eagerly: at once, no wrapper
        model(x[:, :1])
    assert_clean(raised, capfd)


def test_a_negative_cache_index_is_refused(capfd):
    """A cache index set by hand below 0 would clamp the write to slot 0: refused, as a full cache."""
    decoder, variables, x = linen_decoder()
    bad = {**variables, "cache": {**variables["cache"], "cache_index": jnp.int32(-2)}}
    with pytest.raises(ValueError, match="KV cache index -2 is negative"):
        decoder.apply(bad, x[:, :1], mutable=["cache"])
    assert capfd.readouterr().err == ""


# --- 4. Empty dims --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive", "blockwise", "xla", "ring"])
@pytest.mark.parametrize("shapes, pattern", [
    (((1, 3, 2, 0), (1, 3, 2, 0), (1, 3, 2, 4)), r"head_dim must be >= 1, got 0"),
    (((1, 3, 0, 4), (1, 3, 2, 4), (1, 3, 2, 4)), r"query heads must be >= 1, got 0"),
    (((1, 3, 2, 4), (1, 3, 0, 4), (1, 3, 0, 4)), r"key/value heads must be >= 1, got 0"),
    (((1, 3, 2, 4), (1, 3, 2, 4), (1, 3, 2, 0)), r"value head_dim must be >= 1, got 0"),
], ids=["head_dim", "heads", "kv_heads", "value_head_dim"])
def test_empty_dims_are_value_errors_naming_the_dim(impl, shapes, pattern, without_typecheck):
    """head_dim 0 was a ZeroDivisionError (the default scale 0 ** -0.5) from every implementation."""
    q, k, v = (jnp.ones(s, jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=pattern):
        jaxattn.dot_product_attention(q, k, v, implementation=impl)


def test_a_non_finite_scale_is_a_value_error():
    q, k, v = small(3, 3)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be finite"):
            jaxattn.dot_product_attention(q, k, v, scale=scale)


# --- 5. A refusal names every reason ---------------------------------------------------------------------


def call(**kw):
    base = dict(platform="cpu", dtype="float32", batch=1, q_tokens=4, kv_tokens=4, heads=2, kv_heads=2, head_dim=8,
                value_head_dim=8, has_mask=False, has_bias=False, is_causal=True, q_offset=False, dropout=False,
                same_dtypes=True)
    return implementations.Call(**{**base, **kw})


def test_cudnn_on_a_cpu_with_float32_names_the_dtype_and_the_gpu():
    reason = implementations.get("cudnn").refusal(call())
    assert "does not support dtype float32" in reason and "it runs on gpu, not on cpu" in reason, reason
    if jax.default_backend() == "cpu":  # end to end: the call and a module's attention_impl
        q = jnp.ones((1, 4, 2, 8), jnp.float32)
        for attend in (lambda: jaxattn.dot_product_attention(q, q, q, implementation="cudnn"),
                       lambda: jaxattn.MultiHeadAttention(8, 8, 4, 0.0, 2, attention_impl="cudnn").init(
                           jax.random.key(0), jnp.ones((1, 4, 8)))):
            with pytest.raises(ValueError, match=r"'cudnn' cannot serve this call: .*dtype float32.*runs on gpu"):
                attend()


def test_every_implementation_lists_every_reason():
    everything = call(platform="cpu", dtype="float64", has_mask=True, q_offset=True, head_dim=512, value_head_dim=12,
                      same_dtypes=False, dropout=True)
    flash_reason = implementations.get("flash").refusal(everything)
    for part in ("dropout", "different dtypes", "dtype float64", "runs on gpu, not on cpu", "head dims up to 256"):
        assert part in flash_reason, (part, flash_reason)
    cudnn_reason = implementations.get("cudnn").refusal(everything)
    for part in ("a mask", "a q_offset", "dtype float64", "runs on gpu", "one head dim", "not 512", "not 12"):
        assert part in cudnn_reason, (part, cudnn_reason)
    xla_reason = implementations.get("xla").refusal(call(platform="cpu", dtype="float16", value_head_dim=4,
                                                         same_dtypes=False, dropout=True))
    for part in ("dropout", "value head_dim (4)", "different dtypes", "XLA:CPU cannot run its float16 products"):
        assert part in xla_reason, (part, xla_reason)
    assert cudnn.refusal(12, 20).count(";") == 2  # value head dim differs, and neither is a multiple of 8
