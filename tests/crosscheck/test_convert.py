"""``crosscheck convert``: torch -> Flax file -> torch exactly for every variant, in both formats; refusals."""

import json
import os

import numpy as np
import pytest
import torch

from crosscheck.cli import main
from crosscheck.config import AttnConfig
from crosscheck.errors import MismatchError
from crosscheck.pipeline import flax_runner
from crosscheck.porting import convert
from crosscheck.variants import registry
from tests.crosscheck.conftest import make_pair

#: Every format with parameters whose torch side this interpreter has.
CONVERTIBLE = [
    v for v in registry.VARIANTS
    if not registry.missing_needs(v) and v.portmap(v.resolve(AttnConfig(**dict(v.defaults)))).entries
]


def _cfg(variant):
    base = AttnConfig(d_in=6, d_out=8, context_length=9, num_heads=2, qkv_bias=True, num_kv_groups=1, head_dim=4,
                      qk_norm=True, causal=True, rope_theta=500_000.0)
    if variant.splits_heads_of and "d_out" not in variant.fields:
        base = base.replace(d_in=8)
    return variant.resolve(base)


def _flags(variant, cfg) -> dict:
    """What the state dict cannot carry, as ``crosscheck --weights`` takes it."""
    known = dict(num_heads=cfg.num_heads, num_kv_groups=cfg.num_kv_groups, head_dim=cfg.head_dim,
                 rope_theta=cfg.rope_theta, context_length=cfg.context_length, causal=cfg.causal)
    return {k: v for k, v in known.items() if k in variant.fields}


def _torch_file(tmp_path, variant, cfg, name="in.pt"):
    torch_module, _, _ = make_pair(variant, cfg, seed=11)
    path = tmp_path / name
    torch.save(torch_module.state_dict(), path)
    return path, {k: t.numpy() for k, t in torch_module.state_dict().items()}


def _load(path):
    if str(path).endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    return {k: t.numpy() for k, t in torch.load(path, weights_only=True).items()}


@pytest.mark.parametrize("variant", CONVERTIBLE, ids=lambda v: v.name)
def test_every_variant_round_trips_torch_flax_torch_exactly_in_both_formats(variant, tmp_path):
    cfg = _cfg(variant)
    src, original = _torch_file(tmp_path, variant, cfg)
    for flax_suffix, back_suffix, check in ((".safetensors", ".pt", True), (".msgpack", ".safetensors", False)):
        flax_file, back = tmp_path / f"p{flax_suffix}", tmp_path / f"back{back_suffix}"
        done = convert.convert(src, flax_file, variant=variant.name, overrides=_flags(variant, cfg), check=check)
        assert done.direction == "torch->flax" and done.variant == variant.name
        assert (done.max_abs_err is not None) == check and (not check or done.max_abs_err <= done.bound)
        again = convert.convert(flax_file, back, check=check)
        assert again.direction == "flax->torch" and again.variant == variant.name
        got = _load(back)
        assert got.keys() == original.keys(), (sorted(got), sorted(original))
        for key, value in original.items():
            assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_flax_files_hold_flat_params_paths_and_the_metadata(tmp_path):
    variant = registry.get("MultiHeadAttention")
    cfg = _cfg(variant)
    src, original = _torch_file(tmp_path, variant, cfg)
    convert.convert(src, tmp_path / "p.safetensors", check=False)
    from safetensors import safe_open

    with safe_open(tmp_path / "p.safetensors", framework="numpy") as f:
        meta, keys = f.metadata(), set(f.keys())
        np.testing.assert_array_equal(f.get_tensor("params/W_query/kernel"), original["W_query.weight"].T)
    assert "params/out_proj/bias" in keys and len(keys) == 8
    assert meta["format"] == "flax" and meta["crosscheck_variant"] == "MultiHeadAttention"
    assert json.loads(meta["crosscheck_config"])["num_heads"] == 2 and meta["torch_buffers"] == "mask"
    from flax.serialization import msgpack_restore

    convert.convert(src, tmp_path / "p.msgpack", check=False)
    tree = msgpack_restore((tmp_path / "p.msgpack").read_bytes())
    assert tree["metadata"]["crosscheck_variant"] == "MultiHeadAttention"
    np.testing.assert_array_equal(tree["params"]["W_key"]["kernel"], original["W_key.weight"].T)


