"""A Flax file's metadata read back: the variant and config it records, the torch buffers its source carried,
and the flags that may repeat them (one that contradicts the metadata is refused, naming both values).

Each field is checked as the same value given by a flag is: a file edited by hand (or by a bug) is refused
naming the field, not run into a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.pipeline import cases
from crosscheck.porting import bundle
from crosscheck.variants import registry


def metadata_config(meta: Mapping, src: str) -> tuple[registry.Variant, AttnConfig]:
    """The variant and config a Flax file's metadata records (``crosscheck_variant``, ``crosscheck_config``)."""
    name = meta.get("crosscheck_variant")
    if not isinstance(name, str):
        raise BadInputError(f"{src}: metadata crosscheck_variant must be a variant name, found {name!r}")
    try:
        v = registry.get(name)
    except KeyError as err:
        raise BadInputError(f"{src}: metadata crosscheck_variant: {err.args[0]}") from None
    where = f"{src}: metadata crosscheck_config"
    text = meta.get("crosscheck_config")
    if not isinstance(text, str):
        raise BadInputError(f"{where} must be a JSON string, found {type(text).__name__}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInputError(f"{where} is not valid JSON ({err})") from None
    cfg = bundle.config_from_json(raw, where)  # a JSON object, each field of its type
    missing = [f for f in v.fields if f not in raw]
    if missing:
        raise BadInputError(f"{where}: missing {', '.join(missing)} (fields {v.name} reads)")
    bundle.check_config(v, cfg, where)
    cfg = v.resolve(cfg)
    if not v.portmap(cfg).entries:
        raise BadInputError(f"{src}: metadata names {v.name}, which has no parameters to convert")
    return v, cfg


def metadata_buffers(meta: Mapping, v: registry.Variant, cfg: AttnConfig, src: str) -> list[str]:
    """The torch buffers the source state dict carried (``torch_buffers``: comma-separated keys of the variant)."""
    text = meta.get("torch_buffers", "")
    if not isinstance(text, str):
        raise BadInputError(f"{src}: metadata torch_buffers must be a comma-separated string, found {text!r}")
    names = [b for b in text.split(",") if b]
    known = [b.torch_key for b in v.portmap(cfg).buffers]
    unknown = [b for b in names if b not in known]
    if unknown:
        has = f"its buffers: {', '.join(known[:4])}" if known else "it has none"
        raise BadInputError(f"{src}: metadata torch_buffers names {unknown[0]!r}, not a buffer of {v.name} ({has})")
    return names


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_flags_agree(v, cfg: AttnConfig, variant, model_config, overrides, src: str) -> None:
    """Flags (and a ``config.json``) on a Flax file may repeat what its metadata records; one that contradicts
    it is refused naming both values (the metadata describes the weights the file holds)."""
    if variant is not None:
        try:
            named = registry.get(str(variant))
        except KeyError as err:
            raise BadInputError(str(err.args[0])) from None
        if named is not v:
            raise BadInputError(
                f"--variant {named.name} contradicts {src}'s metadata, whose crosscheck_variant is {v.name}"
            )
    given = {k: val for k, val in (overrides or {}).items() if val is not None}
    unknown = sorted(set(given) - set(cases.OVERRIDABLE))
    if unknown:
        raise BadInputError(f"unknown config overrides {unknown}; known: {', '.join(cases.OVERRIDABLE)}")
    merged, origins = cases.config_overrides(given, model_config)
    for key, value in merged.items():
        recorded = getattr(cfg, key)
        if value != recorded:
            source = origins.get(key, "--" + key.replace("_", "-"))
            raise BadInputError(
                f"{source} {_show(value)} contradicts {src}'s metadata, whose crosscheck_config gives "
                f"{key}={_show(recorded)}"
            )
