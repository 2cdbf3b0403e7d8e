"""torch <-> Flax porting: exact round trips, recognition of torch modules, loud failures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import jaxattn
from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError, PortError
from crosscheck.porting import port
from crosscheck.references import torch_ref
from crosscheck.seed import INPUTS
from crosscheck.variants import registry
from tests.bounds import check_layer
from tests.crosscheck.conftest import make_pair

SEED_BATCH = torch.from_numpy(INPUTS[None])


def configs():
    """Unequal dimensions everywhere but in nn.MultiheadAttention, where d_out = d_in = embed_dim."""
    out = []
    for variant in registry.VARIANTS:
        for qkv_bias in (False, True):
            base = AttnConfig(d_in=5, d_out=6, context_length=9, num_heads=3, qkv_bias=qkv_bias)
            if variant.splits_heads_of and "d_out" not in variant.fields:  # d_out is d_in (embed_dim, n_embd)
                base = base.replace(d_in=6)
            out.append(pytest.param(variant, variant.resolve(base), id=f"{variant.name}-bias{int(qkv_bias)}"))
    return out


@pytest.mark.parametrize("variant, cfg", configs())
def test_table_shapes_equal_the_flax_modules_own_parameters(variant, cfg):
    """The porting table is data; this keeps it true to what ``module.init`` creates."""
    module = variant.flax_module(cfg)
    x = jnp.ones((1, 4, cfg.d_in))
    shapes = jax.eval_shape(module.init, jax.random.key(0), x).get("params", {})
    flat = {"/".join(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
    table = {"/".join(e.flax_path): e.flax_shape for e in variant.portmap(cfg).entries}
    assert flat == table


@pytest.mark.parametrize("variant, cfg", configs())
def test_round_trip_torch_flax_torch_is_exact(variant, cfg):
    torch_module, flax_module, variables = make_pair(variant, cfg, seed=5)
    original = torch_module.state_dict()
    back = port.to_state_dict(flax_module, variables, variant=variant)
    assert set(back) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
        assert back[key].dtype == value.numpy().dtype
    # ... and it loads straight back into torch.
    fresh = variant.torch_module(cfg)
    fresh.load_state_dict(port.to_state_dict(flax_module, variables, return_tensors="pt", variant=variant))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, original[key])


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_from_torch_recognises_every_reference_module(variant):
    cfg = variant.resolve(AttnConfig(**{**AttnConfig().to_dict(), **dict(variant.defaults), "dropout": 0.25}))
    torch_module, _, _ = make_pair(variant, cfg, seed=2)
    # What a module cannot carry (the book's GQA classes: RoPE) comes as keywords.
    options = {k: getattr(cfg, k) for k in ("rope_theta", "context_length") if k in variant.options}
    flax_module, variables = port.from_torch(torch_module, **options)
    assert type(flax_module).__name__ == variant.flax_class_name
    x = INPUTS if variant.unbatched else INPUTS[None]
    with torch.no_grad():
        expected = variant.torch_forward(torch_module, torch.from_numpy(x), cfg.replace(causal=False)).numpy()
    # Jitted: one program, not one per operation (slow to compile on a GPU).
    got = jax.jit(flax_module.apply)(variables, jnp.asarray(x))
    check_layer(flax_module, variables.get("params"), x, got, expected, f"{variant.name} from_torch vs torch")
    if hasattr(flax_module, "dropout"):
        assert flax_module.dropout == 0.25


class SeedCausalAttention(nn.Module):
    """The seed notebook's own copy of the class: ``W_val`` instead of ``W_value``, ``dropout_rate``."""

    def __init__(self, d_in, d_out, context_length, dropout_rate):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=False)
        self.W_key = nn.Linear(d_in, d_out, bias=False)
        self.W_val = nn.Linear(d_in, d_out, bias=False)
        self.dropout = nn.Dropout(dropout_rate)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, _ = x.shape
        keys, values, queries = self.W_key(x), self.W_val(x), self.W_query(x)
        attn_scores = queries @ keys.transpose(1, 2)
        attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return self.dropout(attn_weights) @ values


class SeedMultiHeadAttentionWrapper(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout_rate, num_heads):
        super().__init__()
        self.heads = nn.ModuleList(
            [SeedCausalAttention(d_in, d_out, context_length, dropout_rate) for _ in range(num_heads)]
        )

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads], dim=-1)


