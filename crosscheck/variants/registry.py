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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.variants import portmap as pm

#: Canonical torch key -> shape, the part of a state dict that :meth:`Variant.infer_config` reads.
Shapes = Mapping[str, tuple[int, ...]]


#: The Flax APIs a variant's module exists in (:meth:`Variant.flax_module`).
FLAX_APIS = ("linen", "nnx")

#: Config fields only grouped-query attention reads (see :meth:`Variant.report_config`).
_ROPE_FIELDS = ("num_kv_groups", "head_dim", "qk_norm", "rope_theta", "rope_scaling")


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
    name: str  # the jaxattn class name, or the torch format's class name (``LlamaAttention``)
    summary: str
    #: Config fields a user may set for this variant (the rest are ignored).
    fields: tuple[str, ...]
    #: The book applies it to one unbatched sentence ``(tokens, d_in)``.
    unbatched: bool
    _portmap: Callable[[AttnConfig], pm.PortMap]
    _flax: Callable[..., Any]  # (cfg, api, **options)
    _torch: Callable[[AttnConfig], Any]
    #: Name of the program in :mod:`crosscheck.tt.programs`.
    ttnn_program: str
    #: Whether a torch module is this variant, by its structure (users' own copies of the
    #: book's classes count). The predicates of all entries exclude each other.
    _recognises: Callable[[Any], bool]
    #: What a state dict's shapes pin down (see :meth:`infer_config`).
    _infer: Callable[[Shapes, Mapping], dict]  # (shapes, known)
    #: bf16 roundings on the longest data path of the ttnn program; the ttnn tolerance is
    #: this many units of bf16 roundoff (how they are counted: :mod:`crosscheck.tt`).
    bf16_roundings: int
    #: The jaxattn module has an ``attention_impl`` field (the attention core it calls).
    takes_attention_impl: bool = False
    #: The width ``num_heads`` splits, as error messages name it; ``None`` for no split.
    splits_heads_of: str | None = None
    _resolve: Callable[[AttnConfig], AttnConfig] | None = None
    #: Config values this variant needs by default where the seed config does not fit it.
    defaults: tuple[tuple[str, Any], ...] = ()
    #: Config values assumed when checking whether a state dict fits and its shapes do not say.
    fit_defaults: tuple[tuple[str, Any], ...] = ()
    _output_dim: Callable[[AttnConfig], int] = _width_is_d_out
    _torch_forward: Callable[[Any, Any, AttnConfig, Any], Any] = _call_module  # (module, x, cfg, attention_mask)
    _config_of: Callable[[Any], AttnConfig] = _config_from_fields
    #: ``(torch_module, recognise, options) -> AttnConfig`` where the book's attributes do not tell
    #: (``None``: :func:`crosscheck.porting.port.recognise` reads them generically); ``options``: the
    #: ``from_torch`` keyword arguments, only those in :attr:`options`.
    torch_config: Callable[[Any, Callable, Mapping], AttnConfig] | None = None
    #: The torch reference with a KV cache (:mod:`crosscheck.references.torch_kv_cache`, the book's
    #: ``kv_cache`` API); ``None``: the variant does not decode (it is not causal).
    _torch_cached: Callable[[AttnConfig], Any] | None = None
    #: Whether the variant decodes at a config (e.g. only when causal).
    _decodes: Callable[[AttnConfig], bool] = _always
    #: The jaxattn class when it is not ``name`` (transformers' formats run on the book's modules).
    flax_class: str = ""
    #: Runs in a plain ``crosscheck`` (the book's chapter-3 variants); the others run when named
    #: with ``--variant`` or when ``--weights`` fit them.
    in_default_run: bool = True
    #: Optional packages (import names) the torch side needs, e.g. ``("transformers",)``.
    needs: tuple[str, ...] = ()
    #: ``port.from_torch`` keyword arguments this variant reads (what its weights cannot carry).
    options: tuple[str, ...] = ()
    #: ``(values, given) -> values``: fill what follows from the given fields (``given``: the
    #: names the weights or the user set), e.g. ``d_out = num_heads * head_dim``.
    _complete: Callable[[dict, frozenset], dict] | None = None
    #: Further checks of a resolved config (raise :class:`BadInputError` naming the fields).
    _check: Callable[[AttnConfig], None] | None = None
    #: Values that make a state dict's shapes consistent for the fit check only, where they
    #: do not pin them down (never used to run).
    _fit_guess: Callable[[Shapes], dict] | None = None
    #: ``crosscheck --shard`` modes the Flax module can be split by (:mod:`jaxattn.sharding`): ``batch``
    #: needs a batch axis, ``heads`` projections that hold the heads side by side, ``sequence`` a
    #: selectable attention core (ring attention).
    shard_modes: tuple[str, ...] = ()
    #: ``(torch_module, x, resolved cfg, keep mask (b, heads, T, S), p) -> output``: the torch forward in
    #: training mode with a given dropout mask, where dropout happens inside one functional call
    #: (``nn.MultiheadAttention``); ``None``: ``--train`` replaces the module's ``nn.Dropout``
    #: submodules instead (:mod:`crosscheck.references.dropout_masks`).
    torch_masked_forward: Callable[..., Any] | None = None

    @property
    def flax_class_name(self) -> str:
        """The jaxattn class this variant's Flax module is."""
        return self.flax_class or self.name

    def complete(self, values: dict, given: frozenset) -> dict:
        """``values`` with what follows from the given fields filled in (see ``_complete``)."""
        return self._complete(values, given) if self._complete else values

    def fit_guess(self, shapes: Shapes) -> dict:
        return self._fit_guess(shapes) if self._fit_guess else {}

    def resolve(self, cfg: AttnConfig) -> AttnConfig:
        """The config this variant really runs with (e.g. ``d_out = d_in`` for ``nn.MultiheadAttention``)."""
        return self._resolve(cfg) if self._resolve else cfg

    def report_config(self, cfg: AttnConfig) -> dict:
        """The resolved config as reports show it: the GQA/RoPE fields only for variants that have them
        (so the chapter-3 variants' reports read as before those fields existed)."""
        return {k: v for k, v in self.resolve(cfg).to_dict().items() if k not in _ROPE_FIELDS or k in self.fields}

    def portmap(self, cfg: AttnConfig) -> pm.PortMap:
        return self._portmap(self.resolve(cfg))

    def flax_module(self, cfg: AttnConfig, api: str = "linen", **options):
        """The jaxattn module at ``cfg``: Linen, or ``api="nnx"`` for the :mod:`jaxattn.nnx` twin (same class
        name, same parameter paths); ``options`` go to the constructor (``dtype``, ``rngs`` ...)."""
        if api not in FLAX_APIS:
            raise BadInputError(f"unknown Flax API {api!r}; choose from {', '.join(FLAX_APIS)}")
        return self._flax(self.resolve(cfg), api, **options)

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
        assert self._torch_cached is not None  # decodes() said so
        return self._torch_cached(self.resolve(cfg))

    def recognises(self, torch_module) -> bool:
        """Whether ``torch_module`` is this variant (by structure, not by class name)."""
        return bool(self._recognises(torch_module))

    def infer_config(self, shapes: Shapes, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The hyperparameters ``shapes`` (canonical torch key -> shape) pin down; only what is certain.

        ``known``: values given otherwise (flags, a config file) that make more certain, e.g. the
        kv heads from ``W_key``'s width once ``head_dim`` or ``num_heads`` is known.
        """
        return self._infer(shapes, dict(known or {}))

    def config_of(self, flax_module) -> AttnConfig:
        """The :class:`AttnConfig` the jaxattn module ``flax_module`` was built with."""
        return self._config_of(flax_module)

    def check_heads(self, cfg: AttnConfig) -> None:
        """Raise :class:`BadInputError` when ``num_heads`` does not split the width it splits."""
        rc = self.resolve(cfg)
        if self._check is not None:
            self._check(rc)
        if self.splits_heads_of is None:
            return
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
    return pm.PortMap(tuple(e for h in heads for e in h.entries), tuple(b for h in heads for b in h.buffers))


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


def _matrix(shapes: Shapes, key: str) -> tuple[int, int] | None:
    shape = shapes.get(key)
    return shape if shape is not None and len(shape) == 2 else None


def _infer_nothing(shapes: Shapes, known: Mapping) -> dict:
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


def _infer_v1(shapes: Shapes, known: Mapping) -> dict:
    """Raw ``(d_in, d_out)`` matrices; a state dict without them is read as linears (and will not fit)."""
    w = _matrix(shapes, "W_query")
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
    w = _matrix(shapes, "qkv.weight")
    if w:
        found["d_out"], found["d_in"] = w[0] // 3, w[1]
    found["qkv_bias"] = "qkv.bias" in shapes
    return {**found, **_infer_mask(shapes, "")}


def _infer_torch_mha(shapes: Shapes, known: Mapping) -> dict:
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
    return _qkv_layer(module) and _linear(module, "out_proj") and not hasattr(module, "num_kv_groups")


def _single_head_linears(module) -> bool:
    return _qkv_layer(module) and not _linear(module, "out_proj") and _linear(module, "W_query")


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

    return _qkv_layer(module) and not _linear(module, "out_proj") and isinstance(module.W_query, nn.Parameter)


def _is_simplified(module) -> bool:
    """No parameters at all, so only the class name can tell."""
    return not _has_heads(module) and not module.state_dict() and "simplified" in type(module).__name__.lower()


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
    from crosscheck.references.torch_ref import torch_multihead_forward

    return torch_multihead_forward(module, x, cfg.causal, attention_mask=attention_mask)


def _gpt2_masked_forward(module, x, cfg: AttnConfig, keep, p: float):
    """GPT2Attention drops with ``nn.functional.dropout`` inside its eager call: its steps with the mask given."""
    from crosscheck.references.dropout_masks import gpt2_forward_masked

    return gpt2_forward_masked(module, x, keep, p)


def _torch_mha_masked_forward(module, x, cfg: AttnConfig, keep, p: float):
    """``nn.MultiheadAttention`` drops inside its functional call: its steps with the mask given."""
    from crosscheck.references.dropout_masks import multihead_forward_masked

    return multihead_forward_masked(module, x, cfg.causal, keep, p)


# --- module factories (lazy imports) ------------------------------------------------------------


def _flax(name: str, args: Callable[[AttnConfig], dict]):
    def build(cfg: AttnConfig, api: str = "linen", **options):
        """The Linen module (``options``: fields to set), or with ``api="nnx"`` its ``jaxattn.nnx`` twin
        (``options``: keyword arguments, e.g. ``dtype``; random weights from ``rngs``, default seed 0)."""
        if api == "nnx":
            from flax import nnx

            import jaxattn.nnx

            options.setdefault("rngs", nnx.Rngs(0))
            return getattr(jaxattn.nnx, name)(**args(cfg), **options)
        import jaxattn

        return getattr(jaxattn, name)(**args(cfg), **options)

    return build


def _torch(name: str, args: Callable[[AttnConfig], dict]):
    def build(cfg: AttnConfig):
        from crosscheck.references import torch_ref

        return getattr(torch_ref, name)(**args(cfg))

    return build


def _torch_cached(name: str, args: Callable[[AttnConfig], dict]):
    def build(cfg: AttnConfig):
        from crosscheck.references import torch_kv_cache

        return getattr(torch_kv_cache, name)(**args(cfg))

    return build


def _torch_mha_module(cfg: AttnConfig):
    from torch import nn

    return nn.MultiheadAttention(cfg.d_in, cfg.num_heads, dropout=cfg.dropout, bias=cfg.qkv_bias, batch_first=True)


# --- grouped-query attention with RoPE (the book's Llama 3 / Qwen3 classes, transformers' formats) ----
#
# One Flax module (jaxattn.GroupedQueryAttention) and one ttnn program (grouped_query_attention) serve
# the book's classes and transformers' LlamaAttention / Qwen3Attention; the tables below say where each
# format keeps the same weights. Config: ``d_out`` is num_heads x head_dim (the book's d_out: W_query's
# width), ``head_dim`` 0 = d_out // num_heads; the output is d_in wide (out_proj d_out -> d_in).
#
# The book's torch reference is Qwen3GroupedQueryAttention: it covers Llama3GroupedQueryAttention,
# whose keys are the same and whose out_proj (d_out -> d_out) is Qwen3's (d_out -> d_in) whenever
# d_in == d_out, as in every Llama 3 model (a Llama 3 layer with d_in != d_out is refused by the port,
# naming out_proj.weight and both shapes).

#: Buffers users' notebook copies of the book's classes register (the mask, RoPE tables): no weights.
_BOOK_GQA_IGNORED = ("mask", "cos", "sin")


def _gqa_widths(cfg: AttnConfig) -> tuple[int, int, int]:
    """``(d_out, kv width, head_dim)``: W_query's and W_key's output widths, and the per-head dim."""
    hd = cfg.resolved_head_dim()
    return cfg.num_heads * hd, cfg.kv_heads() * hd, hd


def _book_gqa(cfg: AttnConfig) -> pm.PortMap:
    d_out, kv, hd = _gqa_widths(cfg)
    entries = pm.linear("W_query", ("W_query",), cfg.d_in, d_out, False)
    entries += pm.linear("W_key", ("W_key",), cfg.d_in, kv, False)
    entries += pm.linear("W_value", ("W_value",), cfg.d_in, kv, False)
    entries += pm.linear("out_proj", ("out_proj",), d_out, cfg.d_in, False)
    if cfg.qk_norm:
        entries += [pm.norm_scale(f"{n}.scale", (n,), f"{n}.scale", hd) for n in ("q_norm", "k_norm")]
    return pm.PortMap(tuple(entries), ignored=_BOOK_GQA_IGNORED)


#: transformers' names -> the book's (the Flax module's and the ttnn program's).
_HF_QKVO = (("q_proj", "W_query"), ("k_proj", "W_key"), ("v_proj", "W_value"), ("o_proj", "out_proj"))


def _hf_gqa(cfg: AttnConfig) -> pm.PortMap:
    d_out, kv, hd = _gqa_widths(cfg)
    widths = {
        "q_proj": (cfg.d_in, d_out),
        "k_proj": (cfg.d_in, kv),
        "v_proj": (cfg.d_in, kv),
        "o_proj": (d_out, cfg.d_in),
    }
    entries = [e for hf, book in _HF_QKVO for e in pm.linear_as(hf, (book,), book, *widths[hf], cfg.qkv_bias)]
    if cfg.qk_norm:
        entries += [pm.norm_scale(f"{n}.weight", (n,), f"{n}.scale", hd) for n in ("q_norm", "k_norm")]
    # Checkpoints from transformers < 4.40 carry the rotary table's inverse frequencies.
    return pm.PortMap(tuple(entries), ignored=("rotary_emb.inv_freq",))


def _gpt2(cfg: AttnConfig) -> pm.PortMap:
    entries = pm.conv1d("c_attn", ("qkv",), "qkv", cfg.d_in, 3 * cfg.d_in)
    entries += pm.conv1d("c_proj", ("proj",), "proj", cfg.d_in, cfg.d_in)
    # Older GPT-2 checkpoints keep the causal mask ("bias", a tril of ones) and "masked_bias".
    return pm.PortMap(tuple(entries), ignored=("bias", "masked_bias"))


def _infer_gqa_widths(shapes: Shapes, known: Mapping, q: str, k: str, bias: str, norm: str) -> dict:
    """d_in and d_out from the query projection, qk_norm from the norm key and, once the head dim is
    certain (the norm's width, or ``known`` head_dim / num_heads), num_heads and the kv heads."""
    found: dict = {}
    wq, wk = _matrix(shapes, q), _matrix(shapes, k)
    if wq:
        found["d_out"], found["d_in"] = wq
    found["qkv_bias"] = bias in shapes
    scale = shapes.get(norm)
    found["qk_norm"] = scale is not None
    hd = scale[0] if scale is not None and len(scale) == 1 else int(known.get("head_dim") or 0)
    if not hd and wq and known.get("num_heads") and wq[0] % int(known["num_heads"]) == 0:
        hd = wq[0] // int(known["num_heads"])
    if hd and wq and wq[0] % hd == 0:
        found["head_dim"], found["num_heads"] = hd, wq[0] // hd
        if wk and wk[0] % hd == 0:
            found["num_kv_groups"] = wk[0] // hd
    return found


def _infer_book_gqa(shapes: Shapes, known: Mapping) -> dict:
    return _infer_gqa_widths(shapes, known, "W_query.weight", "W_key.weight", "W_query.bias", "q_norm.scale")


def _infer_hf_gqa(shapes: Shapes, known: Mapping) -> dict:
    return _infer_gqa_widths(shapes, known, "q_proj.weight", "k_proj.weight", "q_proj.bias", "q_norm.weight")


def _infer_gpt2(shapes: Shapes, known: Mapping) -> dict:
    w = _matrix(shapes, "c_attn.weight")
    return dict(d_in=w[0], d_out=w[0]) if w else {}


def _gqa_fit_guess(q: str, k: str):
    """For the fit check only: heads of the largest dim that splits both projections (gcd of the widths)."""

    def guess(shapes: Shapes) -> dict:
        import math

        wq, wk = _matrix(shapes, q), _matrix(shapes, k)
        if not (wq and wk):
            return {}
        hd = math.gcd(wq[0], wk[0])
        return dict(head_dim=hd, num_heads=wq[0] // hd, num_kv_groups=wk[0] // hd, d_out=wq[0])

    return guess


def _complete_gqa(values: dict, given: frozenset) -> dict:
    """d_out from num_heads x head_dim when only the head dim was given; kv heads that divide the heads."""
    values = dict(values)
    if values.get("head_dim") and "d_out" not in given:
        values["d_out"] = values["num_heads"] * values["head_dim"]
    if "num_kv_groups" not in given and values.get("num_kv_groups") and values["num_heads"] % values["num_kv_groups"]:
        values["num_kv_groups"] = 0  # the defaults' 2 kv heads do not split an odd head count: plain multi-head
    return values


def _check_gqa(cfg: AttnConfig) -> None:
    """Heads, kv heads and head_dim that fit together, each message naming the fields."""
    if cfg.num_heads < 1:
        raise BadInputError(f"num_heads must be >= 1, got {cfg.num_heads}")
    kv = cfg.kv_heads()
    if kv < 1 or cfg.num_heads % kv:
        raise BadInputError(f"num_heads={cfg.num_heads} must be divisible by num_kv_groups={kv}")
    if cfg.head_dim and cfg.head_dim * cfg.num_heads != cfg.d_out:
        raise BadInputError(
            f"num_heads={cfg.num_heads} x head_dim={cfg.head_dim} = {cfg.num_heads * cfg.head_dim} "
            f"but d_out (W_query's width) is {cfg.d_out}"
        )
    if not cfg.head_dim and cfg.d_out % cfg.num_heads:
        raise BadInputError(f"d_out (W_query's width)={cfg.d_out} must be divisible by num_heads={cfg.num_heads}")
    hd = cfg.resolved_head_dim()
    if hd < 2 or hd % 2:
        raise BadInputError(f"head_dim={hd} must be even for RoPE (split halves)")
    if cfg.rope_theta <= 0:
        raise BadInputError(f"rope_theta must be > 0, got {cfg.rope_theta}")


def _resolve_gqa(qkv_bias: bool | None = None, qk_norm: bool | None = None):
    """Fix what the format fixes (the book: no biases; Llama: no norms; Qwen3: norms) and the head dim."""

    def resolve(cfg: AttnConfig) -> AttnConfig:
        if qkv_bias is not None:
            cfg = cfg.replace(qkv_bias=qkv_bias)
        if qk_norm is not None:
            cfg = cfg.replace(qk_norm=qk_norm)
        if cfg.num_heads < 1:
            return cfg  # refused by _check_gqa
        cfg = cfg.replace(num_kv_groups=cfg.kv_heads())
        if cfg.head_dim or cfg.d_out % cfg.num_heads:
            return cfg  # a head_dim that does not fit d_out is refused by _check_gqa, naming both
        return cfg.replace(head_dim=cfg.d_out // cfg.num_heads)

    return resolve


def _gqa_flax_args(cfg: AttnConfig) -> dict:
    return dict(
        d_in=cfg.d_in,
        num_heads=cfg.num_heads,
        num_kv_groups=cfg.kv_heads(),
        head_dim=cfg.resolved_head_dim(),
        qk_norm=cfg.qk_norm,
        context_length=cfg.context_length,
        rope_theta=cfg.rope_theta,
        freq_config=cfg.freq_config(),
        qkv_bias=cfg.qkv_bias,
        out_bias=cfg.qkv_bias,
    )


def _gqa_config_of(flax_module) -> AttnConfig:
    """The config of a ``jaxattn.GroupedQueryAttention`` (its freq_config as the rope_scaling string)."""
    hd = flax_module.head_dim or flax_module.d_in // flax_module.num_heads
    freq = flax_module.freq_config
    return AttnConfig(
        d_in=flax_module.d_in,
        d_out=flax_module.num_heads * hd,
        context_length=flax_module.context_length,
        num_heads=flax_module.num_heads,
        num_kv_groups=flax_module.num_kv_groups,
        head_dim=hd,
        qk_norm=flax_module.qk_norm,
        rope_theta=float(flax_module.rope_theta),
        rope_scaling=AttnConfig.encode_freq_config(dict(freq) if freq else None),
        qkv_bias=flax_module.qkv_bias,
    )


def _book_gqa_module(cfg: AttnConfig):
    from crosscheck.references.torch_gqa import Qwen3GroupedQueryAttention

    return Qwen3GroupedQueryAttention(
        cfg.d_in, cfg.num_heads, cfg.kv_heads(), head_dim=cfg.resolved_head_dim(), qk_norm=cfg.qk_norm
    )


def _book_gqa_cached(cfg: AttnConfig):
    """The book's ``kv_cache`` GQA: :func:`_book_gqa_module`'s arguments plus the RoPE settings."""
    from crosscheck.references.torch_kv_cache import GroupedQueryAttention

    return GroupedQueryAttention(
        cfg.d_in,
        cfg.num_heads,
        cfg.kv_heads(),
        head_dim=cfg.resolved_head_dim(),
        qk_norm=cfg.qk_norm,
        rope_theta=cfg.rope_theta,
        freq_config=cfg.freq_config(),
        context_length=cfg.context_length,
    )


def _book_gqa_forward(module, x, cfg: AttnConfig, attention_mask=None):
    """The book's forward at positions ``0..T-1``; ``attention_mask`` hides padded keys (:func:`causal_forward`)."""
    from crosscheck.references.torch_gqa import causal_forward

    unbatched = x.dim() == 2
    if unbatched and attention_mask is not None:
        attention_mask = attention_mask[None]
    out = causal_forward(
        module,
        x[None] if unbatched else x,
        rope_theta=cfg.rope_theta,
        freq_config=cfg.freq_config(),
        context_length=max(cfg.context_length, x.shape[-2]),
        attention_mask=attention_mask,
    )
    return out[0] if unbatched else out


def _rope_options(found: dict, options: Mapping, where: str, required: tuple[str, ...]) -> dict:
    """RoPE settings from ``from_torch`` keywords over what the module's config says (contradictions refused).

    ``freq_config`` (the book's keys) or ``rope_scaling`` (transformers' dict, or our string);
    ``rope_theta``; ``context_length``. A setting in ``required`` that neither gives is an error naming it.
    """
    from crosscheck.references import hf

    given = dict(options)
    if "freq_config" in given and "rope_scaling" in given:
        raise BadInputError(f"{where}: pass freq_config or rope_scaling, not both")
    if "freq_config" in given:
        freq = given.pop("freq_config")
        given["rope_scaling"] = AttnConfig.encode_freq_config(dict(freq) if freq else None)
    elif isinstance(given.get("rope_scaling"), Mapping) or (
        given.get("rope_scaling") is None and "rope_scaling" in given
    ):
        given["rope_scaling"] = hf.rope_scaling_string(given["rope_scaling"], where)
    out = dict(found)
    for key, value in given.items():
        value = float(value) if key == "rope_theta" else int(value) if key == "context_length" else value
        if key in out and out[key] != value:
            raise BadInputError(f"{where}: {key}={value!r} contradicts the module's config, which gives {out[key]!r}")
        out[key] = value
    missing = [k for k in required if k not in out]
    if missing:
        raise BadInputError(
            f"{where}: {', '.join(missing)} missing: the module does not carry it; pass "
            + ", ".join(f"{k}=..." for k in missing)
            + " to port.from_torch"
        )
    return out


def _book_gqa_config(module, recognise, options: Mapping) -> AttnConfig:
    """The book's GQA classes keep heads, kv groups and head_dim as attributes; RoPE comes from ``options``."""
    cls = type(module).__name__
    wq = module.W_query.weight
    found: dict[str, Any] = dict(
        d_in=int(wq.shape[1]),
        d_out=int(wq.shape[0]),
        num_heads=int(module.num_heads),
        num_kv_groups=int(module.num_kv_groups),
        head_dim=int(module.head_dim),
        qk_norm=getattr(module, "q_norm", None) is not None,
    )
    if getattr(module, "context_length", None):
        found["context_length"] = int(module.context_length)
    found = _rope_options(found, options, cls, ("rope_theta", "context_length"))
    return AttnConfig(**found)


def _hf_config(rope: bool):
    def read(module, recognise, options: Mapping) -> AttnConfig:
        from crosscheck.references import hf

        cls = type(module).__name__
        config = getattr(module, "config", None)
        if config is None:
            raise BadInputError(f"{cls}: has no config (a transformers attention layer carries its model's)")
        found = hf.attn_fields(config, f"{cls}.config", rope=rope)
        if rope:
            found["qk_norm"] = getattr(module, "q_norm", None) is not None
            found = _rope_options(found, options, cls, ("rope_theta", "context_length"))
        elif options:
            raise BadInputError(f"{cls}: takes no {', '.join(sorted(options))} (GPT-2 has no RoPE)")
        return AttnConfig(**{**dict(context_length=1 << 30), **found})

    return read


def _hf_module(spec_name: str):
    def build(cfg: AttnConfig):
        from crosscheck.references import hf

        return _HF_SPECS[spec_name](hf).module(cfg)

    return build


def _hf_forward(spec_name: str):
    def forward(module, x, cfg: AttnConfig, attention_mask=None):
        from crosscheck.references import hf

        return hf.rope_forward(_HF_SPECS[spec_name](hf), module, x, cfg, attention_mask)

    return forward


def _gpt2_forward(module, x, cfg: AttnConfig, attention_mask=None):
    from crosscheck.references import hf

    return hf.gpt2_forward(module, x, cfg, attention_mask)


#: The transformers classes of each format (built lazily: crosscheck.references.hf imports nothing heavy).
_HF_SPECS = {
    "llama": lambda hf: hf.Spec("llama", "LlamaConfig", "LlamaAttention", "LlamaRotaryEmbedding"),
    "qwen3": lambda hf: hf.Spec("qwen3", "Qwen3Config", "Qwen3Attention", "Qwen3RotaryEmbedding"),
    "gpt2": lambda hf: hf.Spec("gpt2", "GPT2Config", "GPT2Attention"),
}


def _is_book_gqa(module) -> bool:
    """The book's GroupedQueryAttention (Llama 3 or Qwen3): Q/K/V + out_proj linears and ``num_kv_groups``."""
    return _qkv_layer(module) and _linear(module, "out_proj") and hasattr(module, "num_kv_groups")


def _hf_qkvo(module) -> bool:
    return all(_linear(module, n) for n, _ in _HF_QKVO) and hasattr(module, "config")


def _is_hf_llama(module) -> bool:
    return _hf_qkvo(module) and getattr(module, "q_norm", None) is None and getattr(module, "k_norm", None) is None


def _is_hf_qwen3(module) -> bool:
    return _hf_qkvo(module) and all(hasattr(getattr(module, n, None), "weight") for n in ("q_norm", "k_norm"))


def _is_gpt2(module) -> bool:
    """transformers' GPT2Attention (self-attention): Conv1D ``c_attn`` and ``c_proj`` (``nf``, weight (in, out))."""
    conv = lambda n: hasattr(getattr(module, n, None), "nf") and hasattr(getattr(module, n), "weight")  # noqa: E731
    return conv("c_attn") and conv("c_proj") and not hasattr(module, "q_attn")


_GQA_FIELDS = (
    "d_in",
    "d_out",
    "num_heads",
    "num_kv_groups",
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "context_length",
)
#: Random weights: 4 query heads sharing 2 kv heads of dim 4 (the seed's d_out=2 splits into no even head).
_GQA_DEFAULTS = (("d_out", 16), ("num_heads", 4), ("num_kv_groups", 2))
_GQA_COMMON: dict[str, Any] = dict(
    # x, W_query, queries, the cos/sin table, x*cos, the RoPE sum, scores, 1/sqrt(hd), scaled scores, weights,
    # context, out_proj's weight, the output: 13; qk_norm adds the norm's output and its scale: 15.
    bf16_roundings=15,
    takes_attention_impl=True,
    in_default_run=False,
    flax_class="GroupedQueryAttention",
    shard_modes=("batch", "heads", "sequence"),
    defaults=_GQA_DEFAULTS,
    _output_dim=lambda cfg: cfg.d_in,
    _config_of=_gqa_config_of,
    _complete=_complete_gqa,
    _check=_check_gqa,
    options=("rope_theta", "freq_config", "rope_scaling", "context_length"),
)


_none: Callable[[AttnConfig], dict] = lambda cfg: {}  # noqa: E731
_d = lambda cfg: dict(d_in=cfg.d_in, d_out=cfg.d_out)  # noqa: E731
_dq = lambda cfg: dict(d_in=cfg.d_in, d_out=cfg.d_out, qkv_bias=cfg.qkv_bias)  # noqa: E731
_causal_args = lambda cfg: dict(  # noqa: E731
    d_in=cfg.d_in, d_out=cfg.d_out, context_length=cfg.context_length, dropout=cfg.dropout, qkv_bias=cfg.qkv_bias
)
_heads_args = lambda cfg: dict(_causal_args(cfg), num_heads=cfg.num_heads)  # noqa: E731

_CAUSAL_FIELDS = ("d_in", "d_out", "context_length", "dropout", "qkv_bias")

VARIANTS: tuple[Variant, ...] = (
    Variant(
        "SimplifiedSelfAttention",
        "3.3 softmax(x x^T) x, no weights",
        ("d_in",),
        True,
        _no_params,
        _flax("SimplifiedSelfAttention", _none),
        _torch("SimplifiedSelfAttention", _none),
        "simplified_self_attention",
        _is_simplified,
        _infer_nothing,
        # x, scores, softmax weights, context: no projections.
        bf16_roundings=4,
        _output_dim=lambda cfg: cfg.d_in,
        torch_config=_no_config,
    ),
    Variant(
        "SelfAttentionV1",
        "3.4 raw W_query/W_key/W_value matrices",
        ("d_in", "d_out"),
        True,
        _v1,
        _flax("SelfAttentionV1", _d),
        _torch("SelfAttentionV1", _d),
        "self_attention_v1",
        _is_v1,
        _infer_v1,
        bf16_roundings=8,
    ),
    Variant(
        "SelfAttentionV2",
        "3.4 nn.Linear projections",
        ("d_in", "d_out", "qkv_bias"),
        True,
        _v2,
        _flax("SelfAttentionV2", _dq),
        _torch("SelfAttentionV2", _dq),
        "self_attention_v2",
        _is_v2,
        _infer_linears,
        bf16_roundings=8,
    ),
    Variant(
        "CausalAttention",
        "3.5 causal mask + dropout",
        _CAUSAL_FIELDS,
        False,
        _causal,
        _flax("CausalAttention", _causal_args),
        _torch("CausalAttention", _causal_args),
        "causal_attention",
        _is_causal,
        _infer_linears,
        bf16_roundings=8,
        takes_attention_impl=True,
        shard_modes=("batch", "sequence"),
        _torch_cached=_torch_cached("CausalAttention", _causal_args),
    ),
    Variant(
        "MultiHeadAttentionWrapper",
        "3.6.1 stacked causal heads",
        (*_CAUSAL_FIELDS, "num_heads"),
        False,
        _wrapper,
        _flax("MultiHeadAttentionWrapper", _heads_args),
        _torch("MultiHeadAttentionWrapper", _heads_args),
        "multi_head_attention_wrapper",
        _has_heads,
        _infer_wrapper,
        # The heads run side by side: the longest path is one head's.
        bf16_roundings=8,
        takes_attention_impl=True,
        shard_modes=("batch", "sequence"),
        # One head's keys are what every stack has; more heads are read from the keys.
        fit_defaults=(("num_heads", 1),),
        _output_dim=lambda cfg: cfg.num_heads * cfg.d_out,
        torch_config=_wrapper_torch_config,
        _torch_cached=_torch_cached("MultiHeadAttentionWrapper", _heads_args),
    ),
    Variant(
        "MultiHeadAttention",
        "3.6.2 fused heads + out_proj",
        (*_CAUSAL_FIELDS, "num_heads"),
        False,
        _mha,
        _flax("MultiHeadAttention", _heads_args),
        _torch("MultiHeadAttention", _heads_args),
        "multi_head_attention",
        _is_mha,
        _infer_linears,
        bf16_roundings=10,
        takes_attention_impl=True,
        splits_heads_of="d_out",
        shard_modes=("batch", "heads", "sequence"),
        _torch_cached=_torch_cached("MultiHeadAttention", _heads_args),
    ),
    Variant(
        "MultiHeadAttentionCombinedQKV",
        "bonus: one qkv linear + proj",
        (*_CAUSAL_FIELDS, "num_heads"),
        False,
        _combined_qkv,
        _flax("MultiHeadAttentionCombinedQKV", _heads_args),
        _torch("MultiHeadAttentionCombinedQKV", _heads_args),
        "multi_head_attention_combined_qkv",
        _is_combined_qkv,
        _infer_combined,
        bf16_roundings=10,
        takes_attention_impl=True,
        splits_heads_of="d_out",
        shard_modes=("batch", "heads", "sequence"),
        _torch_cached=_torch_cached("MultiHeadAttentionCombinedQKV", _heads_args),
    ),
    Variant(
        "TorchMultiheadAttention",
        "torch.nn.MultiheadAttention layout (in_proj, out_proj)",
        ("d_in", "num_heads", "dropout", "qkv_bias", "causal"),
        False,
        _torch_mha,
        _flax(
            "TorchMultiheadAttention",
            lambda cfg: dict(
                embed_dim=cfg.d_in, num_heads=cfg.num_heads, dropout=cfg.dropout, bias=cfg.qkv_bias, causal=cfg.causal
            ),
        ),
        _torch_mha_module,
        "torch_multihead_attention",
        _is_torch_mha,
        _infer_torch_mha,
        bf16_roundings=10,
        takes_attention_impl=True,
        splits_heads_of="embed_dim (= d_in)",
        shard_modes=("batch", "heads", "sequence"),
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
        torch_masked_forward=_torch_mha_masked_forward,
    ),
    Variant(
        "GroupedQueryAttention",
        "the book's Llama 3 / Qwen3 GQA: RoPE, kv groups, optional q/k RMSNorm",
        (*_GQA_FIELDS, "qk_norm"),
        False,
        _book_gqa,
        _flax("GroupedQueryAttention", _gqa_flax_args),
        _book_gqa_module,
        "grouped_query_attention",
        _is_book_gqa,
        _infer_book_gqa,
        _resolve=_resolve_gqa(qkv_bias=False),
        _torch_forward=_book_gqa_forward,
        _torch_cached=_book_gqa_cached,
        torch_config=_book_gqa_config,
        _fit_guess=_gqa_fit_guess("W_query.weight", "W_key.weight"),
        **_GQA_COMMON,
    ),
    Variant(
        "LlamaAttention",
        "transformers' Llama: q/k/v/o_proj (bias per attention_bias), RoPE, kv groups",
        (*_GQA_FIELDS, "qkv_bias"),
        False,
        _hf_gqa,
        _flax("GroupedQueryAttention", _gqa_flax_args),
        _hf_module("llama"),
        "grouped_query_attention",
        _is_hf_llama,
        _infer_hf_gqa,
        _resolve=_resolve_gqa(qk_norm=False),
        _torch_forward=_hf_forward("llama"),
        torch_config=_hf_config(rope=True),
        _fit_guess=_gqa_fit_guess("q_proj.weight", "k_proj.weight"),
        needs=("transformers",),
        **_GQA_COMMON,
    ),
    Variant(
        "Qwen3Attention",
        "transformers' Qwen3: Llama's layout + q_norm/k_norm (RMSNorm, eps 1e-6)",
        (*_GQA_FIELDS, "qkv_bias"),
        False,
        _hf_gqa,
        _flax("GroupedQueryAttention", _gqa_flax_args),
        _hf_module("qwen3"),
        "grouped_query_attention",
        _is_hf_qwen3,
        _infer_hf_gqa,
        _resolve=_resolve_gqa(qk_norm=True),
        _torch_forward=_hf_forward("qwen3"),
        torch_config=_hf_config(rope=True),
        _fit_guess=_gqa_fit_guess("q_proj.weight", "k_proj.weight"),
        needs=("transformers",),
        **_GQA_COMMON,
    ),
    Variant(
        "GPT2Attention",
        "transformers' GPT-2: Conv1D c_attn (in, 3E) = q|k|v, c_proj; causal",
        ("d_in", "num_heads", "context_length", "dropout"),
        False,
        _gpt2,
        _flax("MultiHeadAttentionCombinedQKV", lambda cfg: dict(_heads_args(cfg), qkv_bias=True)),
        _hf_module("gpt2"),
        "multi_head_attention_combined_qkv",
        _is_gpt2,
        _infer_gpt2,
        bf16_roundings=10,
        takes_attention_impl=True,
        splits_heads_of="n_embd (= d_in)",
        shard_modes=("batch", "heads", "sequence"),
        _resolve=lambda cfg: cfg.replace(d_out=cfg.d_in, qkv_bias=True),
        # n_embd is d_in (3 in the seed), which two heads cannot split.
        defaults=(("num_heads", 1),),
        _torch_forward=_gpt2_forward,
        torch_masked_forward=_gpt2_masked_forward,
        torch_config=_hf_config(rope=False),
        flax_class="MultiHeadAttentionCombinedQKV",
        in_default_run=False,
        needs=("transformers",),
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


def default_run() -> list[Variant]:
    """The variants a plain ``crosscheck`` runs (the book's chapter-3 ones)."""
    return [v for v in VARIANTS if v.in_default_run]


def for_flax_class(class_name: str) -> list[Variant]:
    """The variants whose Flax module is the jaxattn class ``class_name``, the one named like it first."""
    found = [v for v in VARIANTS if v.flax_class_name == class_name]
    return sorted(found, key=lambda v: v.name != class_name)


def missing_needs(variant: Variant) -> list[str]:
    """The optional packages ``variant``'s torch side needs that this interpreter lacks."""
    import importlib.util

    return [n for n in variant.needs if importlib.util.find_spec(n) is None]


def decoding() -> list[Variant]:
    """The variants with a KV cache (at a causal config)."""
    return [v for v in VARIANTS if v._torch_cached is not None]


def takes_attention_impl() -> list[Variant]:
    """The variants whose jaxattn module runs a selectable attention core."""
    return [v for v in VARIANTS if v.takes_attention_impl]
