"""Cases: what a cross-check runs, resolved and validated before anything runs.

A :class:`Case` is one variant with its config, THE weights (canonical torch keys ->
float32, the same array for every backend), its input and its torch reference module.
:func:`build_cases` gets there from what the user gave: variant names (or the variants a
state dict fits), a weights file or mapping, inputs, and config overrides; the config
precedence is seed defaults < what the weights pin down < explicit flags.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError, PortError
from crosscheck.pipeline import budget
from crosscheck.pipeline import inputs as inp
from crosscheck.porting import port
from crosscheck.variants import portmap as pm
from crosscheck.variants import registry

#: The book's seed: ``torch.manual_seed(123)`` before building each layer.
TORCH_SEED = 123
#: Config fields a user may override; the CLI flag of each is ``--`` + the name with dashes.
OVERRIDABLE = (
    "d_in",
    "d_out",
    "context_length",
    "dropout",
    "num_heads",
    "qkv_bias",
    "causal",
    "num_kv_groups",
    "head_dim",
    "qk_norm",
    "rope_theta",
    "rope_scaling",
)
#: A ``--config`` file's name for each field (transformers' ``config.json``), for error messages.
CONFIG_JSON_NAMES = {
    "d_in": "hidden_size",
    "d_out": "num_attention_heads x head_dim",
    "num_heads": "num_attention_heads",
    "num_kv_groups": "num_key_value_heads",
    "head_dim": "head_dim",
    "qkv_bias": "attention_bias",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "context_length": "max_position_embeddings",
    "dropout": "attention_dropout",
}


@dataclass
class Case:
    """One variant ready to run: its config, THE weights (canonical torch keys -> float32) and its input."""

    variant: registry.Variant
    config: AttnConfig
    state_dict: dict[str, np.ndarray]
    x: np.ndarray  # float32, (tokens, d_in) or (batch, tokens, d_in) as the variant takes it
    torch_module: Any = None
    #: ``x.shape[:-1]`` of 1 (real token) / 0 (padding), or ``None``: no padding.
    attention_mask: np.ndarray | None = None


def select_variants(names: Iterable[str] | None, *, all_formats: bool = False) -> list[registry.Variant]:
    """Registry variants by case-insensitive name, in the order given.

    Without names: the default run's variants (the book's chapter-3 ones), or every
    variant with ``all_formats`` (what ``--weights`` are matched against).
    """
    if not names:
        return list(registry.VARIANTS) if all_formats else registry.default_run()
    chosen = []
    for name in names:
        try:
            v = registry.get(name)
        except KeyError as err:
            raise BadInputError(str(err.args[0])) from None
        if v not in chosen:
            chosen.append(v)
    return chosen


def float32_state_dict(sd: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """Canonical keys, float32 values: the weights as every backend receives them."""
    clashes = pm.alias_collisions(sd)
    if clashes:
        raise PortError(f"{source}: ambiguous state dict, duplicate aliases: " + "; ".join(clashes))
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


def _fits(variant: registry.Variant, sd: Mapping[str, Any], known: Mapping[str, Any] | None = None) -> str | None:
    """``None`` when ``sd`` fits ``variant`` at the config its shapes imply, else the port error."""
    known = {k: v for k, v in (known or {}).items() if k in variant.fields}
    inferred = port.infer_config(variant, sd, known)
    shapes = {k: tuple(np.shape(v)) for k, v in sd.items()}
    guess = {} if {"num_heads", "head_dim"} & set(known) else variant.fit_guess(shapes)
    cfg = AttnConfig(
        **{
            **AttnConfig().to_dict(),
            **dict(variant.defaults),
            **dict(variant.fit_defaults),
            **guess,
            **known,
            **inferred,
        }
    )
    if "context_length" in variant.fields and "context_length" not in inferred:
        cfg = cfg.replace(context_length=1)  # no mask buffer to check
    try:
        port.check_state_dict(variant.portmap(cfg), sd, variant.name)
    except BadInputError as err:
        return str(err)
    return None


def match_variants(
    sd: Mapping[str, Any], candidates: Sequence[registry.Variant], known: Mapping[str, Any] | None = None
) -> list[registry.Variant]:
    """The variants among ``candidates`` whose keys and shapes ``sd`` fits (``known``: flags, config file).

    Raises :class:`BadInputError` with the port error of the closest candidate when none fits.
    """
    errors = {v.name: _fits(v, sd, known) for v in candidates if v.portmap(v.resolve(_probe(v))).entries}
    fitting = [v for v in candidates if errors.get(v.name, "no params") is None]
    if fitting:
        return fitting
    if not errors:
        raise BadInputError("weights were given but no selected variant has parameters")
    closest = min(errors, key=lambda n: (errors[n] or "").count("\n"))  # none fits: every error is a string
    raise PortError(f"the weights fit no variant; closest: {errors[closest]}")


def _probe(variant: registry.Variant) -> AttnConfig:
    """A config at which ``variant``'s table lists its parameters (the seed's, with the variant's defaults)."""
    return AttnConfig(**{**AttnConfig().to_dict(), **dict(variant.defaults)})


