"""ttnn decoding and masks on the host model: KV-cache decode equals the full forward, padding equals no padding.

Decoding (a prefill of P tokens, then one ``ttnn.update_cache`` step per token) must give
what the same runtime's full forward gives, and stay within the bf16 budget of the float32
torch reference. A padded batch (left or right) must give, at its real positions, what each
sequence gives alone; a query that sees no key gets a zero context vector. The in-place cache
ops of the host model follow tt-metal's rules. Bundles carry masks and the prompt length.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch reference needs torch")

from crosscheck.config import AttnConfig  # noqa: E402
from crosscheck.errors import BadInputError  # noqa: E402
from crosscheck.porting import bundle as bd  # noqa: E402
from crosscheck.tt import decode_programs, programs, runtime, worker  # noqa: E402
from crosscheck.tt import host_model as ttnn  # noqa: E402
from crosscheck.variants import registry  # noqa: E402
from crosscheck.variants.registry import TTNN_BF16_TOLERANCE  # noqa: E402

TOKENS = 24
#: head_dim 4 (the generic programs) and head_dim 32 (the SDPA twins run the full forward).
SMALL = AttnConfig(d_in=8, d_out=8, context_length=TOKENS, num_heads=2, qkv_bias=True)
WIDE = AttnConfig(d_in=64, d_out=64, context_length=TOKENS, num_heads=2, qkv_bias=True)
CONFIGS = {"head_dim_4": SMALL, "head_dim_32": WIDE}

DECODING = [v for v in registry.VARIANTS if runtime.has_decode(v, SMALL)]


def reference(variant, cfg, seed=0):
    """``(torch module, state dict)``: every parameter uniform(-1, 1) / sqrt(fan-in), the budget's unit-scale regime."""
    torch.manual_seed(seed)
    module = variant.torch_module(cfg).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1.0, 1.0).mul_(p.shape[-1] ** -0.5)
    return module, {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def torch_forward(variant, module, cfg, x):
    with torch.no_grad():
        return variant.torch_forward(module, torch.from_numpy(x), cfg).numpy()


def inputs(variant, cfg, batch=2, tokens=TOKENS, seed=1):
    d_in = variant.resolve(cfg).d_in
    return np.random.default_rng(seed).uniform(-1, 1, (batch, tokens, d_in)).astype(np.float32)


def budget(variant) -> float:
    return TTNN_BF16_TOLERANCE[variant.name][0]


@pytest.fixture(scope="module")
def host():
    with runtime.open_runtime("host") as rt:
        yield rt


def test_the_decoding_programs_are_the_causal_ones():
    names = {v.ttnn_program for v in DECODING}
    assert names == set(registry.ttnn_decoders())
    assert len(names) == 6 and not set(names) & {"self_attention_v1", "self_attention_v2", "simplified_self_attention"}
    mha = registry.get("TorchMultiheadAttention")
    assert runtime.has_decode(mha, SMALL) and not runtime.has_decode(mha, SMALL.replace(causal=False))
    assert decode_programs.decode_program(registry.get("SelfAttentionV2"), SMALL) is None


# --- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", CONFIGS)
@pytest.mark.parametrize("variant", DECODING, ids=lambda v: v.name)
def test_decode_equals_the_full_forward_and_torch(variant, label, host):
    cfg = CONFIGS[label]
    module, state_dict = reference(variant, cfg)
    x = inputs(variant, cfg)
    full = runtime.run_variant(host, variant, cfg, state_dict, x)
    expected = torch_forward(variant, module, cfg, x)
    for prompt_len in (1, 3, 8):
        got = runtime.run_variant_decode(host, variant, cfg, state_dict, x, prompt_len)
        assert got.shape == full.shape == expected.shape and got.dtype == np.float32
        vs_full = float(np.max(np.abs(got - full)))
        vs_torch = float(np.max(np.abs(got - expected)))
        assert vs_full <= budget(variant), f"{variant.name} P={prompt_len}: |decode - full| {vs_full:.3e}"
        assert vs_torch <= budget(variant), f"{variant.name} P={prompt_len}: |decode - torch| {vs_torch:.3e}"
        if runtime.program_name(variant, cfg) == variant.ttnn_program:  # same generic ops, same roundings
            np.testing.assert_array_equal(got, full, err_msg=f"{variant.name} P={prompt_len}")


def test_decode_of_the_whole_input_as_prompt_is_the_forward(host):
    variant = registry.get("MultiHeadAttention")
    _, state_dict = reference(variant, SMALL)
    x = inputs(variant, SMALL, tokens=5)
    full = runtime.run_variant(host, variant, SMALL, state_dict, x)
    np.testing.assert_array_equal(runtime.run_variant_decode(host, variant, SMALL, state_dict, x, 5), full)


def test_decode_steps_write_the_cache_in_place(host):
    """After a decode the caches hold every token's keys: the step's keys/values of the projections."""
    variant = registry.get("MultiHeadAttention")
    _, state_dict = reference(variant, SMALL)
    x = inputs(variant, SMALL, tokens=6)
    decoder = decode_programs.decode_program(variant, SMALL)
    from crosscheck.tt.port import preprocess_parameters

    parameters = preprocess_parameters(ttnn, host.device, variant.portmap(SMALL), state_dict, variant.name)
    cache = decoder.allocate(ttnn, host.device, SMALL, 2, 6)
    keys_before = cache.keys
    def to_tt(a):
        return ttnn.from_torch(np.ascontiguousarray(a), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=host.device)

    decoder.prefill(ttnn, host.device, to_tt(x[:, :2]), parameters=parameters, config=SMALL, cache=cache)
    for pos in range(2, 6):
        decoder.step(ttnn, host.device, to_tt(x[:, pos : pos + 1]), parameters=parameters, config=SMALL, cache=cache,
                     pos=pos)
    assert cache.keys is keys_before  # the same tensor, written in place
    _, keys, values = programs.mha_qkv(ttnn, to_tt(x), parameters, SMALL)
    np.testing.assert_array_equal(np.asarray(ttnn.to_torch(cache.keys), np.float32),
                                  np.asarray(ttnn.to_torch(keys), np.float32))
    np.testing.assert_array_equal(np.asarray(ttnn.to_torch(cache.values), np.float32),
                                  np.asarray(ttnn.to_torch(values), np.float32))
    assert cache.real.all()


def test_decode_refuses_what_it_cannot_do(host):
    v2 = registry.get("SelfAttentionV2")
    _, sd = reference(v2, SMALL)
    with pytest.raises(BadInputError, match="SelfAttentionV2: no ttnn KV-cache decode program"):
        runtime.run_variant_decode(host, v2, SMALL, sd, inputs(v2, SMALL), 3)
    mha = registry.get("MultiHeadAttention")
    _, sd = reference(mha, SMALL)
    x = inputs(mha, SMALL, tokens=4)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(BadInputError, match=r"prompt_len must be an int in \[1, tokens=4\]"):
            runtime.run_variant_decode(host, mha, SMALL, sd, x, bad)
    with pytest.raises(BadInputError, match=r"attention_mask must have the input's shape without d_in, \(2, 4\)"):
        runtime.run_variant_decode(host, mha, SMALL, sd, x, 2, np.ones((2, 3)))


# --- padding ----------------------------------------------------------------------------------------

LENGTHS = (11, 7, 1)


def padded_batch(sequences, side):
    width = max(s.shape[1] for s in sequences)
    x = np.zeros((len(sequences), width, sequences[0].shape[-1]), np.float32)
    real = np.zeros((len(sequences), width), np.int64)
    for i, s in enumerate(sequences):
        n = s.shape[1]
        where = slice(width - n, width) if side == "left" else slice(0, n)
        x[i, where], real[i, where] = s[0], 1
    return x, real


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("label", CONFIGS)
@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_padded_batch_equals_each_sequence_alone(variant, label, side, host):
    cfg = CONFIGS[label]
    _, state_dict = reference(variant, cfg)
    sequences = [inputs(variant, cfg, batch=1, tokens=n, seed=10 + i) for i, n in enumerate(LENGTHS)]
    x, real = padded_batch(sequences, side)
    out = runtime.run_variant(host, variant, cfg, state_dict, x, real)
    assert np.isfinite(out).all()
    for i, s in enumerate(sequences):
        alone = runtime.run_variant(host, variant, cfg, state_dict, s)[0]
        err = float(np.max(np.abs(out[i][real[i] == 1] - alone)))
        assert err <= budget(variant), f"{variant.name} {side} sequence {i}: max abs {err:.3e}"
    if runtime.has_decode(variant, cfg):
        decoded = runtime.run_variant_decode(host, variant, cfg, state_dict, x, 3, real)
        err = float(np.max(np.abs(decoded - out)))
        assert err <= budget(variant), f"{variant.name} {side}: |padded decode - padded forward| {err:.3e}"


def test_no_padding_mask_is_the_unmasked_program_bit_for_bit(host):
    for variant in registry.VARIANTS:
        _, sd = reference(variant, SMALL)
        x = inputs(variant, SMALL, tokens=6)
        plain = runtime.run_variant(host, variant, SMALL, sd, x)
        np.testing.assert_array_equal(runtime.run_variant(host, variant, SMALL, sd, x, np.ones((2, 6))), plain)


@pytest.mark.parametrize("label", CONFIGS)
def test_queries_that_see_no_key_get_zero_context(label, host):
    """Left padding: a causal query before the first real token sees no key. Not the mean of the values, not NaN."""
    cfg = CONFIGS[label]
    real = np.ones((2, 6), np.int64)
    real[1, :4] = 0
    hidden = real == 0
    causal = registry.get("CausalAttention")
    _, sd = reference(causal, cfg)
    x = inputs(causal, cfg, tokens=6)
    out = runtime.run_variant(host, causal, cfg, sd, x, real)
    assert (out[hidden] == 0).all() and (out[~hidden] != 0).any()
    np.testing.assert_array_equal(runtime.run_variant_decode(host, causal, cfg, sd, x, 2, real), out)
    mha = registry.get("MultiHeadAttention")  # context 0, then out_proj: its bias alone
    _, sd = reference(mha, cfg)
    out = runtime.run_variant(host, mha, cfg, sd, x, real)
    bias = ttnn.to_bfloat16(sd["out_proj.bias"]).astype(np.float32)
    np.testing.assert_array_equal(out[hidden], np.broadcast_to(bias, out[hidden].shape))
    simplified = registry.get("SimplifiedSelfAttention")  # no causal mask: only an all-padding row sees nothing
    x3 = inputs(simplified, cfg, tokens=6)
    all_padding = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    out = runtime.run_variant(host, simplified, cfg, {}, x3, all_padding)
    assert (out[1] == 0).all() and np.isfinite(out).all() and (out[0] != 0).any()


@pytest.mark.parametrize("label", CONFIGS)
@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_huge_inputs_stay_finite(variant, label, host):
    cfg = CONFIGS[label]
    _, sd = reference(variant, cfg)
    x = inputs(variant, cfg, tokens=8) * np.float32(1e4)
    real = np.ones((2, 8), np.int64)
    real[0, :3] = 0
    assert np.isfinite(runtime.run_variant(host, variant, cfg, sd, x)).all()
    assert np.isfinite(runtime.run_variant(host, variant, cfg, sd, x, real)).all()
    if runtime.has_decode(variant, cfg):
        assert np.isfinite(runtime.run_variant_decode(host, variant, cfg, sd, x, 3, real)).all()


def test_bad_masks_are_named(host):
    v2 = registry.get("SelfAttentionV2")
    _, sd = reference(v2, SMALL)
    x = inputs(v2, SMALL, tokens=4)
    with pytest.raises(BadInputError, match=r"SelfAttentionV2: attention_mask must have the input's shape"):
        runtime.run_variant(host, v2, SMALL, sd, x, np.ones(4))
    with pytest.raises(BadInputError, match="only 0 .padding. and 1 .real token."):
        runtime.run_variant(host, v2, SMALL, sd, x, np.full((2, 4), 0.5))
    unbatched = runtime.run_variant(host, v2, SMALL, sd, x[0], np.array([1, 1, 0, 1]))  # (tokens,) for (tokens, d_in)
    assert unbatched.shape == (4, SMALL.d_out)


# --- the host model's cache ops ---------------------------------------------------------------------


def tt(a, device, dtype=ttnn.bfloat16, **kw):
    return ttnn.from_torch(np.asarray(a, np.float32), dtype=dtype, layout=ttnn.TILE_LAYOUT, device=device, **kw)


def test_fill_and_update_cache_write_in_place(host):
    d = host.device
    cache = tt(np.zeros((2, 3, 40, 5)), d)
    prompt = np.arange(1 * 3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5)
    assert ttnn.fill_cache(cache, ttnn.fill_implicit_tile_padding(tt(prompt, d), 0.0), 1) is cache
    got = np.asarray(ttnn.to_torch(cache), np.float32)
    np.testing.assert_array_equal(got[1, :, :4], prompt[0])
    assert not got[0].any() and not got[1, :, 4:].any()
    rows = np.random.default_rng(0).normal(size=(1, 3, 2, 5)).astype(np.float32)  # users along dim -2
    assert ttnn.update_cache(cache, tt(rows, d), 37) is cache
    got = np.asarray(ttnn.to_torch(cache), np.float32)
    np.testing.assert_array_equal(got[:, :, 37], ttnn.to_bfloat16(rows[0].transpose(1, 0, 2)).astype(np.float32))
    np.testing.assert_array_equal(got[1, :, :4], prompt[0])  # the rest untouched


def test_fill_cache_copies_undefined_tile_padding(host):
    """Whole tiles: a prompt's padding rows land in the cache; undefined padding (after an op) shows as NaN."""
    d = host.device
    cache = tt(np.zeros((1, 1, 40, 2)), d)
    k = ttnn.multiply(tt(np.ones((1, 1, 3, 2)), d), 2.0)  # an op's output: padding undefined
    ttnn.fill_cache(cache, k, 0)
    got = np.asarray(ttnn.to_torch(cache), np.float32)[0, 0]
    assert (got[:3] == 2).all() and np.isnan(got[3:32]).all() and not got[32:].any()
    ttnn.fill_cache(cache, ttnn.fill_implicit_tile_padding(k, 0.0), 0)
    got = np.asarray(ttnn.to_torch(cache), np.float32)[0, 0]
    assert (got[:3] == 2).all() and not got[3:].any()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c, d: ttnn.fill_cache(c, tt(np.ones((1, 2, 4, 5)), d), 0, update_idx=8),
         r"Fill update_idx \(8\) must be a multiple of TILE_HEIGHT \(32\)"),
        (lambda c, d: ttnn.fill_cache(c, tt(np.ones((1, 2, 4, 5)), d), 2),
         r"Batch index \(2\) must be less than cache tensor batch size \(2\)"),
        (lambda c, d: ttnn.fill_cache(c, tt(np.ones((1, 2, 40, 5)), d), 0, update_idx=32),
         r"Fill update_idx \(32\) \+ input tensor height \(64\) must be <= cache tensor height \(64\)"),
        (lambda c, d: ttnn.fill_cache(c, tt(np.ones((1, 2, 4, 5)), d, dtype=ttnn.float32), 0),
         "Input and cache tensors must have same dtype!"),
        (lambda c, d: ttnn.fill_cache(c, tt(np.ones((2, 2, 4, 5)), d), 0), "Input tensor batch size must be 1 but got 2"),
        (lambda c, d: ttnn.fill_cache(c, tt(np.ones((1, 3, 4, 5)), d), 0),
         r"Input tensor height \(3\) must equal cache tensor height \(2\)"),
        (lambda c, d: ttnn.update_cache(c, tt(np.ones((1, 2, 2, 40)), d), 3),
         r"Input tensor width \(64\) must equal cache tensor width \(32\)"),
        (lambda c, d: ttnn.update_cache(c, tt(np.ones((1, 2, 2, 5)), d), 3, batch_offset=31),
         r"Batch offset \(31\) \+ cache tensor batch size \(2\) must be <= 32"),
        (lambda c, d: ttnn.update_cache(c, ttnn.from_torch(np.ones((1, 2, 2, 5), np.float32), dtype=ttnn.bfloat16,
                                                           layout=ttnn.ROW_MAJOR_LAYOUT, device=d), 3),
         "Inputs to update_cache must be tilized"),
        (lambda c, d: ttnn.update_cache(c, ttnn.from_torch(np.ones((1, 2, 2, 5), np.float32), dtype=ttnn.bfloat16,
                                                           layout=ttnn.TILE_LAYOUT), 3),
         "Operands to update_cache need to be on device!"),
        (lambda c, d: ttnn.update_cache(c, tt(np.ones((1, 2, 2, 5)), d), 64), "past the cache's 64 padded rows"),
    ],
)
def test_cache_op_rules(host, call, message):
    cache = tt(np.zeros((2, 2, 40, 5)), host.device)
    with pytest.raises(RuntimeError, match=message):
        call(cache, host.device)