@pytest.mark.parametrize(
    "build, expected_class",
    [
        (lambda: SeedCausalAttention(3, 2, 6, 0.0), jaxattn.CausalAttention),
        (lambda: SeedMultiHeadAttentionWrapper(3, 2, 6, 0.0, 2), jaxattn.MultiHeadAttentionWrapper),
    ],
)
def test_users_own_copies_of_the_book_classes_are_recognised(build, expected_class):
    torch.manual_seed(123)
    torch_module = build().eval()
    flax_module, variables = port.from_torch(torch_module)
    assert isinstance(flax_module, expected_class)
    assert flax_module.context_length == 6
    with torch.no_grad():
        expected = torch_module(SEED_BATCH).numpy()
    got = jax.jit(flax_module.apply)(variables, jnp.asarray(INPUTS[None]))
    check_layer(flax_module, variables["params"], INPUTS[None], got, expected, "the user's class vs torch")


def test_torch_multihead_attention_with_batch_first_and_causal_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    flax_module, variables = port.from_torch(mha)
    assert isinstance(flax_module, jaxattn.TorchMultiheadAttention) and flax_module.bias
    x = torch.randn(2, 5, 8)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        expected = mha(x, x, x, attn_mask=mask, need_weights=False)[0].numpy()
    causal = flax_module.clone(causal=True)
    got = jax.jit(causal.apply)(variables, jnp.asarray(x.numpy()))
    check_layer(causal, variables["params"], x.numpy(), got, expected, "causal nn.MultiheadAttention")


def test_unsupported_torch_modules_are_refused_by_name():
    with pytest.raises(BadInputError, match="cannot recognise torch module Linear"):
        port.from_torch(nn.Linear(3, 2))
    with pytest.raises(BadInputError, match="add_bias_kv"):
        port.from_torch(nn.MultiheadAttention(4, 2, add_bias_kv=True))


class TestLoadStateDictErrors:
    """Every error names each offending key with expected and found shapes."""

    module = jaxattn.MultiHeadAttention(3, 2, 6, 0.0, 2, qkv_bias=True)

    @pytest.fixture
    def state_dict(self):
        torch.manual_seed(0)
        return torch_ref.MultiHeadAttention(3, 2, 6, 0.0, 2, qkv_bias=True).state_dict()

    def test_a_valid_state_dict_loads(self, state_dict):
        variables = port.load_state_dict(self.module, state_dict)
        np.testing.assert_array_equal(variables["params"]["out_proj"]["kernel"], state_dict["out_proj.weight"].T)

    def test_missing_keys_are_all_listed(self, state_dict):
        del state_dict["W_key.weight"], state_dict["out_proj.bias"]
        with pytest.raises(PortError) as err:
            port.load_state_dict(self.module, state_dict)
        assert "missing key 'W_key.weight' (expected shape (2, 3))" in str(err.value)
        assert "missing key 'out_proj.bias' (expected shape (2,))" in str(err.value)

    def test_unexpected_keys_are_listed_with_their_shapes(self, state_dict):
        state_dict["W_extra.weight"] = torch.zeros(4, 4)
        with pytest.raises(PortError, match=r"unexpected key 'W_extra.weight' \(shape \(4, 4\)\)"):
            port.load_state_dict(self.module, state_dict)

    def test_misshaped_keys_name_expected_and_found(self, state_dict):
        state_dict["W_query.weight"] = torch.zeros(3, 2)  # transposed by mistake
        with pytest.raises(PortError, match=r"key 'W_query.weight': expected shape \(2, 3\), found \(3, 2\)"):
            port.load_state_dict(self.module, state_dict)

    def test_mask_buffer_is_optional(self, state_dict):
        del state_dict["mask"]
        port.load_state_dict(self.module, state_dict)

    def test_mask_buffer_is_checked_when_present(self, state_dict):
        state_dict["mask"] = torch.zeros(7, 7)
        with pytest.raises(PortError, match=r"buffer 'mask': expected shape \(6, 6\), found \(7, 7\)"):
            port.load_state_dict(self.module, state_dict)
        state_dict["mask"] = torch.zeros(6, 6)  # right shape, not causal
        with pytest.raises(PortError, match=r"buffer 'mask': not the causal mask"):
            port.load_state_dict(self.module, state_dict)

    def test_all_problems_are_reported_at_once(self, state_dict):
        del state_dict["W_value.bias"]
        state_dict["bogus"] = torch.zeros(1)
        state_dict["out_proj.weight"] = torch.zeros(2, 3)
        with pytest.raises(PortError) as err:
            port.load_state_dict(self.module, state_dict)
        assert str(err.value).count("\n") == 3

    def test_to_state_dict_rejects_variables_that_do_not_fit(self):
        variables = jax.jit(self.module.init)(jax.random.key(0), jnp.ones((1, 6, 3)))
        params = jax.tree.map(np.asarray, variables["params"])
        params["W_key"]["kernel"] = np.zeros((3, 5), np.float32)
        del params["out_proj"]["bias"]
        with pytest.raises(PortError) as err:
            port.to_state_dict(self.module, {"params": params})
        assert "W_key/kernel: expected shape (3, 2), found (3, 5)" in str(err.value)
        assert "missing Flax parameter out_proj/bias" in str(err.value)

    def test_non_jaxattn_module_is_refused(self):
        import flax.linen as fnn

        with pytest.raises(BadInputError, match="not a jaxattn attention module: Dense"):
            port.load_state_dict(fnn.Dense(3), {})


