"""Input validation shared by the modules: errors that name the numbers.

Shapes are static under ``jax.jit``, so these checks run once at trace time
and cost nothing per call.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any


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
