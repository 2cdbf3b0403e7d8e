"""Writing the files a run produces without ever damaging the files it reads.

Two rules, for every output (``--json``, bundles, outputs files, bench ``--json``/``--plot``):

* :func:`check_output_path` runs *before* the work: the path is not empty, not a directory,
  its directory exists, and it is not one of the run's inputs (weights, inputs, bundles,
  outputs files being compared), compared by resolved path and by file identity, so
  ``./w.pt``, ``w.pt`` and a link to it are all the same file. Overwriting an earlier
  *output* (a second ``--json report.json``) is allowed.
* :func:`atomic_write` writes to a temporary file in the target's directory and renames it
  into place (``os.replace``): a failure leaves the previous file, or nothing, behind.

Only the standard library is imported here (the bundle module stays free of torch and JAX).
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Callable, Iterable
from typing import Union

from crosscheck.errors import BadInputError

PathLike = Union[str, "os.PathLike[str]"]
#: ``(flag, path)`` of one input of the run, e.g. ``("--weights", "mha.pt")``; a ``None`` path is skipped.
NamedInput = tuple[str, PathLike | None]


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same resolved path (links, ``./``) or the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:  # one of them does not exist (yet)
        return False


def check_output_path(path: PathLike | None, flag: str, inputs: Iterable[NamedInput] = (), what: str = "output") -> str:
    """``path`` as a string, or :class:`BadInputError` (one line naming ``flag``) if writing it is unsafe.

    ``inputs``: the ``(flag, path)`` pairs the run reads; entries whose path is ``None`` or not a
    file name (a state dict, an array) are ignored. ``what`` names the file in messages
    (``"JSON report"``, ``"bundle"``).
    """
    if path is None:
        raise BadInputError(f"{flag}: no path given")
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise BadInputError(f"{flag}: empty path; give the file to write the {what} to")
    for in_flag, in_path in inputs:
        if not isinstance(in_path, (str, os.PathLike)):
            continue
        in_text = os.fspath(in_path)
        if in_text and same_file(text, in_text):
            resolved = os.path.realpath(text)
            also = "" if resolved in (text, os.path.abspath(text)) else f" ({resolved})"
            raise BadInputError(
                f"{flag} {text} is also the {in_flag} file{also}: refusing to overwrite an input of the run"
            )
    target = os.path.realpath(text)
    if os.path.isdir(target):
        raise BadInputError(f"cannot write {what} {text} ({flag}): it is a directory")
    if os.path.exists(target) and not os.path.isfile(target):  # a device, a fifo: not replaced by a rename
        raise BadInputError(f"cannot write {what} {text} ({flag}): not a regular file")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        shown = os.path.dirname(os.path.abspath(text))
        raise BadInputError(f"cannot write {what} {text} ({flag}): directory {shown} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write {what} {text} ({flag}): directory {parent} is not writable")
    return text


def atomic_write(path: PathLike, write_fn: Callable[[str], None], what: str = "output") -> None:
    """Call ``write_fn(tmp)`` on a fresh file next to ``path``, then rename it onto ``path``.

    A link at ``path`` is followed (the file it names is replaced, the link stays). A new file gets
    the umask's mode, a replaced one keeps its mode. If ``write_fn`` raises, the temporary file is
    removed and ``path`` is untouched; an ``OSError`` becomes a one-line :class:`BadInputError`.
    """
    text = os.fspath(path)
    target = os.path.realpath(text)
    parent, base = os.path.split(target)
    tmp = os.path.join(parent, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise BadInputError(f"cannot write {what} {text}: {err.strerror or err}") from None
    try:
        os.close(fd)
        try:  # the replaced file's mode, else the umask's (what the fresh file got)
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write_fn(tmp)
        os.chmod(tmp, mode)  # writers that recreate the file (safetensors) leave it 0600
        with open(tmp, "rb") as f:  # the data on disk before the name points at it
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise BadInputError(f"cannot write {what} {text}: {err.strerror or err}") from None
        raise


def atomic_write_text(path: PathLike, text: str, what: str = "output") -> None:
    """:func:`atomic_write` of UTF-8 ``text``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, what)
