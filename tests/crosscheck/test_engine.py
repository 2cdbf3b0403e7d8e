"""The engine in-process: configs, weights, inputs, the backends and a real injected mismatch."""

import jax
import numpy as np
import pytest
import torch

from crosscheck.errors import BadInputError, MismatchError, PortError
from crosscheck.pipeline import compare, engine
from crosscheck.pipeline import inputs as inp
from crosscheck.porting import port
from crosscheck.porting.bundle import read_outputs, write_outputs
from crosscheck.references import torch_ref
from crosscheck.seed import CONTEXT_VECS
from crosscheck.variants import registry


@pytest.fixture(scope="module")
def default_report():
    return engine.run(backends=("torch", "flax"))


def test_default_run_every_variant_passes(default_report):
    rows = {(r.variant, r.backend): r for r in default_report.results}
    assert set(rows) == {(v.name, b) for v in registry.default_run() for b in ("torch", "flax")}
    assert default_report.passed and default_report.failing_variants == []
    for r in default_report.results:
        # crosscheck's verdict, from its POLICY row (crosscheck/pipeline/compare.py) for the backend in float32
        assert r.passed and r.thresholds == compare.policy_for(r.backend, "float32").to_dict() and r.ulp is not None
        # torch on the CPU; Flax where JAX runs ("gpu" on a GPU machine)
        assert r.runtime == ("cpu" if r.backend == "torch" else jax.default_backend()) and r.dtype == "float32"
    # The book's shapes: unbatched for v1/v2/simplified, a batch of one for the rest.
    assert rows[("SelfAttentionV1", "flax")].shape == [6, 2]
    assert rows[("MultiHeadAttentionWrapper", "flax")].shape == [1, 6, 4]
    assert rows[("TorchMultiheadAttention", "flax")].shape == [1, 6, 3]
    cfg = default_report.configs["TorchMultiheadAttention"]
    assert (cfg["d_out"], cfg["num_heads"], cfg["context_length"]) == (3, 1, 6)


def test_seed_sentence_matches_the_book():
    (case,), _, _ = engine.build_cases(["SimplifiedSelfAttention"])
    out32, _ = engine.torch_outputs(case)
    np.testing.assert_allclose(out32, CONTEXT_VECS, atol=6e-5)
    np.testing.assert_allclose(engine.flax_output(case), CONTEXT_VECS, atol=6e-5)


def test_default_weights_are_the_books_seeded_modules():
    (case,), _, _ = engine.build_cases(["MultiHeadAttention"])
    torch.manual_seed(123)
    book = torch_ref.MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)
    for key, value in book.state_dict().items():
        np.testing.assert_array_equal(case.state_dict[key], value.numpy())


def test_wrong_flax_weight_is_a_real_mismatch(monkeypatch):
    """Flax gets one weight off by 0.05 (torch keeps the right one): the verdict must catch it."""
    real = port.port_variables

    def tampered(variant, cfg, state_dict, dtype=None):
        variables = real(variant, cfg, state_dict, dtype)
        if variant.name == "MultiHeadAttention":
            kernel = variables["params"]["W_query"]["kernel"].copy()
            kernel[0, 0] += 0.05
            variables["params"]["W_query"]["kernel"] = kernel
        return variables

    monkeypatch.setattr(engine.port, "port_variables", tampered)
    report = engine.run(["MultiHeadAttention", "SelfAttentionV1"], backends=("flax",))
    assert not report.passed
    assert report.failing_variants == ["MultiHeadAttention"]  # V1 is untouched and still passes
    bad = next(r for r in report.results if r.variant == "MultiHeadAttention")
    assert bad.max_abs_err > 1e-4
    assert any("max abs err" in f and "> 1e-05" in f and "(1, 6, 2)" in f for f in bad.failures)
    with pytest.raises(MismatchError, match=r"mismatch in MultiHeadAttention:\n  MultiHeadAttention / flax: max abs err"):
        report.raise_for_mismatch()


def test_bfloat16_flax_really_computes_in_bfloat16():
    report = engine.run(["CausalAttention"], backends=("flax",), dtype="bfloat16")
    (r,) = report.results
    assert r.passed and r.dtype == "bfloat16" and r.ulp is None
    assert r.max_abs_err > 1e-4  # a float32 computation would be ~1e-7 away
    assert r.thresholds["max_abs"] == 4e-2


