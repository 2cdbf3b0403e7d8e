"""The variant registry: each supported attention variant named once, with every fact about it.

A :class:`Variant` ties together the torch reference, the Flax module, the porting
table and the ttnn program, and carries what generic code needs to know about the
variant (how to recognise its torch module, what its state dict's shapes pin down,
its output width, its bf16 rounding count, whether it takes an ``attention_impl``).
The CLI, the compare engine, the porting code, the ttnn runtime, the benchmark and
the tests ask the entry instead of branching on a variant's name, so a new variant
is one entry here. Torch and JAX are imported lazily so that the ttnn worker can
import this module in an interpreter that has neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from crosscheck import portmap as pm
from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError

#: Canonical torch key -> shape, the part of a state dict that :meth:`Variant.infer_config` reads.
Shapes = Mapping[str, tuple[int, ...]]


# --- defaults shared by most entries ------------------------------------------------------------


def _width_is_d_out(cfg: AttnConfig) -> int:
    return cfg.d_out


def _call_module(module, x, cfg: AttnConfig, attention_mask=None):
    return module(x) if attention_mask is None else module(x, attention_mask=attention_mask)


def _always(cfg: AttnConfig) -> bool:
    return True


def _config_from_fields(flax_module) -> AttnConfig:
    """The :class:`AttnConfig` of a jaxattn module whose fields use the book's names."""
    fields = {f: getattr(flax_module, f) for f in AttnConfig.__dataclass_fields__ if hasattr(flax_module, f)}
    return AttnConfig(**{**dict(d_in=0, d_out=0, context_length=0), **fields})


@dataclass(frozen=True)
class Variant:
    name: str  # the jaxattn class name
    summary: str
    #: Config fields a user may set for this variant (the rest are ignored).
    fields: tuple[str, ...]
    #: The book applies it to one unbatched sentence ``(tokens, d_in)``.
    unbatched: bool
    _portmap: Callable[[AttnConfig], pm.PortMap]
    _flax: Callable[[AttnConfig], Any]
    _torch: Callable[[AttnConfig], Any]
    #: Name of the program in :mod:`crosscheck.tt.programs`.
    ttnn_program: str
    #: Whether a torch module is this variant, by its structure (users' own copies of the
    #: book's classes count). The predicates of all entries exclude each other.
    _recognises: Callable[[Any], bool]
    #: What a state dict's shapes pin down (see :meth:`infer_config`).
    _infer: Callable[[Shapes], dict]
    #: bf16 roundings on the longest data path of the ttnn program; the ttnn tolerance is
    #: this many units of bf16 roundoff (how they are counted: :mod:`crosscheck.tt`).
    bf16_roundings: int
    #: The jaxattn module has an ``attention_impl`` field (the attention core it calls).
    takes_attention_impl: bool = False
    #: The width ``num_heads`` splits, as error messages name it; ``None`` for no split.
    splits_heads_of: Optional[str] = None
    _resolve: Optional[Callable[[AttnConfig], AttnConfig]] = None
    #: Config values this variant needs by default where the seed config does not fit it.
    defaults: tuple[tuple[str, Any], ...] = ()
    #: Config values assumed when checking whether a state dict fits and its shapes do not say.
    fit_defaults: tuple[tuple[str, Any], ...] = ()
    _output_dim: Callable[[AttnConfig], int] = _width_is_d_out
    _torch_forward: Callable[[Any, Any, AttnConfig], Any] = _call_module
    _config_of: Callable[[Any], AttnConfig] = _config_from_fields
    #: ``(torch_module, recognise) -> AttnConfig`` where the book's attributes do not tell
    #: (``None``: :func:`crosscheck.port.recognise` reads them generically).
    torch_config: Optional[Callable[[Any, Callable], AttnConfig]] = None
    #: The torch reference with a KV cache (:mod:`crosscheck.torch_kv_cache`, the book's
    #: ``kv_cache`` API); ``None``: the variant does not decode (it is not causal).
    _torch_cached: Optional[Callable[[AttnConfig], Any]] = None
    #: Whether the variant decodes at a config (e.g. only when causal).
    _decodes: Callable[[AttnConfig], bool] = _always

    def resolve(self, cfg: AttnConfig) -> AttnConfig:
        """The config this variant really runs with (e.g. ``d_out = d_in`` for ``nn.MultiheadAttention``)."""
        return self._resolve(cfg) if self._resolve else cfg

    def portmap(self, cfg: AttnConfig) -> pm.PortMap:
        return self._portmap(self.resolve(cfg))

    def flax_module(self, cfg: AttnConfig):
        return self._flax(self.resolve(cfg))

    def torch_module(self, cfg: AttnConfig):
        return self._torch(self.resolve(cfg))

    def output_dim(self, cfg: AttnConfig) -> int:
        """The last dimension of the context vectors at ``cfg``."""
        return self._output_dim(self.resolve(cfg))

    def torch_forward(self, module, x, cfg: AttnConfig, attention_mask=None):
        """Run the torch reference on ``x`` (a torch tensor); ``attention_mask``: ``x.shape[:-1]``, 1 = real token."""
        return self._torch_forward(module, x, self.resolve(cfg), attention_mask)

    def decodes(self, cfg: AttnConfig) -> bool:
        """Whether the variant has a KV cache at ``cfg`` (jaxattn ``decode=True``, a cached torch reference)."""
        return self._torch_cached is not None and self._decodes(self.resolve(cfg))

    def torch_cached_module(self, cfg: AttnConfig):
        """The torch reference with a KV cache: same state-dict keys as :meth:`torch_module`'s."""
        if not self.decodes(cfg):
            raise BadInputError(f"{self.name} has no KV cache at this config (decoding needs a causal variant)")
        return self._torch_cached(self.resolve(cfg))

    def recognises(self, torch_module) -> bool:
        """Whether ``torch_module`` is this variant (by structure, not by class name)."""
        return bool(self._recognises(torch_module))

    def infer_config(self, shapes: Shapes) -> dict[str, Any]:
        """The hyperparameters ``shapes`` (canonical torch key -> shape) pin down; only what is certain."""
        return self._infer(shapes)

    def config_of(self, flax_module) -> AttnConfig:
        """The :class:`AttnConfig` the jaxattn module ``flax_module`` was built with."""
        return self._config_of(flax_module)

    def check_heads(self, cfg: AttnConfig) -> None:
        """Raise :class:`BadInputError` when ``num_heads`` does not split the width it splits."""
        if self.splits_heads_of is None:
            return
        rc = self.resolve(cfg)
        if rc.num_heads < 1 or rc.d_out % rc.num_heads:
            raise BadInputError(
                f"{self.name}: {self.splits_heads_of}={rc.d_out} must be divisible by num_heads={rc.num_heads}"
            )


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
    return pm.PortMap(
        tuple(e for h in heads for e in h.entries), tuple(b for h in heads for b in h.buffers)
    )


