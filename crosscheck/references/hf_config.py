"""A transformers config read as :class:`~crosscheck.config.AttnConfig` fields, each value checked.

Config reading (:func:`attn_fields`) takes a ``config.json`` mapping or a config object, of
either generation: transformers 5 keeps the RoPE base and scaling in ``rope_parameters``
(``{"rope_type", "rope_theta", ...}``), 4.x in ``rope_theta`` and ``rope_scaling``. GPT-2's own
names (``n_embd``, ``n_head``, ``n_positions``) are read as the common ones. The result uses
:class:`~crosscheck.config.AttnConfig`'s names: ``d_in`` (hidden_size), ``d_out`` (heads x
head_dim), ``num_heads``, ``num_kv_groups``, ``head_dim``, ``qkv_bias`` (attention_bias: q/k/v
AND o_proj), ``rope_theta``, ``rope_scaling`` (the book's ``freq_config`` as a string),
``context_length`` (max_position_embeddings), ``dropout``.

Reading a config needs only the JSON or the config object a module carries: neither transformers
nor torch is imported, and JAX's RoPE tables only inside the functions that read RoPE scaling.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.references.config_values import bad_value, bool_value, float_value, int_value

#: GPT-2's names for the common config keys (transformers' ``GPT2Config.attribute_map``).
_ALIASES = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
    "attention_dropout": "attn_pdrop",
}

_MISSING = object()


def _lookup(config: Any, name: str) -> tuple[str, Any]:
    """``(key, value)`` of ``name`` in ``config`` (a mapping or an object; GPT-2's alias too), ``value`` ``None``
    when absent; ``key`` is the spelling the config used, for error messages."""
    for key in (name, _ALIASES.get(name)):
        if key is None:
            continue
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if value is not None:
            return key, value
    return name, None


def _get(config: Any, name: str, default: Any = _MISSING) -> Any:
    """``config[name]`` or ``config.name`` (GPT-2's alias too); ``default`` when absent or ``None``."""
    value = _lookup(config, name)[1]
    return default if value is None else value


def _int_key(config: Any, where: str, name: str, minimum: int = 1) -> int | None:
    key, value = _lookup(config, name)
    return None if value is None else int_value(where, key, value, minimum)


def _bool_key(config: Any, where: str, name: str, default: bool) -> bool:
    key, value = _lookup(config, name)
    return default if value is None else bool_value(where, key, value)


def _theta(where: str, key: str, value: Any) -> float:
    return float_value(where, key, value, above=0.0, expected="a finite number > 0 (the RoPE base)")


def _check_llama3(rope_scaling: Mapping[str, Any], where: str, key: str) -> None:
    """Llama 3's frequency scaling divides by ``factor``, by each ``*_freq_factor`` and by their difference
    (the smoothing between them), so each must be finite and in range (the rules transformers states)."""
    from jaxattn.rope import FREQ_CONFIG_KEYS

    missing = [k for k in FREQ_CONFIG_KEYS.values() if rope_scaling.get(k) is None]
    if missing:
        raise BadInputError(f"{where}: {key}: rope_type='llama3' needs {', '.join(missing)}")
    positive = "a finite number > 0"
    float_value(where, f"{key}.factor", rope_scaling["factor"], above=0.0, expected=positive)
    low = float_value(where, f"{key}.low_freq_factor", rope_scaling["low_freq_factor"], above=0.0, expected=positive)
    float_value(
        where,
        f"{key}.high_freq_factor",
        rope_scaling["high_freq_factor"],
        above=low,
        expected=f"a finite number > low_freq_factor={low}",
    )
    original = "original_max_position_embeddings"
    int_value(where, f"{key}.{original}", rope_scaling[original])


def rope_scaling_string(rope_scaling: Mapping[str, Any] | None, where: str, key: str = "rope_scaling") -> str:
    """transformers' ``rope_scaling`` / ``rope_parameters`` -> :attr:`AttnConfig.rope_scaling` ("" = none).

    :func:`jaxattn.rope.freq_config_from_rope_scaling` reads it (``default``: no scaling, ``llama3``:
    the book's ``freq_config``); what it refuses, and a value of the wrong type or out of range, is a
    :class:`BadInputError` naming ``where`` and the key (``key``: the config's name for the mapping).
    """
    from jaxattn.rope import freq_config_from_rope_scaling  # here: reading a config must not start JAX

    if rope_scaling is not None and not isinstance(rope_scaling, Mapping):
        raise bad_value(
            where, key, rope_scaling, 'an object such as {"rope_type": "llama3", "factor": 8.0, ...} or null'
        )
    if rope_scaling:
        type_key = "rope_type" if "rope_type" in rope_scaling else "type"
        rope_type = rope_scaling.get(type_key, "default")
        if not isinstance(rope_type, str):
            raise bad_value(where, f"{key}.{type_key}", rope_type, "a string such as 'default' or 'llama3'")
        if rope_type == "llama3":
            _check_llama3(rope_scaling, where, key)
    try:
        freq_config = freq_config_from_rope_scaling(rope_scaling or None)
    except ValueError as err:
        raise BadInputError(f"{where}: {err}") from None
    return AttnConfig.encode_freq_config(freq_config)


def rope_settings(config: Any, where: str) -> dict:
    """``rope_theta`` and ``rope_scaling`` of a transformers config (5: ``rope_parameters``; 4.x: both keys).

    Only what the config holds: a config without a RoPE base gives no ``rope_theta``.
    """
    params = _get(config, "rope_parameters", None)
    if params is not None and not isinstance(params, Mapping):
        raise bad_value(
            where, "rope_parameters", params, 'an object such as {"rope_type": "default", "rope_theta": 1e4}'
        )
    if isinstance(params, Mapping) and params:
        if set(params) and all(isinstance(v, Mapping) for v in params.values()):
            raise BadInputError(f"{where}: per-layer-type rope_parameters ({', '.join(params)}) are not supported")
        found: dict[str, Any] = {"rope_scaling": rope_scaling_string(params, where, "rope_parameters")}
        if params.get("rope_theta") is not None:
            found["rope_theta"] = _theta(where, "rope_parameters.rope_theta", params["rope_theta"])
        return found
    found = {"rope_scaling": rope_scaling_string(_get(config, "rope_scaling", None), where)}
    theta = _get(config, "rope_theta", None)
    if theta is not None:
        found["rope_theta"] = _theta(where, "rope_theta", theta)
    return found


def attn_fields(config: Any, where: str = "config", *, rope: bool = True) -> dict:
    """The :class:`AttnConfig` fields a transformers config (object or ``config.json`` mapping) gives.

    ``rope=False`` for GPT-2 (learned positions, no RoPE keys). Raises :class:`BadInputError`
    naming the key when a needed one is missing, a read one has the wrong type or is out of range
    (every count an integer >= 1, every rate, base and eps finite), or the layer is one we do not
    model (sliding window, a qk-norm eps other than 1e-6, GPT-2's layer-index scaling).
    """
    d_in = _int_key(config, where, "hidden_size")
    num_heads = _int_key(config, where, "num_attention_heads")
    if d_in is None or num_heads is None:
        raise BadInputError(f"{where}: no {'hidden_size' if d_in is None else 'num_attention_heads'}")
    model_type = _get(config, "model_type", "")
    if not isinstance(model_type, str):
        raise bad_value(where, "model_type", model_type, "a string")
    found: dict = dict(d_in=d_in, num_heads=num_heads)
    if rope:
        found.update(_rope_layer_fields(config, where, d_in, num_heads, model_type))
    else:
        found.update(_gpt2_layer_fields(config, where, d_in, num_heads))
    context = _int_key(config, where, "max_position_embeddings")
    if context is not None:
        found["context_length"] = context
    key, dropout = _lookup(config, "attention_dropout")
    if dropout is not None:
        found["dropout"] = float_value(where, key, dropout, at_least=0.0, below=1.0, expected="a number in [0, 1)")
    return found


def _head_dim(config: Any, where: str, d_in: int, num_heads: int) -> int:
    """``head_dim``, or transformers' default ``hidden_size // num_attention_heads``: an even number >= 2."""
    head_dim = _int_key(config, where, "head_dim")
    if head_dim is None:  # transformers' default, as LlamaConfig derives it
        head_dim = d_in // num_heads
        if head_dim < 2 or head_dim % 2:
            raise BadInputError(
                f"{where}: no head_dim, and hidden_size // num_attention_heads = {d_in} // {num_heads} = "
                f"{head_dim} is not an even number >= 2 (RoPE rotates pairs of dims); give head_dim"
            )
    elif head_dim % 2:
        raise bad_value(where, "head_dim", head_dim, "an even integer >= 2 (RoPE rotates pairs of dims)")
    return head_dim


def _kv_heads(config: Any, where: str, num_heads: int) -> int:
    """``num_key_value_heads`` (default: one per query head), a divisor of the query heads."""
    kv_heads = _int_key(config, where, "num_key_value_heads")
    if kv_heads is None:
        return num_heads
    if num_heads % kv_heads:
        raise BadInputError(
            f"{where}: num_key_value_heads must divide num_attention_heads={num_heads} "
            f"(each key/value head serves a group of query heads), got {kv_heads}"
        )
    return kv_heads


def _rope_layer_fields(config: Any, where: str, d_in: int, num_heads: int, model_type: str) -> dict:
    """The fields of a Llama or Qwen3 attention layer: heads, kv heads, bias and RoPE; what we do not model
    (a sliding window, a qk-norm eps other than 1e-6) refused."""
    head_dim = _head_dim(config, where, d_in, num_heads)
    kv_heads = _kv_heads(config, where, num_heads)
    found = dict(
        num_kv_groups=kv_heads,
        head_dim=head_dim,
        d_out=num_heads * head_dim,
        qkv_bias=_bool_key(config, where, "attention_bias", False),
        **rope_settings(config, where),
    )
    if _bool_key(config, where, "use_sliding_window", False):
        raise BadInputError(f"{where}: use_sliding_window=true is not supported (full causal attention only)")
    eps_value = _get(config, "rms_norm_eps", None)
    if eps_value is not None:
        eps = float_value(where, "rms_norm_eps", eps_value, above=0.0, expected="a finite number > 0")
        if eps != 1e-6 and "qwen3" in model_type:
            raise BadInputError(f"{where}: rms_norm_eps={eps_value} is not supported (q/k norms use 1e-6)")
    return found


def _gpt2_layer_fields(config: Any, where: str, d_in: int, num_heads: int) -> dict:
    """The fields of a GPT-2 attention layer (heads that split the width, biases); its scalings we do not
    model refused."""
    if d_in % num_heads:
        heads_key = _lookup(config, "num_attention_heads")[0]
        raise BadInputError(
            f"{where}: {_lookup(config, 'hidden_size')[0]}={d_in} must be divisible by {heads_key}={num_heads} "
            "(the heads split the width)"
        )
    if not _bool_key(config, where, "scale_attn_weights", True):
        raise BadInputError(
            f"{where}: scale_attn_weights=false is not supported (scores are divided by sqrt(head_dim))"
        )
    if _bool_key(config, where, "scale_attn_by_inverse_layer_idx", False):
        raise BadInputError(f"{where}: scale_attn_by_inverse_layer_idx=true is not supported")
    return dict(d_out=d_in, qkv_bias=True)


def read_config_json(path: str | os.PathLike) -> dict:
    """The :class:`AttnConfig` fields of a transformers ``config.json`` (GPT-2's names too)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadInputError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise BadInputError(f"cannot read {path} as JSON: {err}") from None
    if not isinstance(raw, dict):
        raise BadInputError(f"{path}: a config.json holds a JSON object, found {type(raw).__name__}")
    gpt2 = "n_embd" in raw or raw.get("model_type") == "gpt2"
    return attn_fields(raw, path, rope=not gpt2)
