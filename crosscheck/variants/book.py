"""The book's chapter-3 variants (Raschka, *Build a Large Language Model (From Scratch)*, sections 3.3-3.6).

``SimplifiedSelfAttention``, ``SelfAttentionV1``/``V2``, ``CausalAttention``, ``MultiHeadAttentionWrapper``,
``MultiHeadAttention`` and the bonus ``MultiHeadAttentionCombinedQKV``: their porting tables, what their
state dicts pin down, how their torch modules are recognised, and their entries. Torch references:
:mod:`crosscheck.references.torch_ref` (and :mod:`~crosscheck.references.torch_kv_cache`); Flax modules:
:mod:`jaxattn`; ttnn programs: :mod:`crosscheck.tt.programs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.tt import decode_programs as dp
from crosscheck.tt import programs as tp
from crosscheck.variants import portmap as pm
from crosscheck.variants.common import (
    build_flax,
    build_torch,
    build_torch_cached,
    causal_args,
    has_heads,
    has_linear,
    heads_args,
    is_combined_qkv,
    matrix,
    qkv_layer,
)
from crosscheck.variants.variant import Shapes, Variant

# --- porting tables ---------------------------------------------------------------------------


def _no_params(cfg: AttnConfig) -> pm.PortMap:
    return pm.PortMap(())


def _v1(cfg: AttnConfig) -> pm.PortMap:
    shape = (cfg.d_in, cfg.d_out)
    return pm.PortMap(tuple(pm.Entry(n, (n,), "raw", shape) for n in ("W_query", "W_key", "W_value")))


def _v2(cfg: AttnConfig) -> pm.PortMap:
    return pm.PortMap(tuple(pm.qkv_linears("", (), cfg.d_in, cfg.d_out, cfg.qkv_bias)))


def _causal(cfg: AttnConfig, prefix: str = "", flax_prefix: tuple[str, ...] = ()) -> pm.PortMap:
    entries = pm.qkv_linears(prefix, flax_prefix, cfg.d_in, cfg.d_out, cfg.qkv_bias)
    return pm.PortMap(tuple(entries), (pm.causal_mask(prefix, cfg.context_length),))


def _wrapper(cfg: AttnConfig) -> pm.PortMap:
    heads = [_causal(cfg, f"heads.{i}.", (f"heads_{i}",)) for i in range(cfg.num_heads)]
    return pm.PortMap(tuple(e for h in heads for e in h.entries), tuple(b for h in heads for b in h.buffers))


def _mha(cfg: AttnConfig) -> pm.PortMap:
    entries = pm.qkv_linears("", (), cfg.d_in, cfg.d_out, cfg.qkv_bias)
    entries += pm.linear("out_proj", ("out_proj",), cfg.d_out, cfg.d_out, True)
    return pm.PortMap(tuple(entries), (pm.causal_mask("", cfg.context_length),))


def _combined_qkv(cfg: AttnConfig) -> pm.PortMap:
    entries = pm.linear("qkv", ("qkv",), cfg.d_in, 3 * cfg.d_out, cfg.qkv_bias)
    entries += pm.linear("proj", ("proj",), cfg.d_out, cfg.d_out, True)
    return pm.PortMap(tuple(entries), (pm.causal_mask("", cfg.context_length),))


# --- what a state dict's shapes pin down --------------------------------------------------------


def _infer_nothing(shapes: Shapes, known: Mapping) -> dict:
    return {}


def _infer_mask(shapes: Shapes, prefix: str) -> dict:
    """``context_length`` from the causal ``mask`` buffer, when the state dict carries it."""
    mask = matrix(shapes, prefix + "mask")
    return {"context_length": mask[0]} if mask else {}


def _infer_qkv_linears(shapes: Shapes, prefix: str = "") -> dict:
    """``nn.Linear`` Q/K/V (weight ``(d_out, d_in)``) under ``prefix``, and the mask."""
    found: dict = {}
    w = matrix(shapes, prefix + "W_query.weight")
    if w:
        found["d_out"], found["d_in"] = w
    found["qkv_bias"] = prefix + "W_query.bias" in shapes
    return {**found, **_infer_mask(shapes, prefix)}


def _infer_v1(shapes: Shapes, known: Mapping) -> dict:
    """Raw ``(d_in, d_out)`` matrices; a state dict without them is read as linears (and will not fit)."""
    w = matrix(shapes, "W_query")
    return dict(d_in=w[0], d_out=w[1]) if w else _infer_qkv_linears(shapes)


def _infer_linears(shapes: Shapes, known: Mapping) -> dict:
    return _infer_qkv_linears(shapes)


def _infer_wrapper(shapes: Shapes, known: Mapping) -> dict:
    """The first head's linears and mask, and ``num_heads`` from the ``heads.<i>.`` keys."""
    found = _infer_qkv_linears(shapes, "heads.0.")
    heads = {k.split(".")[1] for k in shapes if k.startswith("heads.") and k.count(".") >= 2}
    return {**found, "num_heads": len(heads)} if heads else found


