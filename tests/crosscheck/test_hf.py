"""transformers' LlamaAttention, Qwen3Attention and GPT2Attention through the port and the CLI.

Tiny random configs built in memory: nothing is downloaded. transformers is the optional [hf] extra.
"""

import json
import types

import pytest

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: the Hugging Face formats need pip install 'jaxattn[hf]'"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from crosscheck import cli  # noqa: E402
from crosscheck.config import AttnConfig  # noqa: E402
from crosscheck.errors import BadInputError  # noqa: E402
from crosscheck.porting import port
from crosscheck.references import hf
from crosscheck.variants import registry
from jaxattn.tolerance import reference_bound  # noqa: E402
from tests.bounds import chain_length, check_layer, layer_grads64  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
COMMON = dict(num_hidden_layers=1, vocab_size=8, intermediate_size=8, max_position_embeddings=512,
              attn_implementation="eager")


def llama_config(**extra):
    extra = {"rope_parameters": dict(LLAMA3_ROPE), **extra}
    return transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    **COMMON, **extra)


def qwen3_config(**extra):
    return transformers.Qwen3Config(hidden_size=24, num_attention_heads=4, num_key_value_heads=1, head_dim=10,
                                    **COMMON, **extra)


def gpt2_config():
    return transformers.GPT2Config(n_embd=24, n_head=4, n_layer=1, n_positions=512, vocab_size=8, bos_token_id=0,
                                   eos_token_id=0, attn_implementation="eager")


def _module(kind: str, config):
    modeling = {"llama": transformers.models.llama.modeling_llama, "qwen3": transformers.models.qwen3.modeling_qwen3,
                "gpt2": transformers.models.gpt2.modeling_gpt2}[kind]
    cls = {"llama": "LlamaAttention", "qwen3": "Qwen3Attention", "gpt2": "GPT2Attention"}[kind]
    torch.manual_seed(0)
    module = getattr(modeling, cls)(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
    return module


CASES = [
    pytest.param("llama", llama_config, id="LlamaAttention-llama3-rope"),
    pytest.param("llama", lambda: llama_config(attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1e4}), id="LlamaAttention-bias"),
    pytest.param("qwen3", qwen3_config, id="Qwen3Attention"),
    pytest.param("gpt2", gpt2_config, id="GPT2Attention"),
]


@pytest.mark.parametrize("kind, make_config", CASES)
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_flax_equals_transformers(kind, make_config, tokens):
    module = _module(kind, make_config())
    variant, cfg = port.recognise(module)
    assert variant.name == type(module).__name__
    flax_module, variables = port.from_torch(module)
    x = np.random.default_rng(tokens).normal(size=(2, tokens, cfg.d_in)).astype(np.float32)
    with torch.no_grad():
        expected = variant.torch_forward(module, torch.from_numpy(x), cfg).numpy()
    # Jitted: one program, not one per operation and shape (slow to compile on a GPU).
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(flax_module.apply)(variables, jnp.asarray(x)))
    check_layer(flax_module, variables["params"], x, got, expected, f"{kind} {got.shape}: flax vs transformers")


@pytest.mark.parametrize("kind, make_config", CASES)
def test_to_state_dict_writes_transformers_names_back_exactly(kind, make_config):
    module = _module(kind, make_config())
    variant, _ = port.recognise(module)
    flax_module, variables = port.from_torch(module)
    prefix = "transformer.h.0.attn." if kind == "gpt2" else "model.layers.0.self_attn."
    back = port.to_state_dict(flax_module, variables, variant=variant.name, prefix=prefix)
    original = module.state_dict()
    assert set(back) == {prefix + k for k in original}
    for key, value in original.items():
        np.testing.assert_array_equal(back[prefix + key], value.numpy(), err_msg=key)
    # ... and a whole model's state dict with that prefix loads back (the format found by its keys).
    whole = {**back, "model.embed_tokens.weight": np.zeros((8, 4), np.float32)}
    again = port.load_state_dict(flax_module, whole, prefix=prefix)
    jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_from_torch_reads_transformers_5_rope_parameters():
    _, cfg = port.recognise(_module("llama", llama_config()))
    assert (cfg.num_heads, cfg.kv_heads(), cfg.resolved_head_dim(), cfg.d_in) == (4, 2, 8, 32)
    assert cfg.rope_theta == 500_000.0 and cfg.context_length == 512
    assert cfg.freq_config() == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_context_length": 64.0}


def test_from_torch_reads_transformers_4_rope_theta_and_rope_scaling():
    module = _module("llama", llama_config())
    v5 = port.from_torch(module)[0]
    old = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_theta", "rope_type")}
    module.config = types.SimpleNamespace(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        rope_theta=500_000.0, rope_scaling={"type": "llama3", **old}, attention_bias=False, model_type="llama",
    )
    assert port.from_torch(module)[0] == v5


