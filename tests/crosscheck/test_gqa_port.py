"""The book's two GroupedQueryAttention classes through the port: Flax equals torch, exact round trips,
whole-model prefixes, and errors that name the key. No transformers needed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError, PortError
from crosscheck.porting import port
from crosscheck.references.torch_gqa import Llama3GroupedQueryAttention, Qwen3GroupedQueryAttention, causal_forward
from crosscheck.variants import registry
from tests.bounds import check_layer

LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}
VARIANT = registry.get("GroupedQueryAttention")


def _randomise(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1.0, 1.0)
    return module.eval()


def _compare(module, *, rope_theta, freq_config, tokens=7, batch=2, seed=0):
    context_length = 512
    flax_module, variables = port.from_torch(
        module, rope_theta=rope_theta, freq_config=freq_config, context_length=context_length
    )
    x = np.random.default_rng(seed).normal(size=(batch, tokens, module.W_query.in_features)).astype(np.float32)
    with torch.no_grad():
        expected = causal_forward(
            module, torch.from_numpy(x), rope_theta=rope_theta, freq_config=freq_config, context_length=context_length
        ).numpy()
    with jax.default_matmul_precision("highest"):  # jitted: one program, not one per operation (GPU compile time)
        got = np.asarray(jax.jit(flax_module.apply)(variables, jnp.asarray(x)))
    assert got.shape == expected.shape
    # RoPE (and QK-norm): within 4x torch's own float32 error against the layer in float64 (tests/bounds.py)
    check_layer(flax_module, variables["params"], x, got, expected, "flax vs torch")
    return flax_module, variables


@pytest.mark.parametrize(
    "num_heads, kv, head_dim", [(4, 4, None), (4, 2, None), (4, 1, None), (4, 2, 6)], ids=["mha", "gqa", "mqa", "hd6"]
)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["plain", "llama3"])
def test_qwen3_class_flax_equals_torch(num_heads, kv, head_dim, qk_norm, scaling):
    module = _randomise(Qwen3GroupedQueryAttention(16, num_heads, kv, head_dim=head_dim, qk_norm=qk_norm), 1)
    flax_module, _ = _compare(module, rope_theta=500.0, freq_config=scaling, tokens=37)
    assert flax_module.qk_norm is qk_norm and flax_module.num_kv_groups == kv


@pytest.mark.parametrize("kv", [8, 2, 1])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["plain", "llama3"])
def test_llama3_class_flax_equals_torch(kv, scaling):
    module = _randomise(Llama3GroupedQueryAttention(16, 16, 8, kv), 2)
    _compare(module, rope_theta=500_000.0, freq_config=scaling)


def test_round_trip_torch_flax_torch_is_exact():
    module = _randomise(Qwen3GroupedQueryAttention(12, 6, 2, head_dim=4, qk_norm=True), 3)
    flax_module, variables = port.from_torch(module, rope_theta=1e4, context_length=64)
    back = port.to_state_dict(flax_module, variables)
    original = module.state_dict()
    assert set(back) == set(original) == {
        "W_query.weight", "W_key.weight", "W_value.weight", "out_proj.weight", "q_norm.scale", "k_norm.scale",
    }
    for key, value in original.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    fresh = Qwen3GroupedQueryAttention(12, 6, 2, head_dim=4, qk_norm=True)
    fresh.load_state_dict(port.to_state_dict(flax_module, variables, return_tensors="pt"))


def test_prefix_reads_one_layer_of_a_whole_model_and_writes_it_back():
    layers = [_randomise(Qwen3GroupedQueryAttention(8, 4, 2), seed) for seed in (4, 5)]
    whole = {"tok_emb.weight": torch.zeros(3, 8), "final_norm.scale": torch.ones(8)}
    for i, layer in enumerate(layers):
        whole.update({f"trf_blocks.{i}.att.{k}": v for k, v in layer.state_dict().items()})
        whole[f"trf_blocks.{i}.ff.fc1.weight"] = torch.zeros(4, 8)
    cfg = AttnConfig(d_in=8, d_out=8, num_heads=4, num_kv_groups=2, context_length=32)
    flax_module = VARIANT.flax_module(VARIANT.resolve(cfg))
    variables = port.load_state_dict(flax_module, whole, prefix="trf_blocks.1.att.")
    np.testing.assert_array_equal(
        variables["params"]["W_key"]["kernel"], layers[1].W_key.weight.detach().numpy().T
    )
    back = port.to_state_dict(flax_module, variables, prefix="trf_blocks.1.att.")
    assert set(back) == {k for k in whole if k.startswith("trf_blocks.1.att.")}
    for key, value in back.items():
        np.testing.assert_array_equal(value, whole[key].numpy())


def test_a_prefix_with_nothing_under_it_names_the_prefix():
    with pytest.raises(BadInputError, match=r"no key starts with the prefix 'trf_blocks\.9\.att\.'"):
        port.select_prefix({"trf_blocks.0.att.W_query.weight": np.zeros((2, 2))}, "trf_blocks.9.att.")


def test_errors_name_the_key_and_both_shapes():
    cfg = VARIANT.resolve(AttnConfig(d_in=8, d_out=8, num_heads=4, num_kv_groups=2, context_length=8))
    sd = {k: v.numpy() for k, v in Qwen3GroupedQueryAttention(8, 4, 1).state_dict().items()}  # one kv head
    with pytest.raises(PortError, match=r"'W_key.weight': expected shape \(4, 8\), found \(2, 8\)"):
        port.load_state_dict(VARIANT.flax_module(cfg), sd)
    del sd["out_proj.weight"]
    with pytest.raises(PortError, match=r"missing key 'out_proj.weight'"):
        port.load_state_dict(VARIANT.flax_module(cfg), sd)


def test_from_torch_names_what_the_book_module_cannot_carry():
    module = Qwen3GroupedQueryAttention(8, 4, 2)
    with pytest.raises(BadInputError, match="rope_theta, context_length missing"):
        port.from_torch(module)
    with pytest.raises(BadInputError, match="context_length missing"):
        port.from_torch(module, rope_theta=1e4)
    with pytest.raises(BadInputError, match="unknown option.*rope_base"):
        port.from_torch(module, rope_base=1e4)


def test_book_classes_are_not_mistaken_for_multi_head_attention():
    for module in (Qwen3GroupedQueryAttention(8, 4, 2), Llama3GroupedQueryAttention(8, 8, 4, 4)):
        assert [v.name for v in registry.VARIANTS if v.recognises(module)] == ["GroupedQueryAttention"]


def test_shapes_and_a_head_dim_pin_down_the_kv_heads():
    sd = {k: tuple(v.shape) for k, v in Qwen3GroupedQueryAttention(16, 4, 2, head_dim=6).state_dict().items()}
    assert VARIANT.infer_config(sd) == dict(d_in=16, d_out=24, qkv_bias=False, qk_norm=False)
    assert VARIANT.infer_config(sd, {"num_heads": 4}) == dict(
        d_in=16, d_out=24, qkv_bias=False, qk_norm=False, head_dim=6, num_heads=4, num_kv_groups=2
    )
    normed = {k: tuple(v.shape) for k, v in Qwen3GroupedQueryAttention(16, 4, 1, head_dim=6, qk_norm=True).state_dict().items()}
    assert VARIANT.infer_config(normed)["num_kv_groups"] == 1  # the norm's width is the head dim
