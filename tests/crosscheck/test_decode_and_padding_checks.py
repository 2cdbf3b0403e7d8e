"""``crosscheck --decode`` and ``--padding`` through the engine, the CLI and ``bench --decode``."""

import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the references are torch modules")

from crosscheck.benchmarks import bench  # noqa: E402
from crosscheck.checks import padding_check
from crosscheck.errors import BadInputError  # noqa: E402
from crosscheck.pipeline import engine, flax_runner
from crosscheck.pipeline.inputs import RandomInputs  # noqa: E402
from crosscheck.references import torch_ref
from crosscheck.variants import registry
from tests.bounds import torch_layer_bound  # noqa: E402

from .cli_in_process import main_in_process  # noqa: E402

SMALL = dict(inputs=RandomInputs(batch=2, tokens=10, d_in=4, seed=1), d_out=4, num_heads=2)
DECODERS = [v.name for v in registry.decoding() if v.in_default_run]


@pytest.fixture(scope="module")
def decode_report():
    return engine.run(decode=3, backends=("torch", "flax", "ttnn"), ttnn_runtime="host", **SMALL)


def test_decode_compares_every_step_in_every_backend(decode_report):
    report = decode_report
    assert report.passed, report.failing_variants
    assert [r.variant for r in report.results][::5] == DECODERS  # only the variants with a KV cache
    rows = {(r.variant, r.backend, r.reference): r for r in report.results}
    for name in DECODERS:
        for backend, reference in [("torch", "torch full forward"), ("flax", "torch decode"),
                                   ("flax", "flax full forward"), ("ttnn", "torch decode"), ("ttnn", "ttnn full forward")]:
            r = rows[(name, backend, reference)]
            assert r.shape[:2] == [2, 10] and r.detail["prompt_len"] == 3 and r.detail["steps"] == 7
            assert 0 <= r.detail["worst_token"] < 10
        assert rows[(name, "flax", "torch decode")].passed  # crosscheck's verdict: its POLICY row
    assert report.mode["check"] == "decode" and report.mode["tokens"] == 10
    assert report.mode["flax_compilations"] == {name: 2 for name in DECODERS}  # the prompt and the step
    assert report.to_dict()["mode"]["prompt_len"] == 3


def test_a_wrong_decode_step_fails_and_names_its_token(monkeypatch):
    real = flax_runner.run_flax_decode

    def off_by_a_bit_at_token_6(*args, **kwargs):
        out, compilations = real(*args, **kwargs)
        out = out.copy()
        out[:, 6] += 1e-3
        return out, compilations

    monkeypatch.setattr(flax_runner, "run_flax_decode", off_by_a_bit_at_token_6)
    report = engine.run(["MultiHeadAttention"], decode=2, backends=("torch", "flax"), **SMALL)
    failed = [r for r in report.results if not r.passed]
    assert {r.reference for r in failed} == {"torch decode", "flax full forward"}
    assert all(r.detail["worst_token"] == 6 for r in failed)


def test_padding_equals_the_sequences_alone_in_every_backend():
    report = engine.run(padding="left", pad_lengths=[0, 3, 9], backends=("torch", "flax", "ttnn"),
                        ttnn_runtime="host", **SMALL)
    assert report.passed, report.failing_variants
    assert len(report.results) == 3 * len(registry.default_run())
    # real tokens: 10 + 7 + 1, row i from input row i % 2
    assert {tuple(r.shape[:1]) for r in report.results} == {(18,)}
    assert report.mode == {"check": "padding", "side": "left", "pad_lengths": [0, 3, 9]}


def test_a_leaking_padding_mask_fails(monkeypatch):
    """Left padding: causal queries after the pads see them unless the mask hides them."""
    real = flax_runner.run_flax

    def ignore_the_mask(*args, attention_mask=None, **kwargs):
        return real(*args, **kwargs)

    monkeypatch.setattr(flax_runner, "run_flax", ignore_the_mask)
    report = engine.run(["MultiHeadAttention", "SelfAttentionV2"], padding="left", pad_lengths=[2, 0],
                        backends=("torch", "flax"), **SMALL)
    assert [(r.variant, r.backend) for r in report.results if not r.passed] == [
        ("MultiHeadAttention", "flax"), ("SelfAttentionV2", "flax")
    ]