def _infer_combined(shapes: Shapes, known: Mapping) -> dict:
    found: dict = {}
    w = matrix(shapes, "qkv.weight")
    if w:
        found["d_out"], found["d_in"] = w[0] // 3, w[1]
    found["qkv_bias"] = "qkv.bias" in shapes
    return {**found, **_infer_mask(shapes, "")}


# --- recognising a torch module by its structure (torch imported lazily) ----------------------


def _is_mha(module) -> bool:
    return qkv_layer(module) and has_linear(module, "out_proj") and not hasattr(module, "num_kv_groups")


def _single_head_linears(module) -> bool:
    return qkv_layer(module) and not has_linear(module, "out_proj") and has_linear(module, "W_query")


def _has_mask(module) -> bool:
    """A ``mask`` tensor on the module: a buffer, persistent or not (``state_dict()`` hides a non-persistent
    one, and the causal layer would pass for a non-causal V2), or a plain tensor attribute."""
    mask = getattr(module, "mask", None)
    return hasattr(mask, "shape") and hasattr(mask, "dtype")


def _is_causal(module) -> bool:
    """Linear Q/K/V with the causal ``mask`` (a V2 without one)."""
    return _single_head_linears(module) and _has_mask(module)


def _is_v2(module) -> bool:
    return _single_head_linears(module) and not _has_mask(module)


def _is_v1(module) -> bool:
    from torch import nn

    return qkv_layer(module) and not has_linear(module, "out_proj") and isinstance(module.W_query, nn.Parameter)


def _is_simplified(module) -> bool:
    """No parameters at all, so only the class name can tell."""
    return not has_heads(module) and not module.state_dict() and "simplified" in type(module).__name__.lower()


def _wrapper_torch_config(module, recognise, options: Mapping) -> AttnConfig:
    """The heads' config times their number: every head must be a causal single-head layer, all alike
    (a ModuleList of non-causal ``SelfAttention_v2`` heads is not the book's wrapper)."""
    cls = type(module).__name__
    wrong = [f"heads.{i} ({type(head).__name__})" for i, head in enumerate(module.heads) if not _is_causal(head)]
    if wrong:
        raise BadInputError(
            f"{cls}: not a MultiHeadAttentionWrapper: its heads must be causal single-head layers "
            f"(W_query/W_key/W_value and a mask buffer); {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}"
        )
    found = [recognise(head)[1] for head in module.heads]
    differ = [f"heads.{i}" for i, c in enumerate(found) if c != found[0]]
    if differ:
        raise BadInputError(f"{cls}: heads {', '.join(differ[:4])} differ in shape or context_length from heads.0")
    return found[0].replace(num_heads=len(module.heads))


def _no_config(module, recognise, options: Mapping) -> AttnConfig:
    return AttnConfig(d_in=0, d_out=0, context_length=0)


_none: Callable[[AttnConfig], dict] = lambda cfg: {}  # noqa: E731
_d = lambda cfg: dict(d_in=cfg.d_in, d_out=cfg.d_out)  # noqa: E731
_dq = lambda cfg: dict(d_in=cfg.d_in, d_out=cfg.d_out, qkv_bias=cfg.qkv_bias)  # noqa: E731

_CAUSAL_FIELDS = ("d_in", "d_out", "context_length", "dropout", "qkv_bias")
_STAGES = "crosscheck.checks.stage_reruns:"
#: What the causal entries share: a selectable attention core; the fused ones also split d_out into heads.
_CAUSAL: dict = dict(takes_attention_impl=True, shard_modes=("batch", "sequence"))
_SPLIT: dict = dict(takes_attention_impl=True, splits_heads_of="d_out", shard_modes=("batch", "heads", "sequence"))