def test_cache_op_signatures_are_ttnns(host):
    cache = tt(np.zeros((1, 1, 8, 2)), host.device)
    row = tt(np.ones((1, 1, 1, 2)), host.device)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ttnn.update_cache(cache, row, 0, 0)  # batch_offset is keyword-only
    with pytest.raises(TypeError, match="update_idx must be a uint32"):
        ttnn.update_cache(cache, row, -1)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ttnn.fill_cache(cache, row, 0, 0)  # update_idx is keyword-only


# --- bundles ----------------------------------------------------------------------------------------


def test_bundle_round_trip_with_mask_and_prompt_len(tmp_path, host):
    cases, expected = [], {}
    for variant in (registry.get("MultiHeadAttention"), registry.get("CausalAttention")):
        _, sd = reference(variant, SMALL)
        x = inputs(variant, SMALL, tokens=7)
        real = np.ones((2, 7), np.int64)
        real[1, :2] = 0
        cases.append(bd.BundleCase(variant.name, SMALL, sd, x, real))
        expected[variant.name] = runtime.run_variant_decode(host, variant, SMALL, sd, x, 3, real)
    path = tmp_path / "b.safetensors"
    bd.write_bundle(path, cases, meta={"purpose": "test"}, decode_prompt_len=3)
    back = bd.read_bundle(path)
    assert bd.read_bundle_meta(path) == {"purpose": "test", "decode_prompt_len": 3}
    for case, read in zip(cases, back):
        np.testing.assert_array_equal(read.attention_mask, case.attention_mask)
        assert read.attention_mask.dtype == np.uint8
    meta = worker.run_bundle(path, tmp_path / "o.safetensors", backend="ttnn", runtime="host")
    outputs, meta_back = bd.read_outputs(tmp_path / "o.safetensors")
    assert meta["decode_prompt_len"] == meta_back["decode_prompt_len"] == 3
    for name, value in expected.items():
        np.testing.assert_array_equal(outputs[name], value)


