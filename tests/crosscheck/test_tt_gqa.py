"""The ttnn ``grouped_query_attention`` program on the host model against the book's math in float64.

The reference is the book's Llama 3 / Qwen3 ``GroupedQueryAttention`` (``pkg/llms_from_scratch/
llama3.py`` and ``qwen3.py``: ``compute_rope_params`` with the Llama 3 frequency scaling,
``apply_rope`` with split halves, ``RMSNorm(eps=1e-6)`` on each query/key head, K/V heads
expanded with ``repeat_interleave(group_size, dim=1)``, causal mask, ``/ sqrt(head_dim)``,
``out_proj``), written here in numpy, independent of :mod:`crosscheck.tt.programs`. The ttnn
parameter tree is built by hand (``(in, out)`` weights, ``(1, n)`` biases and norm scales, bf16
TILE on the device), since the port table of this variant lives elsewhere.

Budget: ``12 * 2**-8 * max(1, max|ref|)`` max-abs (the count assumed for this variant; the
program's own count on its longest path is 13 without qk_norm: x, W_query, queries, the cos/sin
table, ``x * cos`` (or ``rotated * sin``), the RoPE sum, scores, the 1/sqrt(hd) scalar, scaled scores,
weights, context, out_proj's weight, the output; 15 with qk_norm: + rms_norm's output and its
scale), PCC >= 0.999, on unit-scale data (weights uniform(-1, 1) /
sqrt(fan-in), inputs uniform(-1, 1)).

KV-cache decoding (``the entry's ``ttnn_decode````) runs through the runtime with the
registry's ``GroupedQueryAttention``: it must equal the same runtime's full forward and this reference
within the registry's budget (``TTNN_BF16_TOLERANCE``, 15 u), keep ``kv_heads`` heads in its caches,
and rotate each step's query and key at the step's own position.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from crosscheck.config import AttnConfig
from crosscheck.pipeline import compare
from crosscheck.tt import BF16_UNIT_ROUNDOFF, TTNN_MIN_PCC, decode_programs, gqa_programs, runtime
from crosscheck.tt import host_model as hm
from crosscheck.tt.port import ParameterDict
from crosscheck.variants import registry
from crosscheck.variants.registry import TTNN_BF16_TOLERANCE
from jaxattn.tolerance import gamma
from tests.bounds import trig_error

#: bf16 roundings assumed for GroupedQueryAttention's budget.
ROUNDINGS = 12

#: The book's Llama 3.2 scaling factors with a short original context (wavelengths 40 .. 160 are "medium"),
#: so that head_dim 6 or 8 at theta 10_000 reaches every branch: the highest frequency is kept (wavelength
#: 2 pi), the next one smoothed (62.8 or 135), the lower ones divided by ``factor``.
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 160.0}


def gqa_config(*, d_in=16, num_heads=4, kv=2, head_dim=0, qk_norm=False, scaling=None, qkv_bias=False,
               theta=10_000.0, context_length=64) -> AttnConfig:
    head_dim = head_dim or d_in // num_heads
    return AttnConfig(d_in=d_in, d_out=num_heads * head_dim, num_heads=num_heads, num_kv_groups=kv,
                      head_dim=head_dim, qk_norm=qk_norm, qkv_bias=qkv_bias, rope_theta=theta,
                      rope_scaling=AttnConfig.encode_freq_config(scaling), context_length=context_length)


# --- the book's math in float64 ------------------------------------------------------------------


#: float32 roundings in a RoPE angle ``p * inv_freq``: the exponent's division, pow (2 ulp), the reciprocal and
#: the product; the Llama 3 scaling adds its own (wavelength, smoothing factor, the blend): 8 more at most.
ANGLE_ROUNDINGS = 5
SCALING_ROUNDINGS = 8


def rope_table_error(head_dim, theta_base, context_length, freq_config=None):
    """Elementwise bound on one float32 table against :func:`book_rope`'s float64 one: the angle off by its
    roundings (relative), then cos/sin's own error (tests/bounds.py)."""
    roundings = ANGLE_ROUNDINGS + (0 if freq_config is None else SCALING_ROUNDINGS)
    return gamma(roundings) * np.abs(book_angles(head_dim, theta_base, context_length, freq_config)) + trig_error()