VARIANTS: tuple[Variant, ...] = (
    Variant(
        name="SimplifiedSelfAttention",
        family="book",
        summary="3.3 softmax(x x^T) x, no weights",
        fields=("d_in",),
        unbatched=True,
        port_table=_no_params,
        make_flax=build_flax("SimplifiedSelfAttention", _none),
        make_torch=build_torch("SimplifiedSelfAttention", _none),
        ttnn_forward=tp.simplified_self_attention,
        matches=_is_simplified,
        infer=_infer_nothing,
        # x, scores, softmax weights, context: no projections.
        bf16_roundings=4,
        output_width=lambda cfg: cfg.d_in,
        torch_config=_no_config,
        torch_stages=_STAGES + "rerun_simplified",
        projects_x=False,
    ),
    Variant(
        name="SelfAttentionV1",
        family="book",
        summary="3.4 raw W_query/W_key/W_value matrices",
        fields=("d_in", "d_out"),
        unbatched=True,
        port_table=_v1,
        make_flax=build_flax("SelfAttentionV1", _d),
        make_torch=build_torch("SelfAttentionV1", _d),
        ttnn_forward=tp.self_attention_v1,
        matches=_is_v1,
        infer=_infer_v1,
        bf16_roundings=8,
        torch_stages=_STAGES + "rerun_v1",
    ),
    Variant(
        name="SelfAttentionV2",
        family="book",
        summary="3.4 nn.Linear projections",
        fields=("d_in", "d_out", "qkv_bias"),
        unbatched=True,
        port_table=_v2,
        make_flax=build_flax("SelfAttentionV2", _dq),
        make_torch=build_torch("SelfAttentionV2", _dq),
        ttnn_forward=tp.self_attention_v2,
        matches=_is_v2,
        infer=_infer_linears,
        bf16_roundings=8,
        torch_stages=_STAGES + "rerun_v2",
    ),
    Variant(
        name="CausalAttention",
        family="book",
        summary="3.5 causal mask + dropout",
        fields=_CAUSAL_FIELDS,
        port_table=_causal,
        make_flax=build_flax("CausalAttention", causal_args),
        make_torch=build_torch("CausalAttention", causal_args),
        make_torch_cached=build_torch_cached("CausalAttention", causal_args),
        ttnn_forward=tp.causal_attention,
        ttnn_decode=dp.CAUSAL_DECODE,
        matches=_is_causal,
        infer=_infer_linears,
        bf16_roundings=8,
        torch_stages=_STAGES + "rerun_causal",
        **_CAUSAL,
    ),
    Variant(
        name="MultiHeadAttentionWrapper",
        family="book",
        summary="3.6.1 stacked causal heads",
        fields=(*_CAUSAL_FIELDS, "num_heads"),
        port_table=_wrapper,
        make_flax=build_flax("MultiHeadAttentionWrapper", heads_args),
        make_torch=build_torch("MultiHeadAttentionWrapper", heads_args),
        make_torch_cached=build_torch_cached("MultiHeadAttentionWrapper", heads_args),
        ttnn_forward=tp.multi_head_attention_wrapper,
        ttnn_decode=dp.WRAPPER_DECODE,
        matches=has_heads,
        infer=_infer_wrapper,
        # The heads run side by side: the longest path is one head's.
        bf16_roundings=8,
        # One head's keys are what every stack has; more heads are read from the keys.
        fit_defaults=(("num_heads", 1),),
        output_width=lambda cfg: cfg.num_heads * cfg.d_out,
        torch_config=_wrapper_torch_config,
        torch_stages=_STAGES + "rerun_wrapper",
        **_CAUSAL,
    ),
    Variant(
        name="MultiHeadAttention",
        family="book",
        summary="3.6.2 fused heads + out_proj",
        fields=(*_CAUSAL_FIELDS, "num_heads"),
        port_table=_mha,
        make_flax=build_flax("MultiHeadAttention", heads_args),
        make_torch=build_torch("MultiHeadAttention", heads_args),
        make_torch_cached=build_torch_cached("MultiHeadAttention", heads_args),
        ttnn_forward=tp.multi_head_attention,
        ttnn_sdpa=tp.multi_head_attention_sdpa,
        ttnn_decode=dp.MHA_DECODE,
        matches=_is_mha,
        infer=_infer_linears,
        bf16_roundings=10,
        torch_stages=_STAGES + "rerun_mha",
        **_SPLIT,
    ),
    Variant(
        name="MultiHeadAttentionCombinedQKV",
        family="book",
        summary="bonus: one qkv linear + proj",
        fields=(*_CAUSAL_FIELDS, "num_heads"),
        port_table=_combined_qkv,
        make_flax=build_flax("MultiHeadAttentionCombinedQKV", heads_args),
        make_torch=build_torch("MultiHeadAttentionCombinedQKV", heads_args),
        make_torch_cached=build_torch_cached("MultiHeadAttentionCombinedQKV", heads_args),
        ttnn_forward=tp.multi_head_attention_combined_qkv,
        ttnn_sdpa=tp.multi_head_attention_combined_qkv_sdpa,
        ttnn_decode=dp.COMBINED_QKV_DECODE,
        matches=is_combined_qkv,
        infer=_infer_combined,
        bf16_roundings=10,
        torch_stages=_STAGES + "rerun_combined",
        **_SPLIT,
    ),
)