def test_missing_and_contradicting_rope_settings_are_named():
    module = _module("llama", llama_config())
    module.config = types.SimpleNamespace(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(BadInputError, match="rope_theta, context_length missing"):
        port.from_torch(module)
    flax_module, _ = port.from_torch(module, rope_theta=1e4, context_length=64, rope_scaling={"rope_type": "default"})
    assert flax_module.rope_theta == 1e4 and flax_module.freq_config is None
    with pytest.raises(BadInputError, match="rope_theta=1.0 contradicts the module's config"):
        port.from_torch(_module("llama", llama_config()), rope_theta=1.0)
    with pytest.raises(BadInputError, match="config.json: rope_scaling: rope_type='yarn' is not supported"):
        hf.rope_settings({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "config.json")


def test_each_format_is_recognised_by_its_own_entry_only():
    for kind, make in (("llama", llama_config), ("qwen3", qwen3_config), ("gpt2", gpt2_config)):
        module = _module(kind, make())
        assert [v.name for v in registry.VARIANTS if v.recognises(module)] == [type(module).__name__]


def test_config_json_supplies_heads_and_rope():
    found = hf.attn_fields(llama_config().to_dict(), "config.json")
    assert found == dict(
        d_in=32, num_heads=4, num_kv_groups=2, head_dim=8, d_out=32, qkv_bias=False, rope_theta=500_000.0,
        rope_scaling=AttnConfig.encode_freq_config(
            {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 64}),
        context_length=512, dropout=0.0,
    )


# --- the CLI --------------------------------------------------------------------------------------


@pytest.fixture
def qwen3_files(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    config = qwen3_config()
    module = _module("qwen3", config)
    whole = {f"model.layers.0.self_attn.{k}": v.contiguous() for k, v in module.state_dict().items()}
    whole["model.norm.weight"] = torch.ones(24)
    save_file(whole, str(tmp_path / "f.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    monkeypatch.chdir(tmp_path)
    return tmp_path


BASE = ["--variant", "Qwen3Attention", "--weights", "f.safetensors", "--prefix", "model.layers.0.self_attn.",
        "--config", "config.json", "--backends", "torch,flax", "--tokens", "9", "--no-color"]


def test_cli_runs_a_layer_of_a_transformers_checkpoint(qwen3_files, capsys):
    assert cli.main(BASE + ["--json", "r.json"]) == 0, capsys.readouterr()
    report = json.loads((qwen3_files / "r.json").read_text())
    assert {r["variant"] for r in report["results"]} == {"Qwen3Attention"}
    assert report["configs"]["Qwen3Attention"]["num_kv_groups"] == 1
    assert report["configs"]["Qwen3Attention"]["head_dim"] == 10


def test_cli_finds_the_format_by_its_keys(qwen3_files, capsys):
    args = [a for a in BASE if a not in ("--variant", "Qwen3Attention")]
    assert cli.main(args + ["--json", "r.json"]) == 0, capsys.readouterr()
    report = json.loads((qwen3_files / "r.json").read_text())
    assert {r["variant"] for r in report["results"]} == {"Qwen3Attention"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-heads", "8"], "--num-heads 8 contradicts config.json, whose num_attention_heads gives num_heads=4"),
        (["--head-dim", "12"], "--head-dim 12 contradicts config.json"),
    ],
)
def test_cli_contradiction_is_exit_2_with_one_line(qwen3_files, capsys, extra, message):
    assert cli.main(BASE + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_gpt2_rows_that_see_no_key_give_the_zero_context():
    """Left padding: a query before the first real token gets c_proj's bias, as in Flax (not the mean of the values)."""
    from crosscheck.config import AttnConfig
    from crosscheck.variants import registry

    variant = registry.get("GPT2Attention")
    cfg = variant.resolve(AttnConfig(d_in=8, d_out=8, num_heads=2, context_length=16, qkv_bias=True))
    torch.manual_seed(0)
    module = variant.torch_module(cfg).eval()
    with torch.no_grad():
        module.c_proj.bias.uniform_(-1, 1)
        x = torch.randn(2, 6, 8)
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, :2] = False
        out = variant.torch_forward(module, x, cfg, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1, :2], module.c_proj.bias.expand(2, -1), rtol=0, atol=0)


@pytest.mark.parametrize("kind, make_config", [CASES[0], CASES[2], CASES[3]])
def test_gradients_equal_transformers(kind, make_config):
    """d(sum(out * cotangent)) / d(x, every weight) in Flax equals transformers' autograd: each within 4x
    transformers' own float32 error against the same gradient in float64 (jaxattn.tolerance.reference_bound)."""
    module = _module(kind, make_config())
    variant, cfg = port.recognise(module)
    flax_module, variables = port.from_torch(module)
    x = np.random.default_rng(3).normal(size=(2, 9, cfg.d_in)).astype(np.float32)
    cotangent = np.random.default_rng(4).normal(size=(2, 9, variant.output_dim(cfg))).astype(np.float32)
    x_t = torch.from_numpy(x).requires_grad_(True)
    (variant.torch_forward(module, x_t, cfg) * torch.from_numpy(cotangent)).sum().backward()
    with jax.default_matmul_precision("highest"):
        grads = jax.jit(jax.grad(lambda v, x: (flax_module.apply(v, x) * cotangent).sum(), argnums=(0, 1)))(
            variables, jnp.asarray(x)
        )
    exact_params, exact_x = layer_grads64(flax_module, variables["params"], x, cotangent)
    length = chain_length(flax_module, variables["params"], x) + x.shape[0] * x.shape[1]

    def check(got, torch32, exact, what):
        bound = reference_bound(torch32, exact, reduction_length=length)
        np.testing.assert_allclose(np.asarray(got), exact, atol=bound, rtol=0, err_msg=f"{what}: flax vs float64")

    check(grads[1], x_t.grad.numpy(), exact_x, "x")
    torch_grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    flax_grads = port.to_state_dict(flax_module, grads[0], variant=variant.name)
    exact = port.to_state_dict(flax_module, {"params": exact_params}, variant=variant.name)
    assert set(torch_grads) <= set(flax_grads)
    for key, g in torch_grads.items():
        check(flax_grads[key], g, np.asarray(exact[key], np.float64), key)
