"""``torch.nn.MultiheadAttention`` (``batch_first=True`` self-attention, causal when ``causal``).

torch keeps the fused input projection as bare parameters (``in_proj_weight``/``in_proj_bias``); the
Flax module is :class:`jaxattn.TorchMultiheadAttention` (torch's names: ``embed_dim``, ``bias``); the ttnn
program is :func:`crosscheck.tt.programs.torch_multihead_attention`. ``d_out`` is ``d_in`` (``embed_dim``).
"""

from __future__ import annotations

from collections.abc import Mapping

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.tt import decode_programs as dp
from crosscheck.tt import programs as tp
from crosscheck.variants import portmap as pm
from crosscheck.variants.common import build_flax, build_torch_cached, is_torch_mha, matrix
from crosscheck.variants.variant import Shapes, Variant


def _torch_mha(cfg: AttnConfig) -> pm.PortMap:
    e = cfg.d_in
    # torch keeps the fused input projection as bare parameters, not an nn.Linear.
    entries = [pm.Entry("in_proj_weight", ("in_proj", "kernel"), "linear_weight", (3 * e, e))]
    if cfg.qkv_bias:
        entries.append(pm.Entry("in_proj_bias", ("in_proj", "bias"), "bias", (3 * e,)))
    entries += pm.linear("out_proj", ("out_proj",), e, e, cfg.qkv_bias)
    return pm.PortMap(tuple(entries))


def _infer_torch_mha(shapes: Shapes, known: Mapping) -> dict:
    found: dict = {}
    w = matrix(shapes, "in_proj_weight")
    if w:
        found["d_in"] = found["d_out"] = w[1]
    found["qkv_bias"] = "in_proj_bias" in shapes
    return found


def _torch_mha_config(module, recognise, options: Mapping) -> AttnConfig:
    """``nn.MultiheadAttention`` keeps its hyperparameters as attributes; causality is a call argument."""
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise BadInputError(
            "nn.MultiheadAttention with kdim/vdim != embed_dim, add_bias_kv or add_zero_attn is not supported"
        )
    return AttnConfig(
        d_in=module.embed_dim,
        d_out=module.embed_dim,
        context_length=0,
        dropout=float(module.dropout),
        num_heads=module.num_heads,
        qkv_bias=module.in_proj_bias is not None,
        causal=False,
    )


def _torch_mha_config_of(flax_module) -> AttnConfig:
    """jaxattn's ``TorchMultiheadAttention`` uses torch's names (``embed_dim``, ``bias``)."""
    return AttnConfig(
        d_in=flax_module.embed_dim,
        d_out=flax_module.embed_dim,
        context_length=0,
        dropout=flax_module.dropout,
        num_heads=flax_module.num_heads,
        qkv_bias=flax_module.bias,
        causal=flax_module.causal,
    )


def _torch_mha_forward(module, x, cfg: AttnConfig, attention_mask=None):
    """Self-attention through ``nn.MultiheadAttention`` (with the causal mask when ``cfg.causal``)."""
    from crosscheck.references.torch_ref import torch_multihead_forward

    return torch_multihead_forward(module, x, cfg.causal, attention_mask=attention_mask)


def _torch_mha_masked_forward(module, x, cfg: AttnConfig, keep, p: float):
    """``nn.MultiheadAttention`` drops inside its functional call: its steps with the mask given."""
    from crosscheck.references.dropout_masks import multihead_forward_masked

    return multihead_forward_masked(module, x, cfg.causal, keep, p)


def _torch_mha_module(cfg: AttnConfig):
    from torch import nn

    return nn.MultiheadAttention(cfg.d_in, cfg.num_heads, dropout=cfg.dropout, bias=cfg.qkv_bias, batch_first=True)


def _module_args(cfg: AttnConfig) -> dict:
    """``TorchMultiheadAttention``'s (and the cached reference's) constructor arguments: torch's names."""
    return dict(embed_dim=cfg.d_in, num_heads=cfg.num_heads, dropout=cfg.dropout, bias=cfg.qkv_bias, causal=cfg.causal)


VARIANTS: tuple[Variant, ...] = (
    Variant(
        name="TorchMultiheadAttention",
        family="torch-mha",
        summary="torch.nn.MultiheadAttention layout (in_proj, out_proj)",
        fields=("d_in", "num_heads", "dropout", "qkv_bias", "causal"),
        port_table=_torch_mha,
        make_flax=build_flax("TorchMultiheadAttention", _module_args),
        make_torch=_torch_mha_module,
        make_torch_cached=build_torch_cached("MultiheadAttention", _module_args),
        ttnn_forward=tp.torch_multihead_attention,
        ttnn_sdpa=tp.torch_multihead_attention_sdpa,
        ttnn_decode=dp.TORCH_MHA_DECODE,
        matches=is_torch_mha,
        infer=_infer_torch_mha,
        bf16_roundings=10,
        takes_attention_impl=True,
        splits_heads_of="embed_dim (= d_in)",
        shard_modes=("batch", "heads", "sequence"),
        resolve_config=lambda cfg: cfg.replace(d_out=cfg.d_in),
        # embed_dim is d_in (3 in the seed), which two heads cannot split.
        defaults=(("num_heads", 1),),
        torch_call=_torch_mha_forward,
        flax_config=_torch_mha_config_of,
        torch_config=_torch_mha_config,
        # nn.MultiheadAttention decodes only as the causal self-attention it is run as.
        decodes_at=lambda cfg: cfg.causal,
        torch_masked_forward=_torch_mha_masked_forward,
        torch_stages="crosscheck.checks.stage_reruns:rerun_torch_mha",
        # torch.nn.MultiheadAttention's own layout: what crosscheck.jax_layers ports from.
        jax_layers=True,
    ),
)
