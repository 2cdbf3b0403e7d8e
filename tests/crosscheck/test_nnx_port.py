"""NNX against torch: every variant's jaxattn.nnx module on ported weights, round trips, ``crosscheck --api``."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxattn.nnx as jn
from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.pipeline import placement
from crosscheck.porting import port
from crosscheck.variants import registry
from tests.bounds import check_layer
from tests.crosscheck.conftest import make_input, make_pair

#: Every format whose torch side this interpreter has (transformers' too when it is installed).
RUNNABLE = [v for v in registry.VARIANTS if not registry.missing_needs(v)]


def _cfg(variant, qkv_bias=True):
    """A config where every width differs (heads split, RoPE's even head dim), biases on where the format has them."""
    base = AttnConfig(d_in=6, d_out=8, context_length=9, num_heads=2, qkv_bias=qkv_bias, num_kv_groups=1, head_dim=4,
                      qk_norm=True, causal=True)
    if variant.splits_heads_of and "d_out" not in variant.fields:  # embed_dim / n_embd: d_in is split
        base = base.replace(d_in=8)
    return variant.resolve(base)


def _nnx_of(variant, cfg, variables):
    model = variant.flax_module(cfg, "nnx", rngs=nnx.Rngs(1))
    assert type(model).__module__ == "jaxattn.nnx" and type(model).__name__ == variant.flax_class_name
    return jn.load_params(model, variables["params"])


@pytest.mark.parametrize("variant", RUNNABLE, ids=lambda v: v.name)
def test_nnx_matches_torch_and_round_trips_the_state_dict_exactly(variant):
    cfg = _cfg(variant)
    torch_module, linen, variables = make_pair(variant, cfg, seed=7)
    model = _nnx_of(variant, cfg, variables)
    x = make_input(variant, cfg, batch=2, tokens=7, seed=7)
    with torch.no_grad():
        want = variant.torch_forward(torch_module, torch.from_numpy(x), cfg).numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
    assert got.shape == want.shape
    check_layer(linen, variables["params"], x, got, want, f"{variant.name}: nnx vs torch")  # the derived bound
    # back to torch, from the module and from its nnx.State: the exact tensors, keys and dtypes
    original = {k: t.numpy() for k, t in torch_module.state_dict().items()}
    for back in (port.to_state_dict(model, variant=variant),
                 port.to_state_dict(model, nnx.state(model, nnx.Param), variant=variant)):
        assert back.keys() == original.keys()
        for key, value in original.items():
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


@pytest.mark.parametrize("variant", [v for v in RUNNABLE if v.in_default_run or v.name == "GroupedQueryAttention"],
                         ids=lambda v: v.name)
def test_from_torch_api_nnx_loads_the_weights_into_an_nnx_module(variant):
    cfg = _cfg(variant, qkv_bias=False)
    torch_module, _, _ = make_pair(variant, cfg, seed=3)
    options = {"rope_theta": cfg.rope_theta, "context_length": cfg.context_length} if variant.options else {}
    model = port.from_torch(torch_module, api="nnx", **options)
    assert isinstance(model, nnx.Module) and type(model).__name__ == variant.flax_class_name
    sd = port.to_state_dict(model, return_tensors="pt")
    torch_module.load_state_dict(sd, strict=True)  # exactly torch's keys and shapes
    for key, value in torch_module.state_dict().items():
        assert torch.equal(sd[key], value), key
    x = make_input(variant, cfg, batch=1, tokens=5, seed=3)
    _, seen = port.recognise(torch_module, **options)  # nn.MultiheadAttention: not causal unless told
    with torch.no_grad():
        want = variant.torch_forward(torch_module, torch.from_numpy(x), seen).numpy()
    # Jitted: one program, not one per operation (slow to compile on a GPU).
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
    check_layer(model, jn.params_of(model), x, got, want, f"{variant.name}: from_torch nnx vs torch")


def test_a_wrong_weight_makes_nnx_disagree_with_torch():
    variant = registry.get("MultiHeadAttention")
    cfg = _cfg(variant)
    torch_module, _, variables = make_pair(variant, cfg, seed=1)
    kernel = variables["params"]["W_key"]["kernel"]  # (d_in, d_out)
    variables["params"]["W_key"]["kernel"] = np.asarray(kernel)[[1, 0, 2, 3, 4, 5]]  # two input rows swapped
    model = _nnx_of(variant, cfg, variables)
    x = make_input(variant, cfg, batch=1, tokens=6, seed=1)
    with torch.no_grad():
        want = variant.torch_forward(torch_module, torch.from_numpy(x), cfg).numpy()
    assert np.abs(np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))) - want).max() > 1e-3


def test_bad_api_and_a_linen_module_without_variables_are_refused():
    torch_module, linen, _ = make_pair(registry.get("SelfAttentionV2"), _cfg(registry.get("SelfAttentionV2")))
    with pytest.raises(BadInputError, match=r"api must be one of linen, nnx; got 'haiku'"):
        port.from_torch(torch_module, api="haiku")
    with pytest.raises(BadInputError, match=r"needs its variables"):
        port.to_state_dict(linen)


def test_cli_api_both_runs_an_nnx_row_per_variant(tmp_path, capsys, monkeypatch):
    from crosscheck.cli import main

    monkeypatch.setenv("NO_COLOR", "1")
    out_json = tmp_path / "r.json"
    code = main(["--api", "both", "--backends", "torch,flax", "--variant", "MultiHeadAttention",
                 "--variant", "SelfAttentionV1", "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"flax-nnx ({placement.jax_device()})" in out  # "cpu", or "gpu: <device>" where JAX runs on a GPU
    rows = {(r["variant"], r["backend"]): r for r in json.loads(out_json.read_text())["results"]}
    for name in ("MultiHeadAttention", "SelfAttentionV1"):
        nnx_row, linen_row = rows[(name, "flax-nnx")], rows[(name, "flax")]
        assert nnx_row["passed"]  # crosscheck's verdict: its POLICY row (crosscheck/pipeline/compare.py)
        assert nnx_row["max_abs_err"] == linen_row["max_abs_err"]  # bit for bit: the same error
        assert nnx_row["precision"] == "highest"


def test_cli_api_nnx_with_decode_exits_2_with_one_line(capsys, monkeypatch):
    from crosscheck.cli import main

    monkeypatch.setenv("NO_COLOR", "1")
    code = main(["--api", "nnx", "--decode", "2", "--backends", "torch,flax"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--api nnx: the NNX modules run in the forward check; --decode" in lines[0], err
