"""Grouped-query attention with RoPE: the book's Llama 3 / Qwen3 ``GroupedQueryAttention``.

What every grouped-query format shares (widths, config completion and checks, RoPE settings, the Flax
module's arguments, the ttnn program) and the book's own entry; transformers' formats, which reuse it,
are in :mod:`crosscheck.variants.transformers`. Torch reference: :mod:`crosscheck.references.torch_gqa`;
Flax module: :class:`jaxattn.GroupedQueryAttention`; ttnn program: :mod:`crosscheck.tt.gqa_programs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.tt import decode_programs as dp
from crosscheck.tt import gqa_programs
from crosscheck.variants import portmap as pm
from crosscheck.variants.common import build_flax, has_linear, matrix, qkv_layer
from crosscheck.variants.variant import Shapes, Variant

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


def gqa_widths(cfg: AttnConfig) -> tuple[int, int, int]:
    """``(d_out, kv width, head_dim)``: W_query's and W_key's output widths, and the per-head dim."""
    hd = cfg.resolved_head_dim()
    return cfg.num_heads * hd, cfg.kv_heads() * hd, hd


def _book_gqa(cfg: AttnConfig) -> pm.PortMap:
    d_out, kv, hd = gqa_widths(cfg)
    entries = pm.linear("W_query", ("W_query",), cfg.d_in, d_out, False)
    entries += pm.linear("W_key", ("W_key",), cfg.d_in, kv, False)
    entries += pm.linear("W_value", ("W_value",), cfg.d_in, kv, False)
    entries += pm.linear("out_proj", ("out_proj",), d_out, cfg.d_in, False)
    if cfg.qk_norm:
        entries += [pm.norm_scale(f"{n}.scale", (n,), f"{n}.scale", hd) for n in ("q_norm", "k_norm")]
    return pm.PortMap(tuple(entries), ignored=_BOOK_GQA_IGNORED)


def infer_gqa_widths(shapes: Shapes, known: Mapping, q: str, k: str, bias: str, norm: str) -> dict:
    """d_in and d_out from the query projection, qk_norm from the norm key and, once the head dim is
    certain (the norm's width, or ``known`` head_dim / num_heads), num_heads and the kv heads."""
    found: dict = {}
    wq, wk = matrix(shapes, q), matrix(shapes, k)
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
    return infer_gqa_widths(shapes, known, "W_query.weight", "W_key.weight", "W_query.bias", "q_norm.scale")


def gqa_fit_guess(q: str, k: str):
    """For the fit check only: heads of the largest dim that splits both projections (gcd of the widths)."""

    def guess(shapes: Shapes) -> dict:
        import math

        wq, wk = matrix(shapes, q), matrix(shapes, k)
        if not (wq and wk):
            return {}
        hd = math.gcd(wq[0], wk[0])
        return dict(head_dim=hd, num_heads=wq[0] // hd, num_kv_groups=wk[0] // hd, d_out=wq[0])

    return guess


def complete_gqa(values: dict, given: frozenset) -> dict:
    """d_out from num_heads x head_dim when only the head dim was given; kv heads that divide the heads."""
    values = dict(values)
    if values.get("head_dim") and "d_out" not in given:
        values["d_out"] = values["num_heads"] * values["head_dim"]
    if "num_kv_groups" not in given and values.get("num_kv_groups") and values["num_heads"] % values["num_kv_groups"]:
        values["num_kv_groups"] = 0  # the defaults' 2 kv heads do not split an odd head count: plain multi-head
    return values


def check_gqa(cfg: AttnConfig) -> None:
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


def resolve_gqa(qkv_bias: bool | None = None, qk_norm: bool | None = None):
    """Fix what the format fixes (the book: no biases; Llama: no norms; Qwen3: norms) and the head dim."""

    def resolve(cfg: AttnConfig) -> AttnConfig:
        if qkv_bias is not None:
            cfg = cfg.replace(qkv_bias=qkv_bias)
        if qk_norm is not None:
            cfg = cfg.replace(qk_norm=qk_norm)
        if cfg.num_heads < 1:
            return cfg  # refused by check_gqa
        cfg = cfg.replace(num_kv_groups=cfg.kv_heads())
        if cfg.head_dim or cfg.d_out % cfg.num_heads:
            return cfg  # a head_dim that does not fit d_out is refused by check_gqa, naming both
        return cfg.replace(head_dim=cfg.d_out // cfg.num_heads)

    return resolve


def gqa_flax_args(cfg: AttnConfig) -> dict:
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


def gqa_config_of(flax_module) -> AttnConfig:
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


def rope_options(found: dict, options: Mapping, where: str, required: tuple[str, ...]) -> dict:
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
    found = rope_options(found, options, cls, ("rope_theta", "context_length"))
    return AttnConfig(**found)


def _is_book_gqa(module) -> bool:
    """The book's GroupedQueryAttention (Llama 3 or Qwen3): Q/K/V + out_proj linears and ``num_kv_groups``."""
    return qkv_layer(module) and has_linear(module, "out_proj") and hasattr(module, "num_kv_groups")


GQA_FIELDS = (
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
GQA_DEFAULTS = (("d_out", 16), ("num_heads", 4), ("num_kv_groups", 2))
#: What every grouped-query format's entry shares: one Flax module, one ttnn program, one stage re-run.
GQA_COMMON: dict[str, Any] = dict(
    make_flax=build_flax("GroupedQueryAttention", gqa_flax_args),
    ttnn_forward=gqa_programs.grouped_query_attention,
    ttnn_decode=dp.GQA_DECODE,
    # x, W_query, queries, the cos/sin table, x*cos, the RoPE sum, scores, 1/sqrt(hd), scaled scores, weights,
    # context, out_proj's weight, the output: 13; qk_norm adds the norm's output and its scale: 15.
    bf16_roundings=15,
    takes_attention_impl=True,
    in_default_run=False,
    flax_class="GroupedQueryAttention",
    shard_modes=("batch", "heads", "sequence"),
    defaults=GQA_DEFAULTS,
    output_width=lambda cfg: cfg.d_in,
    flax_config=gqa_config_of,
    complete_config=complete_gqa,
    check_config=check_gqa,
    options=("rope_theta", "freq_config", "rope_scaling", "context_length"),
    torch_stages="crosscheck.checks.stage_reruns:rerun_gqa",
    flax_stages="crosscheck.checks.stages:flax_gqa",
)

VARIANTS: tuple[Variant, ...] = (
    Variant(
        name="GroupedQueryAttention",
        family="grouped-query",
        summary="the book's Llama 3 / Qwen3 GQA: RoPE, kv groups, optional q/k RMSNorm",
        fields=(*GQA_FIELDS, "qk_norm"),
        port_table=_book_gqa,
        make_torch=_book_gqa_module,
        make_torch_cached=_book_gqa_cached,
        matches=_is_book_gqa,
        infer=_infer_book_gqa,
        resolve_config=resolve_gqa(qkv_bias=False),
        torch_call=_book_gqa_forward,
        torch_config=_book_gqa_config,
        fit_guess_of=gqa_fit_guess("W_query.weight", "W_key.weight"),
        **GQA_COMMON,
    ),
)
