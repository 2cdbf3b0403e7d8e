"""torch state dict -> ttnn parameter tree: layouts from the port tables, validation as on the Flax side."""

import numpy as np
import pytest

from crosscheck.config import AttnConfig
from crosscheck.errors import PortError
from crosscheck.porting import port as flax_port
from crosscheck.tt import host_model as ttnn
from crosscheck.tt.port import ParameterDict, preprocess_parameters, tree_path
from crosscheck.variants import registry


@pytest.fixture
def device():
    dev = ttnn.open_device(device_id=0)
    yield dev
    ttnn.close_device(dev)


def random_state_dict(variant, cfg, seed=0):
    rng = np.random.default_rng(seed)
    pmap = variant.portmap(cfg)
    sd = {e.torch_key: rng.uniform(-1, 1, e.torch_shape).astype(np.float32) for e in pmap.entries}
    sd.update({b.torch_key: b.expected() for b in pmap.buffers})
    return sd


def leaf(tree, key):
    node = tree
    for part in tree_path(key):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_every_entry_lands_in_ttnn_layout(variant, device):
    cfg = variant.resolve(AttnConfig(d_in=5, d_out=6, context_length=7, num_heads=3, qkv_bias=True))
    if variant.name == "TorchMultiheadAttention":
        cfg = variant.resolve(cfg.replace(d_in=6))
    sd = random_state_dict(variant, cfg)
    tree = preprocess_parameters(ttnn, device, variant.portmap(cfg), sd, variant.name)
    for entry in variant.portmap(cfg).entries:
        t = leaf(tree, entry.ttnn_name)  # the book's names whatever the format (q_proj -> W_query)
        assert t.shape == list(entry.ttnn_shape), entry.torch_key
        assert (t.dtype, t.layout, t.storage_type()) == (ttnn.bfloat16, ttnn.TILE_LAYOUT, ttnn.StorageType.DEVICE)
        expected = sd[entry.torch_key]
        expected = expected.T if entry.layout == "linear_weight" else expected.reshape(entry.ttnn_shape)
        np.testing.assert_array_equal(ttnn.to_torch(t), ttnn.to_bfloat16(expected))


def test_tree_mirrors_the_torch_modules(device):
    variant = registry.get("MultiHeadAttentionWrapper")
    cfg = AttnConfig(d_in=3, d_out=2, context_length=6, num_heads=2, qkv_bias=True)
    tree = preprocess_parameters(ttnn, device, variant.portmap(cfg), random_state_dict(variant, cfg), variant.name)
    assert isinstance(tree, ParameterDict) and len(tree.heads) == 2
    assert tree.heads[1].W_key.weight.shape == [3, 2] and tree.heads[1].W_key.bias.shape == [1, 2]
    with pytest.raises(AttributeError, match="no parameter 'W_query'"):
        tree.W_query  # noqa: B018


def test_torch_in_proj_reads_as_a_linear(device):
    variant = registry.get("TorchMultiheadAttention")
    cfg = variant.resolve(AttnConfig(d_in=4, num_heads=2, qkv_bias=True))
    tree = preprocess_parameters(ttnn, device, variant.portmap(cfg), random_state_dict(variant, cfg), variant.name)
    assert tree.in_proj.weight.shape == [4, 12] and tree.in_proj.bias.shape == [1, 12]


def test_user_aliases_are_accepted(device):
    variant = registry.get("SelfAttentionV2")
    cfg = AttnConfig()
    sd = {k.replace("W_value", "W_val"): v for k, v in random_state_dict(variant, cfg).items()}
    tree = preprocess_parameters(ttnn, device, variant.portmap(cfg), sd, variant.name)
    assert tree.W_value.weight.shape == [3, 2]


@pytest.mark.parametrize("mutation", ["missing", "unexpected", "shape", "mask"])
def test_refusals_match_the_flax_port(mutation, device):
    variant = registry.get("CausalAttention")
    cfg = AttnConfig()
    sd = random_state_dict(variant, cfg)
    if mutation == "missing":
        del sd["W_key.weight"]
    elif mutation == "unexpected":
        sd["W_extra.weight"] = np.ones((2, 3), np.float32)
    elif mutation == "shape":
        sd["W_query.weight"] = np.ones((3, 2), np.float32)
    else:
        sd["mask"] = np.zeros((6, 6), np.float32)
    with pytest.raises(PortError) as flax_err:
        flax_port.port_variables(variant, cfg, sd)
    with pytest.raises(PortError) as ttnn_err:
        preprocess_parameters(ttnn, device, variant.portmap(cfg), sd, variant.name)
    assert str(ttnn_err.value) == str(flax_err.value)
    assert {"missing": "'W_key.weight'", "unexpected": "'W_extra.weight'", "shape": "expected shape (2, 3), found (3, 2)",
            "mask": "not the causal mask"}[mutation] in str(ttnn_err.value)