def test_ttnn_host_runtime():
    report = engine.run(["SelfAttentionV2", "MultiHeadAttentionCombinedQKV"], backends=("ttnn",), ttnn_runtime="host")
    assert report.passed
    assert report.ttnn_runtime["name"] == "host"
    assert "not a Tenstorrent device" in report.ttnn_runtime["description"]
    assert all(r.runtime == "host" and r.ulp is None and r.pcc >= 0.999 for r in report.results)


# --- config resolution --------------------------------------------------------------------


MHA = registry.get("MultiHeadAttention")


def test_flags_that_contradict_the_weights_name_both_values():
    with pytest.raises(BadInputError, match=r"--d-out 6 contradicts the weights, whose shapes give d_out=4"):
        engine.resolve_config(MHA, {"d_out": 6}, {"d_out": 4, "d_in": 3}, tokens=6, d_in=3)
    with pytest.raises(BadInputError, match=r"input's last dimension is 5 but the weights take d_in=3"):
        engine.resolve_config(MHA, {}, {"d_in": 3}, tokens=6, d_in=5)


def test_context_length_defaults_to_tokens_and_bounds_them():
    assert engine.resolve_config(MHA, {}, {}, tokens=9, d_in=3).context_length == 9
    with pytest.raises(BadInputError, match=r"tokens=9, beyond context_length=6 \(the weights' mask buffer\)"):
        engine.resolve_config(MHA, {}, {"context_length": 6}, tokens=9, d_in=3)
    with pytest.raises(BadInputError, match=r"d_out=2 must be divisible by num_heads=3"):
        engine.resolve_config(MHA, {"num_heads": 3}, {}, tokens=6, d_in=3)


def test_weights_pick_their_variants():
    v2 = torch_ref.SelfAttentionV2(3, 4).state_dict()
    # The v2 keys are also CausalAttention's (its mask buffer is optional).
    assert [v.name for v in engine.match_variants(v2, registry.VARIANTS)] == ["SelfAttentionV2", "CausalAttention"]
    wrapper = torch_ref.MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=3).state_dict()
    assert [v.name for v in engine.match_variants(wrapper, registry.VARIANTS)] == ["MultiHeadAttentionWrapper"]
    with pytest.raises(PortError, match=r"unexpected key 'bogus.weight' \(shape \(2, 2\)\)"):
        engine.match_variants({**v2, "bogus.weight": np.zeros((2, 2))}, [registry.get("SelfAttentionV2")])


def test_weights_in_memory_with_inferred_config():
    torch.manual_seed(5)
    module = torch_ref.MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=3, qkv_bias=True)
    report = engine.run(weights=module.state_dict(), backends=("torch", "flax"))
    assert report.passed
    assert list(report.configs) == ["MultiHeadAttentionWrapper"]
    cfg = report.configs["MultiHeadAttentionWrapper"]
    assert (cfg["num_heads"], cfg["qkv_bias"], cfg["context_length"]) == (3, True, 6)
    assert report.results[0].shape == [1, 6, 6]


# --- inputs -----------------------------------------------------------------------------------


def test_for_variant_gives_the_books_forms():
    x = np.zeros((6, 3), np.float32)
    assert inp.for_variant(registry.get("SelfAttentionV1"), x).shape == (6, 3)
    assert inp.for_variant(MHA, x).shape == (1, 6, 3)
    assert inp.for_variant(registry.get("SelfAttentionV1"), x[None]).shape == (6, 3)
    assert inp.for_variant(registry.get("SelfAttentionV1"), np.zeros((2, 6, 3))).shape == (2, 6, 3)


