"""The :class:`Variant` entry: every fact about one attention variant, in one place.

A :class:`Variant` ties together the torch reference, the Flax module, the porting
table and the ttnn program, and carries what generic code needs to know about the
variant (how to recognise its torch module, what its state dict's shapes pin down,
its output width, its bf16 rounding count, whether it takes an ``attention_impl``).
The CLI, the compare engine, the porting code, the ttnn runtime, the benchmark and
the tests ask the entry instead of branching on a variant's name.

Numpy only, like the ttnn worker's interpreter: torch and JAX code is reached through
builders that import it when called, or through an importable ``"module:function"``
reference (:func:`load`) where the code lives in a module that imports the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.tt import BF16_UNIT_ROUNDOFF, TTNN_MIN_PCC
from crosscheck.variants import portmap as pm

#: Canonical torch key -> shape, the part of a state dict that :meth:`Variant.infer_config` reads.
Shapes = Mapping[str, tuple[int, ...]]

#: The Flax APIs a variant's module exists in (:meth:`Variant.flax_module`).
FLAX_APIS = ("linen", "nnx")

#: Config fields only grouped-query attention reads (see :meth:`Variant.report_config`).
_ROPE_FIELDS = ("num_kv_groups", "head_dim", "qk_norm", "rope_theta", "rope_scaling")


def load(ref: str) -> Callable:
    """The function an importable ``"package.module:function"`` reference names, imported now."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


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


