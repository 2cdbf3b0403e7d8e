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


def _get(config: Any, name: str, default: Any = _MISSING) -> Any:
    """``config[name]`` or ``config.name`` (GPT-2's alias too); ``default`` when absent or ``None``."""
    for key in (name, _ALIASES.get(name)):
        if key is None:
            continue
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if value is not None:
            return value
    return default


def rope_scaling_string(rope_scaling: Mapping[str, Any] | None, where: str) -> str:
    """transformers' ``rope_scaling`` / ``rope_parameters`` -> :attr:`AttnConfig.rope_scaling` ("" = none).

    :func:`jaxattn.rope.freq_config_from_rope_scaling` reads it (``default``: no scaling, ``llama3``:
    the book's ``freq_config``); what it refuses is a :class:`BadInputError` naming ``where``.
    """
    from jaxattn.rope import freq_config_from_rope_scaling  # here: reading a config must not start JAX

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
    if isinstance(params, Mapping) and params:
        if set(params) and all(isinstance(v, Mapping) for v in params.values()):
            raise BadInputError(f"{where}: per-layer-type rope_parameters ({', '.join(params)}) are not supported")
        found: dict[str, Any] = {"rope_scaling": rope_scaling_string(params, where)}
        if params.get("rope_theta") is not None:
            found["rope_theta"] = float(params["rope_theta"])
        return found
    found = {"rope_scaling": rope_scaling_string(_get(config, "rope_scaling", None), where)}
    theta = _get(config, "rope_theta", None)
    if theta is not None:
        found["rope_theta"] = float(theta)
    return found


def attn_fields(config: Any, where: str = "config", *, rope: bool = True) -> dict:
    """The :class:`AttnConfig` fields a transformers config (object or ``config.json`` mapping) gives.

    ``rope=False`` for GPT-2 (learned positions, no RoPE keys). Raises :class:`BadInputError`
    naming the key when a needed one is missing or the layer is one we do not model (sliding
    window, a qk-norm eps other than 1e-6, GPT-2's layer-index scaling).
    """
    d_in = _get(config, "hidden_size", None)
    num_heads = _get(config, "num_attention_heads", None)
    for name, value in (("hidden_size", d_in), ("num_attention_heads", num_heads)):
        if value is None:
            raise BadInputError(f"{where}: no {name}")
    d_in, num_heads = int(d_in), int(num_heads)
    head_dim = int(_get(config, "head_dim", 0) or 0) or (d_in // num_heads if rope else 0)
    found: dict = dict(d_in=d_in, num_heads=num_heads)
    if rope:
        found.update(
            num_kv_groups=int(_get(config, "num_key_value_heads", num_heads)),
            head_dim=head_dim,
            d_out=num_heads * head_dim,
            qkv_bias=bool(_get(config, "attention_bias", False)),
            **rope_settings(config, where),
        )
        if _get(config, "use_sliding_window", False):
            raise BadInputError(f"{where}: use_sliding_window=true is not supported (full causal attention only)")
        eps = _get(config, "rms_norm_eps", None)
        if eps is not None and float(eps) != 1e-6 and "qwen3" in str(_get(config, "model_type", "")):
            raise BadInputError(f"{where}: rms_norm_eps={eps} is not supported (q/k norms use 1e-6)")
    else:
        found.update(d_out=d_in, qkv_bias=True)
        if not _get(config, "scale_attn_weights", True):
            raise BadInputError(
                f"{where}: scale_attn_weights=false is not supported (scores are divided by sqrt(head_dim))"
            )
        if _get(config, "scale_attn_by_inverse_layer_idx", False):
            raise BadInputError(f"{where}: scale_attn_by_inverse_layer_idx=true is not supported")
    context = _get(config, "max_position_embeddings", None)
    if context is not None:
        found["context_length"] = int(context)
    dropout = _get(config, "attention_dropout", None)
    if dropout is not None:
        found["dropout"] = float(dropout)
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

    from crosscheck.torch_ref import check_attention_mask

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
    from crosscheck.torch_ref import check_attention_mask

    x, unbatched = _batched(x)
    if attention_mask is not None:
        attention_mask = check_attention_mask(
            type(module).__name__, attention_mask[None] if unbatched else attention_mask, x.shape[:-1]
        )
    out = module(x, attention_mask=_mask(x, attention_mask))[0]
    out = _zero_unseen_rows(out, attention_mask, module.c_proj.bias)
    return out[0] if unbatched else out
