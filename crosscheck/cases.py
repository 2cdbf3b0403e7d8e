"""Cases: what a cross-check runs, resolved and validated before anything runs.

A :class:`Case` is one variant with its config, THE weights (canonical torch keys ->
float32, the same array for every backend), its input and its torch reference module.
:func:`build_cases` gets there from what the user gave: variant names (or the variants a
state dict fits), a weights file or mapping, inputs, and config overrides; the config
precedence is seed defaults < what the weights pin down < explicit flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from crosscheck import inputs as inp
from crosscheck import port, registry
from crosscheck import portmap as pm
from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError, PortError

#: The book's seed: ``torch.manual_seed(123)`` before building each layer.
TORCH_SEED = 123
#: Config fields a user may override; the CLI flag of each is ``--`` + the name with dashes.
OVERRIDABLE = ("d_in", "d_out", "context_length", "dropout", "num_heads", "qkv_bias", "causal")


@dataclass
class Case:
    """One variant ready to run: its config, THE weights (canonical torch keys -> float32) and its input."""

    variant: registry.Variant
    config: AttnConfig
    state_dict: dict[str, np.ndarray]
    x: np.ndarray  # float32, (tokens, d_in) or (batch, tokens, d_in) as the variant takes it
    torch_module: Any = None
    #: ``x.shape[:-1]`` of 1 (real token) / 0 (padding), or ``None``: no padding.
    attention_mask: Optional[np.ndarray] = None


def select_variants(names: Optional[Iterable[str]]) -> list[registry.Variant]:
    """Registry variants by case-insensitive name (all when ``names`` is empty), in registry order."""
    if not names:
        return list(registry.VARIANTS)
    chosen = []
    for name in names:
        try:
            v = registry.get(name)
        except KeyError as err:
            raise BadInputError(str(err.args[0])) from None
        if v not in chosen:
            chosen.append(v)
    return chosen


def _float32_state_dict(sd: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """Canonical keys, float32 values: the weights as every backend receives them."""
    out = {}
    for key, value in sd.items():
        array = port.to_numpy(value)
        if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating) or str(array.dtype) == "bfloat16"):
            if key.split(".")[-1] == "mask":  # the causal buffer may be saved as bool/int
                array = array.astype(np.float32)
            else:
                raise BadInputError(f"{source}: weight {key!r} has dtype {array.dtype}; expected a floating dtype")
        array = np.ascontiguousarray(array.astype(np.float32))
        if not np.isfinite(array).all():
            # Every backend would agree on NaN outputs; agreement on garbage is not a pass.
            raise BadInputError(f"{source}: weight {key!r} has NaN or infinite values (or overflows float32)")
        out[pm.canonical_key(str(key))] = array
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fits(variant: registry.Variant, sd: Mapping[str, Any]) -> Optional[str]:
    """``None`` when ``sd`` fits ``variant`` at the config its shapes imply, else the port error."""
    inferred = port.infer_config(variant, sd)
    cfg = AttnConfig(**{**AttnConfig().to_dict(), **dict(variant.defaults), **dict(variant.fit_defaults), **inferred})
    if "context_length" in variant.fields and "context_length" not in inferred:
        cfg = cfg.replace(context_length=1)  # no mask buffer to check
    try:
        port.check_state_dict(variant.portmap(cfg), sd, variant.name)
    except BadInputError as err:
        return str(err)
    return None


def match_variants(sd: Mapping[str, Any], candidates: Sequence[registry.Variant]) -> list[registry.Variant]:
    """The variants among ``candidates`` whose keys and shapes ``sd`` fits.

    Raises :class:`BadInputError` with the port error of the closest candidate when none fits.
    """
    errors = {v.name: _fits(v, sd) for v in candidates if v.portmap(AttnConfig()).entries}
    fitting = [v for v in candidates if errors.get(v.name, "no params") is None]
    if fitting:
        return fitting
    if not errors:
        raise BadInputError("weights were given but no selected variant has parameters")
    closest = min(errors, key=lambda n: errors[n].count("\n"))
    raise PortError(f"the weights fit no variant; closest: {errors[closest]}")


def resolve_config(
    variant: registry.Variant,
    overrides: Mapping[str, Any],
    inferred: Mapping[str, Any],
    tokens: int,
    d_in: int,
) -> AttnConfig:
    """The config ``variant`` runs with: seed defaults < what the weights pin down < explicit flags.

    An explicit flag that contradicts the weights is an error naming both values; so is
    an input whose ``d_in`` or token count the weights cannot take.
    """
    relevant = set(variant.fields)
    inferred = {k: v for k, v in inferred.items() if k in relevant}
    for key, value in inferred.items():
        if key in overrides and overrides[key] != value:
            raise BadInputError(
                f"{variant.name}: {_flag(key)} {_show(overrides[key])} contradicts the weights, "
                f"whose shapes give {key}={_show(value)}"
            )
    if "d_in" in inferred and inferred["d_in"] != d_in:
        raise BadInputError(
            f"{variant.name}: the input's last dimension is {d_in} but the weights take d_in={inferred['d_in']}"
        )
    if "d_in" in overrides and overrides["d_in"] != d_in:
        raise BadInputError(f"{variant.name}: --d-in {overrides['d_in']} but the input's last dimension is {d_in}")
    values = {**AttnConfig().to_dict(), **dict(variant.defaults), "d_in": d_in}
    if "context_length" not in inferred:
        values["context_length"] = tokens  # nothing pins it: the input's own length
    values.update(inferred)
    values.update({k: v for k, v in overrides.items() if k in AttnConfig.__dataclass_fields__})
    cfg = AttnConfig(**values)
    _check_config(variant, cfg, tokens, from_weights="context_length" in inferred)
    return cfg


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_config(variant: registry.Variant, cfg: AttnConfig, tokens: int, from_weights: bool) -> None:
    """Raise :class:`BadInputError` naming the field and the limit when ``variant`` cannot run ``cfg`` on ``tokens``."""
    rc = variant.resolve(cfg)
    name = variant.name
    for key in ("d_in", "d_out", "num_heads", "context_length"):
        if key in variant.fields and getattr(rc, key) < 1:
            raise BadInputError(f"{name}: {key} must be >= 1, got {getattr(rc, key)}")
    if not 0.0 <= rc.dropout < 1.0:
        raise BadInputError(f"{name}: dropout must be in [0, 1), got {rc.dropout}")
    variant.check_heads(rc)
    if "context_length" in variant.fields and tokens > rc.context_length:
        source = "the weights' mask buffer" if from_weights else "--context-length"
        raise BadInputError(f"{name}: input has tokens={tokens}, beyond context_length={rc.context_length} ({source})")


def _torch_reference_module(case_variant: registry.Variant, cfg: AttnConfig, weights: Optional[dict]):
    import torch

    torch.manual_seed(TORCH_SEED)
    module = case_variant.torch_module(cfg).eval()
    if weights is not None:
        sd = module.state_dict()
        for key, value in weights.items():
            if key in sd:  # THE weights; buffers the file lacks keep the module's own (validated equal)
                sd[key] = torch.from_numpy(np.array(value, dtype=np.float32))
        module.load_state_dict(sd, strict=True)
    return module


def build_cases(
    variants: Optional[Iterable[str]] = None,
    *,
    weights: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
    inputs: Union[None, str, os.PathLike, np.ndarray, inp.RandomInputs] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> tuple[list[Case], inp.Inputs, str]:
    """``(cases, inputs, weights description)``: everything validated before anything runs."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise BadInputError(f"unknown config overrides {unknown}; known: {', '.join(OVERRIDABLE)}")
    chosen = select_variants(variants)
    sd = None
    weights_desc = f"torch.manual_seed({TORCH_SEED}) + the torch reference modules' own init"
    if weights is not None:
        if isinstance(weights, Mapping):
            raw, weights_desc = dict(weights), "state dict (in memory)"
        else:
            raw, weights_desc = port.load_file(weights), os.fspath(weights)
        sd = _float32_state_dict(raw, weights_desc)
        if variants:
            for v in chosen:  # every named variant must take the weights
                err = _fits(v, sd) if v.portmap(AttnConfig()).entries else f"{v.name} has no parameters to load"
                if err:
                    raise BadInputError(err)
        else:
            chosen = match_variants(sd, chosen)
    inferred = {v.name: (port.infer_config(v, sd) if sd is not None else {}) for v in chosen}
    weight_d_in = {i["d_in"] for i in inferred.values() if "d_in" in i}
    d_in_hint = overrides.get("d_in") or (weight_d_in.pop() if len(weight_d_in) == 1 else None)
    data = inp.resolve_inputs(inputs, d_in_hint)
    tokens, d_in = data.array.shape[-2], data.array.shape[-1]
    cases = []
    for v in chosen:
        cfg = resolve_config(v, overrides, inferred[v.name], tokens, d_in)
        module = _torch_reference_module(v, cfg, sd)
        state = sd if sd is not None else {k: t.detach().numpy().copy() for k, t in module.state_dict().items()}
        if sd is not None:
            port.check_state_dict(v.portmap(cfg), state, v.name)  # the mask buffer against the final config
        cases.append(Case(v, cfg, state, inp.for_variant(v, data.array), module))
    return cases, data, weights_desc


def bundle_cases(cases: Sequence[Case]):
    """The cases as :class:`crosscheck.bundle.BundleCase` records, for a bundle file."""
    from crosscheck.bundle import BundleCase

    return [
        BundleCase(
            c.variant.name, c.config, dict(c.state_dict), np.asarray(c.x, dtype=np.float32),
            attention_mask=None if c.attention_mask is None else np.asarray(c.attention_mask),
        )
        for c in cases
    ]
