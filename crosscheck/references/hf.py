"""Hugging Face transformers' attention layers: their config, their torch modules and their forward.

Everything transformers-specific lives here, so the registry entries of ``LlamaAttention``,
``Qwen3Attention`` and ``GPT2Attention`` only name a :class:`Spec`. transformers is an optional
extra (``pip install 'jaxattn[hf]'``): it is imported inside the functions that build or run a
module (:func:`require_transformers`), never by reading a config, which needs only the JSON or
the config object a module carries.

Config reading (:func:`attn_fields`) takes a ``config.json`` mapping or a config object, of
either generation: transformers 5 keeps the RoPE base and scaling in ``rope_parameters``
(``{"rope_type", "rope_theta", ...}``), 4.x in ``rope_theta`` and ``rope_scaling``. GPT-2's own
names (``n_embd``, ``n_head``, ``n_positions``) are read as the common ones. The result uses
:class:`~crosscheck.config.AttnConfig`'s names: ``d_in`` (hidden_size), ``d_out`` (heads x
head_dim), ``num_heads``, ``num_kv_groups``, ``head_dim``, ``qkv_bias`` (attention_bias: q/k/v
AND o_proj), ``rope_theta``, ``rope_scaling`` (the book's ``freq_config`` as a string),
``context_length`` (max_position_embeddings), ``dropout``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError

#: What ``pip`` needs for this module's torch side.
EXTRA = "pip install 'jaxattn[hf]' (transformers>=4.45)"

#: GPT-2's names for the common config keys (transformers' ``GPT2Config.attribute_map``).
_ALIASES = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
    "attention_dropout": "attn_pdrop",
}


def require_transformers():
    """The ``transformers`` module, or :class:`BadInputError` saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise BadInputError(
            f"this variant needs Hugging Face transformers, which is not installed ({err}): {EXTRA}"
        ) from None
    return transformers


# --- reading a config ----------------------------------------------------------------------------


_MISSING = object()
#: The largest count a config may give: torch, numpy and XLA hold every size in a signed 64-bit integer.
MAX_INT = 2**63 - 1


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


# A config value reaches torch, Flax and the RoPE tables as a Python number: one of the wrong type
# (``"four"``, ``true``), non-finite (JSON's NaN, 1e400) or out of range would be read as something
# else or compute NaN, and look like a mismatch. Each read key is checked here and named when refused.


