"""Hostile inputs to ``crosscheck convert`` and the port API: what must be refused (naming the key, the field,
the value), what must be accepted, and round trips that must be exact without being told the format.

Through the real CLI entry (``crosscheck.cli.main``: exit code, ONE stderr line, nothing written on a refusal)
and through :mod:`crosscheck.porting.port`.
"""

import json
import os

import numpy as np
import pytest
import torch
from flax.serialization import msgpack_restore, msgpack_serialize

from crosscheck.cli import main
from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError, PortError
from crosscheck.porting import convert, port
from crosscheck.references import torch_ref as tr
from crosscheck.variants import registry
from jaxattn.tolerance import projected_attention_bound
from tests.crosscheck.conftest import make_pair

MHA = registry.get("MultiHeadAttention")
MHA_CFG = AttnConfig(d_in=6, d_out=8, context_length=9, num_heads=2)
GQA = registry.get("GroupedQueryAttention")
GQA_CFG = GQA.resolve(AttnConfig(d_in=8, d_out=16, context_length=9, num_heads=4, num_kv_groups=2, head_dim=4))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The book's MultiHeadAttention as a torch file and as both Flax files; the book's GQA as a msgpack."""
    d = tmp_path_factory.mktemp("hostile_convert")
    torch_module, _, _ = make_pair(MHA, MHA_CFG, seed=5)
    torch.save(torch_module.state_dict(), d / "mha.pt")
    convert.convert(d / "mha.pt", d / "mha.msgpack", check=False)
    convert.convert(d / "mha.pt", d / "mha.safetensors", check=False)
    gqa, _, _ = make_pair(GQA, GQA_CFG, seed=6)
    torch.save(gqa.state_dict(), d / "gqa.pt")
    flags = dict(num_heads=4, num_kv_groups=2, head_dim=4, context_length=9, rope_theta=10_000.0)
    convert.convert(d / "gqa.pt", d / "gqa.msgpack", variant="GroupedQueryAttention", overrides=flags, check=False)
    return d, {k: t.numpy() for k, t in torch_module.state_dict().items()}


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(["convert", *(str(a) for a in argv)])
    return code, capsys.readouterr().err


def _refused(capsys, out, *argv, needles=()) -> str:
    """Exit 2, one ``crosscheck: error:`` line holding every needle, and ``out`` not written."""
    code, err = _cli(capsys, *argv, out)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("crosscheck: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not os.path.exists(out)
    return lines[0]


def _msgpack(src, dst, *, params=None, meta=None, extra=None):
    """A copy of the msgpack Flax file ``src`` at ``dst`` with ``params``/``meta`` edited in place by callables."""
    with open(src, "rb") as f:
        tree = msgpack_restore(f.read())
    if params:
        params(tree["params"])
    if meta:
        meta(tree["metadata"])
    tree.update(extra or {})
    with open(dst, "wb") as f:
        f.write(msgpack_serialize(tree))
    return dst


def _config_edit(**changes):
    """A metadata edit setting (or, with ``...``, removing) fields of ``crosscheck_config``."""

    def edit(meta):
        cfg = json.loads(meta["crosscheck_config"])
        for key, value in changes.items():
            if value is ...:
                del cfg[key]
            else:
                cfg[key] = value
        meta["crosscheck_config"] = json.dumps(cfg)

    return edit


def _bits(t: torch.Tensor) -> np.ndarray:
    """The bit pattern of a tensor: equal bits, not merely equal values (-0.0, NaN payloads)."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().contiguous().view(view).numpy()


# --- 1. convert writes nothing it should refuse ---------------------------------------------------


def test_an_unexpected_flax_parameter_is_refused_as_an_unexpected_torch_key_is(files, tmp_path, capsys):
    d, original = files

    def add(params):
        params["W_extra"] = {"kernel": np.ones((6, 8), np.float32)}

    src = _msgpack(d / "mha.msgpack", tmp_path / "extra.msgpack", params=add)
    _refused(capsys, tmp_path / "o.pt", src, needles=("unexpected Flax parameter W_extra/kernel (shape (6, 8))",))
    # The other direction refuses the same key the same way.
    torch.save({**{k: torch.from_numpy(v) for k, v in original.items()}, "W_extra.weight": torch.ones(8, 6)},
               tmp_path / "extra.pt")
    _refused(capsys, tmp_path / "o.msgpack", tmp_path / "extra.pt", "--variant", "MultiHeadAttention",
             needles=("unexpected key 'W_extra.weight' (shape (8, 6))",))
    # Siblings: a parameter nested under a known layer, and a tensor beside the parameters in a safetensors file.
    nested = _msgpack(d / "mha.msgpack", tmp_path / "nested.msgpack",
                      params=lambda p: p["W_query"].update(scale=np.ones(8, np.float32)))
    _refused(capsys, tmp_path / "o.pt", nested, needles=("unexpected Flax parameter W_query/scale",))
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(d / "mha.safetensors", framework="numpy") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 - safe_open has no __iter__
    save_file({**tensors, "other/W_extra": np.ones(3, np.float32)}, tmp_path / "stray.safetensors", metadata=meta)
    _refused(capsys, tmp_path / "o.pt", tmp_path / "stray.safetensors",
             needles=("unexpected entries beside 'params'", "other/W_extra"))


