"""``crosscheck --train`` and ``--grad``: identical dropout masks in torch and Flax, gradients per torch name.

The masks are checked against independent references: the torch side against torch's own
dropout (same generator state, so the same Bernoulli draw), the Flax side against the
attention weights the core returns (dropout applied by hand in numpy).
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the references are torch modules")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from crosscheck import cli  # noqa: E402
from crosscheck.checks import grad_check, train_check
from crosscheck.pipeline import engine
from crosscheck.pipeline.inputs import RandomInputs  # noqa: E402
from crosscheck.porting import port
from crosscheck.references import dropout_masks as dm  # noqa: E402
from crosscheck.references import torch_ref
from crosscheck.variants import registry
from jaxattn.tolerance import attention_error  # noqa: E402
from tests.bounds import layer_bound  # noqa: E402

DEFAULT_RUN = [v.name for v in registry.default_run()]
WITH_DROPOUT = ("CausalAttention", "MultiHeadAttentionWrapper", "MultiHeadAttention",
                "MultiHeadAttentionCombinedQKV", "TorchMultiheadAttention")


# --- the masks ----------------------------------------------------------------------------------


def test_the_mask_read_back_is_what_the_core_drops():
    """site_mask against the core's weights with dropout applied by hand (grouped kv heads included)."""
    import jaxattn

    site = dm.Site(batch=2, heads=4, kv_heads=2, q_tokens=5, kv_tokens=7, rate=0.4)
    keep = dm.site_mask(3, 1, site)  # (b, N, T, S)
    assert keep.shape == (2, 4, 5, 7) and 0.3 < keep.mean() < 0.9 and not keep.all()
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    k = rng.normal(size=(2, 7, 2, 3)).astype(np.float32)
    v = rng.normal(size=(2, 7, 2, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        dropped = jaxattn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                implementation="naive", dropout_rate=0.4,
                                                dropout_rng=dm.site_key(3, 1))
    keys, values = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # query head n reads kv head n // 2
    scores = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), keys) / np.sqrt(3)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)  # (b, N, T, S)
    expected = np.einsum("bnts,bsnh->btnh", weights * keep / 0.6, values)
    # Against float64: one float32 computation's error, its kept weights (and their errors) scaled by 1 / 0.6
    # (the scaling's own rounding is one more per weight, inside jaxattn.tolerance.SOFTMAX_OPS).
    np.testing.assert_allclose(np.asarray(dropped), expected, atol=attention_error(q, k, v) / 0.6, rtol=0)
    assert not np.array_equal(dm.site_mask(3, 2, site), keep)  # each site its own draw


def _same_draw(seed, shapes, p):
    """The keep masks torch's dropout draws from ``torch.manual_seed(seed)``, one shape after another."""
    torch.manual_seed(seed)
    return [torch.empty(s).bernoulli_(1 - p).numpy().astype(bool) for s in shapes]


@pytest.mark.parametrize("name", ["CausalAttention", "MultiHeadAttentionWrapper", "MultiHeadAttention",
                                  "MultiHeadAttentionCombinedQKV", "TorchMultiheadAttention", "GPT2Attention"])
def test_injected_masks_reproduce_torch_own_dropout(name):
    """Each torch injection point drops exactly what the module's own dropout drops on the same draw."""
    variant = registry.get(name)
    cfg = variant.resolve(engine.resolve_config(variant, dict(d_in=4, d_out=4, num_heads=2, dropout=0.3), {}, 5, 4))
    torch.manual_seed(0)
    module = variant.torch_module(cfg).train()
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 5, 4)).astype(np.float32))
    heads = 1 if name in ("CausalAttention", "MultiHeadAttentionWrapper") else 2
    n_sites = 2 if name == "MultiHeadAttentionWrapper" else 1
    torch.manual_seed(11)
    with torch.no_grad():
        if name == "TorchMultiheadAttention":  # the need_weights path applies F.dropout to (b*H, T, S)
            mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
            native = module(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)[0]
        else:
            native = variant.torch_forward(module, x, cfg)
    masks = _same_draw(11, [(2, heads, 5, 5)] * n_sites, 0.3)
    sites = [dm.Site(2, heads, heads, 5, 5, 0.3)] * n_sites
    with torch.no_grad():
        injected = dm.torch_forward_masked(variant, module, x, cfg, masks, sites)
    # Two float32 computations of the same dropped layer: its derived bound, the kept weights scaled by 1 / 0.7.
    flax_module, variables = port.from_torch(module)
    if name == "TorchMultiheadAttention":
        flax_module = flax_module.clone(causal=True)
    bound = layer_bound(flax_module, variables["params"], x.numpy()) / (1 - 0.3)
    np.testing.assert_allclose(injected.numpy(), native.numpy(), atol=bound, rtol=0)
    flipped = [m.copy() for m in masks]
    flipped[-1][1, -1, -1, 0] ^= True  # the last query sees every key: one weight changes
    with torch.no_grad():
        changed = dm.torch_forward_masked(variant, variant.torch_module(cfg), x, cfg, flipped, sites)
    assert np.abs(changed.numpy() - native.numpy()).max() > 1e-3


