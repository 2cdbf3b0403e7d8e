"""One value of a transformers config checked: an integer, a finite float in range, or a JSON boolean.

A config value reaches torch, Flax and the RoPE tables as a Python number: one of the wrong type
(``"four"``, ``true``), non-finite (JSON's NaN, 1e400) or out of range would be read as something
else or compute NaN, and look like a mismatch. Each read key is checked here and named when refused:
``where`` names the config, ``key`` the spelling it used.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from crosscheck.errors import BadInputError

#: The largest count a config may give: torch, numpy and XLA hold every size in a signed 64-bit integer.
MAX_INT = 2**63 - 1


def bad_value(where: str, key: str, value: Any, expected: str) -> BadInputError:
    """The error for ``key``'s ``value``, saying what was ``expected`` (to be raised by the caller)."""
    shown = repr(value) if isinstance(value, str) else _show(value)
    return BadInputError(f"{where}: {key} must be {expected}, got {shown} ({type(value).__name__})")


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def int_value(where: str, key: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (an integral float such as 8.0 too), else :class:`BadInputError`."""
    whole = _is_number(value) and (
        isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer())
    )
    number = int(value) if whole else None
    if number is None or number < minimum:
        raise bad_value(where, key, value, f"an integer >= {minimum}")
    if number > MAX_INT:
        raise bad_value(where, key, value, "at most 2^63 - 1 (sizes are 64-bit integers)")
    return number


def float_value(
    where: str,
    key: str,
    value: Any,
    *,
    expected: str,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a finite float in the range given, else :class:`BadInputError` saying ``expected``."""
    try:
        number = float(value) if _is_number(value) else math.nan
    except OverflowError:  # an integer beyond float's range
        number = math.inf
    if (
        not math.isfinite(number)
        or (above is not None and not number > above)
        or (at_least is not None and not number >= at_least)
        or (below is not None and not number < below)
    ):
        raise bad_value(where, key, value, expected)
    return number


def bool_value(where: str, key: str, value: Any) -> bool:
    """A JSON ``true``/``false``: the string ``"false"`` would otherwise read as true."""
    if not isinstance(value, bool):
        raise bad_value(where, key, value, "true or false")
    return value
