"""``crosscheck --plot DIR``: PNGs that open, have the expected size and are not blank; token labels;
the directory checked before the work; a user's file never replaced unasked; exit 2 without matplotlib."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from crosscheck import cli
from crosscheck.checks import plots, stages
from crosscheck.seed import TOKENS

pytest.importorskip("matplotlib", reason="--plot draws with matplotlib (the [plot] extra)")
from matplotlib import image  # noqa: E402

RUN = ["--variant", "MultiHeadAttention", "--variant", "CausalAttention", "--backends", "torch,flax,ttnn",
       "--ttnn-runtime", "host", "-q"]


def pixels(path) -> np.ndarray:
    img = image.imread(str(path))  # (height, width, RGBA) floats in [0, 1]
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img


def test_stages_and_plot_write_one_png_per_variant_and_a_summary(tmp_path, capsys):
    out = tmp_path / "plots"
    assert cli.main(["--stages", "--plot", str(out), *RUN]) == 0
    assert sorted(os.listdir(out)) == ["CausalAttention.png", "MultiHeadAttention.png", "summary.png"]
    # MultiHeadAttention: 2 heads x (torch, flax, |flax-torch|, ttnn, |ttnn-torch|) at 100 dpi
    mha = pixels(out / "MultiHeadAttention.png")
    assert mha.shape[:2] == (int((2.5 * 2 + 0.8) * 100), int((2.7 * 5 + 0.5) * 100))
    causal = pixels(out / "CausalAttention.png")
    assert causal.shape[:2] == (int((2.5 * 1 + 0.8) * 100), int((2.7 * 5 + 0.5) * 100))
    summary = pixels(out / "summary.png")
    assert summary.shape[:2] == (420, 600)
    for img in (mha, causal, summary):
        rgb = img[..., :3]
        assert rgb.std() > 0.05  # not blank: heatmaps, labels and bars
        assert (rgb.reshape(-1, 3).max(axis=1) - rgb.reshape(-1, 3).min(axis=1)).max() > 0.3  # colour, not grey only
    assert "wrote 3 PNG(s)" in capsys.readouterr().err


def test_heatmaps_are_labelled_with_the_seed_sentence_and_show_the_weights():
    plt = plots.require_matplotlib()
    report = stages.run(["MultiHeadAttention"], backends=["flax"])
    fig = plots.variant_figure(plt, report.variants[0], report.labels)
    try:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == list(TOKENS)
        assert [t.get_text() for t in ax.get_yticklabels()] == list(TOKENS)
        shown = ax.images[0].get_array()
        np.testing.assert_array_equal(shown, report.variants[0].arrays["torch"]["weights"][0, 0])
        assert np.triu(np.asarray(shown), 1).max() == 0.0  # causal: nothing above the diagonal
    finally:
        plt.close(fig)


def test_plot_alone_keeps_the_forward_report(tmp_path, capsys):
    out = tmp_path / "p"
    assert cli.main(["--plot", str(out), "--variant", "SelfAttentionV1", "--backends", "torch,flax"]) == 0
    text = capsys.readouterr().out
    assert "SelfAttentionV1" in text and "all 2 checks passed" in text  # the forward check's table
    assert sorted(os.listdir(out)) == ["SelfAttentionV1.png", "summary.png"]


def test_an_existing_png_is_never_replaced_unasked(tmp_path, capsys):
    (tmp_path / "summary.png").write_bytes(b"mine")
    assert cli.main(["--stages", "--plot", str(tmp_path), *RUN]) == 2
    err = capsys.readouterr().err
    assert "summary.png already there" in err and "--plot-overwrite" in err
    assert (tmp_path / "summary.png").read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["summary.png"]  # refused before any work
    assert cli.main(["--stages", "--plot", str(tmp_path), "--plot-overwrite", *RUN]) == 0
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_directories_are_exit_2(tmp_path, capsys):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert cli.main(["--stages", "--plot", str(a_file), *RUN]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["--stages", "--plot", str(tmp_path / "no" / "such"), *RUN]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_without_matplotlib_plot_is_exit_2_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main(["--stages", "--plot", str(tmp_path / "p"), *RUN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[plot]" in err and "matplotlib" in err
    assert not (tmp_path / "p").exists()
