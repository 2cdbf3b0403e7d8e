"""``crosscheck``: the command line over :mod:`crosscheck.pipeline.engine` (parse, run, render, exit code).

Exit codes: 0 every check passed, 1 a mismatch (the failing variants are named),
2 bad usage or bad input (one ``crosscheck: error: ...`` line on stderr, no traceback),
130 interrupted by Ctrl-C (one ``crosscheck: interrupted`` line, nothing written).

By role: :mod:`~crosscheck.cli.parser` (the argument parsers; help texts in :mod:`~crosscheck.cli.help`),
:mod:`~crosscheck.cli.runner` (the run: argv -> request -> report), :mod:`~crosscheck.cli.commands` (bundle,
bench, convert), and here :func:`main`, which maps errors to exit codes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from crosscheck.cli import commands
from crosscheck.cli.help import DESCRIPTION, EPILOG
from crosscheck.cli.parser import (
    MAX_INT,
    PROG,
    SUBCOMMANDS,
    Parser,
    build_bundle_parser,
    build_convert_parser,
    build_parser,
)
from crosscheck.cli.runner import one_line, run
from crosscheck.errors import BadInputError, MismatchError

__all__ = [
    "DESCRIPTION",
    "EPILOG",
    "MAX_INT",
    "PROG",
    "SUBCOMMANDS",
    "Parser",
    "build_bundle_parser",
    "build_convert_parser",
    "build_parser",
    "exit_code",
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit code.

    Ctrl-C (SIGINT) ends any command with exit 130, one ``crosscheck: interrupted`` line and nothing
    written (:func:`crosscheck.porting.outputs.sigint_guard`), also when a callback swallowed the
    ``KeyboardInterrupt`` and the run went on: the guard's record decides, not the exception.
    """
    from crosscheck.porting.outputs import sigint_guard

    argv = list(sys.argv[1:] if argv is None else argv)
    with sigint_guard() as guard:
        try:
            code = exit_code(argv)
        except KeyboardInterrupt:
            guard.interrupted = True  # one that bypassed the handler (main() off the main thread): same rule
            code = 130
        except BaseException:  # argparse's SystemExit, or whatever a swallowed interrupt led to
            if not guard.interrupted:
                raise
            code = 130
        if guard.interrupted:
            code = 130
    if code == 130:
        print(f"{PROG}: interrupted", file=sys.stderr)
    return code


def exit_code(argv: list[str]) -> int:
    """Run the command ``argv``; its errors as exit codes: 2 bad input, 1 a mismatch, 130 interrupted."""
    from crosscheck.porting.outputs import interrupted

    try:
        if argv and argv[0] == "bench":
            return commands.bench(argv[1:])
        if argv and argv[0] == "bundle":
            return commands.bundle(argv[1:])
        if argv and argv[0] == "convert":
            return commands.convert(argv[1:])
        return run(build_parser().parse_args(argv))
    except (BadInputError, ValueError) as err:
        if interrupted():  # an error the interrupt caused: reported as the interrupt, once
            return 130
        # ValueError: jaxattn's own input checks (shapes, context_length) raised during a run.
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except MismatchError as err:
        if interrupted():
            return 130
        print(f"{PROG}: mismatch: {one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
