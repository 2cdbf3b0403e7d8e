"""Conformance tests: run only in ``.venv-ttnn`` (CPython 3.12, the real ``ttnn==0.81.1``, JAX 0.7.0).

``make test`` runs them as a second pytest session with that interpreter; the main
session (Python 3.11, torch, no ttnn) does not collect this folder. Run by hand:

    .venv-ttnn/bin/python -m pytest tests/conformance

Every test here is marked ``conformance``. Without an importable ``ttnn`` they are
skipped with the reason, so a wrong interpreter shows up as skips, never as failures.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

_NO_TTNN = None if importlib.util.find_spec("ttnn") else (
    f"the real ttnn is not importable in {sys.executable}; these tests run in .venv-ttnn (make test)"
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.conformance)
            if _NO_TTNN:
                item.add_marker(pytest.mark.skip(reason=_NO_TTNN))


@pytest.fixture(scope="session")
def real_ttnn():
    """The real ``ttnn`` package, imported in this process (no device, no mock cluster)."""
    import ttnn

    return ttnn

