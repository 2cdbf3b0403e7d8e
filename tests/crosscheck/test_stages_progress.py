"""Progress bars: on a terminal (both streams) for the main run, ``--stages`` and ``bench`` sweeps; never
when output is piped, with ``-q`` or with ``--json -`` (which prints the JSON alone on stdout)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from crosscheck import cli
from crosscheck.pipeline import progress

TWO_VARIANTS = ["--variant", "CausalAttention", "--variant", "SelfAttentionV2", "--backends", "torch,flax"]
TINY_BENCH = ["bench", "--tokens", "8,12", "--batch", "1", "--d-model", "8", "--heads", "2", "--repeats", "2",
              "--warmup", "0", "--impls", "jax-naive,torch-book", "--memory", "none"]


class FakeBar:
    """Records what a :class:`crosscheck.pipeline.progress.Bar` is given."""

    made: list["FakeBar"] = []

    def __init__(self, console=None):
        self.steps, self.closed = [], False
        FakeBar.made.append(self)

    def __call__(self, done, total, description):
        self.steps.append((done, total, description))

    def close(self):
        self.closed = True


@pytest.fixture
def fake_bar(monkeypatch):
    FakeBar.made = []
    monkeypatch.setattr(progress, "Bar", FakeBar)
    return FakeBar


def terminal(monkeypatch, stdout: bool = True, stderr: bool = True):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: stderr, raising=False)


def test_main_run_shows_a_bar_on_a_terminal(monkeypatch, capsys, fake_bar):
    terminal(monkeypatch)
    assert cli.main(TWO_VARIANTS) == 0
    (bar,) = fake_bar.made
    assert bar.closed and [s[:2] for s in bar.steps] == [(i, 4) for i in range(1, 5)]  # 2 variants x torch, flax
    assert bar.steps[-1][2] == "flax SelfAttentionV2"


@pytest.mark.parametrize("stdout,stderr", [(False, True), (True, False)])
def test_no_bar_when_output_is_not_a_terminal(monkeypatch, capsys, fake_bar, stdout, stderr):
    terminal(monkeypatch, stdout, stderr)
    assert cli.main(TWO_VARIANTS) == 0
    assert fake_bar.made == []


def test_json_to_stdout_alone_and_no_bar(monkeypatch, capsys, fake_bar):
    terminal(monkeypatch)
    assert cli.main(TWO_VARIANTS + ["--json", "-"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # nothing but the JSON on stdout
    assert report["passed"] and {r["variant"] for r in report["results"]} == {"CausalAttention", "SelfAttentionV2"}
    assert "all 4 checks passed" in captured.err  # the table went to stderr
    assert fake_bar.made == []


def test_stages_bar_counts_every_backend_of_every_variant(monkeypatch, capsys, fake_bar):
    terminal(monkeypatch)
    assert cli.main(["--stages", "--variant", "CausalAttention", "--backends", "flax,ttnn", "--ttnn-runtime", "host"]) == 0
    (bar,) = fake_bar.made
    assert bar.steps[-1][:2] == (3, 3) and bar.closed  # torch, flax and ttnn stages of one variant


def test_bench_sweep_bar_steps_through_every_round(monkeypatch, capsys, fake_bar):
    terminal(monkeypatch)
    assert cli.main(TINY_BENCH) == 0
    (bar,) = fake_bar.made
    assert [s[0] for s in bar.steps] == list(range(1, 7)) and {s[1] for s in bar.steps} == {6}  # 2 shapes x (1 + 2)
    assert bar.steps[0][2].startswith("tokens=8") and bar.steps[-1][2].startswith("tokens=12")
    assert bar.closed


def test_bench_piped_has_no_bar(monkeypatch, capsys, fake_bar):
    terminal(monkeypatch, stdout=False)
    assert cli.main(TINY_BENCH) == 0
    assert fake_bar.made == []
    assert "tokens=12" in capsys.readouterr().out


def test_the_real_bar_draws_on_a_terminal_console():
    from rich.console import Console

    buf = io.StringIO()
    bar = progress.Bar(Console(file=buf, force_terminal=True, width=100))
    bar(1, 4, "flax CausalAttention")
    bar(4, 4, "ttnn CausalAttention")
    bar.close()
    text = buf.getvalue()
    assert "CausalAttention" in text and "4/4" in text