def test_bundle_without_the_new_fields_still_reads(tmp_path):
    variant = registry.get("CausalAttention")
    _, sd = reference(variant, SMALL)
    path = tmp_path / "old.safetensors"
    bd.write_bundle(path, [bd.BundleCase(variant.name, SMALL, sd, inputs(variant, SMALL, tokens=3))])
    (case,) = bd.read_bundle(path)
    assert case.attention_mask is None and "decode_prompt_len" not in bd.read_bundle_meta(path)


def test_bundle_refuses_bad_masks_and_prompt_lengths(tmp_path, host):
    variant = registry.get("CausalAttention")
    _, sd = reference(variant, SMALL)
    x = inputs(variant, SMALL, tokens=3)
    with pytest.raises(BadInputError, match=r"CausalAttention attention_mask: must have the inputs' shape"):
        bd.write_bundle(tmp_path / "a.safetensors", [bd.BundleCase(variant.name, SMALL, sd, x, np.ones((2, 4)))])
    with pytest.raises(BadInputError, match="decode_prompt_len must be an int >= 1, found 0"):
        bd.write_bundle(tmp_path / "b.safetensors", [bd.BundleCase(variant.name, SMALL, sd, x)], decode_prompt_len=0)
    v2 = registry.get("SelfAttentionV2")
    _, sd2 = reference(v2, SMALL)
    path = tmp_path / "c.safetensors"
    bd.write_bundle(path, [bd.BundleCase(v2.name, SMALL, sd2, x)], decode_prompt_len=2)
    with pytest.raises(BadInputError, match=r"these cases do not decode \(not causal\): \['SelfAttentionV2'\]"):
        worker.run_bundle(path, tmp_path / "o.safetensors", backend="ttnn", runtime="host")


def test_flax_worker_decodes_a_padded_bundle_like_ttnn(tmp_path):
    pytest.importorskip("flax", reason="the flax backend needs JAX and Flax")
    cases = []
    for variant in DECODING:
        _, sd = reference(variant, SMALL)
        real = np.ones((2, 7), np.int64)
        real[1, :2] = 0
        cases.append(bd.BundleCase(variant.name, SMALL, sd, inputs(variant, SMALL, tokens=7), real))
    path = tmp_path / "b.safetensors"
    bd.write_bundle(path, cases, decode_prompt_len=3)
    meta = worker.run_bundle(path, tmp_path / "flax.safetensors", backend="flax")
    worker.run_bundle(path, tmp_path / "ttnn.safetensors", backend="ttnn", runtime="host")
    flax_out, _ = bd.read_outputs(tmp_path / "flax.safetensors")
    ttnn_out, _ = bd.read_outputs(tmp_path / "ttnn.safetensors")
    assert meta["backend"] == "flax" and meta["decode_prompt_len"] == 3
    for variant in DECODING:
        err = float(np.max(np.abs(flax_out[variant.name] - ttnn_out[variant.name])))
        assert err <= budget(variant), f"{variant.name}: |flax decode - ttnn decode| {err:.3e}"
