"""``crosscheck --jax-layers``: Flax's Linen and NNX attention and Equinox's as rows against torch.

The adapters first (each library's layer with a ``torch.nn.MultiheadAttention``'s weights, stage by stage,
against the float64 reference within the float32 error bound of :mod:`jaxattn.tolerance`), then the rows of
the forward, padding and decode checks with the real numbers against torch, and the refusals. A layer that
disagrees with torch is a result: the test asserts that the run reports it (the call, the first diverging
stage, exit 1), not that the library is right.
"""

import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference is torch.nn.MultiheadAttention")
pytest.importorskip("equinox", reason="the equinox row needs jaxattn[equinox]")

from crosscheck import cli, jax_layers  # noqa: E402
from crosscheck.errors import BadInputError  # noqa: E402
from crosscheck.jax_layers import weights as jw  # noqa: E402
from crosscheck.pipeline import compare as cmp  # noqa: E402
from crosscheck.pipeline import engine  # noqa: E402
from crosscheck.pipeline.inputs import RandomInputs  # noqa: E402
from crosscheck.variants import registry  # noqa: E402
from jaxattn import tolerance  # noqa: E402

from .test_hostile_cli import refused, run_cli  # noqa: E402

LIBRARIES = tuple(jax_layers.LAYERS)  # flax.linen, flax.nnx, equinox
MHA = next(v.name for v in registry.VARIANTS if v.jax_layers)
NOT_MHA = next(v.name for v in registry.VARIANTS if not v.jax_layers and v.in_default_run)
#: Unequal sizes: 2 heads of 4 over 5 tokens, a batch of 2.
SMALL = dict(inputs=RandomInputs(batch=2, tokens=5, d_in=8, seed=3), num_heads=2)


# --- the adapters: each layer with the ported weights, stage by stage, against float64 -------------------


def _weights(bias: bool, seed: int = 0, e: int = 8, heads: int = 2) -> jw.MhaWeights:
    torch.manual_seed(seed)
    module = torch.nn.MultiheadAttention(e, heads, bias=bias, batch_first=True)
    return jw.split({k: v.detach().numpy() for k, v in module.state_dict().items()}, heads)


def _stage_bounds(w: jw.MhaWeights, x: np.ndarray, visible: np.ndarray) -> dict[str, object]:
    """Each stage's bound on one float32 computation's distance from the exact value (jaxattn.tolerance):
    elementwise for the projections, the largest entry for the attention and the output."""
    kernels = dict(w_query=w.w_q.T, w_key=w.w_k.T, w_value=w.w_v.T)
    biases = dict(b_query=w.b_q, b_key=w.b_k, b_value=w.b_v)
    common = dict(num_heads=w.num_heads, mask=visible[:, None], **biases)
    return {
        "query": tolerance.linear_error(x, w.w_q.T, w.b_q)[1],
        "key": tolerance.linear_error(x, w.w_k.T, w.b_k)[1],
        "value": tolerance.linear_error(x, w.w_v.T, w.b_v)[1],
        "attention": tolerance.projected_attention_error(x, **kernels, **common),
        "output": tolerance.projected_attention_error(x, **kernels, w_out=w.w_o.T, b_out=w.b_o, **common),
    }


def _within(stages: dict, reference: dict, bounds: dict, keep=None) -> None:
    keep = np.ones(reference["output"].shape[:2], bool) if keep is None else keep  # (B, T): positions compared
    for name in jax_layers.STAGES:
        err = np.abs(np.asarray(stages[name], np.float64) - reference[name])
        bound = np.broadcast_to(bounds[name], err.shape)
        print(f"{name}: max err {err[keep].max():.3g}, bound {bound[keep].max():.3g}")
        assert (err[keep] <= bound[keep]).all(), name


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_each_layer_ported_equals_the_float64_reference(library, causal, bias):
    w = _weights(bias, seed=1)
    x = np.random.default_rng(4).standard_normal((2, 5, 8)).astype(np.float32)
    stages = jax_layers.LAYERS[library].adapter().stages(w, x, causal=causal)
    reference = jw.reference_stages(w, x, causal=causal)
    _within(stages, reference, _stage_bounds(w, x, jw.visible(5, causal, None, 2)))


