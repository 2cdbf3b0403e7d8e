"""Cross-checking an attention layer the project does not have: ``crosscheck.register_variant`` and ``--plugin``.

The plugin (``plugins/alibi.py``, also the worked example of docs/own_attention.md) is ALiBi causal attention,
which none of the project's modules implements; ``plugins/alibi_swapped.py`` ports it wrongly (``W_key`` and
``W_value`` swapped in its table) and ``plugins/alibi_nnx.py`` adds an NNX twin. Everything runs through
``crosscheck.cli.main`` in this process; every test's registrations are undone (:func:`registrations`).
"""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import crosscheck  # noqa: E402
from crosscheck.cli import main  # noqa: E402
from crosscheck.porting import port  # noqa: E402
from crosscheck.variants import plugins, registry  # noqa: E402

HERE = Path(__file__).parent / "plugins"
ALIBI, SWAPPED, NNX = (str(HERE / f) for f in ("alibi.py", "alibi_swapped.py", "alibi_nnx.py"))


@pytest.fixture(autouse=True)
def no_leaks(monkeypatch):
    """Registrations and the plugins' modules as they were; no colour, a wide table."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    names = registry.names()
    with plugins.registrations():
        yield
    assert registry.names() == names


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_plugins_table_passes_and_says_why_there_is_no_ttnn_row(capsys):
    code, out, err = cli(capsys, "--plugin", ALIBI, "--variant", "ALiBiAttention", "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"torch", "flax"} and all(r["passed"] for r in rows.values())
    assert rows["flax"]["max_abs_err"] < 1e-6
    assert report["mode"]["skipped_backends"]["ttnn"] == "not run: no ttnn program registered for ALiBiAttention"
    assert report["input"]["source"] == "seed"  # d_in = 3: the book's sentence
    assert "ttnn: not run: no ttnn program registered for ALiBiAttention" in err  # the table went to stderr
    assert "all 2 checks passed" in err


def test_the_table(capsys):
    code, out, _ = cli(capsys, "--plugin", ALIBI, "--variant", "alibiattention")
    assert code == 0
    assert "ALiBiAttention" in out and "flax (cpu)" in out and "all 2 checks passed" in out


def test_a_wrong_port_fails_and_stages_name_the_wrong_projection(capsys):
    code, out, err = cli(capsys, "--plugin", SWAPPED, "--variant", "ALiBiSwapped", "--backends", "torch,flax")
    assert code == 1 and "mismatch in ALiBiSwapped" in err
    code, out, err = cli(capsys, "--plugin", SWAPPED, "--variant", "ALiBiSwapped", "--stages", "--json", "-")
    assert code == 1
    flax = json.loads(out)["stages"][0]["backends"][0]
    assert flax["first_failing_stage"] == "W_key"
    assert [s["stage"] for s in flax["stages"]] == ["W_query", "W_key", "W_value", "out_proj", "output"]
    assert [s["passed"] for s in flax["stages"]] == [True, False, False, False, False]
    assert "first stage over its bound: W_key" in err


def test_the_right_port_passes_every_stage(capsys):
    code, out, _ = cli(capsys, "--plugin", ALIBI, "--variant", "ALiBiAttention", "--stages")
    assert code == 0
    assert "W_query" in out and "out_proj" in out and "every stage of 1 variant(s) within its bound" in out


def test_grad_passes(capsys):
    code, out, err = cli(capsys, "--plugin", ALIBI, "--variant", "ALiBiAttention", "--grad", "--json", "-")
    assert code == 0, err
    names = {r["reference"] for r in json.loads(out)["results"]}
    assert {"torch grad: input", "torch grad: W_key.weight", "torch grad: out_proj.bias"} <= names


def test_train_runs_a_plugin_without_dropout_as_it_is(capsys):
    code, out, err = cli(capsys, "--plugin", ALIBI, "--variant", "ALiBiAttention", "--train", "--json", "-")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert [r["reference"] for r in rows] == ["torch float64, no dropout", "torch float32, no dropout"]
    assert all(r["passed"] for r in rows)


WINDOW = str(HERE / "window_dropout.py")


def test_train_gives_a_plugins_dropout_sites_the_same_masks_in_torch_and_flax(capsys):
    """The plugin drops with ``flax.linen.Dropout`` and ``torch.nn.Dropout``: each Flax call gets its site's
    mask, torch's module the same one, and the outputs agree; at rate 0.5 about half the weights are kept."""
    args = ("--plugin", WINDOW, "--variant", "WindowDropout", "--dropout", "0.5", "--json", "-")
    code, out, err = cli(capsys, *args, "--train", "--grad")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert rows and all(r["passed"] for r in rows)
    train = [r for r in rows if r["reference"] == "torch float32, same masks"]
    assert train and train[0]["detail"]["dropout"] == 0.5 and train[0]["detail"]["sites"] == 1
    assert 0.2 < train[0]["detail"]["kept_fraction"] < 0.8  # 36 weights at keep probability 1/2
    assert {"torch grad: input", "torch grad: W_key.weight"} <= {r["reference"] for r in rows}