def test_random_inputs_are_seeded_and_shaped():
    a = inp.resolve_inputs(inp.RandomInputs(batch=2, tokens=5, seed=7), d_in_hint=4).array
    b = inp.resolve_inputs(inp.RandomInputs(batch=2, tokens=5, seed=7, d_in=4)).array
    assert a.shape == (2, 5, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert 0.0 <= a.min() and a.max() < 1.0


@pytest.mark.parametrize(
    "array, message",
    [
        (np.arange(6).reshape(2, 3), "dtype int64 is not a floating dtype"),
        (np.zeros((1, 1, 2, 3), np.float32), r"got \(1, 1, 2, 3\)"),
        (np.array([[np.nan, 1.0, 2.0]], np.float32), "NaN or infinite"),
        (np.zeros((0, 3), np.float32), "empty input"),
    ],
)
def test_bad_input_arrays(array, message):
    with pytest.raises(BadInputError, match=message):
        inp.validate_array(array, "input")


def test_input_files(tmp_path):
    x = np.random.default_rng(1).random((2, 4, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    torch.save({"inputs": torch.from_numpy(x)}, tmp_path / "x.pt")
    from safetensors.numpy import save_file

    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    for name in ("x.npy", "x.pt", "x.safetensors"):
        np.testing.assert_array_equal(inp.load_input(tmp_path / name), x)
    save_file({"a": x, "b": x}, str(tmp_path / "two.safetensors"))
    with pytest.raises(BadInputError, match="holds 2 tensors"):
        inp.load_input(tmp_path / "two.safetensors")
    (tmp_path / "x.csv").write_text("1,2,3")
    with pytest.raises(BadInputError, match="unsupported input format .csv"):
        inp.load_input(tmp_path / "x.csv")


# --- bundles ----------------------------------------------------------------------------------


def test_compare_outputs_catches_a_tampered_file(tmp_path):
    from crosscheck.tt.worker import run_bundle

    bundle, out = tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    engine.export_bundle(bundle, ["CausalAttention", "SelfAttentionV1"])
    run_bundle(bundle, out, backend="ttnn", runtime="host")
    assert engine.compare_outputs(bundle, [out]).passed
    outputs, meta = read_outputs(out)
    outputs["SelfAttentionV1"] = outputs["SelfAttentionV1"] * np.float32(1.2)  # correlates, but 20% off
    write_outputs(tmp_path / "t.safetensors", outputs, meta)
    report = engine.compare_outputs(bundle, [tmp_path / "t.safetensors"])
    assert report.failing_variants == ["SelfAttentionV1"]
    (bad,) = [r for r in report.results if not r.passed]
    assert bad.pcc > 0.999 and any("max abs err" in f for f in bad.failures)  # PCC alone is blind to scale


# --- a chosen attention core ---------------------------------------------------------------------

TAKERS = [v.name for v in registry.takes_attention_impl()]


def test_the_chosen_core_is_the_one_the_flax_module_runs():
    from crosscheck.config import AttnConfig
    from crosscheck.pipeline import flax_runner

    for name in TAKERS:
        v = registry.get(name)
        assert flax_runner.flax_module(v, v.resolve(AttnConfig(num_heads=1)), attention_impl="xla").attention_impl == "xla"
        assert flax_runner.flax_module(v, v.resolve(AttnConfig(num_heads=1))).attention_impl == "auto"


def test_default_core_is_recorded_as_auto(default_report):
    assert default_report.attention_impl == "auto"
    assert {r.variant for r in default_report.results if r.attention_impl == "auto"} == {
        v.name for v in registry.default_run() if v.takes_attention_impl
    }


def test_unknown_attention_impl_lists_the_known_ones():
    with pytest.raises(BadInputError, match=r"unknown attention impl 'flash9'; known: auto, naive, blockwise, xla"):
        engine.run(["CausalAttention"], backends=("torch", "flax"), attention_impl="flash9")


def test_attention_impl_for_a_named_variant_without_one_is_refused():
    with pytest.raises(BadInputError, match="SelfAttentionV2 takes no --attention-impl"):
        engine.run(["CausalAttention", "SelfAttentionV2"], backends=("torch", "flax"), attention_impl="naive")


def test_bundle_carries_the_attention_impl_to_the_flax_worker(tmp_path):
    from crosscheck.tt.worker import run_bundle

    bundle, out = tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    engine.export_bundle(bundle, ["MultiHeadAttention"], attention_impl="blockwise")
    meta = run_bundle(bundle, out, backend="flax")
    assert meta["attention_impl"] == "blockwise"
    report = engine.compare_outputs(bundle, [out])
    assert report.passed and report.attention_impl == "blockwise"
    assert [r.attention_impl for r in report.results] == ["blockwise"]
