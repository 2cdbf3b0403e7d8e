"""Every variant's ttnn program on the host model vs the torch float32 reference, on the same weights."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch reference needs torch")

from crosscheck.config import AttnConfig  # noqa: E402
from crosscheck.errors import BadInputError  # noqa: E402
from crosscheck.seed import INPUTS  # noqa: E402
from crosscheck.tt import host_model, ops, runtime  # noqa: E402
from crosscheck.variants import registry  # noqa: E402
from crosscheck.variants.registry import TTNN_BF16_TOLERANCE  # noqa: E402


def pcc(a, b) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def reference(variant, cfg, x, seed=0):
    """``(state_dict, torch output)`` with unit-scale weights (the tolerance table's regime)."""
    cfg = variant.resolve(cfg)
    torch.manual_seed(seed)
    module = variant.torch_module(cfg).eval()
    if variant.name == "SelfAttentionV1":  # torch.rand weights are unit-scale only at the book's d_in=3
        with torch.no_grad():
            for p in module.parameters():
                p.uniform_(-1.0, 1.0).mul_(cfg.d_in ** -0.5)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):  # torch zero-inits some biases; make a mis-ported bias visible
                p.uniform_(-0.5, 0.5)
    state_dict = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    with torch.no_grad():
        out = variant.torch_forward(module, torch.from_numpy(x), cfg).numpy()
    return state_dict, out


def check(variant, cfg, x, runtime_):
    state_dict, expected = reference(variant, cfg, x)
    got = runtime.run_variant(runtime_, variant, cfg, state_dict, x)
    budget, min_pcc = TTNN_BF16_TOLERANCE[variant.name]
    err = float(np.max(np.abs(got - expected)))
    r = pcc(got, expected)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert r >= min_pcc, f"{variant.name} {cfg}: PCC {r:.6f} < {min_pcc} (shape {got.shape})"
    assert err <= budget, f"{variant.name} {cfg}: max abs {err:.3e} > budget {budget:.3e} (shape {got.shape})"
    assert not np.array_equal(got, expected), "bf16 rounding should make the host result differ from float32"
    return err, r


@pytest.fixture(scope="module")
def host():
    with runtime.open_runtime("host") as rt:
        yield rt


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_seed_sentence(variant, host):
    cfg = AttnConfig().replace(**dict(variant.defaults))
    x = INPUTS if variant.unbatched else INPUTS[None]
    check(variant, cfg, x, host)


SHAPES = [  # (batch, tokens, d_in, d_out, heads): tokens and dims off the 32-grid on purpose
    (1, 6, 3, 2, 1),
    (2, 7, 16, 8, 2),
    (1, 33, 40, 12, 4),
    (2, 50, 16, 4, 2),
]


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}t{}i{}o{}h{}".format(*s))
@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_shapes(variant, shape, qkv_bias, host):
    batch, tokens, d_in, d_out, heads = shape
    if variant.name == "TorchMultiheadAttention" and d_in % heads:
        heads = 1
    cfg = AttnConfig(d_in=d_in, d_out=d_out, context_length=64, num_heads=heads, qkv_bias=qkv_bias)
    try:
        variant.check_heads(cfg)
    except BadInputError:  # e.g. GQA's RoPE needs an even head_dim; 12 / 4 heads is 3: twice as wide is 6
        cfg = cfg.replace(d_out=2 * d_out)
        variant.check_heads(cfg)
    rng = np.random.default_rng(tokens)
    x = rng.uniform(-1, 1, size=(batch, tokens, d_in)).astype(np.float32)
    if variant.unbatched and batch == 1:
        x = x[0]
    check(variant, cfg, x, host)


def test_torch_multihead_non_causal(host):
    variant = registry.get("TorchMultiheadAttention")
    cfg = AttnConfig(d_in=8, num_heads=2, qkv_bias=True, causal=False)
    check(variant, cfg, np.random.default_rng(0).uniform(-1, 1, (2, 9, 8)).astype(np.float32), host)


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("name", sorted({v.ttnn_program for v in registry.VARIANTS if v.ttnn_sdpa}))
def test_sdpa_program_is_used_and_correct(name, head_dim, host, monkeypatch):
    variant = next(v for v in registry.VARIANTS if v.ttnn_program == name)
    cfg = variant.resolve(AttnConfig(d_in=2 * head_dim, d_out=2 * head_dim, context_length=40, num_heads=2,
                                     qkv_bias=True))
    assert runtime.program_name(variant, cfg) == name + "_sdpa"
    calls = []
    real = host_model.transformer.scaled_dot_product_attention
    monkeypatch.setattr(host_model.transformer, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    x = np.random.default_rng(head_dim).uniform(-1, 1, (2, 33, 2 * head_dim)).astype(np.float32)
    check(variant, cfg, x, host)
    assert len(calls) == 1 and calls[0]["is_causal"] is True


def test_sdpa_not_chosen_for_unaligned_head_dim():
    variant = registry.get("MultiHeadAttention")
    assert runtime.program_name(variant, AttnConfig(d_out=48, num_heads=2)) == "multi_head_attention"
    assert runtime.program_name(variant, AttnConfig()) == "multi_head_attention"


def test_generic_and_sdpa_programs_agree(host):
    variant = registry.get("MultiHeadAttention")
    cfg = AttnConfig(d_in=32, d_out=64, context_length=40, num_heads=2)
    x = np.random.default_rng(7).uniform(-1, 1, (1, 20, 32)).astype(np.float32)
    state_dict, expected = reference(variant, cfg, x)
    generic = runtime.run_variant(host, variant, cfg, state_dict, x, program="multi_head_attention")
    sdpa = runtime.run_variant(host, variant, cfg, state_dict, x)
    assert pcc(generic, sdpa) > 0.9999
    assert np.max(np.abs(generic - sdpa)) <= TTNN_BF16_TOLERANCE[variant.name][0]


def test_mask_value_survives_bf16_as_a_large_negative():
    stored = float(host_model.to_bfloat16(np.float32(ops.ADDITIVE_MASK_VALUE)).astype(np.float32))
    assert stored == -998244352.0 and np.exp(np.float32(stored)) == 0.0
