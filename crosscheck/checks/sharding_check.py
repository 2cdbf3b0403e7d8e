"""``crosscheck --devices N --shard batch|heads|sequence``: the Flax backend split over N devices.

The sharded Flax output is compared with torch as every Flax output is, and one more row
compares it with the same module on one device (reference ``"flax 1 device"``, float32
bound 1e-6 x max(1, max|ref|), ``compare.POLICY[("flax sharded", "float32")]``). The split
is :func:`jaxattn.sharding.shard`: which modes a variant takes is its registry entry's
``shard_modes``. JAX is imported inside the functions, after the CLI has set the device
count (:mod:`crosscheck.pipeline.devices`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from crosscheck.checks import forward
from crosscheck.errors import BadInputError
from crosscheck.pipeline import backends, flax_runner
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline.cases import Case
from crosscheck.pipeline.progress import Progress
from crosscheck.pipeline.request import SHARD_MODES, RunRequest
from crosscheck.pipeline.results import CheckOutcome, Result, result_of

MODES = SHARD_MODES
#: The reference of the extra row, as the report shows it.
ONE_DEVICE = "flax 1 device"


def run(cases: Sequence[Case], request: RunRequest, progress: Progress | None) -> CheckOutcome:
    """The forward check with the Flax rows split over ``request.devices``, plus each one's one-device row."""
    devices, shard = int(request.devices or 0), str(request.shard)
    check_cases(cases, devices, shard)

    def flax_rows(case: Case, request: RunRequest, api: str, ref: np.ndarray) -> list[Result]:
        t0 = time.perf_counter()
        out = sharded_output(case, request.dtype, request.attention_impl, devices, shard)
        result = forward.flax_result(case, request, "flax", out, ref, time.perf_counter() - t0)
        label(result, request.dtype, devices, shard)
        return [result, one_device_row(case, request.dtype, request.attention_impl, out, devices, shard)]

    outcome = forward.run_rows(cases, request, progress, flax_rows)
    outcome.sharding = describe(devices, shard)
    return outcome


def check_cases(cases: Sequence[Case], devices: int, shard: str) -> None:
    """Refuse, naming the numbers, a case the split cannot serve (the options: :class:`RunRequest`)."""
    from crosscheck.pipeline.devices import check_device_count, check_split

    for case in cases:
        variant, cfg = case.variant, case.config
        if shard not in variant.shard_modes:
            takes = ", ".join(variant.shard_modes) or "none (its input has no batch axis)"
            raise BadInputError(f"{variant.name} cannot be split by {shard}; its shard modes: {takes}")
        shape = case.x.shape  # (batch, tokens, d_in): every variant with a shard mode takes a batch
        check_split(devices, shard, batch=shape[0] if len(shape) == 3 else 1, tokens=shape[-2])
        if shard == "heads":
            for field in ("num_heads", "num_kv_groups"):
                count = getattr(cfg, field, None)
                if field in variant.fields and count is not None and count % devices:
                    raise BadInputError(
                        f"--shard heads: {variant.name} has {field}={count}, not divisible by --devices {devices}"
                    )
    check_device_count(devices)  # after the checks above: it starts JAX


def sharded_output(case, dtype: str, attention_impl: str | None, devices: int, shard: str) -> np.ndarray:
    """``case``'s Flax module split over ``devices`` devices in mode ``shard``.

    Jitted, its matmuls at ``highest`` precision for float32.
    """
    import jax

    from jaxattn import sharding

    module, variables, x, kwargs = flax_runner.module_call(case, dtype, None if shard == "sequence" else attention_impl)
    mask = kwargs.pop("attention_mask", None)
    split = sharding.shard(module, sharding.make_mesh(devices), shard)
    with jax.default_matmul_precision(flax_runner.matmul_precision(dtype)):
        out = split.apply(variables, x, attention_mask=mask, **kwargs)
    return np.asarray(jax.device_get(out))


def where(devices: int, shard: str) -> str:
    """How the sharded rows name where they ran: ``cpu x8 sequence``."""
    return f"{flax_runner.platform()} x{devices} {shard}"


def label(result: Result, dtype: str, devices: int, shard: str) -> None:
    """Mark the Flax-vs-torch ``result`` as sharded.

    Its device says how; ``attention_impl`` says ring in sequence mode.
    """
    result.device, result.precision = where(devices, shard), flax_runner.matmul_precision(dtype)
    if shard == "sequence":
        result.attention_impl = "ring"


def one_device_row(
    case, dtype: str, attention_impl: str | None, sharded: np.ndarray, devices: int, shard: str
) -> Result:
    """The row comparing the sharded output with the same module on one device."""
    single = backends.flax_output(case, dtype, attention_impl)
    tol = cmp.policy_for("flax sharded", dtype) if dtype == "float32" else cmp.policy_for("flax", dtype)
    result = result_of(case.variant.name, "flax", flax_runner.platform(), dtype, ONE_DEVICE, sharded, single, tol)
    label(result, dtype, devices, shard)
    return result


def describe(devices: int, shard: str) -> dict:
    """The JSON ``"sharding"`` record."""
    return {"mode": shard, "devices": int(devices), "platform": flax_runner.platform()}