def test_port_to_state_dict_refuses_what_convert_refuses():
    torch_module, flax_module, variables = make_pair(MHA, MHA_CFG, seed=1)
    params = dict(variables["params"])
    with pytest.raises(PortError, match=r"unexpected Flax parameter extra/kernel \(shape \(2,\)\)"):
        port.to_state_dict(flax_module, {"params": {**params, "extra": {"kernel": np.ones(2, np.float32)}}})
    wrong = {**params, "out_proj": {**params["out_proj"], "bias": np.arange(8, dtype=np.int64)}}
    with pytest.raises(PortError, match=r"out_proj/bias \(for 'out_proj.bias'\): dtype int64; expected a floating"):
        port.to_state_dict(flax_module, {"params": wrong})
    # torch -> Flax through the port API refuses an integer weight too, naming the key and the dtype.
    sd = dict(torch_module.state_dict(), **{"W_key.weight": torch.ones(8, 6, dtype=torch.int32)})
    with pytest.raises(PortError, match=r"key 'W_key.weight': dtype int32; expected a floating"):
        port.load_state_dict(flax_module, sd)


def test_a_non_float_or_non_finite_flax_parameter_is_refused_naming_key_and_dtype(files, tmp_path, capsys):
    d, _ = files

    def to_int(params):
        params["W_query"]["kernel"] = params["W_query"]["kernel"].astype(np.int32)

    src = _msgpack(d / "mha.msgpack", tmp_path / "int.msgpack", params=to_int)
    _refused(capsys, tmp_path / "o.pt", src, "--no-check",
             needles=("W_query/kernel (for 'W_query.weight'): dtype int32; expected a floating dtype",))

    def to_bool(params):
        params["out_proj"]["bias"] = params["out_proj"]["bias"] > 0

    src = _msgpack(d / "mha.msgpack", tmp_path / "bool.msgpack", params=to_bool)
    _refused(capsys, tmp_path / "o.pt", src, needles=("out_proj/bias (for 'out_proj.bias'): dtype bool",))

    def nan(params):
        params["W_value"]["kernel"] = np.where(np.eye(6, 8) > 0, np.nan, params["W_value"]["kernel"])

    src = _msgpack(d / "mha.msgpack", tmp_path / "nan.msgpack", params=nan)
    _refused(capsys, tmp_path / "o.pt", src, "--no-check",
             needles=("weight 'W_value.weight' (params/W_value/kernel) has NaN or infinite values",))


def test_the_mask_buffer_is_written_in_the_dtype_the_torch_module_keeps(files, tmp_path, capsys):
    d, original = files

    def half(params):
        for layer in params.values():
            for name in layer:
                layer[name] = layer[name].astype(np.float16)

    src = _msgpack(d / "mha.msgpack", tmp_path / "half.msgpack", params=half)
    assert _cli(capsys, src, tmp_path / "half.pt", "--no-check")[0] == 0
    back = torch.load(tmp_path / "half.pt", weights_only=True)
    reference = MHA.torch_module(MHA_CFG).half().state_dict()  # torch's .half() moves the mask along
    assert {k: t.dtype for k, t in back.items()} == {k: t.dtype for k, t in reference.items()}
    assert torch.equal(back["mask"], reference["mask"])

    def mixed(params):  # the first weight float64: a mask following "the first weight" would be float64
        params["W_query"]["kernel"] = params["W_query"]["kernel"].astype(np.float64)

    src = _msgpack(d / "mha.msgpack", tmp_path / "mixed.msgpack", params=mixed)
    assert _cli(capsys, src, tmp_path / "mixed.safetensors", "--no-check")[0] == 0
    from safetensors.torch import load_file

    back = load_file(tmp_path / "mixed.safetensors")
    # Weights of several dtypes: the reference module's own float32 mask, never a weight's odd dtype.
    assert back["mask"].dtype == MHA.torch_module(MHA_CFG).state_dict()["mask"].dtype == torch.float32
    assert back["W_query.weight"].dtype == torch.float64
    np.testing.assert_array_equal(back["W_query.weight"].numpy(), original["W_query.weight"].astype(np.float64))


