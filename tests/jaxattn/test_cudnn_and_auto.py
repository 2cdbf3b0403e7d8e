"""``implementation="cudnn"`` and what ``auto`` picks per backend, dtype and length.

The dispatch is checked with made-up calls (``Call.platform = "gpu"``), so a CPU shows what a
GPU would run; the cuDNN wrapper is checked with ``jax.nn.dot_product_attention`` standing in
for cuDNN (its xla path), and for real under the ``gpu`` marker.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import implementations
from jaxattn.kernels import cudnn
from jaxattn.kernels.naive import naive_attention
from jaxattn.tolerance import attention_bound


def call(platform="gpu", dtype="bfloat16", batch=1, tokens=1024, kv_tokens=None, heads=12, kv_heads=None,
         head_dim=64, **features):
    flags = dict(has_mask=False, has_bias=False, is_causal=True, q_offset=False, dropout=False, same_dtypes=True)
    return implementations.Call(
        platform=platform, dtype=dtype, batch=batch, q_tokens=tokens,
        kv_tokens=tokens if kv_tokens is None else kv_tokens, heads=heads,
        kv_heads=heads if kv_heads is None else kv_heads, head_dim=head_dim,
        value_head_dim=features.pop("value_head_dim", head_dim), **{**flags, **features},
    )


def picked(**kw) -> str:
    return implementations.select(None, call(**kw)).name


def test_cpu_picks_as_before():
    for dtype in ("float32", "bfloat16"):
        assert picked(platform="cpu", dtype=dtype, tokens=implementations.AUTO_BLOCKWISE_MIN_TOKENS - 1) == "naive"
        assert picked(platform="cpu", dtype=dtype, tokens=implementations.AUTO_BLOCKWISE_MIN_TOKENS) == "blockwise"
        assert picked(platform="cpu", dtype=dtype, tokens=16384, has_mask=True) == "blockwise"


def test_gpu_picks_cudnn_for_16_bit_and_flash_for_float32_and_what_cudnn_refuses():
    for batch, tokens in ((8, 1024), (4, 4096), (1, 16384), (1, 65536)):  # the GPU targets' shapes
        assert picked(dtype="bfloat16", batch=batch, tokens=tokens) == "cudnn"
        assert picked(dtype="float16", batch=batch, tokens=tokens, is_causal=False) == "cudnn"
        assert picked(dtype="float32", batch=batch, tokens=tokens) == "flash"
    assert picked(dtype="bfloat16", heads=8, kv_heads=2) == "cudnn"  # grouped kv heads natively
    assert picked(dtype="bfloat16", head_dim=256) == "flash"  # past cuDNN's head dim
    assert picked(dtype="bfloat16", head_dim=60) == "flash"  # not a multiple of 8
    assert picked(dtype="bfloat16", head_dim=64, value_head_dim=32) == "flash"


def test_gpu_masks_bias_and_offsets_go_to_xla_while_the_scores_fit_then_flash():
    assert picked(dtype="bfloat16", has_mask=True) == "xla"
    assert picked(dtype="float32", has_bias=True) == "xla"
    assert picked(dtype="float32", tokens=1, kv_tokens=4096, q_offset=True) == "xla"  # a decode step
    assert picked(dtype="float16", tokens=1, kv_tokens=4096, q_offset=True) == "xla"
    assert picked(dtype="bfloat16", tokens=16384, has_mask=True) == "flash"  # 12 GiB of scores
    assert picked(dtype="float32", tokens=16384, has_mask=True, q_offset=True, heads=8, kv_heads=2) == "flash"
    assert picked(dtype="float32", batch=8, tokens=1, kv_tokens=1 << 22, q_offset=True) == "flash"  # 1.5 GiB
    assert picked(dtype="bfloat16", tokens=16384, has_bias=True) == "flash"
    # What the flash kernel cannot serve past the bound still needs blockwise: float64, head dims over 256.
    assert picked(dtype="float64", tokens=16384, has_mask=True) == "blockwise"
    assert picked(dtype="float32", tokens=16384, has_mask=True, head_dim=512) == "blockwise"
    assert picked(dtype="float32", dropout=True) == "naive"  # only naive has the weights to drop
    assert picked(dtype="float64") == "xla"  # neither cuDNN nor the flash kernel takes float64


def test_flash_registration_declares_masks_bias_and_offsets_not_dropout():
    flash = implementations.get("flash")
    assert flash.refusal(call(dtype="float32", has_mask=True, has_bias=True, q_offset=True)) is None
    assert "dropout" in flash.refusal(call(dtype="float32", dropout=True))


def test_gpu_never_the_lax_loop_while_scores_fit_and_never_t2_scores_past_the_bound():
    bound = implementations.SCORES_MEMORY_BOUND
    for dtype, tokens, batch, mask, bias, offset, causal, group in itertools.product(
        ("float32", "bfloat16", "float16"), (1, 100, 1024, 4096, 16384, 65536), (1, 8), (False, True), (False, True),
        (False, True), (False, True), (1, 4),
    ):
        c = call(dtype=dtype, tokens=tokens, batch=batch, has_mask=mask, has_bias=bias, q_offset=offset,
                 is_causal=causal, kv_heads=12 // group)
        name = implementations.select(None, c).name
        assert name != "blockwise", c  # masks, bias and q_offset past the bound: the flash kernel
        if implementations.scores_bytes(c) > bound:
            assert name not in ("naive", "xla"), (c, implementations.scores_bytes(c))


def test_auto_follows_where_the_arrays_are_not_only_the_default_backend(monkeypatch):
    """On a GPU machine, arrays on the host (or ``jax.default_device(cpu)`` under jit) get a CPU kernel."""
    platforms = []
    select = implementations.select
    monkeypatch.setattr(implementations, "select", lambda name, call: platforms.append(call.platform) or
                        select(name, call))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # a GPU machine, as dispatch sees it
    rng = np.random.default_rng(0)
    q = jax.device_put(np.float32(rng.normal(size=(1, 5, 2, 8))), jax.devices("cpu")[0])  # concrete, on the host
    expected = naive_attention(q, q, q, scale=8**-0.5, is_causal=True, precision=jax.lax.Precision.HIGHEST)[0]

    got = jaxattn.dot_product_attention(q, q, q, is_causal=True, precision="highest")  # eager: the array's device
    with jax.default_device(jax.devices("cpu")[0]):  # traced: the default device
        jitted = jax.jit(lambda q: jaxattn.dot_product_attention(q, q, q, is_causal=True, precision="highest"))(q)
    traced_without = jax.eval_shape(lambda q: jaxattn.dot_product_attention(q, q, q, is_causal=True), q)

    assert platforms == ["cpu", "cpu", "gpu"]  # the last: nothing says where, so the default backend
    assert traced_without.shape == q.shape
    bound = attention_bound(q, q, q, is_causal=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=bound, rtol=0)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(expected), atol=bound, rtol=0)


def test_cudnn_off_the_gpu_is_a_value_error_naming_the_backend():
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    backend = jax.default_backend()
    if backend == "gpu":  # there it runs (compared with naive below)
        assert jaxattn.dot_product_attention(q, q, q, implementation="cudnn").shape == (1, 4, 2, 8)
        return
    with pytest.raises(ValueError, match=f"'cudnn' cannot serve this call: it runs on gpu, not on {backend}"):
        jaxattn.dot_product_attention(q, q, q, implementation="cudnn")


def test_cudnn_refusals_name_the_reason():
    def reason(**kw):
        return implementations.get("cudnn").refusal(call(**kw))

    assert reason() is None
    assert "dtype float32" in reason(dtype="float32")
    assert "multiples of 8 up to 128, not 256" in reason(head_dim=256)
    assert "one head dim for q, k and v (got 64 and 32)" in reason(value_head_dim=32)
    assert "a mask" in reason(has_mask=True) and "a q_offset" in reason(q_offset=True)


def test_cudnn_wrapper_hands_over_the_scale_and_keeps_zero_token_edges(monkeypatch):
    """jax.nn's xla path standing in for cuDNN: what the wrapper hands over, and that it adds up to naive."""
    seen, real = [], jax.nn.dot_product_attention

    def fake(q, k, v, bias=None, mask=None, *, scale, is_causal, implementation):
        seen.append((scale, is_causal, implementation))
        return real(q, k, v, scale=scale, is_causal=is_causal, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 9, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 9, 2, 8)), jnp.float32) for _ in range(2))
    with jax.default_matmul_precision("highest"):
        out, weights = cudnn.cudnn_attention(q, k, v, scale=0.3, is_causal=True)
        expected = naive_attention(q, k, v, scale=0.3, is_causal=True)[0]
    assert seen == [(0.3, True, "cudnn")] and weights is None
    np.testing.assert_allclose(out, expected, atol=attention_bound(q, k, v, scale=0.3, is_causal=True), rtol=0)
    assert cudnn.cudnn_attention(q[:, :0], k, v, scale=0.3)[0].shape == (2, 0, 4, 8)
    assert not cudnn.cudnn_attention(q, k[:, :0], v[:, :0], scale=0.3)[0].any()
    assert len(seen) == 1  # the edges never reach cuDNN
    with pytest.raises(ValueError, match="no mask, bias, q_offset or dropout"):
        cudnn.cudnn_attention(q, k, v, mask=jnp.ones((1, 1, 9, 9), bool), scale=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cudnn_on_the_gpu_equals_naive_forward_and_gradients(dtype):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 1000, 8, 64)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(2, 1000, 2, 64)), dtype) for _ in range(2))

    def loss(impl):
        return lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl).astype(
            jnp.float32).sum()

    out = jax.jit(lambda *a: jaxattn.dot_product_attention(*a, is_causal=True, implementation="cudnn"))(q, k, v)
    exact = jaxattn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True,
                                          implementation="naive", precision="highest")
    assert np.abs(np.asarray(out, np.float32) - np.asarray(exact)).max() <= 4e-2
    got = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss("naive"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.abs(g - w).max() <= 4e-2 * max(1.0, np.abs(w).max())
