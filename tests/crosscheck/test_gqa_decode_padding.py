"""Grouped-query attention decoding (the book's ``kv_cache`` API) and padding masks, torch and Flax."""

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the references are torch modules")

from crosscheck.checks import padding_check  # noqa: E402
from crosscheck.pipeline import backends, engine, flax_runner
from crosscheck.pipeline.inputs import RandomInputs  # noqa: E402
from crosscheck.porting import port
from crosscheck.references import torch_gqa, torch_kv_cache  # noqa: E402
from crosscheck.variants import registry
from jaxattn.tolerance import reference_bound  # noqa: E402
from tests.bounds import case_layer, check_layer, max_abs, rms_norm64, rope64  # noqa: E402

#: 4 query heads of dim 4 sharing 2 kv heads, d_in 16; rope_theta small so 12 positions turn far.
GQA = dict(d_out=16, num_heads=4, num_kv_groups=2, head_dim=4, rope_theta=500.0)
SMALL = dict(inputs=RandomInputs(batch=2, tokens=12, d_in=16, seed=1), **GQA)
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=8)
HF = "the LlamaAttention / Qwen3Attention references are transformers' classes"


def _cached_pair(num_kv_groups, qk_norm, freq_config, seed=0):
    """``(cached module, the book's module)`` with the same random weights (norm scales too)."""
    torch.manual_seed(seed)
    cached = torch_kv_cache.GroupedQueryAttention(
        16, 4, num_kv_groups, head_dim=4, qk_norm=qk_norm, rope_theta=500.0, freq_config=freq_config,
        context_length=64,
    ).eval()
    with torch.no_grad():
        for p in cached.parameters():
            p.uniform_(-1.0, 1.0)
    book = torch_gqa.Qwen3GroupedQueryAttention(16, 4, num_kv_groups, head_dim=4, qk_norm=qk_norm).eval()
    book.load_state_dict(cached.state_dict(), strict=True)  # the same keys both ways
    return cached, book


def _full(book, x, freq_config, attention_mask=None):
    return torch_gqa.causal_forward(
        book, x, rope_theta=500.0, freq_config=freq_config, context_length=64, attention_mask=attention_mask
    )


def _as_flax(book, freq_config):
    """The book's module as a Flax module and params (crosscheck's port): what tests/bounds.py reads the layer
    from for its float64 reference (RoPE and QK-norm: no first-order bound)."""
    module, variables = port.from_torch(book, rope_theta=500.0, freq_config=freq_config, context_length=64)
    return module, variables["params"]