def test_a_torch_module_whose_dropout_sites_differ_is_refused():
    module = torch_ref.MultiHeadAttentionWrapper(3, 2, 6, 0.1, num_heads=2)
    site = dm.Site(1, 1, 1, 6, 6, 0.1)
    with pytest.raises(ValueError, match="2 torch dropout module.*1 site"):
        dm.inject_masks(module, [np.ones((1, 1, 6, 6), bool)], [site])
    with pytest.raises(ValueError, match="p=0.1 but the Flax site's rate is 0.5"):
        dm.inject_masks(module, [np.ones((1, 1, 6, 6), bool)] * 2, [dm.Site(1, 1, 1, 6, 6, 0.5)] * 2)


# --- the checks through the engine and the CLI --------------------------------------------------


@pytest.fixture(scope="module")
def train_grad_report():
    return engine.run(train=True, grad=True, backends=("torch", "flax", "ttnn"))  # dropout 0.1 by default


@pytest.mark.slow
def test_train_and_grad_pass_for_every_default_variant_at_dropout_0_1(train_grad_report):
    report = train_grad_report
    assert report.passed, [f for r in report.results for f in r.failures]
    assert report.mode["check"] == "grad" and report.mode["train"] and report.mode["dropout"] == 0.1
    assert "ttnn" in report.mode["skipped_backends"] and "torch and Flax only" in report.mode["skipped_backends"]["ttnn"]
    assert {r.backend for r in report.results} == {"torch", "flax"}
    train_rows = {(r.variant, r.backend): r for r in report.results if "parameter" not in r.detail}
    for name in DEFAULT_RUN:
        flax_row = train_rows[(name, "flax")]
        assert flax_row.passed and (name, "torch") in train_rows  # crosscheck's verdict: its POLICY row
        if name in WITH_DROPOUT:
            assert flax_row.reference == "torch float32, same masks" and flax_row.detail["dropout"] == 0.1
            assert flax_row.detail["sites"] == (2 if name == "MultiHeadAttentionWrapper" else 1)
            assert 0.6 < flax_row.detail["kept_fraction"] < 1.0
        else:
            assert flax_row.reference == "torch float32, no dropout" and flax_row.detail["dropout"] == "no dropout"


@pytest.mark.slow
def test_grad_rows_name_every_torch_parameter(train_grad_report):
    grads = [r for r in train_grad_report.results if r.detail.get("parameter")]
    by_variant = {}
    for r in grads:
        by_variant.setdefault(r.variant, []).append(r.detail["parameter"])
        assert r.detail["train"] and r.reference == f"torch grad: {r.detail['parameter']}"
    for case in engine.build_cases(DEFAULT_RUN)[0]:
        names = [n for n, _ in case.torch_module.named_parameters()]
        assert by_variant[case.variant.name] == ["input", *names]
    assert "heads.1.W_key.weight" in by_variant["MultiHeadAttentionWrapper"]
    assert "in_proj_weight" in by_variant["TorchMultiheadAttention"]