def _mha(cfg: AttnConfig) -> pm.PortMap:
    entries = pm.qkv_linears("", (), cfg.d_in, cfg.d_out, cfg.qkv_bias)
    entries += pm.linear("out_proj", ("out_proj",), cfg.d_out, cfg.d_out, True)
    return pm.PortMap(tuple(entries), (pm.causal_mask("", cfg.context_length),))


def _combined_qkv(cfg: AttnConfig) -> pm.PortMap:
    entries = pm.linear("qkv", ("qkv",), cfg.d_in, 3 * cfg.d_out, cfg.qkv_bias)
    entries += pm.linear("proj", ("proj",), cfg.d_out, cfg.d_out, True)
    return pm.PortMap(tuple(entries), (pm.causal_mask("", cfg.context_length),))


def _torch_mha(cfg: AttnConfig) -> pm.PortMap:
    e = cfg.d_in
    # torch keeps the fused input projection as bare parameters, not an nn.Linear.
    entries = [pm.Entry("in_proj_weight", ("in_proj", "kernel"), "linear_weight", (3 * e, e))]
    if cfg.qkv_bias:
        entries.append(pm.Entry("in_proj_bias", ("in_proj", "bias"), "bias", (3 * e,)))
    entries += pm.linear("out_proj", ("out_proj",), e, e, cfg.qkv_bias)
    return pm.PortMap(tuple(entries))


# --- what a state dict's shapes pin down --------------------------------------------------------


def _matrix(shapes: Shapes, key: str) -> Optional[tuple[int, int]]:
    shape = shapes.get(key)
    return shape if shape is not None and len(shape) == 2 else None


def _infer_nothing(shapes: Shapes) -> dict:
    return {}


