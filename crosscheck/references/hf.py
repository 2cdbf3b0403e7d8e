"""Hugging Face transformers' attention layers: their config, their torch modules and their forward.

Everything transformers-specific lives here and in :mod:`crosscheck.references.hf_config` (reading a
config, re-exported here), so the registry entries of ``LlamaAttention``, ``Qwen3Attention`` and
``GPT2Attention`` only name a :class:`Spec`. transformers is an optional extra
(``pip install 'jaxattn[hf]'``): it is imported inside the functions that build or run a module
(:func:`require_transformers`), never by reading a config, which needs only the JSON or the config
object a module carries.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.references.config_values import MAX_INT
from crosscheck.references.hf_config import attn_fields, read_config_json, rope_scaling_string, rope_settings

__all__ = [
    "EXTRA",
    "MAX_INT",
    "Spec",
    "attn_fields",
    "gpt2_forward",
    "read_config_json",
    "require_transformers",
    "rope_forward",
    "rope_scaling_string",
    "rope_settings",
]

#: What ``pip`` needs for this module's torch side.
EXTRA = "pip install 'jaxattn[hf]' (transformers>=4.45)"


def require_transformers():
    """The ``transformers`` module, or :class:`BadInputError` saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise BadInputError(
            f"this variant needs Hugging Face transformers, which is not installed ({err}): {EXTRA}"
        ) from None
    return transformers


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