class TestFiles:
    @pytest.fixture
    def state_dict(self):
        torch.manual_seed(0)
        return torch_ref.CausalAttention(3, 2, 6, 0.0).state_dict()

    @pytest.mark.parametrize("name", ["w.pt", "w.pth", "w.safetensors"])
    def test_save_then_load_is_exact(self, tmp_path, state_dict, name):
        path = tmp_path / name
        port.save_file(state_dict, path)
        loaded = port.load_file(path)
        assert set(loaded) == set(state_dict)
        for key in state_dict:
            np.testing.assert_array_equal(loaded[key], state_dict[key].numpy())

    def test_nested_checkpoint_is_unwrapped(self, tmp_path, state_dict):
        torch.save({"model_state_dict": state_dict, "epoch": 3}, tmp_path / "ckpt.pt")
        assert set(port.load_file(tmp_path / "ckpt.pt")) == set(state_dict)

    def test_missing_file(self, tmp_path):
        with pytest.raises(BadInputError, match="weights file not found: .*nope.pt"):
            port.load_file(tmp_path / "nope.pt")

    def test_unknown_extension(self, tmp_path):
        (tmp_path / "w.npz").write_bytes(b"x")
        with pytest.raises(BadInputError, match=r"unsupported weights format .npz"):
            port.load_file(tmp_path / "w.npz")

    def test_pickled_module_is_refused_by_weights_only(self, tmp_path):
        torch.save(torch_ref.CausalAttention(3, 2, 6, 0.0), tmp_path / "module.pt")  # a whole pickled module
        with pytest.raises(BadInputError, match=r"weights_only=True"):
            port.load_file(tmp_path / "module.pt")

    def test_not_a_state_dict(self, tmp_path):
        torch.save([torch.zeros(2)], tmp_path / "list.pt")
        with pytest.raises(BadInputError, match="does not hold a state dict"):
            port.load_file(tmp_path / "list.pt")
        torch.save({"W_query.weight": torch.zeros(2, 3), "note": "hi"}, tmp_path / "mixed.pt")
        with pytest.raises(BadInputError, match="entry 'note' is not a tensor"):
            port.load_file(tmp_path / "mixed.pt")

    @pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors"])
    def test_corrupted_file(self, tmp_path, name):
        (tmp_path / name).write_bytes(b"\x00\x01 definitely not a checkpoint")
        with pytest.raises(BadInputError, match="cannot (load|read)"):
            port.load_file(tmp_path / name)


@pytest.mark.parametrize(
    "variant_name, build, expected",
    [
        ("SelfAttentionV1", lambda: torch_ref.SelfAttentionV1(4, 3), dict(d_in=4, d_out=3)),
        ("CausalAttention", lambda: torch_ref.CausalAttention(4, 3, 9, 0.1, True),
         dict(d_in=4, d_out=3, qkv_bias=True, context_length=9)),
        ("MultiHeadAttentionWrapper", lambda: torch_ref.MultiHeadAttentionWrapper(4, 3, 9, 0.0, 5),
         dict(d_in=4, d_out=3, qkv_bias=False, context_length=9, num_heads=5)),
        ("MultiHeadAttentionCombinedQKV", lambda: torch_ref.MultiHeadAttentionCombinedQKV(4, 6, 2, 9),
         dict(d_in=4, d_out=6, qkv_bias=False, context_length=9)),
        ("TorchMultiheadAttention", lambda: nn.MultiheadAttention(8, 2, batch_first=True),
         dict(d_in=8, d_out=8, qkv_bias=True)),
    ],
)
def test_infer_config_reads_what_the_shapes_tell(variant_name, build, expected):
    assert port.infer_config(registry.get(variant_name), build().state_dict()) == expected