@pytest.mark.parametrize("library", LIBRARIES)
def test_each_layer_takes_a_key_padding_mask_through_its_own_argument(library):
    w = _weights(True, seed=2)
    x = np.random.default_rng(5).standard_normal((2, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # the second row padded on the left
    stages = jax_layers.LAYERS[library].adapter().stages(w, x, causal=True, attention_mask=mask)
    reference = jw.reference_stages(w, x, causal=True, attention_mask=mask)
    seen = jw.visible(5, True, mask, 2)
    # A query that sees no key (left padding, causal) is a padding position: each library fills it its own way.
    _within(stages, reference, _stage_bounds(w, x, seen), keep=seen.any(axis=-1))


def test_linen_decodes_through_its_cache_as_the_full_causal_forward():
    w = _weights(True, seed=3)
    x = np.random.default_rng(6).standard_normal((2, 5, 8)).astype(np.float32)
    stages = jax_layers.LAYERS["flax.linen"].adapter().decode_stages(w, x)
    reference = jw.reference_stages(w, x, causal=True)
    _within(stages, reference, _stage_bounds(w, x, jw.visible(5, True, None, 2)))


def test_first_diverging_names_the_first_stage_over_the_bound():
    ref = {name: np.zeros((1, 2, 3)) for name in jax_layers.STAGES}
    got = {**ref, "attention": np.full((1, 2, 3), 1e-3), "output": np.full((1, 2, 3), 1.0)}
    assert jax_layers.first_diverging(got, ref, lambda name, r: 1e-5) == "attention"
    assert jax_layers.first_diverging(ref, ref, lambda name, r: 0.0) is None
    assert jax_layers.parse(" flax.nnx,jaxattn,flax.nnx ") == ("flax.nnx", "jaxattn")


# --- the rows of the checks, against torch ------------------------------------------------------------


def _rows(report) -> dict:
    return {r.backend: r for r in report.results if r.backend in LIBRARIES}


def _is_a_library_row(r, reference: str) -> None:
    layer = jax_layers.LAYERS[r.backend]
    assert r.variant == MHA and r.dtype == "float32" and r.precision == "highest" and r.reference == reference
    assert r.runtime == f"{layer.distribution} {layer.version()}"  # e.g. "flax 0.12.8"
    assert r.thresholds == cmp.policy_for("flax", "float32").to_dict()  # the Flax float32 row's bounds


@pytest.mark.parametrize(("causal", "bias"), [(True, True), (True, False), (False, True), (False, False)])
def test_forward_rows_pass_for_every_library(causal, bias):
    report = engine.run([MHA], backends=("torch",), jax_layers=",".join(LIBRARIES), causal=causal, qkv_bias=bias,
                        **SMALL)  # fmt: skip
    rows = _rows(report)
    assert list(rows) == list(LIBRARIES)
    for r in rows.values():
        _is_a_library_row(r, "torch float32")
        assert r.passed and r.shape == [2, 5, 8], (r.backend, r.failures)
        assert r.detail["call"] == jax_layers.LAYERS[r.backend].call
    assert report.passed and report.mode["jax_layers"] == list(LIBRARIES)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_rows_pass_for_every_library(side):
    report = engine.run([MHA], backends=("torch",), jax_layers=",".join(LIBRARIES), padding=side,
                        pad_lengths=(0, 2, 4), **SMALL)  # fmt: skip
    rows = _rows(report)
    assert list(rows) == list(LIBRARIES)
    for r in rows.values():
        _is_a_library_row(r, "torch unpadded, one by one")
        assert r.passed and r.detail["real_tokens"] == 15 - 6, (r.backend, r.failures)
    assert report.passed


def test_decode_rows_linen_passes_nnx_is_reported_equinox_has_no_cache(tmp_path, capsys):
    """Flax 0.12.8's nnx.MultiHeadAttention decoding with is_causal=True (as Flax's examples call it) attends to
    key 0 only: the run reports it as a FAIL row naming the call and the first diverging stage, and exits 1."""
    out = tmp_path / "decode.json"
    small = ["--batch", 2, "--tokens", 5, "--d-in", 8, "--num-heads", 2]
    argv = ["--variant", MHA, "--jax-layers", "jaxattn," + ",".join(LIBRARIES), "--backends", "torch,flax",
            "--decode", 2, *small, "--no-color", "--json", out]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 1 and err.strip().splitlines()[-1] == f"crosscheck: mismatch in {MHA}", err
    report = json.loads(out.read_text())
    rows = {r["backend"]: r for r in report["results"] if r["backend"] in LIBRARIES}
    assert list(rows) == ["flax.linen", "flax.nnx"]  # equinox: no cache, no row
    assert [r["passed"] for r in report["results"] if r["backend"] in ("torch", "flax")] == [True, True, True]
    linen, nnx = rows["flax.linen"], rows["flax.nnx"]
    assert linen["passed"] and linen["reference"] == "torch decode" and linen["detail"]["steps"] == 3
    assert not nnx["passed"] and "is_causal=True" in nnx["detail"]["call"]
    assert nnx["detail"]["first_diverging_stage"] == "attention"
    assert any("first diverging stage: attention" in f and "is_causal=True" in f for f in nnx["failures"])
    assert "no KV cache" in report["mode"]["skipped_backends"]["equinox"]
    assert report["failing_variants"] == [MHA]


def test_decode_table_says_where_and_why(capsys):
    argv = ["--variant", MHA, "--jax-layers", "flax.nnx,equinox", "--backends", "torch", "--decode", "1",
            "--no-color"]  # fmt: skip
    code = cli.main(argv)
    printed = capsys.readouterr()
    assert code == 1 and printed.err.strip().splitlines() == [f"crosscheck: mismatch in {MHA}"]
    assert "FAIL at attention" in printed.out and "is_causal=True" in printed.out
    assert "equinox: no decode row: equinox.nn.MultiheadAttention has no KV cache" in printed.out


# --- refusals: exit 2, one line --------------------------------------------------------------------------


def test_an_unknown_layer_is_refused_naming_it_and_the_choices(capsys):
    line = refused(["--variant", MHA, "--jax-layers", "flax.nnx,haiku"], capsys)
    assert "'haiku'" in line and all(name in line for name in jax_layers.NAMES)


def test_a_variant_that_is_not_a_torch_mha_port_is_refused(capsys):
    line = refused(["--variant", NOT_MHA, "--jax-layers", "flax.linen"], capsys)
    assert f"--jax-layers needs {MHA}" in line and NOT_MHA in line
    line = refused(["--jax-layers", "flax.linen"], capsys)  # the default run: the book's variants
    assert f"--jax-layers needs {MHA}" in line


def test_a_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)  # import equinox fails
    with pytest.raises(BadInputError, match=r"pip install 'jaxattn\[equinox\]'"):
        engine.RunRequest.create([MHA], jax_layers="equinox")


@pytest.mark.parametrize("flags", [["--train"], ["--grad"], ["--stages"]])
def test_other_checks_are_refused(flags, capsys):
    assert "--jax-layers" in refused(["--variant", MHA, "--jax-layers", "flax.nnx", *flags], capsys)
