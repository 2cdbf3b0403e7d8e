"""The variant registry: each supported attention variant named once.

A :class:`Variant` ties together the torch reference, the Flax module, the
porting table and the ttnn program. The CLI, the compare engine, the
benchmark and the tests iterate over :data:`VARIANTS` instead of repeating
lists. Torch and JAX are imported lazily so that the ttnn worker can import
this module in an interpreter that has neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from crosscheck import portmap as pm
from crosscheck.config import AttnConfig


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
    _resolve: Optional[Callable[[AttnConfig], AttnConfig]] = None
    #: Config values this variant needs by default where the seed config does not fit it.
    defaults: tuple[tuple[str, Any], ...] = ()

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
        cfg = self.resolve(cfg)
        if self.name == "SimplifiedSelfAttention":
            return cfg.d_in
        if self.name == "MultiHeadAttentionWrapper":
            return cfg.num_heads * cfg.d_out
        return cfg.d_out

    def torch_forward(self, module, x, cfg: AttnConfig):
        """Run the torch reference on ``x`` (a torch tensor)."""
        if self.name == "TorchMultiheadAttention":
            from crosscheck.torch_ref import torch_multihead_forward

            return torch_multihead_forward(module, x, self.resolve(cfg).causal)
        return module(x)


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
        "simplified_self_attention",
    ),
    Variant(
        "SelfAttentionV1", "3.4 raw W_query/W_key/W_value matrices", ("d_in", "d_out"), True,
        _v1, _flax("SelfAttentionV1", _d), _torch("SelfAttentionV1", _d), "self_attention_v1",
    ),
    Variant(
        "SelfAttentionV2", "3.4 nn.Linear projections", ("d_in", "d_out", "qkv_bias"), True,
        _v2, _flax("SelfAttentionV2", _dq), _torch("SelfAttentionV2", _dq), "self_attention_v2",
    ),
    Variant(
        "CausalAttention", "3.5 causal mask + dropout", _CAUSAL_FIELDS, False,
        _causal, _flax("CausalAttention", _causal_args), _torch("CausalAttention", _causal_args),
        "causal_attention",
    ),
    Variant(
        "MultiHeadAttentionWrapper", "3.6.1 stacked causal heads", _CAUSAL_FIELDS + ("num_heads",), False,
        _wrapper, _flax("MultiHeadAttentionWrapper", _heads_args), _torch("MultiHeadAttentionWrapper", _heads_args),
        "multi_head_attention_wrapper",
    ),
    Variant(
        "MultiHeadAttention", "3.6.2 fused heads + out_proj", _CAUSAL_FIELDS + ("num_heads",), False,
        _mha, _flax("MultiHeadAttention", _heads_args), _torch("MultiHeadAttention", _heads_args),
        "multi_head_attention",
    ),
    Variant(
        "MultiHeadAttentionCombinedQKV", "bonus: one qkv linear + proj", _CAUSAL_FIELDS + ("num_heads",), False,
        _combined_qkv, _flax("MultiHeadAttentionCombinedQKV", _heads_args),
        _torch("MultiHeadAttentionCombinedQKV", _heads_args), "multi_head_attention_combined_qkv",
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
        _resolve=lambda cfg: cfg.replace(d_out=cfg.d_in),
        # embed_dim is d_in (3 in the seed), which two heads cannot split.
        defaults=(("num_heads", 1),),
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