def resolve_config(
    variant: registry.Variant,
    overrides: Mapping[str, Any],
    inferred: Mapping[str, Any],
    tokens: int,
    d_in: int,
    origins: Mapping[str, str] | None = None,
) -> AttnConfig:
    """The config ``variant`` runs with: seed defaults < what the weights pin down < explicit flags.

    An explicit flag that contradicts the weights is an error naming both values; so is
    an input whose ``d_in`` or token count the weights cannot take. ``origins``: where an
    override came from when not from its flag (``config.json's num_attention_heads``).
    """
    relevant = set(variant.fields)
    origins = origins or {}
    inferred = {k: v for k, v in inferred.items() if k in relevant}
    for key, value in inferred.items():
        if key in overrides and overrides[key] != value:
            source = origins.get(key, _flag(key))
            raise BadInputError(
                f"{variant.name}: {source} {_show(overrides[key])} contradicts the weights, "
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
    given = frozenset(inferred) | frozenset(k for k in overrides if k in relevant)
    cfg = AttnConfig(**variant.complete(values, given))
    check_config(variant, cfg, tokens, from_weights="context_length" in inferred)
    return cfg


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_config(variant: registry.Variant, cfg: AttnConfig, tokens: int, from_weights: bool) -> None:
    """Raise :class:`BadInputError` naming the field and the limit when ``variant`` cannot run ``cfg`` on ``tokens``."""
    rc = variant.resolve(cfg)
    name = variant.name
    for key in ("d_in", "d_out", "num_heads", "context_length"):
        if key in variant.fields and getattr(rc, key) < 1:
            raise BadInputError(f"{name}: {key} must be >= 1, got {getattr(rc, key)}")
    if not 0.0 <= rc.dropout < 1.0:
        raise BadInputError(f"{name}: dropout must be in [0, 1), got {rc.dropout}")
    try:
        variant.check_heads(rc)
    except BadInputError as err:
        text = str(err)
        raise BadInputError(text if text.startswith(name) else f"{name}: {text}") from None
    if "context_length" in variant.fields and tokens > rc.context_length:
        source = "the weights' mask buffer" if from_weights else "--context-length"
        raise BadInputError(f"{name}: input has tokens={tokens}, beyond context_length={rc.context_length} ({source})")


def torch_reference_module(case_variant: registry.Variant, cfg: AttnConfig, weights: dict | None):
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


def _check_needs(variants: Iterable[registry.Variant]) -> None:
    """A variant whose torch side needs a package this interpreter lacks is an error saying which."""
    for v in variants:
        missing = registry.missing_needs(v)
        if missing:
            raise BadInputError(
                f"{v.name} needs {', '.join(missing)}, which is not installed: pip install 'jaxattn[hf]'"
            )


def config_overrides(
    overrides: Mapping[str, Any], model_config: str | os.PathLike | Mapping[str, Any] | None
) -> tuple[dict, dict]:
    """``(overrides, origins)``: the flags and a transformers ``config.json``'s values, which must agree.

    A flag that contradicts the file is an error naming both; ``origins`` names the file's key
    for each value it supplied (for the messages of later contradictions).
    """
    if model_config is None:
        return dict(overrides), {}
    from crosscheck.references import hf

    if isinstance(model_config, Mapping):
        where, found = "config", hf.attn_fields(model_config, "config", rope="n_embd" not in model_config)
    else:
        where, found = os.fspath(model_config), hf.read_config_json(model_config)
    name = os.path.basename(where)
    merged, origins = dict(overrides), {}
    for key, value in found.items():
        if key in overrides and overrides[key] != value:
            raise BadInputError(
                f"{_flag(key)} {_show(overrides[key])} contradicts {name}, whose "
                f"{CONFIG_JSON_NAMES.get(key, key)} gives {key}={_show(value)}"
            )
        if key not in overrides:
            merged[key] = value
            origins[key] = f"{name}'s {CONFIG_JSON_NAMES.get(key, key)}"
    return merged, origins


def build_cases(
    variants: Iterable[str] | None = None,
    *,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    inputs: str | os.PathLike | np.ndarray | inp.RandomInputs | None = None,
    overrides: Mapping[str, Any] | None = None,
    prefix: str = "",
    model_config: str | os.PathLike | Mapping[str, Any] | None = None,
) -> tuple[list[Case], inp.Inputs, str]:
    """``(cases, inputs, weights description)``: everything validated before anything runs.

    ``prefix``: the layer to read from a whole model's state dict (``model.layers.0.self_attn.``).
    ``model_config``: a transformers ``config.json`` (path or mapping) for heads, kv heads,
    head_dim, RoPE; flags that contradict it are errors. Without ``variants``, ``weights``
    are matched against every variant; with neither, the default run's variants run.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise BadInputError(f"unknown config overrides {unknown}; known: {', '.join(OVERRIDABLE)}")
    if prefix and weights is None:
        raise BadInputError("--prefix selects a layer of --weights; no weights were given")
    overrides, origins = config_overrides(overrides, model_config)
    if "num_heads" in overrides:  # before a porting table or module is built per head
        budget.check_count(int(overrides["num_heads"]), budget.MAX_HEADS, origins.get("num_heads", "--num-heads"))
    chosen = select_variants(variants, all_formats=weights is not None)
    if variants:
        _check_needs(chosen)
    sd = None
    weights_desc = f"torch.manual_seed({TORCH_SEED}) + the torch reference modules' own init"
    if weights is not None:
        if isinstance(weights, Mapping):
            raw, weights_desc = dict(weights), "state dict (in memory)"
        else:
            raw, weights_desc = port.load_file(weights), os.fspath(weights)
        if prefix:
            raw, weights_desc = port.select_prefix(raw, prefix), f"{weights_desc} [{prefix}]"
        sd = float32_state_dict(raw, weights_desc)
        if variants:
            for v in chosen:  # every named variant must take the weights
                has_params = v.portmap(v.resolve(_probe(v))).entries
                err = _fits(v, sd, overrides) if has_params else f"{v.name} has no parameters to load"
                if err:
                    raise BadInputError(err)
        else:
            chosen = match_variants(sd, chosen, overrides)
            _check_needs(chosen)
    inferred = {v.name: (port.infer_config(v, sd, _known(v, overrides)) if sd is not None else {}) for v in chosen}
    weight_d_in = {i["d_in"] for i in inferred.values() if "d_in" in i}
    default_d_in = {dict(v.defaults)["d_in"] for v in chosen if "d_in" in dict(v.defaults)}  # a plugin's own
    d_in_hint = (
        overrides.get("d_in")
        or (weight_d_in.pop() if len(weight_d_in) == 1 else None)
        or (default_d_in.pop() if len(default_d_in) == 1 else None)
    )
    data = inp.resolve_inputs(inputs, d_in_hint)
    tokens, d_in = data.array.shape[-2], data.array.shape[-1]
    configs = [resolve_config(v, overrides, inferred[v.name], tokens, d_in, origins) for v in chosen]
    # Before any torch module (mask buffers, one module per head) or activation exists.
    budget.check_cases(
        [(v, cfg, inp.for_variant(v, data.array).shape) for v, cfg in zip(chosen, configs, strict=True)],
        _input_flag(inputs),
    )
    cases = []
    for v, cfg in zip(chosen, configs, strict=True):
        module = torch_reference_module(v, cfg, sd)
        state = sd if sd is not None else {k: t.detach().numpy().copy() for k, t in module.state_dict().items()}
        if sd is not None:
            port.check_state_dict(v.portmap(cfg), state, v.name)  # the mask buffer against the final config
        cases.append(Case(v, cfg, state, inp.for_variant(v, data.array), module))
    return cases, data, weights_desc


def _input_flag(inputs) -> str:
    """The flag to lower when the input's shape is what makes a run too large."""
    if isinstance(inputs, (str, os.PathLike)):
        return f"the shape of --input {os.fspath(inputs)}"
    return "--tokens/--batch" if isinstance(inputs, inp.RandomInputs) or inputs is None else "the inputs' shape"


def _known(variant: registry.Variant, overrides: Mapping[str, Any]) -> dict:
    return {k: v for k, v in overrides.items() if k in variant.fields}


def bundle_cases(cases: Sequence[Case]):
    """The cases as :class:`crosscheck.porting.bundle.BundleCase` records, for a bundle file."""
    from crosscheck.porting.bundle import BundleCase

    return [
        BundleCase(
            c.variant.name,
            c.config,
            dict(c.state_dict),
            np.asarray(c.x, dtype=np.float32),
            attention_mask=None if c.attention_mask is None else np.asarray(c.attention_mask),
        )
        for c in cases
    ]


def cases_from_bundle(records: Sequence[Any], source: str | os.PathLike) -> list[Case]:
    """The cases of a bundle's records (:func:`crosscheck.porting.bundle.read_bundle`), validated as
    :func:`build_cases` validates them; ``source`` names the bundle in the messages."""
    cases = []
    for bc in records:
        v = select_variants([bc.variant])[0]
        sd = float32_state_dict(bc.state_dict, f"{source}: {bc.variant}")
        port.check_state_dict(v.portmap(bc.config), sd, v.name)
        x = inp.validate_array(np.asarray(bc.inputs), f"{source}: {bc.variant}/inputs")
        check_config(v, bc.config, x.shape[-2], from_weights=False)
        budget.check_cases([(v, bc.config, x.shape)], f"the config or inputs of {os.fspath(source)}")
        cases.append(Case(v, bc.config, sd, x, torch_reference_module(v, bc.config, sd)))
    return cases