def test_train_refuses_dropout_sites_that_do_not_pair(capsys):
    code, _, err = cli(capsys, "--plugin", WINDOW, "--variant", "WindowDropoutTwice", "--train")
    assert code == 2 and err.count("\n") == 1
    assert "1 torch dropout module(s) (dropout) but the Flax module applies dropout at 2 site(s)" in err


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_load_by_name(capsys, tmp_path, suffix):
    with plugins.registrations():
        sys.path.insert(0, str(HERE))
        try:
            import alibi
        finally:
            sys.path.remove(str(HERE))
        torch.manual_seed(5)
        layer = alibi.TorchALiBiAttention(3, 4, 2, 6)
    path = tmp_path / f"alibi{suffix}"
    port.save_file(layer.state_dict(), path) if suffix == ".safetensors" else torch.save(layer.state_dict(), path)
    code, out, err = cli(
        capsys, "--plugin", ALIBI, "--variant", "ALiBiAttention", "--weights", str(path), "--json", "-"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["weights"] == str(path)
    torch_row = next(r for r in report["results"] if r["backend"] == "torch")
    assert torch_row["passed"] and report["configs"]["ALiBiAttention"]["d_out"] == 4

    bad = {**layer.state_dict(), "W_key.weight": torch.zeros(3, 4), "extra": torch.zeros(1)}
    torch.save(bad, tmp_path / "bad.pt")
    code, _, err = cli(capsys, "--plugin", ALIBI, "--variant", "ALiBiAttention", "--weights", str(tmp_path / "bad.pt"))
    assert code == 2
    assert "'W_key.weight': expected shape (4, 3), found (3, 4)" in err and "unexpected key 'extra'" in err


def test_nnx_twin(capsys):
    code, out, err = cli(capsys, "--plugin", NNX, "--variant", "ALiBiAttentionNNX", "--api", "both", "--json", "-")
    assert code == 0, err
    assert [r["backend"] for r in json.loads(out)["results"]] == ["torch", "flax", "flax-nnx"]
    code, _, err = cli(capsys, "--plugin", ALIBI, "--variant", "ALiBiAttention", "--api", "nnx")
    assert code == 2 and "no nnx Flax class registered" in err


def test_other_dimensions_run_on_random_inputs(capsys):
    code, out, err = cli(capsys, "--plugin", ALIBI, "--variant", "ALiBiAttention", "--d-in", "5", "--d-out", "6",
                         "--num-heads", "3", "--seed", "2", "--json", "-")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["input"]["source"] == "random" and report["results"][1]["shape"] == [1, 6, 6]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no/such/plugin.py", "--plugin no/such/plugin.py: no such file"),
        ("no_such_plugin_module", "cannot import module 'no_such_plugin_module': ModuleNotFoundError"),
    ],
)
def test_a_missing_plugin_exits_2_with_one_line(capsys, spec, message):
    code, out, err = cli(capsys, "--plugin", spec)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