def _infer_mask(shapes: Shapes, prefix: str) -> dict:
    """``context_length`` from the causal ``mask`` buffer, when the state dict carries it."""
    mask = _matrix(shapes, prefix + "mask")
    return {"context_length": mask[0]} if mask else {}


def _infer_qkv_linears(shapes: Shapes, prefix: str = "") -> dict:
    """``nn.Linear`` Q/K/V (weight ``(d_out, d_in)``) under ``prefix``, and the mask."""
    found: dict = {}
    w = _matrix(shapes, prefix + "W_query.weight")
    if w:
        found["d_out"], found["d_in"] = w
    found["qkv_bias"] = prefix + "W_query.bias" in shapes
    return {**found, **_infer_mask(shapes, prefix)}


def _infer_v1(shapes: Shapes) -> dict:
    """Raw ``(d_in, d_out)`` matrices; a state dict without them is read as linears (and will not fit)."""
    w = _matrix(shapes, "W_query")
    return dict(d_in=w[0], d_out=w[1]) if w else _infer_qkv_linears(shapes)


def _infer_wrapper(shapes: Shapes) -> dict:
    """The first head's linears and mask, and ``num_heads`` from the ``heads.<i>.`` keys."""
    found = _infer_qkv_linears(shapes, "heads.0.")
    heads = {k.split(".")[1] for k in shapes if k.startswith("heads.") and k.count(".") >= 2}
    return {**found, "num_heads": len(heads)} if heads else found


def _infer_combined(shapes: Shapes) -> dict:
    found: dict = {}
    w = _matrix(shapes, "qkv.weight")
    if w:
        found["d_out"], found["d_in"] = w[0] // 3, w[1]
    found["qkv_bias"] = "qkv.bias" in shapes
    return {**found, **_infer_mask(shapes, "")}


def _infer_torch_mha(shapes: Shapes) -> dict:
    found: dict = {}
    w = _matrix(shapes, "in_proj_weight")
    if w:
        found["d_in"] = found["d_out"] = w[1]
    found["qkv_bias"] = "in_proj_bias" in shapes
    return found


# --- recognising a torch module by its structure (torch imported lazily) ----------------------


def _linear(module, attr: str) -> bool:
    sub = getattr(module, attr, None)
    return sub is not None and hasattr(sub, "weight") and hasattr(sub, "in_features")


def _is_torch_mha(module) -> bool:
    from torch import nn

    return isinstance(module, nn.MultiheadAttention)


def _has_heads(module) -> bool:
    """The wrapper's shape: a non-empty ``nn.ModuleList`` of single-head layers named ``heads``."""
    from torch import nn

    heads = getattr(module, "heads", None)
    return isinstance(heads, nn.ModuleList) and len(heads) > 0


def _is_combined_qkv(module) -> bool:
    return not _has_heads(module) and _linear(module, "qkv") and _linear(module, "proj")


def _qkv_layer(module) -> bool:
    """A single layer with ``W_query``/``W_key``/``W_value`` (the seed notebook spells it ``W_val``)."""
    if _is_torch_mha(module) or _has_heads(module) or _is_combined_qkv(module):
        return False
    values = "W_value" if hasattr(module, "W_value") else "W_val"
    return all(hasattr(module, n) for n in ("W_query", "W_key", values))


def _is_mha(module) -> bool:
    return _qkv_layer(module) and _linear(module, "out_proj")


def _single_head_linears(module) -> bool:
    return _qkv_layer(module) and not _linear(module, "out_proj") and _linear(module, "W_query")


def _is_causal(module) -> bool:
    """Linear Q/K/V with the causal ``mask`` buffer (a V2 without one)."""
    return _single_head_linears(module) and "mask" in module.state_dict()


def _is_v2(module) -> bool:
    return _single_head_linears(module) and "mask" not in module.state_dict()


def _is_v1(module) -> bool:
    from torch import nn

    return (
        _qkv_layer(module)
        and not _linear(module, "out_proj")
        and isinstance(getattr(module, "W_query"), nn.Parameter)
    )


def _is_simplified(module) -> bool:
    """No parameters at all, so only the class name can tell."""
    return not _has_heads(module) and not module.state_dict() and "simplified" in type(module).__name__.lower()