def _bad(where: str, key: str, value: Any, expected: str) -> BadInputError:
    shown = repr(value) if isinstance(value, str) else _show(value)
    return BadInputError(f"{where}: {key} must be {expected}, got {shown} ({type(value).__name__})")


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_value(where: str, key: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (an integral float such as 8.0 too), else :class:`BadInputError`."""
    whole = _is_number(value) and (
        isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer())
    )
    number = int(value) if whole else None
    if number is None or number < minimum:
        raise _bad(where, key, value, f"an integer >= {minimum}")
    if number > MAX_INT:
        raise _bad(where, key, value, "at most 2^63 - 1 (sizes are 64-bit integers)")
    return number


def _float_value(
    where: str,
    key: str,
    value: Any,
    *,
    expected: str,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a finite float in the range given, else :class:`BadInputError` saying ``expected``."""
    try:
        number = float(value) if _is_number(value) else math.nan
    except OverflowError:  # an integer beyond float's range
        number = math.inf
    if (
        not math.isfinite(number)
        or (above is not None and not number > above)
        or (at_least is not None and not number >= at_least)
        or (below is not None and not number < below)
    ):
        raise _bad(where, key, value, expected)
    return number


def _bool_value(where: str, key: str, value: Any) -> bool:
    """A JSON ``true``/``false``: the string ``"false"`` would otherwise read as true."""
    if not isinstance(value, bool):
        raise _bad(where, key, value, "true or false")
    return value


def _int_key(config: Any, where: str, name: str, minimum: int = 1) -> int | None:
    key, value = _lookup(config, name)
    return None if value is None else _int_value(where, key, value, minimum)


def _bool_key(config: Any, where: str, name: str, default: bool) -> bool:
    key, value = _lookup(config, name)
    return default if value is None else _bool_value(where, key, value)


def _theta(where: str, key: str, value: Any) -> float:
    return _float_value(where, key, value, above=0.0, expected="a finite number > 0 (the RoPE base)")


def _check_llama3(rope_scaling: Mapping[str, Any], where: str, key: str) -> None:
    """Llama 3's frequency scaling divides by ``factor``, by each ``*_freq_factor`` and by their difference
    (the smoothing between them), so each must be finite and in range (the rules transformers states)."""
    from jaxattn.rope import FREQ_CONFIG_KEYS

    missing = [k for k in FREQ_CONFIG_KEYS.values() if rope_scaling.get(k) is None]
    if missing:
        raise BadInputError(f"{where}: {key}: rope_type='llama3' needs {', '.join(missing)}")
    positive = "a finite number > 0"
    _float_value(where, f"{key}.factor", rope_scaling["factor"], above=0.0, expected=positive)
    low = _float_value(where, f"{key}.low_freq_factor", rope_scaling["low_freq_factor"], above=0.0, expected=positive)
    _float_value(
        where,
        f"{key}.high_freq_factor",
        rope_scaling["high_freq_factor"],
        above=low,
        expected=f"a finite number > low_freq_factor={low}",
    )
    original = "original_max_position_embeddings"
    _int_value(where, f"{key}.{original}", rope_scaling[original])


def rope_scaling_string(rope_scaling: Mapping[str, Any] | None, where: str, key: str = "rope_scaling") -> str:
    """transformers' ``rope_scaling`` / ``rope_parameters`` -> :attr:`AttnConfig.rope_scaling` ("" = none).

    :func:`jaxattn.rope.freq_config_from_rope_scaling` reads it (``default``: no scaling, ``llama3``:
    the book's ``freq_config``); what it refuses, and a value of the wrong type or out of range, is a
    :class:`BadInputError` naming ``where`` and the key (``key``: the config's name for the mapping).
    """
    from jaxattn.rope import freq_config_from_rope_scaling  # here: reading a config must not start JAX

    if rope_scaling is not None and not isinstance(rope_scaling, Mapping):
        raise _bad(where, key, rope_scaling, 'an object such as {"rope_type": "llama3", "factor": 8.0, ...} or null')
    if rope_scaling:
        type_key = "rope_type" if "rope_type" in rope_scaling else "type"
        rope_type = rope_scaling.get(type_key, "default")
        if not isinstance(rope_type, str):
            raise _bad(where, f"{key}.{type_key}", rope_type, "a string such as 'default' or 'llama3'")
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
        raise _bad(where, "rope_parameters", params, 'an object such as {"rope_type": "default", "rope_theta": 1e4}')
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
    heads_key = _lookup(config, "num_attention_heads")[0]
    model_type = _get(config, "model_type", "")
    if not isinstance(model_type, str):
        raise _bad(where, "model_type", model_type, "a string")
    found: dict = dict(d_in=d_in, num_heads=num_heads)
    if rope:
        head_dim = _int_key(config, where, "head_dim")
        if head_dim is None:  # transformers' default, as LlamaConfig derives it
            head_dim = d_in // num_heads
            if head_dim < 2 or head_dim % 2:
                raise BadInputError(
                    f"{where}: no head_dim, and hidden_size // num_attention_heads = {d_in} // {num_heads} = "
                    f"{head_dim} is not an even number >= 2 (RoPE rotates pairs of dims); give head_dim"
                )
        elif head_dim % 2:
            raise _bad(where, "head_dim", head_dim, "an even integer >= 2 (RoPE rotates pairs of dims)")
        kv_heads = _int_key(config, where, "num_key_value_heads")
        if kv_heads is None:
            kv_heads = num_heads
        elif num_heads % kv_heads:
            raise BadInputError(
                f"{where}: num_key_value_heads must divide num_attention_heads={num_heads} "
                f"(each key/value head serves a group of query heads), got {kv_heads}"
            )
        found.update(
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
            eps = _float_value(where, "rms_norm_eps", eps_value, above=0.0, expected="a finite number > 0")
            if eps != 1e-6 and "qwen3" in model_type:
                raise BadInputError(f"{where}: rms_norm_eps={eps_value} is not supported (q/k norms use 1e-6)")
    else:
        if d_in % num_heads:
            raise BadInputError(
                f"{where}: {_lookup(config, 'hidden_size')[0]}={d_in} must be divisible by {heads_key}={num_heads} "
                "(the heads split the width)"
            )
        found.update(d_out=d_in, qkv_bias=True)
        if not _bool_key(config, where, "scale_attn_weights", True):
            raise BadInputError(
                f"{where}: scale_attn_weights=false is not supported (scores are divided by sqrt(head_dim))"
            )
        if _bool_key(config, where, "scale_attn_by_inverse_layer_idx", False):
            raise BadInputError(f"{where}: scale_attn_by_inverse_layer_idx=true is not supported")
    context = _int_key(config, where, "max_position_embeddings")
    if context is not None:
        found["context_length"] = context
    key, dropout = _lookup(config, "attention_dropout")
    if dropout is not None:
        found["dropout"] = _float_value(where, key, dropout, at_least=0.0, below=1.0, expected="a number in [0, 1)")
    return found


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


# --- the torch modules ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One transformers attention layer: its model module and class names."""

    model: str  # transformers.models.<model>.modeling_<model>
    config_class: str
    attention_class: str
    rotary_class: str | None = None  # RoPE models: the rotary embedding class

    def modeling(self):
        require_transformers()
        import importlib

        return importlib.import_module(f"transformers.models.{self.model}.modeling_{self.model}")

    def config(self, cfg: AttnConfig):
        """A one-layer transformers config at ``cfg`` (eager attention, nothing downloaded)."""
        transformers = require_transformers()
        common = dict(num_hidden_layers=1, vocab_size=8, attn_implementation="eager")
        if self.rotary_class is None:
            return getattr(transformers, self.config_class)(
                n_embd=cfg.d_in,
                n_head=cfg.num_heads,
                n_positions=cfg.context_length,
                attn_pdrop=cfg.dropout,
                resid_pdrop=0.0,
                n_layer=1,
                vocab_size=8,
                bos_token_id=0,
                eos_token_id=0,
                attn_implementation="eager",
            )
        from jaxattn.rope import FREQ_CONFIG_KEYS  # the book's freq_config keys -> transformers'

        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        freq = cfg.freq_config()
        if freq:
            rope = {
                "rope_type": "llama3",
                "rope_theta": cfg.rope_theta,
                **{hf: freq[book] for book, hf in FREQ_CONFIG_KEYS.items()},
            }
            rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        hd = cfg.resolved_head_dim()
        config = getattr(transformers, self.config_class)(
            # transformers validates hidden_size % heads == 0 even with head_dim given; hidden_size is set after.
            hidden_size=cfg.num_heads * hd,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.kv_heads(),
            head_dim=hd,
            attention_bias=cfg.qkv_bias,
            attention_dropout=cfg.dropout,
            max_position_embeddings=cfg.context_length,
            intermediate_size=8,
            rms_norm_eps=1e-6,
            **common,
        )
        config.hidden_size = cfg.d_in
        # transformers 5 reads rope_parameters; 4.x reads rope_theta / rope_scaling.
        if hasattr(config, "rope_parameters"):
            config.rope_parameters = rope
        else:
            config.rope_theta = cfg.rope_theta
            config.rope_scaling = None if not freq else {**rope, "rope_type": "llama3"}
        return config

    def module(self, cfg: AttnConfig):
        """The attention layer at ``cfg`` (layer 0), randomly initialised by its own ``__init__``."""
        return getattr(self.modeling(), self.attention_class)(self.config(cfg), layer_idx=0)


def _mask(x, attention_mask):
    """The additive ``(batch, 1, T, T)`` causal mask, with padded keys hidden (finfo.min, never NaN)."""
    import torch

    tokens = x.shape[-2]
    visible = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    visible = visible.expand(x.shape[0], 1, tokens, tokens)
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, None, :]
    zero = torch.zeros((), dtype=x.dtype)
    return torch.where(visible, zero, torch.tensor(torch.finfo(x.dtype).min, dtype=x.dtype))


def _batched(x):
    return (x[None], True) if x.dim() == 2 else (x, False)


def rope_forward(spec: Spec, module, x, cfg: AttnConfig, attention_mask=None):
    """``module`` (a Llama/Qwen3 attention) on ``x`` at positions ``0..T-1``, causal: the context vectors.

    cos/sin come from the model's own rotary embedding class built from ``module.config``.
    ``attention_mask``: ``x.shape[:-1]``, 1/True = real token. Padded keys are hidden by the
    additive ``(batch, 1, T, T)`` mask eager attention adds (:func:`_mask`); RoPE positions stay
    ``0..T-1`` in every row. A query that sees no key gets what a zero context gives
    (``o_proj``'s bias, or zero): eager attention would give it the mean of every value there.
    """
    import torch

    from crosscheck.references.torch_ref import check_attention_mask

    x, unbatched = _batched(x)
    if attention_mask is not None:
        attention_mask = check_attention_mask(
            type(module).__name__, attention_mask[None] if unbatched else attention_mask, x.shape[:-1]
        )
    assert spec.rotary_class is not None  # rope_forward is the forward of the RoPE specs only
    rotary = getattr(spec.modeling(), spec.rotary_class)(module.config)
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    with torch.no_grad():  # the tables hold no parameters; the layer itself keeps autograd
        cos, sin = rotary(x, positions)
    out, _ = module(x, position_embeddings=(cos.to(x.dtype), sin.to(x.dtype)), attention_mask=_mask(x, attention_mask))
    out = _zero_unseen_rows(out, attention_mask, module.o_proj.bias)
    return out[0] if unbatched else out


def _zero_unseen_rows(out, attention_mask, bias):
    """Rows whose query sees no key (causal + padding) set to what a zero context gives: ``bias``, or zero."""
    import torch

    if attention_mask is None:
        return out
    tokens = out.shape[1]
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=out.device).tril()  # (T, T), True = visible
    row_visible = (causal & attention_mask.to(out.device).bool()[:, None, :]).any(dim=-1, keepdim=True)  # (b, T, 1)
    zero_context = torch.zeros((), dtype=out.dtype, device=out.device) if bias is None else bias
    return torch.where(row_visible, out, zero_context)


def gpt2_forward(module, x, cfg: AttnConfig, attention_mask=None):
    """``GPT2Attention`` on ``x``, causal (eager attention adds the mask it is given: we give the causal one).

    As in :func:`rope_forward`, a query that sees no key gets ``c_proj``'s bias (a zero context).
    """
    from crosscheck.references.torch_ref import check_attention_mask

    x, unbatched = _batched(x)
    if attention_mask is not None:
        attention_mask = check_attention_mask(
            type(module).__name__, attention_mask[None] if unbatched else attention_mask, x.shape[:-1]
        )
    out = module(x, attention_mask=_mask(x, attention_mask))[0]
    out = _zero_unseen_rows(out, attention_mask, module.c_proj.bias)
    return out[0] if unbatched else out