def test_a_plugin_that_raises_exits_2_naming_it(capsys, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no GPU here')\n")
    code, _, err = cli(capsys, "--plugin", str(broken))
    assert code == 2 and err.count("\n") == 1
    assert f"--plugin {broken}: importing it raised RuntimeError: no GPU here" in err
    assert "broken" not in sys.modules


def test_a_module_plugin_and_an_entry_point(capsys, monkeypatch):
    """A module by name, and an installed package's entry point (group crosscheck.variants) called at start."""
    monkeypatch.syspath_prepend(str(HERE))
    code, out, err = cli(capsys, "--plugin", "alibi", "--variant", "ALiBiAttention", "-q")
    assert code == 0, err

    calls = []

    def register():
        calls.append(1)
        import alibi_swapped  # noqa: F401 - registers ALiBiSwapped (and ALiBiAttention, which it imports)

    class EntryPoint:
        name, value = "alibi", "alibi_plugin:register"

        def load(self):
            return register

    def entry_points(group):
        return [EntryPoint()] if group == plugins.ENTRY_POINT_GROUP else []

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    code, out, err = cli(capsys, "--variant", "ALiBiSwapped", "--backends", "torch", "-q")
    assert code == 0, err
    assert calls == [1] and "ALiBiSwapped" in registry.names()

    def failing(group):
        return [types.SimpleNamespace(name="bad", value="bad:register", load=lambda: 1 / 0)]

    monkeypatch.setattr("importlib.metadata.entry_points", failing)
    code, _, err = cli(capsys, "--variant", "ALiBiSwapped")
    assert code == 2 and "entry point 'bad' (bad:register) of group crosscheck.variants: ZeroDivisionError" in err


# --- the registration call ----------------------------------------------------------------------------


def _classes():
    sys.path.insert(0, str(HERE))
    try:
        import alibi
    finally:
        sys.path.remove(str(HERE))
    return alibi


def test_registration_errors_are_clear():
    alibi = _classes()  # registers ALiBiAttention
    kw = dict(torch_module=alibi.TorchALiBiAttention, flax_module=alibi.ALiBiAttention, config={"d_in": 3})
    with pytest.raises(ValueError, match=r"'MultiHeadAttention': the name is taken by a built-in variant"):
        crosscheck.register_variant("MultiHeadAttention", **kw)
    with pytest.raises(ValueError, match=r"'alibiattention': the name is taken by a variant registered before"):
        crosscheck.register_variant("alibiattention", **kw)
    with pytest.raises(ValueError, match=r"config key\(s\) 'heads', 'window' are not AttnConfig fields"):
        crosscheck.register_variant("Other", **{**kw, "config": {"d_in": 3, "heads": 2, "window": 4}})
    with pytest.raises(TypeError, match=r"flax\.linen\.Module or flax\.nnx\.Module"):
        crosscheck.register_variant("Other", **{**kw, "flax_module": alibi.TorchALiBiAttention})
    assert "Other" not in registry.names()
    with pytest.raises(ValueError, match="only registered ones"):
        crosscheck.unregister_variant("MultiHeadAttention")


def test_the_registry_and_from_torch_see_a_registered_variant():
    alibi = _classes()
    entry = registry.get("ALiBiAttention")
    assert entry.family == plugins.FAMILY and entry in registry.VARIANTS and entry not in registry.default_run()
    assert entry.no_ttnn and entry.ttnn_program == ""
    torch.manual_seed(0)
    layer = alibi.TorchALiBiAttention(3, 4, 2, 6)  # the book's W_query... names: still recognised as itself
    flax_module, variables = port.from_torch(layer)
    assert type(flax_module) is alibi.ALiBiAttention
    x = np.random.default_rng(1).normal(size=(2, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(flax_module.apply(variables, x)), layer(torch.from_numpy(x)).detach().numpy(), atol=1e-5
    )
    assert sorted(port.to_state_dict(flax_module, variables)) == sorted(layer.state_dict())
    crosscheck.unregister_variant("ALiBiAttention")
    assert "ALiBiAttention" not in registry.names() and "ALiBiAttention" not in registry.TTNN_BF16_TOLERANCE


def test_import_crosscheck_stays_light():
    import subprocess

    code = (
        "import sys, crosscheck\n"
        "assert callable(crosscheck.register_variant)\n"
        "print(sorted(m for m in ('torch', 'jax', 'flax') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_docs_page_shows_the_plugin_unchanged():
    page = (Path(__file__).parents[2] / "docs" / "own_attention.md").read_text()
    assert f"```python\n{(HERE / 'alibi.py').read_text()}```" in page


def test_padding_and_decode_refuse_a_plugin(capsys):
    code, _, err = cli(
        capsys, "--plugin", ALIBI, "--variant", "ALiBiAttention", "--padding", "left", "--pad-lengths", "0,2"
    )
    assert code == 2 and "its forward takes no padding mask" in err
    code, _, err = cli(capsys, "--plugin", ALIBI, "--variant", "ALiBiAttention", "--decode", "3")
    assert code == 2 and "ALiBiAttention cannot decode" in err


def test_a_ttnn_program_given_at_registration_gets_a_ttnn_row(capsys):
    """The book's classes registered as a plugin, with the project's ttnn program: a ttnn row on the host model."""
    from crosscheck.references import torch_ref
    from crosscheck.tt import programs
    from jaxattn.multihead import MultiHeadAttention

    crosscheck.register_variant(
        "BookMHAPlugin",
        torch_module=torch_ref.MultiHeadAttention,
        flax_module=MultiHeadAttention,
        config={"d_in": 3, "d_out": 4, "context_length": 6, "dropout": 0.0, "num_heads": 2},
        ttnn_program=programs.multi_head_attention,
        bf16_roundings=registry.BF16_ROUNDINGS["MultiHeadAttention"],
    )
    code, out, err = cli(capsys, "--variant", "BookMHAPlugin", "--ttnn-runtime", "host", "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert [r["backend"] for r in report["results"]] == ["torch", "flax", "ttnn"]
    assert "skipped_backends" not in (report["mode"] or {})
