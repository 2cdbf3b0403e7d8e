"""Which interpreter may import what is a property of the folder.

The ttnn worker runs in an interpreter with numpy and ttnn but neither torch nor JAX/Flax, and it
imports the variant registry and the ttnn path. So every module under ``crosscheck/variants/`` and
``crosscheck/tt/`` (found on disk, so that a new file is covered the day it lands) must import with
torch, jax and flax poisoned in ``sys.modules``; the control shows the poison bites.
"""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import crosscheck

ROOT = Path(__file__).resolve().parents[2]
#: The folders the ttnn worker's interpreter imports from.
NUMPY_ONLY = ("variants", "tt")

_POISON = (
    "import sys\n"
    "sys.modules['torch'] = sys.modules['jax'] = sys.modules['flax'] = None\n"
    "import importlib\n"
    "for name in {names!r}:\n"
    "    importlib.import_module(name)\n"
    "    print('imported', name)\n"
)


def numpy_only_modules() -> list[str]:
    """Every module under the numpy-only folders, packages included."""
    found = []
    for folder in NUMPY_ONLY:
        package = f"{crosscheck.__name__}.{folder}"
        found.append(package)
        path = [str(Path(crosscheck.__file__).parent / folder)]
        found += [m.name for m in pkgutil.walk_packages(path, prefix=package + ".")]
    return found


def import_poisoned(names: list[str]) -> subprocess.CompletedProcess:
    """Import ``names`` in a fresh interpreter where torch, jax and flax cannot be imported, as the worker."""
    env = {**os.environ, "CROSSCHECK_WORKER": "1"}
    code = _POISON.format(names=names)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)


def test_the_numpy_only_folders_are_found():
    modules = numpy_only_modules()
    on_disk = {p.stem for folder in NUMPY_ONLY for p in (ROOT / "crosscheck" / folder).glob("*.py")} - {"__init__"}
    assert {m.rsplit(".", 1)[1] for m in modules if m.count(".") == 2} == on_disk
    assert {"crosscheck.variants.registry", "crosscheck.tt.programs", "crosscheck.tt.worker"} <= set(modules)


def test_variants_and_tt_import_without_torch_jax_or_flax():
    modules = numpy_only_modules()
    out = import_poisoned(modules)
    assert out.returncode == 0, f"a module under crosscheck/{{variants,tt}}/ needs torch, jax or flax:\n{out.stderr}"
    assert out.stdout.split("\n")[:-1] == [f"imported {m}" for m in modules]


@pytest.mark.parametrize("module", ["crosscheck.references.torch_ref", "jaxattn"])
def test_the_poison_bites(module):
    """Control: a module that needs torch or JAX fails in the same poisoned interpreter."""
    out = import_poisoned([module])
    assert out.returncode != 0, f"{module} imported with torch, jax and flax poisoned: the poison does not work"
    assert "ModuleNotFoundError" in out.stderr or "ImportError" in out.stderr, out.stderr
