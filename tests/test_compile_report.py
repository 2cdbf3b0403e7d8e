"""JAXATTN_COMPILE_REPORT (tests/conftest.py) and tools/compile_report.py: counts one can check by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]


def test_each_test_that_compiles_gets_a_line_with_its_programs(tmp_path):
    env = dict(os.environ, JAXATTN_COMPILE_REPORT=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop("PYTEST_XDIST_WORKER", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "tests/compile_report_probe.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [json.loads(line) for line in (tmp_path / "compiles-main.jsonl").read_text().splitlines()]
    assert [(row["test"], row["programs"]) for row in lines] == [
        ("tests/compile_report_probe.py::test_three_shapes_compile_three_programs", 3)]
    assert lines[0]["backend"] == jax.default_backend() and lines[0]["compile_s"] > 0

    report = subprocess.run([sys.executable, "tools/compile_report.py", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert report.startswith(f"{jax.default_backend()}: 1 tests compiled 3 programs in ")
    assert "tests/compile_report_probe.py::test_three_shapes_compile_three_programs" in report
