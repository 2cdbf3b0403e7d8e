"""Progress bars for long runs (many variants, large ``--tokens``, ``bench`` sweeps): rich, on stderr, terminals only.

A bar is shown only when both stdout and stderr are terminals: rich keeps its bar below what is
printed by redirecting stdout through its console while the bar lives, which would send a piped
report (``crosscheck bench > out.txt``) to stderr. Never with ``-q`` or with the JSON report on
stdout (``--json -``). The bar is transient: gone once the run ends.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

#: ``progress(done, total, description)``: called after each step of a run (a :class:`Bar` is one).
Progress = Callable[[int, int, str], None]


def wanted(*, quiet: bool = False, json_path: str | None = None) -> bool:
    """Whether a run should show a bar: both streams terminals, not ``quiet``, JSON not on stdout."""
    return not quiet and json_path != "-" and sys.stdout.isatty() and sys.stderr.isatty()


class Bar:
    """``bar(done, total, description)``: a rich bar on ``console`` (stderr's by default), started on the first step."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<40}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console or Console(file=sys.stderr),
            transient=True,
        )
        self._task = None

    def __call__(self, done: int, total: int, description: str) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(description, total=total)
        self._progress.update(self._task, completed=done, description=description)

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()


class Steps:
    """Counts steps of a known total into an optional :class:`Bar` or other :data:`Progress` (``None``: counts only)."""

    def __init__(self, total: int, bar: Progress | None):
        self.total, self.done, self.bar = total, 0, bar

    def step(self, description: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar(self.done, self.total, description)

    def close(self) -> None:
        if isinstance(self.bar, Bar):
            self.bar.close()