def test_a_layer_of_a_whole_model_with_prefix(tmp_path):
    variant = registry.get("MultiHeadAttention")
    cfg = _cfg(variant)
    torch_module, _, _ = make_pair(variant, cfg, seed=2)
    model = {f"trf_blocks.1.att.{k}": t for k, t in torch_module.state_dict().items()}
    model["tok_emb.weight"] = torch.ones(10, 6)
    torch.save(model, tmp_path / "model.pth")
    convert.convert(tmp_path / "model.pth", tmp_path / "att.msgpack", prefix="trf_blocks.1.att.")
    convert.convert(tmp_path / "att.msgpack", tmp_path / "att.pt")
    back = _load(tmp_path / "att.pt")
    assert back.keys() == torch_module.state_dict().keys()
    assert all(np.array_equal(back[k], t.numpy()) for k, t in torch_module.state_dict().items())


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    variant = registry.get("CausalAttention")
    src, _ = _torch_file(tmp_path, variant, _cfg(variant))
    real = flax_runner.run_flax
    monkeypatch.setattr(flax_runner, "run_flax", lambda *a, **k: real(*a, **k) + 1e-3)  # a port gone wrong
    with pytest.raises(MismatchError, match=r"disagree.*nothing written"):
        convert.convert(src, tmp_path / "p.msgpack")
    assert os.listdir(tmp_path) == ["in.pt"]
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["convert", str(src), str(tmp_path / "p.msgpack")]) == 1
    assert os.listdir(tmp_path) == ["in.pt"]


def test_cli_converts_refuses_to_overwrite_and_forces(tmp_path, capsys):
    variant = registry.get("SelfAttentionV2")
    src, _ = _torch_file(tmp_path, variant, _cfg(variant))
    out = tmp_path / "p.safetensors"
    assert main(["convert", str(src), str(out), "--variant", "SelfAttentionV2"]) == 0
    assert "torch->flax SelfAttentionV2, 6 tensors" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["convert", str(src), str(out), "--variant", "SelfAttentionV2"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["convert", str(src), str(out), "--variant", "SelfAttentionV2", "--force", "--no-check"]) == 0
    assert "not checked (--no-check)" in capsys.readouterr().out


BAD = {
    "ambiguous": (["{pt}", "{d}/o.msgpack"], "fits several variants (SelfAttentionV2, CausalAttention); choose one with --variant"),
    "out suffix": (["{pt}", "{d}/o.npy", "--variant", "SelfAttentionV2"], "converts to Flax .safetensors or .msgpack"),
    "back suffix": (["{flax}", "{d}/o.msgpack"], "a Flax file converts to a torch .pt, .pth or .safetensors"),
    "in is out": (["{pt}", "{pt}"], "is also the IN file"),
    "missing in": (["{d}/nope.pt", "{d}/o.msgpack"], "IN file not found"),
    "not a state dict": (["{d}/junk.pt", "{d}/o.msgpack"], "cannot load"),
    "no params": (["{pt}", "{d}/o.msgpack", "--variant", "SimplifiedSelfAttention"], "has no parameters to load"),
    "wrong variant": (["{pt}", "{d}/o.msgpack", "--variant", "MultiHeadAttention"], "MultiHeadAttention: state dict does not fit"),
    "flags on a flax file": (["{flax}", "{d}/o.pt", "--num-heads", "3"], "--num-heads 3 contradicts"),
    "foreign msgpack": (["{d}/foreign.msgpack", "{d}/o.pt"], "not a Flax parameter file written by crosscheck convert"),
    "two variants": (["{pt}", "{d}/o.msgpack", "--variant", "A", "--variant", "B"], "--variant given 2 times"),
}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    variant = registry.get("SelfAttentionV2")
    torch_module, _, _ = make_pair(variant, _cfg(variant), seed=0)
    torch.save(torch_module.state_dict(), d / "v2.pt")
    (d / "junk.pt").write_text("not a pickle")
    from flax.serialization import msgpack_serialize

    (d / "foreign.msgpack").write_bytes(msgpack_serialize({"params": {"w": np.ones(2, np.float32)}}))
    convert.convert(d / "v2.pt", d / "v2.msgpack", variant="SelfAttentionV2", check=False)
    return d


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, bad_dir, capsys):
    args, message = BAD[case]
    before = sorted(os.listdir(bad_dir))
    argv = [a.format(d=bad_dir, pt=bad_dir / "v2.pt", flax=bad_dir / "v2.msgpack") for a in args]
    code = main(["convert", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crosscheck: error: ") and message in lines[0], err
    assert sorted(os.listdir(bad_dir)) == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("flax_suffix,back_suffix", [(".safetensors", ".safetensors"), (".msgpack", ".pt")])
def test_16_and_64_bit_weights_round_trip_exactly_through_both_formats(tmp_path, dtype, flax_suffix, back_suffix):
    variant = registry.get("SelfAttentionV2")
    torch_module, _, _ = make_pair(variant, _cfg(variant), seed=4)
    sd = {k: t.to(dtype) for k, t in torch_module.state_dict().items()}
    torch.save(sd, tmp_path / "w.pt")
    convert.convert(tmp_path / "w.pt", tmp_path / f"p{flax_suffix}", variant="SelfAttentionV2")
    convert.convert(tmp_path / f"p{flax_suffix}", tmp_path / f"back{back_suffix}")
    if back_suffix == ".pt":
        back = torch.load(tmp_path / "back.pt", weights_only=True)
    else:
        from safetensors.torch import load_file

        back = load_file(tmp_path / "back.safetensors")
    assert back.keys() == sd.keys()
    assert all(back[k].dtype == dtype and torch.equal(back[k], t) for k, t in sd.items())
