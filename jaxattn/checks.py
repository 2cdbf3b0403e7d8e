"""Input validation shared by the modules: errors that name the numbers.

Shapes are static under ``jax.jit``, so these checks run once at trace time
and cost nothing per call. Values that are traced (a KV cache's index, a traced
``q_offset``) are checked when the program runs: :func:`check_at_run_time`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def check_sizes(owner: str, **sizes: Any) -> None:  # anything: validated here
    """Raise ``ValueError`` naming the first size that is not a positive integer (``None`` = not set, skipped).

    ``check_sizes("MultiHeadAttention", d_in=4, d_out=-4)`` raises
    ``MultiHeadAttention: d_out=-4 must be a positive integer``. Booleans are refused;
    NumPy integers are accepted.
    """
    for name, value in sizes.items():
        if value is None:
            continue
        try:
            size = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            size = None
        if size is None or size < 1:
            raise ValueError(f"{owner}: {name}={value!r} must be a positive integer")


def check_rate(owner: str, name: str, rate: Any) -> None:  # anything: validated here
    """Raise ``ValueError`` unless ``rate`` is a probability of dropping, in ``[0, 1)`` (NaN is not).

    A negative rate would scale the kept weights by ``1 / (1 - rate) < 1``, and 1 or more
    would drop everything: ``MultiHeadAttention: dropout=-0.5 must be in [0, 1)``.
    """
    try:
        value = float(rate)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value < 1.0:  # False for NaN too
        raise ValueError(f"{owner}: {name}={rate!r} must be in [0, 1)")


def check_divisible(owner: str, d_out: int, num_heads: int, dim_name: str = "d_out") -> None:
    if num_heads < 1:
        raise ValueError(f"{owner}: num_heads must be >= 1, got {num_heads}")
    if d_out % num_heads != 0:
        raise ValueError(f"{owner}: {dim_name}={d_out} must be divisible by num_heads={num_heads}")


def check_input(
    owner: str,
    shape: Sequence[int],
    *,
    d_in: int | None,
    ranks: Sequence[int],
    context_length: int | None = None,
) -> None:
    """Raise ``ValueError`` if ``shape`` is not ``(batch, tokens, d_in)`` (or ``(tokens, d_in)``)."""
    layouts = {2: "(tokens, d_in)", 3: "(batch, tokens, d_in)"}
    if len(shape) not in ranks:
        expected = " or ".join(f"rank {r} {layouts[r]}" for r in ranks)
        raise ValueError(f"{owner}: expected input of {expected}, got shape {tuple(shape)}")
    if d_in is not None and shape[-1] != d_in:
        raise ValueError(f"{owner}: last dimension of input must be d_in={d_in}, got shape {tuple(shape)}")
    tokens = shape[-2]
    if context_length is not None and tokens > context_length:
        raise ValueError(f"{owner}: tokens={tokens} exceeds context_length={context_length}")


# --- checks of traced values: the KV cache's index, a traced q_offset ------------------------------
#
# A traced value is known only when the compiled program runs, so its check is a host callback. JAX turns
# an exception raised there into its own runtime error whose message JAX formats (under jax.jit it opens
# with "INTERNAL: CpuCallback error calling callback: Traceback ...", and it is a JaxRuntimeError or a
# ValueError depending on JAX's dispatch path), and it logs the callback's traceback to stderr. What this
# module controls: a concrete value (eager code) is checked here, at once, as a plain ValueError; a traced
# one raises RuntimeCheckError in the callback, whose traceback is not logged (the filter below), and
# :func:`clean_errors` turns JAX's runtime error back into a ValueError carrying only our message.


class RuntimeCheckError(ValueError):
    """A check of a traced value failed when the program ran (raised in the host callback)."""


class _QuietRuntimeChecks(logging.Filter):
    """Drops JAX's "jax.pure_callback failed" record (and its traceback) when the failure is our check:
    the error still reaches the caller, once, as JAX's runtime error."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, RuntimeCheckError)


_QUIET = _QuietRuntimeChecks()
logging.getLogger("jax._src.callback").addFilter(_QUIET)


def check_at_run_time(value: Any, problem: Callable[[np.ndarray], str | None]) -> Any:
    """``value``, checked by ``problem`` (a numpy array -> the error message, or ``None``) when it is known.

    A concrete value is checked now and a failure is a ``ValueError``. A traced one is checked by a host
    callback when the program runs; its (zero) result is added to ``value``, so the check cannot be
    pruned and whatever uses the returned value waits for it. A failure there stops the program with
    JAX's runtime error, whose message ends with ours; :func:`clean_errors` raises it as a ``ValueError``.
    Under ``vmap`` the callback sees the whole batch (``problem`` must take any shape).
    """
    if not isinstance(value, jax.core.Tracer):
        message = problem(np.asarray(value))
        if message is not None:
            raise ValueError(message)
        return value

    def host(x):
        x = np.asarray(x)
        message = problem(x)
        if message is not None:
            raise RuntimeCheckError(message)
        return np.zeros(x.shape, x.dtype)

    zero = jax.pure_callback(host, jax.ShapeDtypeStruct(value.shape, value.dtype), value, vmap_method="broadcast_all")
    return value + zero


#: Traced values that a run-time check bounds: ``id -> (weak reference, (low, high))``. A KV cache's
#: checked index becomes the attention call's ``q_offset``; the call then need not check it again (one
#: host round trip per decode step, not two). The weak reference drops the entry with its tracer.
_KNOWN_RANGES: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}


def mark_range(value: Any, low: int, high: int) -> None:
    """Record that a run-time check (:func:`check_at_run_time`) keeps the traced ``value`` in ``[low, high]``."""
    if isinstance(value, jax.core.Tracer):
        key = id(value)
        _KNOWN_RANGES[key] = (weakref.ref(value, lambda _: _KNOWN_RANGES.pop(key, None)), (low, high))


def known_range(value: Any) -> tuple[int, int] | None:
    """``(low, high)`` recorded by :func:`mark_range` for this very traced ``value``, or ``None``."""
    entry = _KNOWN_RANGES.get(id(value))
    if entry is None or entry[0]() is not value:
        return None
    return entry[1]


_CHECK_LINE = RuntimeCheckError.__name__ + ": "


class clean_errors(contextlib.ContextDecorator):
    """Raise a failed run-time check (:func:`check_at_run_time`) as a ``ValueError`` with only its message.

    Around a jitted call (or a ``lax.scan``) that may stop on a full KV cache or an out-of-range traced
    ``q_offset``: ``with jaxattn.checks.clean_errors(): out, state = step(...)`` raises
    ``ValueError("MultiHeadAttention: KV cache full: ...")`` instead of JAX's runtime error with the
    callback's traceback in its message. Other exceptions pass through unchanged. On a GPU the program
    runs asynchronously: keep the first use of its results (or ``jax.block_until_ready``) inside.
    """

    def __enter__(self) -> clean_errors:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None or isinstance(error, RuntimeCheckError) or not isinstance(error, Exception):
            return  # nothing raised, or already ours (a RuntimeCheckError is a ValueError with our message)
        text = str(error)
        at = text.rfind(_CHECK_LINE)
        if at >= 0:
            raise ValueError(text[at + len(_CHECK_LINE) :].splitlines()[0]) from None
