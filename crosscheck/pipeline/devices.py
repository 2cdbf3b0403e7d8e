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

#: The most devices ``--devices`` may ask for, checked before JAX starts. XLA's CPU backend (JAX 0.10)
#: runs one computation over at most 2048 forced host devices: on a mesh of 2049 the first call fails
#: with "Multiprocess computations aren't implemented on the CPU backend" (9999 ran for over ten
#: minutes before getting anywhere). Up to it the cost grows with the count (a 4-token layer on 2
#: cores: 4 s at 8 devices, 11 s and 0.8 GB at 2048), and :func:`check_split` ties the count to the
#: rows or tokens the mode splits. One machine's GPUs are far fewer.
MAX_DEVICES = 2048


def check_limit(n: int) -> None:
    """Refuse a device count below 1 or over :data:`MAX_DEVICES` (:class:`BadInputError` naming both)."""
    if n < 1:
        raise BadInputError(f"--devices must be >= 1, got {n}")
    if n > MAX_DEVICES:
        raise BadInputError(
            f"--devices {n} is over the limit of {MAX_DEVICES} (the most host devices one XLA CPU computation "
            "can span; a GPU machine has fewer)"
        )


def check_split(n: int, mode: str, *, batch: int, tokens: int) -> None:
    """Refuse more devices than the split axis has elements: each device must get some of the work.

    ``batch`` mode splits the rows, ``sequence`` the tokens; a batch or sequence the devices do not
    divide is padded (:mod:`jaxattn.sharding`), so any count up to the axis's length works, and a
    device past it would compute padding only. (``heads`` needs the heads divisible by ``n``: the
    callers check that, with the layer's numbers.) :data:`MAX_DEVICES` is checked first.
    """
    check_limit(n)
    extent = {"batch": ("batch", batch, "row"), "sequence": ("input", tokens, "token")}.get(mode)
    if extent is None:
        return
    what, size, unit = extent
    if n > size:
        raise BadInputError(
            f"--devices {n} --shard {mode}: the {what} has {size} {unit}(s) to split, so at most {size} "
            f"device(s) get any of it (the rest would compute padding only); use --devices <= {size}"
        )


def force_host_devices(n: int) -> None:
    """Ask XLA for ``n`` host (CPU) devices, replacing any count already in ``XLA_FLAGS``.

    ``n`` over :data:`MAX_DEVICES` is refused here, before JAX starts.
    """
    check_limit(n)
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
