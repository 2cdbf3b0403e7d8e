"""``crosscheck --stages``: each stage matches on honest ports, and a corruption is named at its stage.

One thing is corrupted at a time, in Flax (the ported parameters or the attention core) or in
ttnn (the parameters the program receives, or the program's own ops), and the report must name
the stage where the corruption enters as that backend's first stage over its bound, while the
other backend passes every stage:

* a transposed ``W_key`` -> ``keys``;
* the ``1/sqrt(head_dim)`` forgotten -> ``weights`` (the book's scores are ``q @ k.T``, unscaled);
* the causal mask missing -> ``weights`` (the scores are taken before the mask);
* a wrong ``out_proj`` bias -> ``output`` (the context before ``out_proj`` still matches).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types

import numpy as np
import pytest

from crosscheck import cli
from crosscheck.checks import stages
from crosscheck.seed import TOKENS
from jaxattn.tolerance import linear_error
from tests.bounds import weights_error

#: MultiHeadAttention with d_in == d_out (a transposed W_key keeps its shape), head_dim 4, inputs ~N(0, 2^2):
#: forgetting the 1/sqrt(4) doubles every logit, far beyond the bf16 bound.
CASE = dict(d_out=8, num_heads=2, ttnn_runtime="host")
X = np.random.default_rng(0).normal(0.0, 2.0, (1, 5, 8)).astype(np.float32)


def run_mha(**kwargs) -> stages.StagesReport:
    return stages.run(["MultiHeadAttention"], inputs=X, **CASE, **kwargs)


def firsts(report: stages.StagesReport) -> dict:
    """``{backend: first failing stage or None}`` of the one variant."""
    (v,) = report.variants
    return {b.backend: (b.first_failure.stage if b.first_failure else None) for b in v.backends}


# --- the corruptions ---------------------------------------------------------------------------------


def flax_params(monkeypatch, edit):
    """Flax gets ``edit(params)`` of the honest ported parameters; ttnn and torch keep the state dict."""
    from crosscheck.porting import port

    honest = port.port_variables

    def corrupted(variant, cfg, state_dict, *a, **kw):
        variables = honest(variant, cfg, state_dict, *a, **kw)
        params = {k: dict(v) for k, v in variables["params"].items()}
        edit(params)
        return {**variables, "params": params}

    monkeypatch.setattr(port, "port_variables", corrupted)


def flax_core(monkeypatch, **override):
    """The attention kernel jaxattn picks, called with ``override`` (scale, is_causal) instead."""
    from jaxattn import implementations

    honest = implementations.select

    def select(name, call):
        chosen = honest(name, call)

        def kernel(*args, **kwargs):
            return chosen.kernel(*args, **{**kwargs, **override})

        return dataclasses.replace(chosen, kernel=kernel)

    monkeypatch.setattr(implementations, "select", select)


def ttnn_state_dict(monkeypatch, edit):
    """The ttnn program gets parameters from ``edit(state_dict)``; torch and Flax keep the honest one."""
    from crosscheck.tt import runtime

    honest = runtime.preprocess_parameters

    def corrupted(ttnn, device, portmap, state_dict, owner):
        sd = dict(state_dict)
        edit(sd)
        return honest(ttnn, device, portmap, sd, owner)

    monkeypatch.setattr(runtime, "preprocess_parameters", corrupted)


def transpose_w_key_flax(params):
    params["W_key"]["kernel"] = np.asarray(params["W_key"]["kernel"]).T


def shift_bias_flax(params):
    params["out_proj"]["bias"] = np.asarray(params["out_proj"]["bias"]) + 0.5


def transpose_w_key_torch(sd):
    sd["W_key.weight"] = np.ascontiguousarray(np.asarray(sd["W_key.weight"]).T)


def shift_bias_torch(sd):
    sd["out_proj.bias"] = np.asarray(sd["out_proj.bias"]) + 0.5


def ttnn_no_scale(monkeypatch):
    from crosscheck.tt import ops

    monkeypatch.setattr(ops, "math", types.SimpleNamespace(sqrt=lambda v: 1.0))


def ttnn_no_causal_mask(monkeypatch):
    from crosscheck.tt import ops

    honest = ops.key_visibility
    monkeypatch.setattr(ops, "key_visibility", lambda *a, **kw: honest(*a, **{**kw, "causal": False}))


CORRUPTIONS = {
    ("flax", "transposed W_key"): (lambda mp: flax_params(mp, transpose_w_key_flax), "keys"),
    ("flax", "no 1/sqrt(d)"): (lambda mp: flax_core(mp, scale=1.0), "weights"),
    ("flax", "no causal mask"): (lambda mp: flax_core(mp, is_causal=False), "weights"),
    ("flax", "out_proj bias + 0.5"): (lambda mp: flax_params(mp, shift_bias_flax), "output"),
    ("ttnn", "transposed W_key"): (lambda mp: ttnn_state_dict(mp, transpose_w_key_torch), "keys"),
    ("ttnn", "no 1/sqrt(d)"): (ttnn_no_scale, "weights"),
    ("ttnn", "no causal mask"): (ttnn_no_causal_mask, "weights"),
    ("ttnn", "out_proj bias + 0.5"): (lambda mp: ttnn_state_dict(mp, shift_bias_torch), "output"),
}


def test_honest_ports_pass_every_stage():
    report = run_mha()
    assert report.passed, firsts(report)
    (v,) = report.variants
    for b in v.backends:
        assert [r.stage for r in b.rows] == ["queries", "keys", "values", "scores", "weights", "context", "output"]
    assert v.arrays["torch"]["queries"].shape == (1, 2, 5, 4)  # heads-first, head_dim 4
    assert v.arrays["torch"]["weights"].shape == (1, 2, 5, 5)


@pytest.mark.parametrize("backend,what", list(CORRUPTIONS), ids=[f"{b}-{w}" for b, w in CORRUPTIONS])
def test_a_corruption_is_named_at_its_stage(monkeypatch, backend, what):
    corrupt, stage = CORRUPTIONS[(backend, what)]
    corrupt(monkeypatch)
    report = run_mha()
    other = {"flax": "ttnn", "ttnn": "flax"}[backend]
    assert firsts(report) == {backend: stage, other: None}
    (v,) = report.variants
    rows = {r.stage: r for r in next(b for b in v.backends if b.backend == backend).rows}
    assert rows[stage].max_abs_err > rows[stage].bound  # failed on the abs bound, not only on PCC
    earlier = stages.STAGES[: stages.STAGES.index(stage)]
    assert all(rows[s].passed for s in earlier if s in rows)


def test_layouts_agree_with_torch_module_stages():
    """The torch re-run's weights are the book's softmax(masked q k^T / sqrt(d)), recomputed here in numpy."""
    report = run_mha(backends=["flax"])
    t = report.variants[0].arrays["torch"]
    q, k = t["queries"].astype(np.float64), t["keys"].astype(np.float64)
    scores = q @ np.swapaxes(k, -1, -2)  # (1, 2, 5, 5)
    # torch's float32 stages against float64 from the same float32 queries and keys: one computation's error.
    np.testing.assert_allclose(t["scores"], scores, atol=linear_error(q, np.swapaxes(k, -1, -2))[1].max(), rtol=0)
    masked = np.where(np.triu(np.ones((5, 5), bool), 1), -np.inf, scores) / math.sqrt(4)
    weights = np.exp(masked - masked.max(-1, keepdims=True))
    bound = weights_error(np.swapaxes(q, 1, 2), np.swapaxes(k, 1, 2), is_causal=True)  # (b, T, heads, hd) layout
    np.testing.assert_allclose(t["weights"], weights / weights.sum(-1, keepdims=True), atol=bound, rtol=0)


def test_gqa_with_qk_norm_exposes_norm_and_rope_stages():
    report = stages.run(["GroupedQueryAttention"], qk_norm=True, ttnn_runtime="host")
    assert report.passed, firsts(report)
    (v,) = report.variants
    names = [r.stage for r in v.backends[0].rows]
    assert names == ["queries", "keys", "values", "queries_normed", "keys_normed", "queries_rope", "keys_rope",
                     "scores", "weights", "context", "output"]
    assert v.arrays["flax"]["keys_rope"].shape == (1, 2, 6, 4)  # 2 kv groups, never repeated
    assert v.arrays["ttnn"]["scores"].shape == (1, 4, 6, 6)


def test_cli_stages_names_the_first_stage_and_exits_1(monkeypatch, capsys, tmp_path):
    flax_params(monkeypatch, transpose_w_key_flax)
    path = str(tmp_path / "x.npy")
    np.save(path, X)
    code = cli.main(["--stages", "--variant", "MultiHeadAttention", "--input", path, "--d-out", "8",
                     "--num-heads", "2", "--backends", "flax", "--json", "-"])
    captured = capsys.readouterr()
    assert code == 1
    report = json.loads(captured.out)  # stdout: the JSON alone
    (entry,) = report["stages"]
    assert entry["backends"][0]["first_failing_stage"] == "keys"
    assert "first stage over its bound: keys" in captured.err


def test_cli_refuses_what_stages_do_not_cover(capsys):
    assert cli.main(["--stages", "--decode", "2"]) == 2
    assert "--decode" in capsys.readouterr().err
    assert cli.main(["--stages", "--backends", "torch"]) == 2
    assert "add flax or ttnn" in capsys.readouterr().err
    assert cli.main(["--stages", "--variant", "LlamaAttention"]) == 2  # transformers' layers have no re-run here
    assert "LlamaAttention" in capsys.readouterr().err


def test_seed_sentence_labels():
    assert stages.token_labels(None, 6) == list(TOKENS)
    assert stages.token_labels(X, 5) == ["0", "1", "2", "3", "4"]