@dataclass(frozen=True, kw_only=True)
class Variant:
    name: str  # the jaxattn class name, or the torch format's class name (``LlamaAttention``)
    #: The file of :mod:`crosscheck.variants` that holds the entry: ``book`` (chapter 3), ``torch-mha``,
    #: ``grouped-query`` (the book's Llama 3 / Qwen3 class), ``transformers`` (Llama, Qwen3, GPT-2 formats).
    family: str
    summary: str
    #: Config fields a user may set for this variant (the rest are ignored).
    fields: tuple[str, ...]
    #: The book applies it to one unbatched sentence ``(tokens, d_in)``.
    unbatched: bool = False

    # --- the four implementations: porting table, Flax module, torch reference, ttnn program --------
    #: ``cfg -> PortMap`` at a resolved config (read through :meth:`portmap`).
    port_table: Callable[[AttnConfig], pm.PortMap]
    #: ``(cfg, api, **options) -> the jaxattn module`` (read through :meth:`flax_module`).
    make_flax: Callable[..., Any]
    #: ``cfg -> the torch reference module`` (read through :meth:`torch_module`).
    make_torch: Callable[[AttnConfig], Any]
    #: The torch reference with a KV cache (:mod:`crosscheck.references.torch_kv_cache`, the book's
    #: ``kv_cache`` API); ``None``: the variant does not decode (it is not causal).
    make_torch_cached: Callable[[AttnConfig], Any] | None = None
    #: The ttnn program (:mod:`crosscheck.tt.programs`): ``(ttnn, device, x, *, parameters, config,
    #: attention_mask=None)``; ``None`` only with :attr:`no_ttnn` saying why (a registered plugin without one).
    ttnn_forward: Callable[..., Any] | None = None
    #: Why the variant has no ttnn program (``""``: it has one); the ttnn row is left out with this reason.
    no_ttnn: str = ""
    #: Its twin through ttnn's fused SDPA kernel, run when every head's dim is a multiple of the tile size.
    ttnn_sdpa: Callable[..., Any] | None = None
    #: Its KV-cache decode (:mod:`crosscheck.tt.decode_programs`); ``None``: not causal.
    ttnn_decode: Any = None
    #: bf16 roundings on the longest data path of the ttnn program; the ttnn tolerance is
    #: this many units of bf16 roundoff (how they are counted: :mod:`crosscheck.tt`).
    bf16_roundings: int

    # --- reading torch modules and state dicts ------------------------------------------------------
    #: Whether a torch module is this variant, by its structure (users' own copies of the
    #: book's classes count). The predicates of all entries exclude each other.
    matches: Callable[[Any], bool]
    #: ``(shapes, known) -> dict``: what a state dict's shapes pin down (see :meth:`infer_config`).
    infer: Callable[[Shapes, Mapping], dict]
    #: ``(torch_module, recognise, options) -> AttnConfig`` where the book's attributes do not tell
    #: (``None``: :func:`crosscheck.porting.port.recognise` reads them generically); ``options``: the
    #: ``from_torch`` keyword arguments, only those in :attr:`options`.
    torch_config: Callable[[Any, Callable, Mapping], AttnConfig] | None = None
    #: ``flax_module -> AttnConfig`` (read through :meth:`config_of`).
    flax_config: Callable[[Any], AttnConfig] = _config_from_fields
    #: ``port.from_torch`` keyword arguments this variant reads (what its weights cannot carry).
    options: tuple[str, ...] = ()
    #: Values that make a state dict's shapes consistent for the fit check only, where they
    #: do not pin them down (never used to run).
    fit_guess_of: Callable[[Shapes], dict] | None = None

    # --- its config -------------------------------------------------------------------------------
    #: ``cfg -> cfg``: what the variant really runs with (read through :meth:`resolve`).
    resolve_config: Callable[[AttnConfig], AttnConfig] | None = None
    #: Config values this variant needs by default where the seed config does not fit it.
    defaults: tuple[tuple[str, Any], ...] = ()
    #: Config values assumed when checking whether a state dict fits and its shapes do not say.
    fit_defaults: tuple[tuple[str, Any], ...] = ()
    #: ``(values, given) -> values``: fill what follows from the given fields (``given``: the
    #: names the weights or the user set), e.g. ``d_out = num_heads * head_dim``.
    complete_config: Callable[[dict, frozenset], dict] | None = None
    #: Further checks of a resolved config (raise :class:`BadInputError` naming the fields).
    check_config: Callable[[AttnConfig], None] | None = None
    #: The width ``num_heads`` splits, as error messages name it; ``None`` for no split.
    splits_heads_of: str | None = None
    #: ``cfg -> int``: the last dimension of the context vectors (read through :meth:`output_dim`).
    output_width: Callable[[AttnConfig], int] = _width_is_d_out
    #: Whether the variant decodes at a config (e.g. only when causal).
    decodes_at: Callable[[AttnConfig], bool] = _always

    # --- running it -------------------------------------------------------------------------------
    #: ``(module, x, cfg, attention_mask) -> output``: the torch forward (read through :meth:`torch_forward`).
    torch_call: Callable[[Any, Any, AttnConfig, Any], Any] = _call_module
    #: ``(torch_module, x, resolved cfg, keep mask (b, heads, T, S), p) -> output``: the torch forward in
    #: training mode with a given dropout mask, where dropout happens inside one functional call
    #: (``nn.MultiheadAttention``); ``None``: ``--train`` replaces the module's ``nn.Dropout``
    #: submodules instead (:mod:`crosscheck.references.dropout_masks`).
    torch_masked_forward: Callable[..., Any] | None = None
    #: The jaxattn module has an ``attention_impl`` field (the attention core it calls).
    takes_attention_impl: bool = False
    #: The jaxattn class when it is not ``name`` (transformers' formats run on the book's modules).
    flax_class: str = ""
    #: ``crosscheck --shard`` modes the Flax module can be split by (:mod:`jaxattn.sharding`): ``batch``
    #: needs a batch axis, ``heads`` projections that hold the heads side by side, ``sequence`` a
    #: selectable attention core (ring attention).
    shard_modes: tuple[str, ...] = ()
    #: Runs in a plain ``crosscheck`` (the book's chapter-3 variants); the others run when named
    #: with ``--variant`` or when ``--weights`` fit them.
    in_default_run: bool = True
    #: Optional packages (import names) the torch side needs, e.g. ``("transformers",)``.
    needs: tuple[str, ...] = ()
    #: Why ``crosscheck --train`` cannot run the variant (``""``: it can); a registered plugin's modules do
    #: not take the dropout masks the check injects.
    no_train: str = ""
    #: Its state dict is a ``torch.nn.MultiheadAttention``'s (``in_proj_weight``, ``out_proj``), which
    #: ``crosscheck --jax-layers`` ports into other JAX libraries' attention layers
    #: (:mod:`crosscheck.jax_layers`: Flax's Linen and NNX layers, Equinox's) as rows against torch.
    jax_layers: bool = False

    # --- crosscheck --stages (:mod:`crosscheck.checks.stages`) ----------------------------------------
    #: ``"module:function"``: ``(torch_module, x, cfg, raw) -> output``, the functional re-run of the torch
    #: reference that records its stages in ``raw``; ``None``: no stage breakdown.
    torch_stages: str | None = None
    #: ``"module:function"``: ``(captured tree, raw, cfg)``, turns what the Flax module sows into the shared
    #: stages where it sows something else (grouped-query attention: the rotated queries and keys).
    flax_stages: str | None = None
    #: The layer projects ``x`` into queries, keys and values (``SimplifiedSelfAttention`` attends over
    #: ``x`` itself: no projection stages to compare).
    projects_x: bool = True

    def __post_init__(self) -> None:
        if self.ttnn_forward is None and not self.no_ttnn:
            raise ValueError(f"{self.name}: an entry without a ttnn program says why (no_ttnn=...)")

    @property
    def flax_class_name(self) -> str:
        """The jaxattn class this variant's Flax module is."""
        return self.flax_class or self.name

    @property
    def ttnn_program(self) -> str:
        """The ttnn program's name, as reports show it (code reads :attr:`ttnn_forward` itself); ``""``: none."""
        return "" if self.ttnn_forward is None else self.ttnn_forward.__name__

    @property
    def ttnn_tolerance(self) -> tuple[float, float]:
        """``(max-abs budget for unit-scale data, min PCC)`` of the ttnn program against torch float32."""
        return self.bf16_roundings * BF16_UNIT_ROUNDOFF, TTNN_MIN_PCC

    def torch_stages_rerun(self) -> Callable | None:
        """The function :attr:`torch_stages` names, or ``None``."""
        return load(self.torch_stages) if self.torch_stages else None

    def flax_stages_fix(self) -> Callable | None:
        """The function :attr:`flax_stages` names, or ``None``."""
        return load(self.flax_stages) if self.flax_stages else None

    def complete(self, values: dict, given: frozenset) -> dict:
        """``values`` with what follows from the given fields filled in (see :attr:`complete_config`)."""
        return self.complete_config(values, given) if self.complete_config else values

    def fit_guess(self, shapes: Shapes) -> dict:
        return self.fit_guess_of(shapes) if self.fit_guess_of else {}

    def resolve(self, cfg: AttnConfig) -> AttnConfig:
        """The config this variant really runs with (e.g. ``d_out = d_in`` for ``nn.MultiheadAttention``)."""
        return self.resolve_config(cfg) if self.resolve_config else cfg

    def report_config(self, cfg: AttnConfig) -> dict:
        """The resolved config as reports show it: the GQA/RoPE fields only for variants that have them
        (so the chapter-3 variants' reports read as before those fields existed)."""
        return {k: v for k, v in self.resolve(cfg).to_dict().items() if k not in _ROPE_FIELDS or k in self.fields}

    def portmap(self, cfg: AttnConfig) -> pm.PortMap:
        return self.port_table(self.resolve(cfg))

    def flax_module(self, cfg: AttnConfig, api: str = "linen", **options):
        """The jaxattn module at ``cfg``: Linen, or ``api="nnx"`` for the :mod:`jaxattn.nnx` twin (same class
        name, same parameter paths); ``options`` go to the constructor (``dtype``, ``rngs`` ...)."""
        if api not in FLAX_APIS:
            raise BadInputError(f"unknown Flax API {api!r}; choose from {', '.join(FLAX_APIS)}")
        return self.make_flax(self.resolve(cfg), api, **options)

    def torch_module(self, cfg: AttnConfig):
        return self.make_torch(self.resolve(cfg))

    def output_dim(self, cfg: AttnConfig) -> int:
        """The last dimension of the context vectors at ``cfg``."""
        return self.output_width(self.resolve(cfg))

    def torch_forward(self, module, x, cfg: AttnConfig, attention_mask=None):
        """Run the torch reference on ``x`` (a torch tensor); ``attention_mask``: ``x.shape[:-1]``, 1 = real token."""
        return self.torch_call(module, x, self.resolve(cfg), attention_mask)

    def decodes(self, cfg: AttnConfig) -> bool:
        """Whether the variant has a KV cache at ``cfg`` (jaxattn ``decode=True``, a cached torch reference)."""
        return self.make_torch_cached is not None and self.decodes_at(self.resolve(cfg))

    def torch_cached_module(self, cfg: AttnConfig):
        """The torch reference with a KV cache: same state-dict keys as :meth:`torch_module`'s."""
        if not self.decodes(cfg):
            raise BadInputError(f"{self.name} has no KV cache at this config (decoding needs a causal variant)")
        assert self.make_torch_cached is not None  # decodes() said so
        return self.make_torch_cached(self.resolve(cfg))

    def recognises(self, torch_module) -> bool:
        """Whether ``torch_module`` is this variant (by structure, not by class name)."""
        return bool(self.matches(torch_module))

    def infer_config(self, shapes: Shapes, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The hyperparameters ``shapes`` (canonical torch key -> shape) pin down; only what is certain.

        ``known``: values given otherwise (flags, a config file) that make more certain, e.g. the
        kv heads from ``W_key``'s width once ``head_dim`` or ``num_heads`` is known.
        """
        return self.infer(shapes, dict(known or {}))

    def config_of(self, flax_module) -> AttnConfig:
        """The :class:`AttnConfig` the jaxattn module ``flax_module`` was built with."""
        return self.flax_config(flax_module)

    def check_heads(self, cfg: AttnConfig) -> None:
        """Raise :class:`BadInputError` when ``num_heads`` does not split the width it splits."""
        rc = self.resolve(cfg)
        if self.check_config is not None:
            self.check_config(rc)
        if self.splits_heads_of is None:
            return
        if rc.num_heads < 1 or rc.d_out % rc.num_heads:
            raise BadInputError(
                f"{self.name}: {self.splits_heads_of}={rc.d_out} must be divisible by num_heads={rc.num_heads}"
            )
