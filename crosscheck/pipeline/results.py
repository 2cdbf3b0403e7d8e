"""The result model of a cross-check: one :class:`Result` per variant and backend, and the :class:`Report`.

Shared by the engine (which fills it), the bundle comparison and the views in
:mod:`crosscheck.pipeline.report` (terminal table, JSON). Plain data: no framework imports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from crosscheck.errors import MismatchError
from crosscheck.pipeline import compare as cmp


@dataclass
class Result:
    """One variant on one backend, against its reference."""

    variant: str
    backend: str
    runtime: str  # torch: its device ("cpu", "cuda"); flax: JAX's platform; ttnn: "host" or "device"
    dtype: str  # the dtype the backend computed in
    reference: str  # what it was compared with
    shape: list[int] | None
    reference_shape: list[int] | None
    max_abs_err: float | None
    max_rel_err: float | None
    pcc: float | None
    ulp: int | None
    passed: bool
    thresholds: dict
    failures: list[str] = field(default_factory=list)
    seconds: float | None = None
    source: str | None = None  # the outputs file, for `bundle compare`
    #: The attention core the Flax module ran ("auto" or an implementation name);
    #: ``None`` for other backends and for variants without a selectable core.
    attention_impl: str | None = None
    #: Decoding: ``prompt_len``, ``steps`` and the token whose error is largest (``worst_token``,
    #: ``worst_token_max_abs_err``); padding: how many real positions were compared. ``None`` otherwise.
    detail: dict | None = None
    #: Where it ran, in words (``"cpu"``, ``"gpu: NVIDIA H100 80GB HBM3"``, ``"cuda: ..."`` for torch,
    #: ``"ttnn host"``) and its matmul precision (``"highest"``, ``"default"``, ``"bfloat16"``);
    #: filled by :func:`crosscheck.pipeline.placement.describe`.
    device: str | None = None
    precision: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    results: list[Result]
    configs: dict[str, dict]
    input: dict
    weights: str
    versions: dict
    ttnn_runtime: dict | None = None
    backends: tuple[str, ...] = ()
    seconds: float | None = None
    #: The attention core asked of the Flax modules ("auto" unless chosen); ``None`` when no Flax ran.
    attention_impl: str | None = None
    #: What was checked: ``{"check": "forward"}``, ``{"check": "decode", "prompt_len": P, "tokens": T,
    #: "flax_compilations": {...}}`` or ``{"check": "padding", "side": ..., "pad_lengths": [...]}``.
    mode: dict | None = None
    #: ``--devices N --shard MODE``: ``{"mode": MODE, "devices": N, "platform": ...}``; ``None``: one device.
    sharding: dict | None = None

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def raise_for_mismatch(self) -> None:
        """Raise :class:`MismatchError` naming each failing variant, backend and reason."""
        if not self.passed:
            lines = [f"{r.variant} / {r.backend}: {f}" for r in self.results if not r.passed for f in r.failures]
            raise MismatchError(f"mismatch in {', '.join(self.failing_variants)}:\n  " + "\n  ".join(lines))

    @property
    def failing_variants(self) -> list[str]:
        seen: list[str] = []
        for r in self.results:
            if not r.passed and r.variant not in seen:
                seen.append(r.variant)
        return seen

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failing_variants": self.failing_variants,
            "results": [r.to_dict() for r in self.results],
            "configs": self.configs,
            "input": self.input,
            "weights": self.weights,
            "backends": list(self.backends),
            "attention_impl": self.attention_impl,
            "mode": self.mode or {"check": "forward"},
            "sharding": self.sharding,
            "versions": self.versions,
            "ttnn_runtime": self.ttnn_runtime,
            "policy": {
                "rel_floor": cmp.REL_FLOOR,
                "note": "max_rel_err = max |a-r| / max(|r|, rel_floor * max|r|); ulp only for float32 outputs",
            },
            "seconds": self.seconds,
        }


@dataclass
class CheckOutcome:
    """What a check (:mod:`crosscheck.checks`) returns: its rows, and what the report says of the run beside them."""

    results: list[Result]
    #: The JSON ``"mode"`` record (``None``: the forward check).
    mode: dict | None = None
    #: The cases checked when not all those given (decode: those that decode); their configs are reported.
    cases: list | None = None
    #: ``{variant: input shape as run}`` when not the cases' own (padding: the padded batch).
    shapes: dict[str, list[int]] | None = None
    ttnn_runtime: dict | None = None
    ttnn_versions: dict | None = None
    #: ``--devices N --shard MODE``: the JSON ``"sharding"`` record.
    sharding: dict | None = None


def result_of(
    variant: str,
    backend: str,
    runtime: str,
    dtype: str,
    reference: str,
    out,
    ref,
    tol: cmp.Tolerance,
    seconds: float | None = None,
    detail: dict | None = None,
) -> Result:
    """The :class:`Result` of comparing ``out`` with ``ref`` under ``tol``."""
    c = cmp.compare(out, ref, tol, computed_in=dtype)
    m = c.metrics
    return Result(
        variant=variant,
        backend=backend,
        runtime=runtime,
        dtype=dtype,
        reference=reference,
        shape=list(c.shape),
        reference_shape=list(c.reference_shape),
        max_abs_err=m.max_abs_err if m else None,
        max_rel_err=m.max_rel_err if m else None,
        pcc=m.pcc if m else None,
        ulp=m.ulp if m else None,
        passed=c.passed,
        thresholds=tol.to_dict(),
        failures=list(c.failures),
        seconds=seconds,
        detail=detail,
    )