@pytest.mark.slow
def test_cli_train_grad_at_dropout_0_5_every_default_variant(tmp_path, capsys):
    out = tmp_path / "train.json"
    code = cli.main(["--train", "--grad", "--dropout", "0.5", "--json", str(out), "--no-color"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "training mode: dropout 0.5" in text and "ttnn: not run" in text and "no dropout" in text
    data = json.loads(out.read_text())
    assert data["passed"] and data["mode"]["dropout"] == 0.5 and data["mode"]["check"] == "grad"
    assert {r["variant"] for r in data["results"]} == set(DEFAULT_RUN)
    masked = [r for r in data["results"] if r["detail"].get("dropout") == 0.5 and "parameter" not in r["detail"]]
    assert {r["variant"] for r in masked} == set(WITH_DROPOUT) and len(masked) == 2 * len(WITH_DROPOUT)
    assert all(0.3 < r["detail"]["kept_fraction"] < 0.7 for r in masked)


@pytest.mark.slow
def test_grouped_query_and_transformers_formats_train_and_grad():
    report = engine.run(["GroupedQueryAttention", "LlamaAttention", "Qwen3Attention", "GPT2Attention"],
                        train=True, grad=True, dropout=0.5, backends=("torch", "flax"))
    assert report.passed, [f for r in report.results for f in r.failures]
    flax_train = {r.variant: r for r in report.results if r.reference.startswith("torch float32,")}
    assert flax_train["GPT2Attention"].detail["dropout"] == 0.5  # GPT-2's attn_pdrop, masked in both
    for name in ("GroupedQueryAttention", "LlamaAttention", "Qwen3Attention"):
        assert flax_train[name].detail["dropout"] == "no dropout"
    assert any(r.detail.get("parameter") == "q_norm.weight" for r in report.results if r.variant == "Qwen3Attention")


def test_grad_in_inference_mode_with_a_chosen_core():
    report = engine.run(["MultiHeadAttention"], grad=True, attention_impl="blockwise", backends=("torch", "flax"),
                        inputs=RandomInputs(batch=2, tokens=5, d_in=4, seed=3), d_out=4)
    assert report.passed and report.mode == {"check": "grad", "train": False, "seed": 0,
                                             "loss": grad_check.LOSS}
    assert all(r.attention_impl == "blockwise" and not r.detail["train"] for r in report.results)
    assert [r.detail["parameter"] for r in report.results][:2] == ["input", "W_query.weight"]


# --- a changed mask or a wrong gradient fails ---------------------------------------------------


def test_one_flipped_mask_element_on_the_torch_side_fails(monkeypatch):
    real = train_check.torch_train_module

    def flip_one(case, masks, sites, dtype=None):
        flipped = [m.copy() for m in masks]
        flipped[0][0, 0, -1, 0] ^= True  # last query, first key: visible under the causal mask
        return real(case, flipped, sites, dtype)

    monkeypatch.setattr(train_check, "torch_train_module", flip_one)
    report = engine.run(["CausalAttention"], train=True, grad=True, dropout=0.5, backends=("torch", "flax"))
    flax_rows = [r for r in report.results if r.backend == "flax"]
    assert not report.passed and report.failing_variants == ["CausalAttention"]
    assert not flax_rows[0].passed and flax_rows[0].max_abs_err > 1e-3  # the output
    assert any(not r.passed for r in flax_rows[1:])  # and the gradients on that mask
    torch_row = [r for r in report.results if r.backend == "torch"][0]
    assert torch_row.passed  # float32 vs float64 torch, both on the flipped mask


def test_a_perturbed_parameter_gradient_fails_and_is_named(monkeypatch):
    real = grad_check.flax_output_and_grads

    def perturbed(case, trainer, seed):
        out, grads, sites = real(case, trainer, seed)
        grads = dict(grads)
        grads["W_key.weight"] = grads["W_key.weight"].copy()
        grads["W_key.weight"][1, 2] += 1e-4  # 5x the bound
        return out, grads, sites

    monkeypatch.setattr(grad_check, "flax_output_and_grads", perturbed)
    report = engine.run(["MultiHeadAttention"], grad=True, backends=("torch", "flax"), d_out=4)
    failed = [r for r in report.results if not r.passed]
    assert [r.detail["parameter"] for r in failed] == ["W_key.weight"]
    assert failed[0].detail["reference_float32_error"] < 1e-6 and failed[0].thresholds["max_abs"] == 2e-5
    assert "max abs err 0.0001 > 2e-05" in failed[0].failures[0]


# --- bad usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--train", "--dtype", "bfloat16"], "--dtype bfloat16 is not supported"),
    (["--grad", "--decode", "2"], "does not combine with --decode"),
    (["--train", "--attention-impl", "blockwise"], "naive kernel"),
    (["--train", "--backends", "torch,ttnn"], "--backends must include torch and flax"),
])
def test_train_and_grad_refuse_what_they_cannot_run(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("crosscheck: error:") and message in err and len(err.strip().splitlines()) == 1


def test_flax_train_output_without_dropout_equals_inference():
    """A rate of 0 is no dropout: training mode gives the inference output and no site."""
    case = engine.build_cases(["MultiHeadAttention"], overrides={"dropout": 0.0})[0][0]
    out, sites = train_check.flax_train_output(case, seed=0)
    assert sites == []
    np.testing.assert_array_equal(out, engine.flax_output(case))
    assert jnp.asarray(out).shape == (1, 6, 2)


def test_the_grad_bound_is_the_documented_row_widened_by_the_reference_error():
    from crosscheck.cli import EPILOG
    from crosscheck.pipeline import compare

    row = compare.POLICY[("flax grad", "float32")]
    assert (row.max_abs, row.max_rel, row.min_pcc) == (2e-5, None, None) and compare.GRAD_REFERENCE_FACTOR == 4
    assert "max abs 2e-5 x max(1, max|ref|), at\n  least 4 x torch's own float32 error" in EPILOG
    assert compare.grad_policy(0.0, 1.0).max_abs == 2e-5  # a well-conditioned gradient: the plain bound
    assert compare.grad_policy(1e-4, 2.0).max_abs == pytest.approx(2e-4)  # 4 x 1e-4, over ref_scale 2
    # An ill-conditioned gradient (torch itself 8e-5 off in float32) passes only within 4x that error.
    ref = np.array([1e-4, -2e-4], np.float32)
    assert compare.compare(ref + 3e-4, ref, compare.grad_policy(8e-5, 1.0)).passed
    assert not compare.compare(ref + 4e-4, ref, compare.grad_policy(8e-5, 1.0)).passed


def test_help_documents_train_and_grad():
    text = cli.build_parser().format_help()
    assert "--train" in text and "--grad" in text and "identical masks" in text
    assert "ttnn in --backends is skipped" in text and "torch_masked_forward" not in text
