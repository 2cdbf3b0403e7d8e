"""The two audiences' installs, as far as the checkout can show them (tools/package_check.sh checks the wheel).

jaxattn alone must not need torch; crosscheck without its extra names the install in one line.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jaxattn

ROOT = Path(__file__).resolve().parents[1]
POISON = "import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None\n"


def run(code, *args, env=None):
    env = {k: v for k, v in os.environ.items() if k != "CROSSCHECK_WORKER"} | (env or {})
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)


def test_versions_agree_with_the_distribution():
    crosscheck = pytest.importorskip("crosscheck")
    assert jaxattn.__version__ == crosscheck.__version__ == importlib.metadata.version("jaxattn")


def test_jaxattn_imports_and_runs_without_torch():
    code = POISON + (
        "import jax, numpy as np, jaxattn, jaxattn.nnx\n"
        "q = np.ones((1, 3, 1, 2), np.float32)\n"
        "print(np.asarray(jaxattn.dot_product_attention(q, q, q, is_causal=True)).shape)\n"
    )
    out = run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 3, 1, 2)"


def test_import_crosscheck_without_the_extra_names_the_install():
    out = run(POISON + "import crosscheck\n")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1
    assert last == ("crosscheck.extra.MissingExtraError: crosscheck needs torch, safetensors, which jaxattn alone "
                    "does not install: pip install 'jaxattn[crosscheck]'")


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_the_command_without_the_extra_is_one_line_and_exit_2(how):
    # runpy's `-m crosscheck` and the console script both reach crosscheck.extra.require() at import.
    if how == "python -m":
        code = POISON + "import runpy, sys; sys.orig_argv = [sys.executable, '-m', 'crosscheck']; " \
                        "runpy.run_module('crosscheck', run_name='__main__', alter_sys=True)\n"
    else:
        code = POISON + "import sys; sys.argv = ['/usr/bin/crosscheck']; from crosscheck.cli import main\n"
    out = run(code)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        "crosscheck: error: crosscheck needs torch, safetensors, which jaxattn alone does not install: "
        "pip install 'jaxattn[crosscheck]'"
    ]


def test_the_ttnn_worker_interpreter_skips_the_check():
    out = run(POISON + "import crosscheck.variants.registry; print('ok')\n", env={"CROSSCHECK_WORKER": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