def book_rope(head_dim, theta_base, context_length, freq_config=None):
    angles = book_angles(head_dim, theta_base, context_length, freq_config)
    return np.cos(angles), np.sin(angles)


def book_angles(head_dim, theta_base, context_length, freq_config=None):
    inv_freq = 1.0 / (theta_base ** (np.arange(0, head_dim, 2, dtype=np.float64)[: head_dim // 2] / head_dim))
    if freq_config is not None:
        low_wl = freq_config["original_context_length"] / freq_config["low_freq_factor"]
        high_wl = freq_config["original_context_length"] / freq_config["high_freq_factor"]
        wavelen = 2 * np.pi / inv_freq
        llama = np.where(wavelen > low_wl, inv_freq / freq_config["factor"], inv_freq)
        smooth = (freq_config["original_context_length"] / wavelen - freq_config["low_freq_factor"]) / (
            freq_config["high_freq_factor"] - freq_config["low_freq_factor"])
        smoothed = (1 - smooth) * (inv_freq / freq_config["factor"]) + smooth * inv_freq
        inv_freq = np.where((wavelen <= low_wl) & (wavelen >= high_wl), smoothed, llama)
    angles = np.arange(context_length, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.concatenate([angles, angles], axis=1)


def book_apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[: x.shape[-2]] + rotated * sin[: x.shape[-2]]


def book_rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def reference(weights, x, cfg: AttnConfig, attention_mask=None):
    """The book's forward in float64; ``attention_mask`` (1 = real key) hides keys as the programs do."""
    b, tokens, _ = x.shape
    hd, heads, kv = cfg.resolved_head_dim(), cfg.num_heads, cfg.kv_heads()

    def proj(name, x):
        out = x @ weights[f"{name}.weight"].T
        return out + weights[f"{name}.bias"] if f"{name}.bias" in weights else out

    def heads_of(t, n):
        return t.reshape(b, tokens, n, hd).transpose(0, 2, 1, 3)  # (b, n, T, hd)

    x = x.astype(np.float64)
    q, k, v = heads_of(proj("W_query", x), heads), heads_of(proj("W_key", x), kv), heads_of(proj("W_value", x), kv)
    if cfg.qk_norm:
        q, k = book_rms_norm(q, weights["q_norm.scale"]), book_rms_norm(k, weights["k_norm.scale"])
    cos, sin = book_rope(hd, cfg.rope_theta, cfg.context_length, cfg.freq_config())
    q, k = book_apply_rope(q, cos, sin), book_apply_rope(k, cos, sin)
    k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)  # repeat_interleave(dim=1)
    visible = np.tril(np.ones((tokens, tokens), dtype=bool))
    if attention_mask is not None:
        visible = visible & attention_mask.astype(bool)[:, None, None, :]
    scores = np.where(visible, q @ k.transpose(0, 1, 3, 2), -np.inf) / math.sqrt(hd)
    with np.errstate(invalid="ignore"):
        w = np.exp(scores - scores.max(axis=-1, keepdims=True))
        w = w / w.sum(axis=-1, keepdims=True)
    context = np.nan_to_num(w) @ v  # a query that sees no key: 0, as the programs
    return proj("out_proj", context.transpose(0, 2, 1, 3).reshape(b, tokens, heads * hd))


# --- weights and the ttnn parameter tree -------------------------------------------------------------


def random_weights(cfg: AttnConfig, seed=0, out_dim=None) -> dict[str, np.ndarray]:
    """torch-layout weights, uniform(-1, 1) / sqrt(fan-in); norm scales uniform(0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    hd, heads, kv = cfg.resolved_head_dim(), cfg.num_heads, cfg.kv_heads()
    shapes = {"W_query": (heads * hd, cfg.d_in), "W_key": (kv * hd, cfg.d_in), "W_value": (kv * hd, cfg.d_in),
              "out_proj": (out_dim or cfg.d_in, heads * hd)}
    weights = {}
    for name, (n_out, n_in) in shapes.items():
        weights[f"{name}.weight"] = rng.uniform(-1, 1, (n_out, n_in)) / math.sqrt(n_in)
        if cfg.qkv_bias:
            weights[f"{name}.bias"] = rng.uniform(-1, 1, n_out) / math.sqrt(n_in)
    if cfg.qk_norm:
        weights["q_norm.scale"] = rng.uniform(0.5, 1.5, hd)
        weights["k_norm.scale"] = rng.uniform(0.5, 1.5, hd)
    return {k: v.astype(np.float32) for k, v in weights.items()}


def ttnn_parameters(ttnn, device, weights) -> ParameterDict:
    """Linear weights ``(in, out)``, biases and norm scales ``(1, n)``: bf16 TILE on ``device``."""
    tree = ParameterDict()
    for key, w in weights.items():
        module, leaf = key.split(".")
        array = w.T if leaf == "weight" else w.reshape(1, -1)
        tensor = ttnn.from_torch(np.ascontiguousarray(array, dtype=np.float32), dtype=ttnn.bfloat16,
                                 layout=ttnn.TILE_LAYOUT, device=device)
        tree.setdefault(module, ParameterDict())[leaf] = tensor
    return tree


@pytest.fixture
def device():
    dev = hm.open_device(device_id=0)
    yield dev
    hm.close_device(dev)


def run(device, weights, x, cfg, attention_mask=None):
    parameters = ttnn_parameters(hm, device, weights)
    tt_x = hm.from_torch(x, dtype=hm.bfloat16, layout=hm.TILE_LAYOUT, device=device)
    out = gqa_programs.grouped_query_attention(hm, device, tt_x, parameters=parameters, config=cfg,
                                                       attention_mask=attention_mask)
    return np.asarray(hm.to_torch(out), dtype=np.float32)


def assert_within_budget(out, ref, label):
    assert out.shape == ref.shape, f"{label}: ttnn {out.shape} vs reference {ref.shape}"
    err = compare.max_abs_err(out, ref.astype(np.float32))
    budget = ROUNDINGS * BF16_UNIT_ROUNDOFF * max(1.0, float(np.abs(ref).max()))
    pcc = compare.pcc(ref.astype(np.float32), out)
    assert err <= budget, f"{label}: max-abs {err:.3g} > budget {budget:.3g} ({ROUNDINGS} u), shape {out.shape}"
    assert pcc >= TTNN_MIN_PCC, f"{label}: PCC {pcc:.6f} < {TTNN_MIN_PCC}, shape {out.shape}"
    return err, pcc


# --- the sweep --------------------------------------------------------------------------------------

CASES = {
    # name: config; tokens are swept separately (1 and 40)
    "mha": gqa_config(num_heads=4, kv=4),
    "gqa": gqa_config(num_heads=4, kv=2),
    "mqa": gqa_config(num_heads=4, kv=1),
    "gqa_head_dim_8_bias": gqa_config(num_heads=4, kv=2, head_dim=8, qkv_bias=True),  # hd != d_in / heads
    "qwen3_qk_norm": gqa_config(num_heads=4, kv=2, head_dim=8, qk_norm=True, theta=1_000_000.0),
    "qwen3_qk_norm_mqa_hd_32": gqa_config(d_in=32, num_heads=2, kv=1, head_dim=32, qk_norm=True),
    "llama3_scaling": gqa_config(num_heads=4, kv=2, scaling=LLAMA3_SCALING, theta=500_000.0),
    "llama3_scaling_hd_6": gqa_config(d_in=12, num_heads=4, kv=2, head_dim=6, scaling=LLAMA3_SCALING),
}


@pytest.mark.parametrize("tokens", [1, 40])
@pytest.mark.parametrize("name", list(CASES))
def test_program_equals_the_book_within_bf16_budget(device, name, tokens):
    cfg = CASES[name]
    weights = random_weights(cfg)
    x = np.random.default_rng(1).uniform(-1, 1, (2, tokens, cfg.d_in)).astype(np.float32)
    out = run(device, weights, x, cfg)
    assert_within_budget(out, reference(weights, x, cfg), f"{name}, {tokens} tokens")


@pytest.mark.parametrize("head_dim", [6, 8])
def test_llama3_scaling_shows_above_the_budget(device, head_dim):
    """With q/k weights x3 (scores of a few units), the scaled and the plain RoPE give outputs further apart
    than the budget, so the sweep above could not pass a program that ignored ``freq_config``."""
    cfg = gqa_config(d_in=2 * head_dim, num_heads=2, kv=1, head_dim=head_dim, scaling=LLAMA3_SCALING)
    weights = random_weights(cfg)
    weights["W_query.weight"] *= 3
    weights["W_key.weight"] *= 3
    x = np.random.default_rng(6).uniform(-1, 1, (2, 40, cfg.d_in)).astype(np.float32)
    ref, plain = reference(weights, x, cfg), reference(weights, x, cfg.replace(rope_scaling=""))
    budget = ROUNDINGS * BF16_UNIT_ROUNDOFF * max(1.0, float(np.abs(ref).max()))
    assert np.abs(ref - plain).max() > 1.5 * budget, "the case does not tell scaled from plain RoPE"
    assert_within_budget(run(device, weights, x, cfg), ref, f"Llama 3 scaling, head_dim {head_dim}")


def test_output_width_comes_from_out_proj(device):
    """Qwen3's ``out_proj`` maps ``H * hd -> d_in``; a different width is read off ``out_proj.weight``."""
    cfg = gqa_config(num_heads=4, kv=2, head_dim=8)
    weights = random_weights(cfg, out_dim=24)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 5, cfg.d_in)).astype(np.float32)
    out = run(device, weights, x, cfg)
    assert out.shape == (1, 5, 24)
    assert_within_budget(out, reference(weights, x, cfg), "out_proj 32 -> 24")


def test_padding_mask_hides_keys(device):
    """Right and left padding: real positions match the masked reference; a query that sees nothing gets out_proj(0)."""
    cfg = gqa_config(num_heads=4, kv=2, head_dim=8, qk_norm=True, qkv_bias=True)
    weights = random_weights(cfg)
    x = np.random.default_rng(3).uniform(-1, 1, (2, 12, cfg.d_in)).astype(np.float32)
    mask = np.ones((2, 12), dtype=bool)
    mask[0, -3:] = False  # right padding
    mask[1, :2] = False  # left padding: queries 0 and 1 see no key
    out = run(device, weights, x, cfg, mask)
    ref = reference(weights, x, cfg, mask)
    assert_within_budget(out, ref, "padding")
    bias = weights["out_proj.bias"]
    assert np.allclose(out[1, :2], bias, atol=2 * BF16_UNIT_ROUNDOFF), "a query that sees no key: out_proj(0) = bias"


def test_without_qk_norm_the_scales_are_not_read(device):
    """Llama 3 has no q_norm/k_norm: the program must not need them (the tree has none)."""
    cfg = gqa_config(num_heads=4, kv=1)
    weights = random_weights(cfg)
    assert not any("norm" in k for k in weights)
    x = np.random.default_rng(4).uniform(-1, 1, (1, 3, cfg.d_in)).astype(np.float32)
    assert np.all(np.isfinite(run(device, weights, x, cfg)))


# --- the pieces, by hand --------------------------------------------------------------------------


def test_rope_tables_equal_the_book_and_scaling_matters():
    for theta in (10_000.0, 500_000.0):
        for scaling in (None, LLAMA3_SCALING):
            cos, sin = gqa_programs.compute_rope_params(8, theta, 40, scaling)
            ref_cos, ref_sin = book_rope(8, theta, 40, scaling)
            assert cos.dtype == np.float32 and cos.shape == (40, 8)
            # float32 angles, as the book's torch code: p * inv_freq is off by a few roundings of it, relative
            bound = rope_table_error(8, theta, 40, scaling)
            for got, want in ((cos, ref_cos), (sin, ref_sin)):
                assert np.all(np.abs(got - want) <= bound), (np.abs(got - want).max(), bound.min())
    plain = gqa_programs.compute_rope_params(8, 10_000.0, 40)[1]
    scaled = gqa_programs.compute_rope_params(8, 10_000.0, 40, LLAMA3_SCALING)[1]
    slow = gqa_programs.compute_rope_params(8, 10_000.0 * 8.0 ** 2, 40)[1]  # inv_freq[2] / 8 (theta ** (4/8) * 8)
    assert np.array_equal(plain[:, 0], scaled[:, 0])  # high frequency: kept
    assert not np.allclose(plain[:, 1], scaled[:, 1], atol=1e-3)  # medium: smoothed
    bound = rope_table_error(8, 10_000.0, 40, LLAMA3_SCALING)[:, 2] + rope_table_error(8, 10_000.0 * 8.0**2, 40)[:, 2]
    assert np.all(np.abs(scaled[:, 2] - slow[:, 2]) <= bound)  # low: divided by factor (the same angles, exactly)
    np.testing.assert_array_equal(scaled[:, :4], scaled[:, 4:])  # the halves share their angles
    with pytest.raises(ValueError, match="even head_dim"):
        gqa_programs.compute_rope_params(5)


def test_rope_tables_equal_the_torch_reference():
    """When the torch module of the book's GQA exists (crosscheck.references.torch_gqa), its tables equal ours."""
    pytest.importorskip("torch")
    torch_gqa = pytest.importorskip("crosscheck.references.torch_gqa")
    for scaling in (None, LLAMA3_SCALING):
        cos, sin = torch_gqa.compute_rope_params(8, theta_base=500_000.0, context_length=40, freq_config=scaling)
        ours = gqa_programs.compute_rope_params(8, 500_000.0, 40, scaling)
        bound = 2 * rope_table_error(8, 500_000.0, 40, scaling)  # two float32 tables of the same angles
        for got, want in ((ours[0], cos.numpy()), (ours[1], sin.numpy())):
            assert np.all(np.abs(got - want) <= bound), (np.abs(got - want).max(), bound.min())


def test_apply_rope_rotates_split_halves(device):
    """Position 0 is the identity; at position p, the pair (i, i + hd/2) turns by p * inv_freq[i]."""
    x = np.arange(1, 9, dtype=np.float32).reshape(1, 1, 1, 8).repeat(3, axis=2) / 8  # 3 positions, same vector
    cos, sin = gqa_programs.compute_rope_params(8, 10_000.0, 3)
    send = lambda a: hm.from_torch(a, dtype=hm.bfloat16, layout=hm.TILE_LAYOUT, device=device)  # noqa: E731
    out = hm.to_torch(gqa_programs.apply_rope(hm, send(x), send(cos[None, None]), send(sin[None, None]))).astype(np.float32)
    np.testing.assert_array_equal(out[0, 0, 0], x[0, 0, 0])
    angle = 2 * 1.0  # position 2, inv_freq[0] = 1
    expected = x[0, 0, 2, 0] * math.cos(angle) - x[0, 0, 2, 4] * math.sin(angle)
    assert abs(out[0, 0, 2, 0] - expected) < 4 * BF16_UNIT_ROUNDOFF


def test_kv_heads_are_repeated_interleaved(device):
    """[K1, K2] -> [K1, K1, K2, K2] (the book's repeat_interleave), not [K1, K2, K1, K2] (repeat)."""
    k = np.stack([np.full((3, 2), 1.0), np.full((3, 2), 2.0)])[None].astype(np.float32)  # (1, 2, 3, 2)
    t = hm.from_torch(k, dtype=hm.bfloat16, layout=hm.TILE_LAYOUT, device=device)
    out = hm.to_torch(gqa_programs.expand_kv_heads(hm, t, 2)).astype(np.float32)
    assert out.shape == (1, 4, 3, 2)
    assert out[0, :, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert gqa_programs.expand_kv_heads(hm, t, 1) is t


def test_host_rms_norm_matches_the_book_and_checks_gamma(device):
    rng = np.random.default_rng(5)
    x, scale = rng.standard_normal((2, 3, 4, 6)).astype(np.float32), rng.uniform(0.5, 1.5, 6).astype(np.float32)
    send = lambda a: hm.from_torch(a, dtype=hm.bfloat16, layout=hm.TILE_LAYOUT, device=device)  # noqa: E731
    tx, ts = send(x), send(scale.reshape(1, -1))
    out = hm.to_torch(hm.rms_norm(tx, epsilon=1e-6, weight=ts)).astype(np.float32)
    xb, sb = hm.to_torch(tx).astype(np.float64), hm.to_torch(ts).astype(np.float64)
    np.testing.assert_allclose(out, book_rms_norm(xb, sb[0]), rtol=2 * BF16_UNIT_ROUNDOFF, atol=1e-6)
    with pytest.raises(RuntimeError, match="gamma logical width must be >= input logical width"):
        hm.rms_norm(tx, epsilon=1e-6, weight=send(scale[:4].reshape(1, -1)))
    with pytest.raises(RuntimeError, match="does not support ROW_MAJOR input"):
        hm.rms_norm(hm.from_torch(x, dtype=hm.bfloat16, device=device), weight=ts)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        hm.rms_norm(tx, 1e-6)  # epsilon is keyword-only in 0.81.1


# --- KV-cache decoding --------------------------------------------------------------------------------
#
# Through the runtime, as a user decodes: the registry's GroupedQueryAttention (the book's keys, no biases)
# on the host model. Budget: the registry's (15 u max-abs, PCC 0.999; TTNN_BF16_TOLERANCE) against the
# same runtime's full forward and against the float64 reference above (rounded to float32).

DECODE_TOKENS = 24
DECODE_BUDGET, DECODE_PCC = TTNN_BF16_TOLERANCE["GroupedQueryAttention"]
DECODE_CASES = {
    "mha": gqa_config(num_heads=4, kv=4),
    "gqa": gqa_config(num_heads=4, kv=2),
    "mqa": gqa_config(num_heads=4, kv=1),
    "gqa_qk_norm": gqa_config(num_heads=4, kv=2, head_dim=8, qk_norm=True, theta=1_000_000.0),
    "mqa_qk_norm_llama3_scaling": gqa_config(num_heads=4, kv=1, qk_norm=True, scaling=LLAMA3_SCALING,
                                             theta=500_000.0),
    "gqa_llama3_scaling_hd_6": gqa_config(d_in=12, num_heads=4, kv=2, head_dim=6, scaling=LLAMA3_SCALING),
}
GQA = registry.get("GroupedQueryAttention")


@pytest.fixture(scope="module")
def host():
    with runtime.open_runtime("host") as rt:
        yield rt


def decode_inputs(cfg, tokens=DECODE_TOKENS, seed=7):
    return np.random.default_rng(seed).uniform(-1, 1, (2, tokens, cfg.d_in)).astype(np.float32)


def left_padding(tokens=DECODE_TOKENS):
    """Sequence 1 starts at token 5: its queries 0 .. 4 see no key (context 0, out_proj(0) = 0)."""
    real = np.ones((2, tokens), np.int64)
    real[1, :5] = 0
    return real


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "left_padding"])
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_equals_the_full_forward_and_the_reference(host, name, padded):
    cfg = DECODE_CASES[name]
    weights = random_weights(cfg)
    x = decode_inputs(cfg)
    mask = left_padding() if padded else None
    full = runtime.run_variant(host, GQA, cfg, weights, x, mask)
    ref = reference(weights, x, cfg, mask).astype(np.float32)
    for prompt_len in (1, 3, 8):
        got = runtime.run_variant_decode(host, GQA, cfg, weights, x, prompt_len, mask)
        label = f"{name}, padded={padded}, P={prompt_len}"
        assert got.shape == full.shape == ref.shape == (2, DECODE_TOKENS, cfg.d_in) and got.dtype == np.float32
        vs_full, vs_ref = compare.max_abs_err(got, full), compare.max_abs_err(got, ref)
        assert vs_full <= DECODE_BUDGET, f"{label}: |decode - full| {vs_full:.3e} > {DECODE_BUDGET:.3e}"
        assert vs_ref <= DECODE_BUDGET, f"{label}: |decode - reference| {vs_ref:.3e} > {DECODE_BUDGET:.3e}"
        pcc = compare.pcc(ref, got)
        assert pcc >= DECODE_PCC, f"{label}: PCC {pcc:.6f} < {DECODE_PCC}"
        # the host model computes each row the same way whatever the token count: bit for bit
        np.testing.assert_array_equal(got, full, err_msg=label)
        if padded:
            assert not got[1, :5].any(), f"{label}: a query that sees no key must give out_proj(0) = 0"


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_the_cache_holds_the_kv_heads_after_rope(host, kv):
    """The caches are ``(b, G, tokens, hd)``, NOT repeated per query head, holding the rotated (and normed) keys."""
    cfg = gqa_config(num_heads=4, kv=kv, qk_norm=True)
    weights = random_weights(cfg)
    x = decode_inputs(cfg, tokens=7)
    parameters = ttnn_parameters(hm, host.device, weights)
    decoder = decode_programs.decode_program(registry.get("GroupedQueryAttention"), cfg)
    cache = decoder.allocate(hm, host.device, cfg, 2, 7)
    assert tuple(cache.keys.shape) == tuple(cache.values.shape) == (2, kv, 7, 4)
    keys_before = cache.keys

    def to_tt(a):
        return hm.from_torch(np.ascontiguousarray(a), dtype=hm.bfloat16, layout=hm.TILE_LAYOUT, device=host.device)

    decoder.prefill(hm, host.device, to_tt(x[:, :3]), parameters=parameters, config=cfg, cache=cache)
    for pos in range(3, 7):
        decoder.step(hm, host.device, to_tt(x[:, pos : pos + 1]), parameters=parameters, config=cfg, cache=cache,
                     pos=pos)
    assert cache.keys is keys_before and tuple(cache.keys.shape) == (2, kv, 7, 4)
    queries, keys, values = gqa_programs.gqa_qkv(hm, to_tt(x), parameters, cfg)
    _, keys = gqa_programs.gqa_rope(hm, host.device, queries, keys, cfg)  # positions 0 .. 6
    read = lambda t: np.asarray(hm.to_torch(t), np.float32)  # noqa: E731
    np.testing.assert_array_equal(read(cache.keys), read(keys))
    np.testing.assert_array_equal(read(cache.values), read(values))
    assert cache.real.all()


