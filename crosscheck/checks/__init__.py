"""The checks: one module each, one protocol, ``run(cases, request, progress) -> CheckOutcome``.

:func:`crosscheck.pipeline.engine.run` builds the cases of a :class:`~crosscheck.pipeline.request.RunRequest`
and hands them to the check :func:`select` picks, the first in :data:`CHECKS` that applies to the
request; the outcome (:class:`~crosscheck.pipeline.results.CheckOutcome`) becomes the report. A new
check is one module here and one line in :data:`CHECKS`. ``--stages`` and ``--plot``
(:mod:`crosscheck.checks.stages`, :mod:`crosscheck.checks.plots`) have reports of their own and their
own entry points. Modules are imported when chosen: importing this package imports no check.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from crosscheck.pipeline.cases import Case
    from crosscheck.pipeline.progress import Progress
    from crosscheck.pipeline.request import RunRequest
    from crosscheck.pipeline.results import CheckOutcome


class Check(Protocol):
    """A check module."""

    def run(self, cases: Sequence[Case], request: RunRequest, progress: Progress | None) -> CheckOutcome: ...


#: ``(module, applies(request))`` in the order tried; the forward check takes whatever no other does.
CHECKS: tuple[tuple[str, Callable[[RunRequest], bool]], ...] = (
    ("crosscheck.checks.train_check", lambda r: r.train or r.grad),
    ("crosscheck.checks.decode_check", lambda r: r.decode is not None),
    ("crosscheck.checks.padding_check", lambda r: r.padding is not None),
    ("crosscheck.checks.sharding_check", lambda r: r.shard is not None),
    ("crosscheck.checks.forward", lambda r: True),
)


def select(request: RunRequest) -> Check:
    """The check that runs ``request``."""
    name = next(module for module, applies in CHECKS if applies(request))
    return cast(Check, importlib.import_module(name))
