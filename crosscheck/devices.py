"""``--devices N``: make N devices exist before JAX initialises, and refuse N where they cannot.

XLA reads ``XLA_FLAGS`` once, when JAX's backend starts. On a CPU the CLI asks for N
host devices with ``--xla_force_host_platform_device_count=N`` (one process, N
"devices" sharing the cores: right for checking that a split changes nothing, not
for timing it). The CLI calls :func:`force_host_devices` right after parsing its
arguments, and nothing it imports before that imports JAX (``crosscheck`` and
``crosscheck.cli`` import neither JAX nor torch). On a GPU machine the flag does not
touch the GPUs: N must not exceed the GPUs present (:func:`check_device_count`).
No JAX import at module level.
"""

from __future__ import annotations

import os
import re

from crosscheck.errors import BadInputError

FLAG = "--xla_force_host_platform_device_count"


def force_host_devices(n: int) -> None:
    """Ask XLA for ``n`` host (CPU) devices, replacing any count already in ``XLA_FLAGS``."""
    if n < 1:
        raise BadInputError(f"--devices must be >= 1, got {n}")
    flags = re.sub(rf"{FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{FLAG}={n}"])


def check_device_count(n: int) -> str:
    """The platform JAX runs on, after checking that it has at least ``n`` devices (:class:`BadInputError` if not)."""
    import jax

    platform = jax.default_backend()
    present = len(jax.devices())
    if n > present:
        if platform == "cpu":
            raise BadInputError(
                f"--devices {n}: JAX sees {present} CPU device(s); it was initialised before {FLAG}={n} could be "
                "set (set XLA_FLAGS yourself, or run the crosscheck command in a fresh process)"
            )
        raise BadInputError(f"--devices {n}: this machine has {present} {platform} device(s)")
    return platform