# --- 2. a mask the state dict does not show ---------------------------------------------------------


class NonPersistentCausal(tr.CausalAttention):
    """The book's CausalAttention with its mask registered ``persistent=False`` (absent from state_dict())."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", self.mask, persistent=False)


def test_a_non_persistent_mask_ports_causally_and_round_trips_without_it():
    torch.manual_seed(3)
    module = NonPersistentCausal(3, 4, 6, 0.0).eval()
    assert "mask" not in module.state_dict()
    flax_module, variables = port.from_torch(module)
    assert type(flax_module).__name__ == "CausalAttention" and flax_module.context_length == 6
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    import jax

    with jax.default_matmul_precision("highest"):
        got = np.asarray(flax_module.apply(variables, jax.numpy.asarray(x)))
    w = {k: t.numpy().T for k, t in module.state_dict().items()}
    bound = projected_attention_bound(x, w["W_query.weight"], w["W_key.weight"], w["W_value.weight"], num_heads=1,
                                      is_causal=True)
    assert bound < 1e-4  # far below the 8.6e-2 a non-causal port is off by: the comparison can tell
    assert np.max(np.abs(got - want)) <= bound
    back = port.to_state_dict(flax_module, variables, return_tensors="pt")
    assert back.keys() == module.state_dict().keys()  # no mask key the torch module would refuse
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(_bits(back[key]), _bits(value), err_msg=key)
    NonPersistentCausal(3, 4, 6, 0.0).load_state_dict(back, strict=True)


def test_every_fact_a_hidden_mask_carries_is_read():
    torch.manual_seed(0)
    wrapper = tr.MultiHeadAttentionWrapper(3, 2, 7, 0.0, 2)
    for head in wrapper.heads:
        head.register_buffer("mask", head.mask, persistent=False)
    flax_module, _ = port.from_torch(wrapper)  # its heads are causal layers, not V2s
    assert type(flax_module).__name__ == "MultiHeadAttentionWrapper" and flax_module.context_length == 7
    mha = tr.MultiHeadAttention(4, 4, 5, 0.0, 2)
    mha.register_buffer("mask", mha.mask, persistent=False)
    assert port.from_torch(mha)[0].context_length == 5  # the mask bounds the tokens, not UNBOUNDED_CONTEXT
    plain = tr.CausalAttention(3, 2, 4, 0.0)
    mask = plain.mask
    del plain._buffers["mask"]
    plain.mask = mask  # a plain tensor attribute, as a notebook may keep it
    assert type(port.from_torch(plain)[0]).__name__ == "CausalAttention"
    bad = tr.CausalAttention(3, 2, 4, 0.0)
    bad.register_buffer("mask", torch.zeros(4, 4), persistent=False)
    with pytest.raises(PortError, match=r"buffer 'mask': not the causal mask"):  # checked as a saved one is
        port.from_torch(bad)


# --- 3. round trips exact by default ----------------------------------------------------------------


def _hf_module(kind: str):
    transformers = pytest.importorskip("transformers")
    common = dict(num_hidden_layers=1, vocab_size=8, intermediate_size=8, max_position_embeddings=64,
                  attn_implementation="eager")
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                          attention_bias=True, **common)
        cls = transformers.models.llama.modeling_llama.LlamaAttention
    elif kind == "qwen3":
        config = transformers.Qwen3Config(hidden_size=12, num_attention_heads=2, num_key_value_heads=1, head_dim=6,
                                          **common)
        cls = transformers.models.qwen3.modeling_qwen3.Qwen3Attention
    else:
        config = transformers.GPT2Config(n_embd=12, n_head=3, n_layer=1, n_positions=64, vocab_size=8,
                                         attn_implementation="eager")
        cls = transformers.models.gpt2.modeling_gpt2.GPT2Attention
    torch.manual_seed(0)
    module = cls(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
    return module


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
def test_transformers_formats_round_trip_bit_for_bit_without_variant(kind):
    module = _hf_module(kind)
    original = module.state_dict()
    flax_module, variables = port.from_torch(module)
    assert port.ported_from(flax_module).variant == type(module).__name__
    model = port.from_torch(module, api="nnx")
    for back in (port.to_state_dict(flax_module, variables, return_tensors="pt"),
                 port.to_state_dict(model, return_tensors="pt")):
        assert back.keys() == original.keys(), (sorted(back), sorted(original))
        for key, value in original.items():
            assert back[key].dtype == value.dtype, key
            np.testing.assert_array_equal(_bits(back[key]), _bits(value), err_msg=key)
    type(module)(module.config, layer_idx=0).load_state_dict(back, strict=True)


def test_load_state_dict_remembers_the_format_and_variant_still_wins():
    module = _hf_module("llama")
    fresh = registry.get("LlamaAttention").flax_module(port.recognise(module)[1])
    variables = port.load_state_dict(fresh, module.state_dict())  # found by its keys
    assert set(port.to_state_dict(fresh, variables)) == set(module.state_dict())
    assert "q_proj.weight" in port.to_state_dict(fresh, variables, variant="LlamaAttention")
    with pytest.raises(BadInputError, match="qkv_bias=True is not a GroupedQueryAttention"):
        port.to_state_dict(fresh, variables, variant="GroupedQueryAttention")  # the book's format has no biases


# --- 4. bad metadata: exit 2, one line naming the field and the value ---------------------------------

BAD_METADATA = {
    "num_heads splits no d_out": ("mha", _config_edit(num_heads=3), "d_out=8 must be divisible by num_heads=3"),
    "num_heads zero": ("mha", _config_edit(num_heads=0), "num_heads must be >= 1, found 0"),
    "num_heads a string": ("mha", _config_edit(num_heads="two"), "'num_heads' must be int, found 'two'"),
    "context_length negative": ("mha", _config_edit(context_length=-5), "context_length must be >= 1, found -5"),
    "d_in a float": ("mha", _config_edit(d_in=6.5), "'d_in' must be int, found 6.5"),
    "qkv_bias not a bool": ("mha", _config_edit(qkv_bias=1), "'qkv_bias' must be bool, found 1"),
    "dropout out of range": ("mha", _config_edit(dropout=1.5), "dropout must be in [0, 1), found 1.5"),
    "num_heads over the limit": ("mha", _config_edit(num_heads=1 << 20), "num_heads 1048576 is over the limit"),
    "unknown field": ("mha", _config_edit(heads=2), "unknown config fields ['heads']"),
    "missing field": ("mha", _config_edit(d_out=...), "crosscheck_config: missing d_out"),
    "config not JSON": ("mha", lambda m: m.update(crosscheck_config="{"), "crosscheck_config is not valid JSON"),
    "config not a string": ("mha", lambda m: m.update(crosscheck_config=3), "must be a JSON string, found int"),
    "unknown variant": ("mha", lambda m: m.update(crosscheck_variant="Nope"), "unknown variant 'Nope'"),
    "a buffer the variant lacks": (
        "mha", lambda m: m.update(torch_buffers="heads.0.mask"), "torch_buffers names 'heads.0.mask'"),
    "kv groups that split no heads": (
        "gqa", _config_edit(num_kv_groups=3), "num_heads=4 must be divisible by num_kv_groups=3"),
    "odd head_dim": ("gqa", _config_edit(head_dim=3, d_out=12), "head_dim=3 must be even"),
    "rope_theta negative": ("gqa", _config_edit(rope_theta=-1.0), "rope_theta must be a finite number > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_exits_2_naming_the_field_and_the_value(case, files, tmp_path, capsys):
    d, _ = files
    which, edit, message = BAD_METADATA[case]
    src = _msgpack(d / f"{which}.msgpack", tmp_path / "bad.msgpack", meta=edit)
    _refused(capsys, tmp_path / "o.pt", src, needles=(str(src), message))


def test_bad_metadata_in_a_safetensors_file_is_refused_alike(files, tmp_path, capsys):
    d, _ = files
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(d / "mha.safetensors", framework="numpy") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 - safe_open has no __iter__
    _config_edit(num_heads=3)(meta)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    _refused(capsys, tmp_path / "o.pt", tmp_path / "bad.safetensors",
             needles=("metadata crosscheck_config", "d_out=8 must be divisible by num_heads=3"))


def test_a_context_shorter_than_the_check_input_is_named(files, tmp_path, capsys):
    d, original = files
    src = _msgpack(d / "mha.msgpack", tmp_path / "short.msgpack", meta=_config_edit(context_length=4))
    _refused(capsys, tmp_path / "o.pt", src, needles=("tokens=6, beyond context_length=4", "--tokens"))
    code, err = _cli(capsys, src, tmp_path / "o.pt", "--tokens", "4")
    assert code == 0, err
    back = torch.load(tmp_path / "o.pt", weights_only=True)
    assert back["mask"].shape == (4, 4)
    assert torch.equal(back["W_query.weight"], torch.from_numpy(original["W_query.weight"]))


# --- 5. messages that say what to do ----------------------------------------------------------------


def test_a_whole_model_without_prefix_names_the_option_and_the_prefixes(files, tmp_path, capsys):
    d, original = files
    model = {f"trf_blocks.{i}.att.{k}": torch.from_numpy(v) for i in (0, 1, 10) for k, v in original.items()}
    model["tok_emb.weight"] = torch.ones(4, 6)
    torch.save(model, tmp_path / "model.pt")
    out = tmp_path / "o.msgpack"
    layers = "'trf_blocks.0.att.', 'trf_blocks.1.att.', 'trf_blocks.10.att.'"
    _refused(capsys, out, tmp_path / "model.pt", needles=("--prefix", "3 attention layers", layers))
    # A prefix that still holds several layers names the full prefixes; one that holds none lists them.
    _refused(capsys, out, tmp_path / "model.pt", "--prefix", "trf_blocks.",
             needles=("under --prefix 'trf_blocks.'", layers))
    _refused(capsys, out, tmp_path / "model.pt", "--prefix", "model.layers.0.",
             needles=("no key starts with the prefix 'model.layers.0.'", "layers found under 'trf_blocks.0.att.'"))
    # The port API says the same in its own terms.
    flax_module = MHA.flax_module(MHA_CFG)
    with pytest.raises(PortError, match=r"choose one with --prefix \(prefix= in Python\) \('trf_blocks.0.att.'"):
        port.load_state_dict(flax_module, model)
    assert port.layer_prefixes(model) == ["trf_blocks.0.att.", "trf_blocks.1.att.", "trf_blocks.10.att."]
    assert port.layer_prefixes(original) == [""]


def test_flags_that_agree_with_the_metadata_are_accepted(files, tmp_path, capsys):
    d, original = files
    out = tmp_path / "back.pt"
    code, err = _cli(capsys, d / "mha.msgpack", out, "--variant", "multiheadattention", "--num-heads", "2",
                     "--d-in", "6", "--d-out", "8", "--context-length", "9", "--causal", "--no-qkv-bias", "--no-check")
    assert code == 0, err
    back = torch.load(out, weights_only=True)
    assert back.keys() == original.keys()
    assert all(np.array_equal(back[k].numpy(), v) for k, v in original.items())


CONTRADICTIONS = {
    "num_heads": (["--num-heads", "4"], "--num-heads 4 contradicts", "gives num_heads=2"),
    "variant": (["--variant", "CausalAttention"], "--variant CausalAttention contradicts", "is MultiHeadAttention"),
    "causal": (["--no-causal"], "--causal false contradicts", "gives causal=true"),
    "d_out": (["--d-out", "4"], "--d-out 4 contradicts", "gives d_out=8"),
    "config.json": (["--config", "{d}/config.json"], "config.json's num_attention_heads 3 contradicts",
                    "gives num_heads=2"),
    "prefix": (["--prefix", "trf_blocks.0.att."], "--prefix 'trf_blocks.0.att.' selects a layer", "drop --prefix"),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_a_flag_that_contradicts_the_metadata_names_both_values(case, files, tmp_path, capsys):
    d, _ = files
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 6, "n_head": 3}))
    flags, *needles = CONTRADICTIONS[case]
    _refused(capsys, tmp_path / "o.pt", d / "mha.msgpack", *(f.format(d=tmp_path) for f in flags), needles=needles)


def test_a_bundle_whose_heads_split_no_width_is_refused_on_read(tmp_path):
    """The bundle's config is metadata read back as convert's is: heads that do not split d_out are named
    on read, not left to fail in the worker's interpreter."""
    from crosscheck.porting import bundle

    torch_module, _, _ = make_pair(MHA, MHA_CFG, seed=2)
    weights = {k: t.numpy() for k, t in torch_module.state_dict().items()}
    x = np.zeros((1, 6, 6), np.float32)
    path = tmp_path / "b.safetensors"
    bundle.write_bundle(path, [bundle.BundleCase("MultiHeadAttention", MHA_CFG.replace(num_heads=3), weights, x)])
    with pytest.raises(BadInputError, match=r"case 'MultiHeadAttention': .*d_out=8 must be divisible by num_heads=3"):
        bundle.read_bundle(path)
