"""Writing the files a run produces without ever damaging the files it reads.

Two rules, for every output (``--json``, bundles, outputs files, bench ``--json``/``--plot``):

* :func:`check_output_path` runs *before* the work: the path is not empty, not a directory,
  its directory exists, and it is not one of the run's inputs (weights, inputs, bundles,
  outputs files being compared), compared by resolved path and by file identity, so
  ``./w.pt``, ``w.pt`` and a link to it are all the same file. Overwriting an earlier
  *output* (a second ``--json report.json``) is allowed.
* :func:`atomic_write` writes to a temporary file in the target's directory and renames it
  into place (``os.replace``): a failure leaves the previous file, or nothing, behind.

And one rule for an interrupt (Ctrl-C): it ends the run with nothing written. The CLI runs under
:func:`sigint_guard`, whose SIGINT handler records the interrupt before raising ``KeyboardInterrupt``:
a callback that swallows the exception (JAX's garbage-collection callback does) cannot hide it, because
:func:`atomic_write` checks the record before its rename and refuses, and the files the guarded run
created are removed when it ends interrupted.

Only the standard library is imported here (the bundle module stays free of torch and JAX).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
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


#: How soon a SIGINT that arrived during an import is delivered again (see :func:`sigint_guard`).
_REDELIVER_S = 0.05


class _Guard:
    """What :func:`sigint_guard` records: whether SIGINT came, and the files the guarded run created."""

    def __init__(self) -> None:
        self.interrupted = False
        self.created: list[str] = []
        self.closed = False
        self.lock = threading.Lock()  # never taken by the signal handler: it may run inside a holder
        self.timer: threading.Timer | None = None

    def redeliver_later(self) -> None:
        """Send SIGINT to this process again shortly, unless the guard has closed by then."""

        def send() -> None:
            with self.lock:
                self.timer = None
                if not self.closed:
                    os.kill(os.getpid(), signal.SIGINT)

        if self.timer is None:
            self.timer = threading.Timer(_REDELIVER_S, send)
            self.timer.daemon = True
            self.timer.start()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            timer = self.timer
        if timer is not None:
            timer.cancel()
            timer.join()  # a Python call: a SIGINT it sent is handled here, by the closed guard


def _stack(frame) -> Iterator:
    while frame is not None:
        yield frame
        frame = frame.f_back


def _importing(frame, outer: set[int]) -> bool:
    """Whether ``frame`` runs inside an import begun below the frames ``outer`` (the ids of the stack the
    guard was entered from: a guard entered by an importing module defers nothing for that import)."""
    for f in _stack(frame):
        if id(f) in outer:
            return False
        if f.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
    return False


#: The guard of the run in progress (``None`` outside :func:`sigint_guard`: no interrupt rule).
_guard: _Guard | None = None


def interrupted() -> bool:
    """Whether SIGINT arrived during the guarded run in progress, whether or not its exception got through."""
    return _guard is not None and _guard.interrupted


def _check_interrupt() -> None:
    if interrupted():
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_guard() -> Iterator[_Guard]:
    """Run the body with SIGINT recorded, then raised as ``KeyboardInterrupt``; restore the old handler after.

    The record survives a ``KeyboardInterrupt`` swallowed where it was raised (a garbage-collection or
    C callback): :func:`atomic_write` refuses to rename while it is set, and a body that ends with it
    set has the files it created removed (a file it replaced keeps its new, complete content). A
    swallowed interrupt's "Exception ignored" report is dropped: the caller reports the interrupt once.

    During an import the exception is held back and the signal sent again 50 ms later: raised into a
    native module's initialisation (jaxlib's), it aborts the process (``std::terminate``, exit -6)
    instead of unwinding. Outside the main thread no handler can be installed, and the guard only
    scopes the record.
    """
    global _guard
    outer, guard = _guard, _Guard()
    _guard = guard
    entry_frames = list(_stack(sys._getframe()))  # held, so that no later frame can reuse one's id
    entry_stack = {id(f) for f in entry_frames}

    def on_sigint(signum, frame):
        if guard.closed:  # a redelivery that arrived as the guard closed: already recorded
            return
        guard.interrupted = True
        if _importing(frame, entry_stack):
            guard.redeliver_later()
            return
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    def unraisable(info):
        if not (guard.interrupted and isinstance(info.exc_value, KeyboardInterrupt)):
            previous_hook(info)

    previous = signal.getsignal(signal.SIGINT)
    # A process started with SIGINT ignored (a background job of a script) keeps ignoring it, as Python does.
    install = threading.current_thread() is threading.main_thread() and previous is not signal.SIG_IGN
    if install:
        signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = unraisable
    try:
        yield guard
    finally:
        guard.close()
        if install:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        sys.unraisablehook = previous_hook
        _guard = outer
        del entry_frames[:]
        if guard.interrupted:
            for path in reversed(guard.created):
                with contextlib.suppress(OSError):
                    os.unlink(path)


def atomic_write(path: PathLike, write_fn: Callable[[str], None], what: str = "output") -> None:
    """Call ``write_fn(tmp)`` on a fresh file next to ``path``, then rename it onto ``path``.

    A link at ``path`` is followed (the file it names is replaced, the link stays). A new file gets
    the umask's mode, a replaced one keeps its mode. If ``write_fn`` raises, the temporary file is
    removed and ``path`` is untouched; an ``OSError`` becomes a one-line :class:`BadInputError`.
    Under :func:`sigint_guard`, an interrupt recorded before the rename raises ``KeyboardInterrupt``
    instead, with nothing written, and a new file is recorded for removal if the run ends interrupted.
    """
    _check_interrupt()
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
        if _guard is not None and not os.path.lexists(target):
            _guard.created.append(target)  # before the rename: an interrupt right after it still finds it
        _check_interrupt()  # a swallowed KeyboardInterrupt left only the record: the write stops here
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
