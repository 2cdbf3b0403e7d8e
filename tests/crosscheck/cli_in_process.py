"""``crosscheck.cli.main`` in this process, answered as the console script's subprocess is answered.

A new interpreter imports torch, JAX and Flax and traces every program again (seconds each); in this
process they are imported and compiled once. Tests whose subject is the process itself (a signal, a
device count XLA reads at start-up, what an import pulls in) keep their subprocesses.
"""

import contextlib
import io
import subprocess

import pytest

#: What the console script's subprocesses get on top of the test's environment: no colour codes, and a
#: terminal width at which argparse's help text does not wrap.
ENV = {"NO_COLOR": "1", "COLUMNS": "200"}


def main_in_process(argv, cwd=None) -> subprocess.CompletedProcess:
    """``returncode``, ``stdout`` and ``stderr`` of ``cli.main(argv)`` run in ``cwd`` with :data:`ENV`.

    argparse's ``SystemExit`` (``--help``, a usage error) gives its code. Any other exception propagates: a
    subprocess would show it as exit 1 with a traceback on stderr, which every caller counts as a failure.
    Needs no fixture (``pytest.MonkeyPatch.context``, not ``monkeypatch``), so a module-scoped fixture can
    call it too.
    """
    from crosscheck.cli import main

    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for name, value in ENV.items():
            patch.setenv(name, value)
        if cwd is not None:
            patch.chdir(cwd)
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = 0 if exit_.code is None else exit_.code
    return subprocess.CompletedProcess(["crosscheck", *argv], code, out.getvalue(), err.getvalue())