def test_pad_case_layout_by_hand():
    case = engine.build_cases(["SelfAttentionV1"], inputs=np.arange(12, dtype=np.float32).reshape(1, 4, 3))[0][0]
    padded, sequences = padding_check.pad_case(case, "left", [0, 1, 3])
    np.testing.assert_array_equal(padded.attention_mask, [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(padded.x[1, 1:], case.x[:3])  # the first 3 tokens, after one pad
    np.testing.assert_array_equal(padded.x[2, 3], case.x[0])
    assert [s.shape for s in sequences] == [(1, 4, 3), (1, 3, 3), (1, 1, 3)]
    out = np.arange(2 * 3 * 4).reshape(3, 4, 2)
    np.testing.assert_array_equal(padding_check.real_rows(out, [0, 1, 3], "left"),
                                  np.concatenate([out[0], out[1, 1:], out[2, 3:]]))
    right, _ = padding_check.pad_case(case, "right", [2])
    np.testing.assert_array_equal(right.attention_mask, [[1, 1, 0, 0]])


@pytest.mark.parametrize("kwargs, message", [
    (dict(variants=["SelfAttentionV2"], decode=2), "SelfAttentionV2 cannot decode: it has no torch reference with a KV cache"),
    (dict(variants=["TorchMultiheadAttention"], decode=2, causal=False), "TorchMultiheadAttention cannot decode: it is not causal at this config"),
    (dict(decode=11), r"--decode 11: the prompt must have 1..10 tokens"),
    (dict(decode=0), r"--decode: the prompt length must be >= 1, got 0"),
    (dict(padding="left", pad_lengths=[10]), "10 padding tokens leave no real token of 10"),
    (dict(padding="middle", pad_lengths=[1]), "--padding must be one of left, right"),
    (dict(padding="left"), "--padding and --pad-lengths go together"),
    (dict(decode=2, padding="left", pad_lengths=[1]), "choose one"),
])
def test_bad_decode_and_padding_requests_are_named(kwargs, message):
    variants = kwargs.pop("variants", None)
    with pytest.raises(BadInputError, match=message):
        engine.run(variants, backends=("torch", "flax"), **{**SMALL, **kwargs})


def test_cli_decode_and_padding(tmp_path):
    out = main_in_process(["--decode", "2", "--backends", "torch,flax", "--json", str(tmp_path / "d.json")], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "decode: prompt of 2 tokens, then one token at a time to 6" in out.stdout
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["mode"]["check"] == "decode" and all(r["detail"]["steps"] == 4 for r in report["results"])
    out = main_in_process(["--padding", "right", "--pad-lengths", "0,2", "--backends", "torch,flax", "-q"], tmp_path)
    assert out.returncode == 0 and "all 16 checks passed" in out.stdout, out.stdout + out.stderr
    bad = main_in_process(["--padding", "left", "--pad-lengths", "1,-2"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "crosscheck: error: --pad-lengths: must be >= 0, got -2"
    assert "Traceback" not in bad.stderr


def test_bench_decode_times_both_and_compiles_twice(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    json_path = tmp_path / "decode.json"
    args = parser.parse_args(["--decode", "--batch", "2", "--d-model", "16", "--heads", "2", "--prompt-len", "5",
                              "--steps", "12", "--repeats", "2", "--json", str(json_path)])
    assert bench.main(args) == 0
    result = json.loads(json_path.read_text())
    rows = {r["impl"]: r for r in result["results"]}
    assert set(rows) == {"jax-naive", "jax-xla", "jax-auto", "torch-book-cache"}
    # The layer the bench decodes, rebuilt as crosscheck.benchmarks.bench_decode draws it (seeded): its derived bound.
    torch.manual_seed(args.seed)
    book = torch_ref.MultiHeadAttention(16, 16, 17, 0.0, 2)
    x = np.random.default_rng(args.seed).standard_normal((2, 17, 16), dtype=np.float32)
    bound = torch_layer_bound(book, x)
    for name, row in rows.items():
        assert row["per_token_median_s"] > 0 and len(row["per_token_times_s"]) == 2
        assert row["max_abs_diff_vs_torch"] <= bound, (row, bound)
        if name.startswith("jax-"):
            assert row["compilations"] == 2 and row["traces"] == 2  # the prompt and the step, over all rounds
    assert "compilations" in capsys.readouterr().out


@pytest.mark.parametrize("impl", ["naive", "blockwise", "xla"])
def test_padding_and_decoding_hold_for_every_attention_implementation(impl):
    padded = engine.run(padding="left", pad_lengths=[4, 0, 7], backends=("torch", "flax"), attention_impl=impl,
                        **SMALL)
    assert padded.passed, padded.failing_variants
    decoded = engine.run(decode=4, backends=("torch", "flax"), attention_impl=impl, **SMALL)
    assert decoded.passed, decoded.failing_variants
    assert {r.attention_impl for r in padded.results + decoded.results if r.backend == "flax"} - {None} == {impl}


@pytest.mark.xla_optimized
def test_inputs_scaled_by_1e4_stay_finite_in_every_backend():
    """Scores ~1e8: agreement is not expected (a float32 rounding of a score moves the softmax), finiteness is."""
    from crosscheck.pipeline import backends

    x = np.random.default_rng(5).random((2, 10, 4), dtype=np.float32) * 1e4
    cases, _, _ = engine.build_cases(None, inputs=x, overrides=dict(d_out=4, num_heads=2))
    padded = [padding_check.pad_case(c, "left", [0, 6])[0] for c in cases]
    decoding = [c for c in cases if c.variant.decodes(c.config)]
    outs = {}
    for case in padded:
        outs[("torch", case.variant.name)] = backends.torch_outputs(case)[0]
        outs[("flax", case.variant.name)] = backends.flax_output(case)
    for case in decoding:
        outs[("torch decode", case.variant.name)] = backends.torch_decode_output(case, 3)
        outs[("flax decode", case.variant.name)] = backends.flax_decode_output(case, 3)[0]
    ttnn_padded = backends.ttnn_outputs_in_process(padded, "host", lambda _: None)[0]
    ttnn_decoded = backends.ttnn_outputs_in_process(decoding, "host", lambda _: None, prompt_len=3)[0]
    outs.update({("ttnn", k): v for k, v in ttnn_padded.items()})
    outs.update({("ttnn decode", k): v for k, v in ttnn_decoded.items()})
    assert len(outs) == 3 * len(padded) + 3 * len(decoding)
    assert [k for k, v in outs.items() if not np.isfinite(v).all()] == []
