"""Bundle and outputs files: exact round trips, and clear errors for files that are not ours."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.porting import bundle as bd
from crosscheck.seed import INPUTS


def _cases():
    rng = np.random.default_rng(0)
    cfg = AttnConfig(d_in=3, d_out=4, context_length=6, num_heads=2, qkv_bias=True, dropout=0.0)
    mha = {
        "W_query.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "W_query.bias": rng.standard_normal(4).astype(np.float32),
        "out_proj.weight": rng.standard_normal((4, 4)).astype(np.float32),
        "mask": np.triu(np.ones((6, 6), np.float32), 1),
    }
    return [
        bd.BundleCase("SimplifiedSelfAttention", AttnConfig(), {}, INPUTS),
        bd.BundleCase("MultiHeadAttention", cfg, mha, rng.standard_normal((2, 6, 3)).astype(np.float32)),
    ]


def test_bundle_round_trip_is_exact(tmp_path):
    path = tmp_path / "b.safetensors"
    cases = _cases()
    bd.write_bundle(path, cases, meta={"created_by": "test"})
    back = bd.read_bundle(path)
    assert [c.variant for c in back] == ["SimplifiedSelfAttention", "MultiHeadAttention"]
    for want, got in zip(cases, back, strict=True):
        assert got.config == want.config
        assert sorted(got.state_dict) == sorted(want.state_dict)
        for key, value in want.state_dict.items():
            assert got.state_dict[key].dtype == value.dtype
            np.testing.assert_array_equal(got.state_dict[key], value)
        assert got.inputs.shape == want.inputs.shape
        np.testing.assert_array_equal(got.inputs, want.inputs)
    assert bd.read_bundle_meta(path) == {"created_by": "test"}


def test_bundle_keys_follow_the_documented_layout(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "b.safetensors"
    bd.write_bundle(path, _cases())
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()["crosscheck"])
    assert "MultiHeadAttention/weights/W_query.weight" in keys
    assert "MultiHeadAttention/inputs" in keys and "SimplifiedSelfAttention/inputs" in keys
    assert header["format"] == "crosscheck-bundle" and header["version"] == bd.FORMAT_VERSION
    assert header["cases"][1]["config"]["d_out"] == 4


def test_outputs_round_trip(tmp_path):
    path = tmp_path / "o.safetensors"
    out = {"CausalAttention": np.arange(12, dtype=np.float32).reshape(1, 6, 2)}
    meta = {"backend": "ttnn", "runtime": "host", "runtime_description": "numpy model", "versions": {"ttnn": "0.81.1"}}
    bd.write_outputs(path, out, meta)
    got, got_meta = bd.read_outputs(path)
    np.testing.assert_array_equal(got["CausalAttention"], out["CausalAttention"])
    assert got_meta == meta


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(BadInputError, match="bundle not found: .*nope.safetensors"):
        bd.read_bundle(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_bundle_is_rejected(tmp_path, cut):
    path = tmp_path / "b.safetensors"
    bd.write_bundle(path, _cases())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(BadInputError, match="cannot read bundle .*not a safetensors file"):
        bd.read_bundle(path)


def test_garbage_file_is_rejected(tmp_path):
    path = tmp_path / "b.safetensors"
    path.write_bytes(b"\x00" * 7 + b"not a bundle at all")
    with pytest.raises(BadInputError, match="not a safetensors file"):
        bd.read_bundle(path)


def test_foreign_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"W_query.weight": np.zeros((2, 3), np.float32)}, str(path))
    with pytest.raises(BadInputError, match="not a crosscheck bundle"):
        bd.read_bundle(path)


def test_outputs_file_is_not_a_bundle(tmp_path):
    path = tmp_path / "o.safetensors"
    bd.write_outputs(path, {"SelfAttentionV1": np.zeros((6, 2), np.float32)}, {"backend": "flax"})
    with pytest.raises(BadInputError, match="format is 'crosscheck-outputs', expected 'crosscheck-bundle'"):
        bd.read_bundle(path)
    bd.write_bundle(path, _cases())
    with pytest.raises(BadInputError, match="format is 'crosscheck-bundle', expected 'crosscheck-outputs'"):
        bd.read_outputs(path)


def _rewrite_header(path, mutate):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["crosscheck"])
    mutate(header, tensors)
    save_file(tensors, str(path), metadata={"crosscheck": json.dumps(header)})


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h, t: h.update(version=99), "version 99 is not supported"),
        (lambda h, t: h.update(cases=[]), "bundle has no cases"),
        (lambda h, t: h["cases"][1]["config"].update(heads=2), r"unknown config fields \['heads'\]"),
        (lambda h, t: h["cases"][1]["config"].update(d_in="3"), "config field 'd_in' must be int, found '3'"),
        (lambda h, t: t.pop("MultiHeadAttention/inputs"), "has no tensor 'MultiHeadAttention/inputs'"),
        (lambda h, t: t.update({"Other/inputs": np.zeros((6, 3), np.float32)}), r"belong to no case: \['Other/inputs'\]"),
        (
            lambda h, t: t.update({"MultiHeadAttention/inputs": np.zeros(3, np.float32)}),
            r"must be \(tokens, d_in\) or \(batch, tokens, d_in\), found shape \(3,\)",
        ),
    ],
)
def test_bad_bundle_contents_are_named(tmp_path, mutate, message):
    path = tmp_path / "b.safetensors"
    bd.write_bundle(path, _cases())
    _rewrite_header(path, mutate)
    with pytest.raises(BadInputError, match=message):
        bd.read_bundle(path)


def test_invalid_json_metadata(tmp_path):
    path = tmp_path / "b.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(path), metadata={"crosscheck": "{not json"})
    with pytest.raises(BadInputError, match="metadata is not valid JSON"):
        bd.read_bundle(path)


def test_write_rejects_duplicate_and_empty(tmp_path):
    case = _cases()[0]
    with pytest.raises(BadInputError, match="appears twice"):
        bd.write_bundle(tmp_path / "b.safetensors", [case, case])
    with pytest.raises(BadInputError, match="at least one case"):
        bd.write_bundle(tmp_path / "b.safetensors", [])
    with pytest.raises(BadInputError, match="directory .* does not exist"):
        bd.write_bundle(tmp_path / "no" / "b.safetensors", [case])


def test_bundle_module_imports_neither_torch_nor_jax():
    import subprocess
    import sys

    code = (
        "import sys, crosscheck.porting.bundle, crosscheck.tt.worker; "
        "bad = [m for m in ('torch', 'jax', 'flax') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