def _decode(module, x, prompt_len, attention_mask=None):
    bounds = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, x.shape[1])]
    outs, cache = [], None
    for start, stop in bounds:
        out, cache = module(
            x[:, start:stop], use_cache=True, start_pos=start, cache=cache,
            attention_mask=None if attention_mask is None else attention_mask[:, :stop],
        )
        outs.append(out)
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("freq_config", [None, LLAMA3_SCALING], ids=["rope", "llama3-scaling"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["no-norm", "qk-norm"])
@pytest.mark.parametrize("num_kv_groups", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_prefill_and_steps_equal_the_full_forward(num_kv_groups, qk_norm, freq_config):
    cached, book = _cached_pair(num_kv_groups, qk_norm, freq_config)
    x = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = _full(book, x, freq_config)
        uncached, no_cache = cached(x)
        assert torch.equal(uncached, full) and no_cache is None  # use_cache=False: the book's ops exactly
        module, params = _as_flax(book, freq_config)
        for prompt_len in (1, 3, 17):
            out, (keys, values) = _decode(cached, x, prompt_len)
            check_layer(module, params, x.numpy(), out.numpy(), full.numpy(), f"prompt {prompt_len}: decode vs full")
            # one entry per kv group, never repeated to the query heads
            assert keys.shape == values.shape == (2, num_kv_groups, 40, 4)


def test_the_cache_holds_normed_rotated_keys_and_rope_advances_with_start_pos():
    cached, _ = _cached_pair(2, True, None)
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, (keys, _) = cached(x, use_cache=True)
        _, (step_keys, _) = cached(x[:, 4:], use_cache=True, start_pos=4, cache=(keys[..., :4, :], keys[..., :4, :]))
        k = cached.k_norm(cached.W_key(x).view(1, 5, 2, 4).transpose(1, 2))  # (1, kv_groups, 5, hd)
        expected = torch_gqa.apply_rope(k, cached.cos, cached.sin)
    # The same keys in float64 (projection, RMS norm, RoPE at the same float32 angles): each cache within 4x the
    # float32 recomputation's own error of them (jaxattn.tolerance.reference_bound).
    kernel = cached.W_key.weight.detach().double().numpy().T
    k64 = (x.double().numpy() @ kernel).reshape(1, 5, 2, 4)
    k64 = rope64(rms_norm64(k64, cached.k_norm.scale.detach().double().numpy()), np.arange(5), 500.0)
    exact = np.swapaxes(k64, 1, 2)  # (1, kv_groups, 5, hd)
    bound = reference_bound(expected.numpy(), exact, reduction_length=16 + 2 * 4)  # d_in, the norm's mean, RoPE
    for got, want in ((keys.numpy(), exact), (step_keys[..., 4:, :].numpy(), exact[..., 4:, :])):
        assert max_abs(got, want) <= bound, f"cached keys: max |diff| {max_abs(got, want):.3g} > bound {bound:.3g}"


def test_decoding_a_left_padded_batch_equals_its_full_masked_forward():
    cached, book = _cached_pair(2, True, LLAMA3_SCALING)
    x = torch.randn(3, 20, 16, generator=torch.Generator().manual_seed(3)) * 1e4
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, :9] = False
    with torch.no_grad():
        full = _full(book, x, LLAMA3_SCALING, mask)
        masked, _ = cached(x, attention_mask=mask)
        out, _ = _decode(cached, x, 3, mask)
    assert torch.equal(masked, full)
    assert torch.isfinite(out).all() and torch.isfinite(full).all()
    assert (full[2, :9] == 0).all() and (out[2, :9] == 0).all()  # no visible key: zero, never NaN
    # Scores ~1e8: a score's rounding is not small, so no first-order bound: within 4x the full forward's own
    # float32 error against the layer in float64 (tests/bounds.py).
    module, params = _as_flax(book, LLAMA3_SCALING)
    check_layer(module, params, x.numpy(), out.numpy(), full.numpy(), "x1e4 padded decode vs full",
                attention_mask=mask.numpy(), reference=True)


def test_cached_module_refuses_what_it_cannot_do():
    cached, _ = _cached_pair(2, False, None)
    x = torch.randn(1, 4, 16)
    _, cache = cached(x, use_cache=True)
    with pytest.raises(ValueError, match="start_pos=3 must equal the cached length 4"):
        cached(x[:, :1], use_cache=True, start_pos=3, cache=cache)
    with pytest.raises(ValueError, match="exceed context_length=64"):
        cached(torch.randn(1, 65, 16))
    with pytest.raises(ValueError, match=r"attention_mask must have shape"):
        cached(x, attention_mask=torch.ones(1, 3))


def test_the_registry_builds_the_cached_module_from_the_config():
    cases, _, _ = engine.build_cases(["GroupedQueryAttention"], inputs=np.zeros((1, 6, 16), np.float32),
                                     overrides=dict(GQA, context_length=32, qk_norm=True))
    case = cases[0]
    module = case.variant.torch_cached_module(case.config)
    assert isinstance(module, torch_kv_cache.GroupedQueryAttention)
    assert module.state_dict().keys() == case.torch_module.state_dict().keys()
    assert (module.num_kv_groups, module.head_dim, module.context_length) == (2, 4, 32)
    assert "GroupedQueryAttention" in [v.name for v in registry.decoding()]


def test_engine_decode_passes_in_torch_and_flax():
    report = engine.run(["GroupedQueryAttention"], decode=3, backends=("torch", "flax"), **SMALL)
    assert report.passed, report.failing_variants
    rows = {(r.backend, r.reference): r for r in report.results}
    assert set(rows) == {("torch", "torch full forward"), ("flax", "torch decode"), ("flax", "flax full forward")}
    assert rows[("flax", "torch decode")].passed  # crosscheck's verdict: its POLICY row (crosscheck/pipeline/compare.py)
    assert rows[("flax", "torch decode")].detail["steps"] == 9


@pytest.mark.parametrize("variant", ["GroupedQueryAttention", "LlamaAttention", "Qwen3Attention"])
def test_engine_left_padding_passes_in_torch_and_flax(variant):
    if variant != "GroupedQueryAttention":
        pytest.importorskip("transformers", reason=HF)
    report = engine.run([variant], padding="left", pad_lengths=[0, 3, 6], backends=("torch", "flax"), **SMALL)
    assert report.passed, report.failing_variants
    assert [r.backend for r in report.results] == ["torch", "flax"]
    assert all(r.shape[0] == 12 + 9 + 6 for r in report.results)  # the real tokens of the three rows


@pytest.mark.parametrize("variant", ["GroupedQueryAttention", "LlamaAttention"])
def test_padded_positions_agree_too(variant):
    """Left padding's leading queries see no key: torch and Flax give the zero context there (o_proj's bias)."""
    if variant != "GroupedQueryAttention":
        pytest.importorskip("transformers", reason=HF)
    bias = dict(qkv_bias=True) if variant == "LlamaAttention" else {}
    cases, _, _ = engine.build_cases([variant], inputs=SMALL["inputs"], overrides={**GQA, **bias})
    padded, _ = padding_check.pad_case(cases[0], "left", [0, 5])
    torch_out = backends.torch_outputs(padded)[0]
    flax_out = backends.flax_output(padded)
    module, params = case_layer(padded)
    check_layer(module, params, padded.x, flax_out, torch_out, f"{variant} padded",
                attention_mask=padded.attention_mask)
    out_proj = dict(padded.torch_module.named_modules())["o_proj" if bias else "out_proj"]
    zero_context = 0.0 if out_proj.bias is None else out_proj.bias.detach().numpy()
    np.testing.assert_array_equal(torch_out[1, :5], np.broadcast_to(zero_context, torch_out[1, :5].shape))


def test_a_leaking_mask_fails(monkeypatch):
    real = flax_runner.run_flax

    def ignore_the_mask(*args, attention_mask=None, **kwargs):
        return real(*args, **kwargs)

    monkeypatch.setattr(flax_runner, "run_flax", ignore_the_mask)
    report = engine.run(["GroupedQueryAttention"], padding="left", pad_lengths=[0, 3, 6],
                        backends=("torch", "flax"), **SMALL)
    assert [(r.backend, r.passed) for r in report.results] == [("torch", True), ("flax", False)]


def test_inputs_scaled_by_1e4_stay_finite_in_torch():
    """Scores ~1e8: agreement is not expected, finiteness is (padded rows with no visible key included)."""
    names = ["GroupedQueryAttention"]
    if importlib.util.find_spec("transformers") is not None:
        names += ["LlamaAttention", "Qwen3Attention"]
    x = np.random.default_rng(5).random((2, 12, 16), dtype=np.float32) * 1e4
    cases, _, _ = engine.build_cases(names, inputs=x, overrides=GQA)
    outs = {}
    for case in cases:
        for side in padding_check.SIDES:
            padded = padding_check.pad_case(case, side, [0, 6])[0]
            outs[(side, case.variant.name)] = backends.torch_outputs(padded)[0]
        if case.variant.decodes(case.config):
            outs[("decode", case.variant.name)] = backends.torch_decode_output(case, 3)
            left = padding_check.pad_case(case, "left", [0, 6])[0]
            outs[("decode left-padded", case.variant.name)] = backends.torch_decode_output(left, 3)
    assert len(outs) == 2 * len(cases) + 2
    assert [k for k, v in outs.items() if not np.isfinite(v).all()] == []