def _wrapper_torch_config(module, recognise) -> AttnConfig:
    """The first head's config (whatever single-head class it is), times the number of heads."""
    _, head_cfg = recognise(module.heads[0])
    return head_cfg.replace(num_heads=len(module.heads))


def _no_config(module, recognise) -> AttnConfig:
    return AttnConfig(d_in=0, d_out=0, context_length=0)


def _torch_mha_config(module, recognise) -> AttnConfig:
    """``nn.MultiheadAttention`` keeps its hyperparameters as attributes; causality is a call argument."""
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise BadInputError(
            "nn.MultiheadAttention with kdim/vdim != embed_dim, add_bias_kv or add_zero_attn is not supported"
        )
    return AttnConfig(
        d_in=module.embed_dim, d_out=module.embed_dim, context_length=0, dropout=float(module.dropout),
        num_heads=module.num_heads, qkv_bias=module.in_proj_bias is not None, causal=False,
    )


# --- jaxattn modules -> config, torch forward, output width -------------------------------------


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
    from crosscheck.torch_ref import torch_multihead_forward

    return torch_multihead_forward(module, x, cfg.causal, attention_mask=attention_mask)


# --- module factories (lazy imports) ------------------------------------------------------------


def _flax(name: str, args: Callable[[AttnConfig], dict]):
    def build(cfg: AttnConfig):
        import jaxattn

        return getattr(jaxattn, name)(**args(cfg))

    return build


def _torch(name: str, args: Callable[[AttnConfig], dict]):
    def build(cfg: AttnConfig):
        from crosscheck import torch_ref

        return getattr(torch_ref, name)(**args(cfg))

    return build


def _torch_cached(name: str, args: Callable[[AttnConfig], dict]):
    def build(cfg: AttnConfig):
        from crosscheck import torch_kv_cache

        return getattr(torch_kv_cache, name)(**args(cfg))

    return build


def _torch_mha_module(cfg: AttnConfig):
    from torch import nn

    return nn.MultiheadAttention(
        cfg.d_in, cfg.num_heads, dropout=cfg.dropout, bias=cfg.qkv_bias, batch_first=True
    )


_none = lambda cfg: {}  # noqa: E731
_d = lambda cfg: dict(d_in=cfg.d_in, d_out=cfg.d_out)  # noqa: E731
_dq = lambda cfg: dict(d_in=cfg.d_in, d_out=cfg.d_out, qkv_bias=cfg.qkv_bias)  # noqa: E731
_causal_args = lambda cfg: dict(  # noqa: E731
    d_in=cfg.d_in, d_out=cfg.d_out, context_length=cfg.context_length, dropout=cfg.dropout, qkv_bias=cfg.qkv_bias
)
_heads_args = lambda cfg: dict(_causal_args(cfg), num_heads=cfg.num_heads)  # noqa: E731

_CAUSAL_FIELDS = ("d_in", "d_out", "context_length", "dropout", "qkv_bias")

