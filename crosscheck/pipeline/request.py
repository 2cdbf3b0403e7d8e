"""What a run was asked, validated once: :class:`RunRequest`.

The CLI builds one from argv, :func:`crosscheck.pipeline.engine.run` takes one (or builds one from
its keyword arguments), and the checks in :mod:`crosscheck.checks` read it. Every refusal of
a combination of options is here, as a :class:`BadInputError` naming the flag; what needs the
cases (a variant that cannot decode, a split that does not divide) is refused by the check
that runs them. Imports stay light: no torch, no JAX at module level.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from crosscheck import jax_layers
from crosscheck.errors import BadInputError
from crosscheck.pipeline import budget, flax_runner, placement
from crosscheck.pipeline import inputs as inp
from crosscheck.pipeline.backends import BACKENDS, DTYPES, TTNN_RUNTIMES
from crosscheck.pipeline.cases import OVERRIDABLE, select_variants
from crosscheck.variants import registry

#: ``api`` choices and the backend name of each Flax API's rows.
APIS = ("linen", "nnx", "both")
FLAX_API_BACKENDS = {"linen": "flax", "nnx": "flax-nnx"}
#: ``--padding`` sides (:mod:`crosscheck.checks.padding_check`).
PADDING_SIDES = ("left", "right")
#: ``--shard`` modes (:mod:`crosscheck.checks.sharding_check`).
SHARD_MODES = ("batch", "heads", "sequence")
#: The dropout rate ``--train`` uses when ``--dropout`` is not given.
DEFAULT_TRAIN_DROPOUT = 0.1
#: Why the ttnn backend does not take part in ``--train``/``--grad`` (recorded in the report).
TTNN_SKIPPED = (
    "not run: --train/--grad compare torch and Flax only (no dropout masks or gradients in the ttnn programs)"
)

Weights = str | os.PathLike | Mapping[str, Any] | None
Inputs = str | os.PathLike | np.ndarray | inp.RandomInputs | None


@dataclasses.dataclass(frozen=True, eq=False)  # eq: inputs may be arrays
class RunRequest:
    """Everything a run was asked; constructing one validates it (:class:`BadInputError` naming the flag).

    ``variants``: jaxattn class names (case-insensitive); all when ``None`` (with ``weights``: those
    the state dict fits). ``overrides``: config fields (:data:`crosscheck.pipeline.cases.OVERRIDABLE`).
    ``backends`` are kept in canonical order. ``decode``/``padding``/``train``/``grad``/``shard``
    choose the check (:mod:`crosscheck.checks`); ``max_memory`` the budget
    (:mod:`crosscheck.pipeline.budget`). ``jax_layers``: other JAX libraries' attention layers to add as
    rows (:mod:`crosscheck.jax_layers`; a comma list or names). :meth:`create` takes the config fields as
    keywords.
    """

    variants: tuple[str, ...] | None = None
    weights: Weights = None
    inputs: Inputs = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    prefix: str = ""
    model_config: str | os.PathLike | Mapping[str, Any] | None = None
    backends: tuple[str, ...] = BACKENDS
    dtype: str = "float32"
    ttnn_runtime: str = "auto"
    ttnn_python: str | None = None
    attention_impl: str | None = None
    api: str = "linen"
    decode: int | None = None
    padding: str | None = None
    pad_lengths: tuple[int, ...] | None = None
    train: bool = False
    grad: bool = False
    train_seed: int | None = None
    devices: int | None = None
    shard: str | None = None
    max_memory: int | str | None = None
    jax_layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        budget.budget_for(self.max_memory)  # a bad --max-memory first, as before any work
        set_ = object.__setattr__  # frozen: the normalised values, once
        if self.variants is not None:
            set_(self, "variants", tuple(self.variants))
        if self.pad_lengths is not None:
            set_(self, "pad_lengths", tuple(self.pad_lengths))
        set_(self, "backends", check_choices(self.backends, self.dtype, self.ttnn_runtime))
        check_attention_impl(self.attention_impl, self.variants)
        _check_decode_and_padding(self.decode, self.padding, self.pad_lengths)
        if placement.torch_device() != "cpu" and (self.training or self.decode is not None or self.padding is not None):
            raise BadInputError(
                f"--torch-device {placement.torch_device()}: only the forward check runs torch there; "
                "--train, --grad, --decode and --padding run torch on the CPU"
            )
        _check_api(self.api, self._modes(("--decode", "--padding", "--train/--grad")))
        if self.training:
            _check_training(self)
        _check_sharding(self)
        if self.jax_layers is not None:
            set_(self, "jax_layers", _check_jax_layers(self))

    @classmethod
    def create(cls, variants: Iterable[str] | None = None, **options: Any) -> RunRequest:
        """A request from keywords: the config fields (``d_in=``, ``num_heads=`` ...) go to ``overrides``."""
        overrides = {k: options.pop(k) for k in list(options) if k in OVERRIDABLE}
        return cls(None if variants is None else tuple(variants), overrides=overrides, **options)

    # --- what the checks read ----------------------------------------------------------------------

    @property
    def training(self) -> bool:
        """``--train`` or ``--grad``: torch and Flax only."""
        return self.train or self.grad

    @property
    def run_backends(self) -> tuple[str, ...]:
        """The backends that run: all asked, but ttnn in training (:attr:`skipped_backends`)."""
        return tuple(b for b in self.backends if b not in self.skipped_backends)

    @property
    def skipped_backends(self) -> dict[str, str]:
        """``{backend: why}`` of the backends asked that do not run."""
        return {"ttnn": TTNN_SKIPPED} if self.training and "ttnn" in self.backends else {}

    @property
    def flax_apis(self) -> tuple[str, ...]:
        """The Flax APIs to run (``api="both"``: Linen and NNX, a row each)."""
        return ("linen", "nnx") if self.api == "both" else (self.api,)

    @property
    def config_overrides(self) -> dict[str, Any]:
        """The config fields asked; ``--train`` without ``--dropout`` runs at :data:`DEFAULT_TRAIN_DROPOUT`."""
        overrides = dict(self.overrides)
        if self.train and overrides.get("dropout") is None:
            overrides["dropout"] = DEFAULT_TRAIN_DROPOUT
        return overrides

    @property
    def seed(self) -> int:
        """The seed of ``--train``'s masks and ``--grad``'s loss weights (default 0)."""
        return 0 if self.train_seed is None else int(self.train_seed)

    def _modes(self, flags: Sequence[str]) -> list[str]:
        """Those of ``flags`` (``--decode``, ``--padding``, ``--train``, ``--grad``, ``--train/--grad``) given."""
        given = {
            "--decode": self.decode is not None,
            "--padding": self.padding is not None,
            "--train": self.train,
            "--grad": self.grad,
            "--train/--grad": self.training,
            "--api nnx": self.api != "linen",
        }
        return [flag for flag in flags if given[flag]]


# --- the checks --------------------------------------------------------------------------------------


def check_choices(backends: Sequence[str], dtype: str, ttnn_runtime: str) -> tuple[str, ...]:
    """The chosen backends in canonical order; :class:`BadInputError` naming the bad choice and the options."""
    backends = tuple(dict.fromkeys(b.strip().lower() for b in backends if b.strip()))
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise BadInputError(f"unknown backend(s) {bad or '(none)'}; choose from {', '.join(BACKENDS)}")
    placement.check_dtype(dtype, DTYPES)
    if ttnn_runtime not in TTNN_RUNTIMES:
        raise BadInputError(f"ttnn runtime must be one of {', '.join(TTNN_RUNTIMES)}; got {ttnn_runtime!r}")
    return tuple(b for b in BACKENDS if b in backends)


def check_attention_impl(attention_impl: str | None, variants: Iterable[str] | None) -> None:
    """Refuse an unknown core, and a core for an explicitly named variant that has no choice of core.

    Without named variants, those that take no ``attention_impl`` run as they always do.
    """
    if attention_impl is None:
        return
    flax_runner.check_attention_impl(attention_impl)
    if variants:
        for v in select_variants(variants):
            if not v.takes_attention_impl:
                takers = ", ".join(t.name for t in registry.takes_attention_impl())
                raise BadInputError(
                    f"{v.name} takes no --attention-impl (its Flax module has one fixed attention core); "
                    f"variants that take one: {takers}"
                )


def _check_decode_and_padding(decode: int | None, padding: str | None, pad_lengths: Sequence[int] | None) -> None:
    """The decode and padding options: one check at a time, each complete."""
    if decode is not None and padding is not None:
        raise BadInputError("--decode and --padding are separate checks; choose one")
    if decode is not None and (isinstance(decode, bool) or int(decode) < 1):
        raise BadInputError(f"--decode: the prompt length must be >= 1, got {decode}")
    if padding is not None and padding not in PADDING_SIDES:
        raise BadInputError(f"--padding must be one of {', '.join(PADDING_SIDES)}; got {padding!r}")
    if (padding is None) != (pad_lengths is None):
        raise BadInputError("--padding and --pad-lengths go together (e.g. --padding left --pad-lengths 0,3)")


def _check_api(api: str, modes: Sequence[str]) -> None:
    """``api`` one of :data:`APIS`; NNX runs the forward check only."""
    if api not in APIS:
        raise BadInputError(f"--api must be one of {', '.join(APIS)}; got {api!r}")
    if api != "linen" and modes:
        raise BadInputError(f"--api {api}: the NNX modules run in the forward check; {modes[0]} runs Linen only")


def _check_training(r: RunRequest) -> None:
    """``--train``/``--grad``: float32 torch against Flax, on its own (ttnn is skipped, not refused)."""
    flag = "--train" if r.train and not r.grad else "--grad" if r.grad and not r.train else "--train --grad"
    if r.decode is not None or r.padding is not None:
        raise BadInputError(f"{flag} is a check of its own; it does not combine with --decode or --padding")
    if r.dtype != "float32":
        raise BadInputError(f"{flag} compares float32 torch and Flax; --dtype {r.dtype} is not supported")
    if r.train and r.attention_impl not in (None, flax_runner.AUTO):
        raise BadInputError(
            f"{flag}: dropout runs jaxattn's naive kernel (the only one with dropout); --attention-impl "
            f"{r.attention_impl} does not apply"
        )
    if "flax" not in r.run_backends or "torch" not in r.run_backends:
        raise BadInputError(f"{flag} compares torch with Flax: --backends must include torch and flax")


def _check_sharding(r: RunRequest) -> None:
    """``--devices N --shard MODE``: both or neither, a Flax forward run; the cases are checked when they run."""
    if r.shard is None and r.devices is None:
        return
    if r.shard is None:
        raise BadInputError(f"--devices {r.devices} needs --shard {'|'.join(SHARD_MODES)} (how to split the Flax run)")
    if r.devices is None:
        raise BadInputError(f"--shard {r.shard} needs --devices N (how many devices to split over)")
    if r.shard not in SHARD_MODES:
        raise BadInputError(f"--shard must be one of {', '.join(SHARD_MODES)}; got {r.shard!r}")
    from crosscheck.pipeline.devices import check_limit

    check_limit(int(r.devices))
    others = r._modes(("--decode", "--padding", "--train", "--grad", "--api nnx"))
    if others:
        raise BadInputError(f"--shard checks the forward pass; it cannot be combined with {others[0]}")
    if "flax" not in r.backends:
        raise BadInputError("--shard splits the Flax backend: add flax to --backends")
    if r.shard == "sequence" and r.attention_impl not in (None, "auto", "ring"):
        raise BadInputError(
            f"--shard sequence runs attention as ring attention; --attention-impl {r.attention_impl} "
            "cannot be combined with it"
        )


def _check_jax_layers(r: RunRequest) -> tuple[str, ...]:
    """``--jax-layers``: known, installed names, rows of the forward, decode or padding check of variants that
    are a ``torch.nn.MultiheadAttention`` port (named, or matched to ``--weights`` and checked when they run)."""
    given = r.jax_layers
    try:
        names = jax_layers.parse(given if isinstance(given, str) else ",".join(given or ()))
    except ValueError as err:
        raise BadInputError(str(err)) from None
    others = r._modes(("--train/--grad",)) + (["--shard"] if r.shard is not None else [])
    if others:
        raise BadInputError(f"--jax-layers adds rows to the forward, --decode and --padding checks, not to {others[0]}")
    ports = [v for v in registry.VARIANTS if v.jax_layers]
    why = "the layers are ported from a torch.nn.MultiheadAttention state dict"
    if r.variants:
        for v in select_variants(r.variants):
            if not v.jax_layers:
                raise BadInputError(f"--jax-layers needs {', '.join(p.name for p in ports)} ({why}); got {v.name}")
    elif r.weights is None:
        raise BadInputError(
            f"--jax-layers needs {', '.join(p.name for p in ports)} ({why}): name it with --variant "
            "(the default run is the book's chapter-3 variants)"
        )
    if "jaxattn" in names and "flax" not in r.backends:
        raise BadInputError("--jax-layers jaxattn is the flax backend's row: add flax to --backends")
    for name in names:
        missing = jax_layers.LAYERS[name].available() if name in jax_layers.LAYERS else None
        if missing:
            raise BadInputError(missing)
    return names
