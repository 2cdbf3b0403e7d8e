"""The ``[crosscheck]`` extra: what ``crosscheck`` needs beyond jaxattn, checked when the package loads.

``pip install jaxattn`` brings JAX and Flax for the layers alone; the cross-checks also need torch (the
references), safetensors (weight files) and rich (tables). Without them ``import crosscheck`` raises
:class:`MissingExtraError` and the ``crosscheck`` command prints one line and exits 2, both naming the
install command, instead of failing later inside some import.

The ttnn worker (:mod:`crosscheck.tt.worker`) runs in an interpreter that holds numpy and ttnn (or JAX and
Flax) but never torch, by design: :func:`crosscheck.tt.worker.run_in_interpreter` sets ``CROSSCHECK_WORKER=1``
for it, and the check is skipped there.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys

#: The import names the extra provides (``pyproject.toml``'s ``crosscheck`` extra).
REQUIRED = ("torch", "safetensors", "rich")
INSTALL = "pip install 'jaxattn[crosscheck]'"
WORKER_ENV = "CROSSCHECK_WORKER"


class MissingExtraError(ModuleNotFoundError):
    """``import crosscheck`` without the ``[crosscheck]`` extra installed (a module it needs is not found,
    hence the base class: ``pytest.importorskip`` and ``except ModuleNotFoundError`` treat it as such)."""


def missing() -> list[str]:
    """The names in :data:`REQUIRED` that this interpreter cannot import."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def message(names: list[str]) -> str:
    return f"crosscheck needs {', '.join(names)}, which jaxattn alone does not install: {INSTALL}"


def _running_as_command() -> bool:
    """The ``crosscheck`` console script or ``python -m crosscheck``, as opposed to an ``import``."""
    if sys.argv and os.path.basename(sys.argv[0]) in ("crosscheck", "crosscheck.exe"):
        return True
    orig = list(getattr(sys, "orig_argv", []))  # the interpreter's own argv: [python, -m, crosscheck, ...]
    return any(a == "-m" and b.split(".")[0] == "crosscheck" for a, b in itertools.pairwise(orig))


def require() -> None:
    """Raise :class:`MissingExtraError` (or, run as the command, exit 2 with one line) if the extra is missing."""
    if os.environ.get(WORKER_ENV) == "1":
        return
    names = missing()
    if not names:
        return
    if _running_as_command():
        print(f"crosscheck: error: {message(names)}", file=sys.stderr)
        raise SystemExit(2)
    raise MissingExtraError(message(names))