VARIANTS: tuple[Variant, ...] = (
    Variant(
        "SimplifiedSelfAttention", "3.3 softmax(x x^T) x, no weights", ("d_in",), True,
        _no_params, _flax("SimplifiedSelfAttention", _none), _torch("SimplifiedSelfAttention", _none),
        "simplified_self_attention", _is_simplified, _infer_nothing,
        # x, scores, softmax weights, context: no projections.
        bf16_roundings=4,
        _output_dim=lambda cfg: cfg.d_in,
        torch_config=_no_config,
    ),
    Variant(
        "SelfAttentionV1", "3.4 raw W_query/W_key/W_value matrices", ("d_in", "d_out"), True,
        _v1, _flax("SelfAttentionV1", _d), _torch("SelfAttentionV1", _d), "self_attention_v1",
        _is_v1, _infer_v1, bf16_roundings=8,
    ),
    Variant(
        "SelfAttentionV2", "3.4 nn.Linear projections", ("d_in", "d_out", "qkv_bias"), True,
        _v2, _flax("SelfAttentionV2", _dq), _torch("SelfAttentionV2", _dq), "self_attention_v2",
        _is_v2, _infer_qkv_linears, bf16_roundings=8,
    ),
    Variant(
        "CausalAttention", "3.5 causal mask + dropout", _CAUSAL_FIELDS, False,
        _causal, _flax("CausalAttention", _causal_args), _torch("CausalAttention", _causal_args),
        "causal_attention", _is_causal, _infer_qkv_linears, bf16_roundings=8, takes_attention_impl=True,
        _torch_cached=_torch_cached("CausalAttention", _causal_args),
    ),
    Variant(
        "MultiHeadAttentionWrapper", "3.6.1 stacked causal heads", _CAUSAL_FIELDS + ("num_heads",), False,
        _wrapper, _flax("MultiHeadAttentionWrapper", _heads_args), _torch("MultiHeadAttentionWrapper", _heads_args),
        "multi_head_attention_wrapper", _has_heads, _infer_wrapper,
        # The heads run side by side: the longest path is one head's.
        bf16_roundings=8, takes_attention_impl=True,
        # One head's keys are what every stack has; more heads are read from the keys.
        fit_defaults=(("num_heads", 1),),
        _output_dim=lambda cfg: cfg.num_heads * cfg.d_out,
        torch_config=_wrapper_torch_config,
        _torch_cached=_torch_cached("MultiHeadAttentionWrapper", _heads_args),
    ),
    Variant(
        "MultiHeadAttention", "3.6.2 fused heads + out_proj", _CAUSAL_FIELDS + ("num_heads",), False,
        _mha, _flax("MultiHeadAttention", _heads_args), _torch("MultiHeadAttention", _heads_args),
        "multi_head_attention", _is_mha, _infer_qkv_linears,
        bf16_roundings=10, takes_attention_impl=True, splits_heads_of="d_out",
        _torch_cached=_torch_cached("MultiHeadAttention", _heads_args),
    ),
    Variant(
        "MultiHeadAttentionCombinedQKV", "bonus: one qkv linear + proj", _CAUSAL_FIELDS + ("num_heads",), False,
        _combined_qkv, _flax("MultiHeadAttentionCombinedQKV", _heads_args),
        _torch("MultiHeadAttentionCombinedQKV", _heads_args), "multi_head_attention_combined_qkv",
        _is_combined_qkv, _infer_combined,
        bf16_roundings=10, takes_attention_impl=True, splits_heads_of="d_out",
        _torch_cached=_torch_cached("MultiHeadAttentionCombinedQKV", _heads_args),
    ),
    Variant(
        "TorchMultiheadAttention", "torch.nn.MultiheadAttention layout (in_proj, out_proj)",
        ("d_in", "num_heads", "dropout", "qkv_bias", "causal"), False,
        _torch_mha,
        _flax(
            "TorchMultiheadAttention",
            lambda cfg: dict(
                embed_dim=cfg.d_in, num_heads=cfg.num_heads, dropout=cfg.dropout, bias=cfg.qkv_bias, causal=cfg.causal
            ),
        ),
        _torch_mha_module,
        "torch_multihead_attention",
        _is_torch_mha, _infer_torch_mha,
        bf16_roundings=10, takes_attention_impl=True, splits_heads_of="embed_dim (= d_in)",
        _resolve=lambda cfg: cfg.replace(d_out=cfg.d_in),
        # embed_dim is d_in (3 in the seed), which two heads cannot split.
        defaults=(("num_heads", 1),),
        _torch_forward=_torch_mha_forward,
        _config_of=_torch_mha_config_of,
        torch_config=_torch_mha_config,
        _torch_cached=_torch_cached(
            "MultiheadAttention",
            lambda cfg: dict(
                embed_dim=cfg.d_in, num_heads=cfg.num_heads, dropout=cfg.dropout, bias=cfg.qkv_bias, causal=cfg.causal
            ),
        ),
        # nn.MultiheadAttention decodes only as the causal self-attention it is run as.
        _decodes=lambda cfg: cfg.causal,
    ),
)

_BY_NAME = {v.name.lower(): v for v in VARIANTS}


def get(name: str) -> Variant:
    """Look a variant up by its jaxattn class name, case-insensitively."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        known = ", ".join(v.name for v in VARIANTS)
        raise KeyError(f"unknown variant {name!r}; known variants: {known}") from None


def names() -> list[str]:
    return [v.name for v in VARIANTS]


def decoding() -> list[Variant]:
    """The variants with a KV cache (at a causal config)."""
    return [v for v in VARIANTS if v._torch_cached is not None]


def takes_attention_impl() -> list[Variant]:
    """The variants whose jaxattn module runs a selectable attention core."""
    return [v for v in VARIANTS if v.takes_attention_impl]