def test_a_step_rotates_at_its_own_position(host):
    """A step's one-row cos/sin table is the forward table's row ``pos``, bit for bit; and with q/k weights
    x3 a decode that rotated every step at position 0 misses the reference by more than the budget,
    so the sweep above could not pass a step that ignored its position."""
    cfg = gqa_config(num_heads=4, kv=2, scaling=LLAMA3_SCALING)
    cos, sin = gqa_programs.rope_tables(hm, host.device, DECODE_TOKENS, cfg)
    for pos in (0, 5, 23):
        one_cos, one_sin = gqa_programs.rope_tables(hm, host.device, 1, cfg, start=pos)
        assert tuple(one_cos.shape) == (1, 1, 1, cfg.resolved_head_dim())
        np.testing.assert_array_equal(hm.to_torch(one_cos)[0, 0, 0], hm.to_torch(cos)[0, 0, pos])
        np.testing.assert_array_equal(hm.to_torch(one_sin)[0, 0, 0], hm.to_torch(sin)[0, 0, pos])
    weights = random_weights(cfg)
    weights["W_query.weight"] *= 3
    weights["W_key.weight"] *= 3
    x = decode_inputs(cfg)
    ref = reference(weights, x, cfg).astype(np.float32)
    assert compare.max_abs_err(runtime.run_variant_decode(host, GQA, cfg, weights, x, 3), ref) <= DECODE_BUDGET
    right = decode_programs.GQA_DECODE
    at_zero = dataclasses.replace(right, positions=lambda ttnn, device, q, k, c, start: gqa_programs.gqa_rope(
        ttnn, device, q, k, c, 0))
    wrong = runtime.run_variant_decode(host, dataclasses.replace(GQA, ttnn_decode=at_zero), cfg, weights, x, 3)
    assert compare.max_abs_err(wrong, ref) > 1.5 * DECODE_BUDGET, "the case does not tell the step's position"


def test_decoding_huge_inputs_stays_finite(host):
    for name in ("gqa", "mqa_qk_norm_llama3_scaling"):
        cfg = DECODE_CASES[name]
        weights = random_weights(cfg)
        x = decode_inputs(cfg, tokens=10) * np.float32(1e4)
        for mask in (None, left_padding(10)):
            out = runtime.run_variant_decode(host, GQA, cfg, weights, x, 3, mask)
            assert np.isfinite(out).all(), f"{name}, padded={mask is not None}: non-finite decode of x * 1e4"
