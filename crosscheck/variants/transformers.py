"""transformers' attention layers: Llama's and Qwen3's (grouped-query) and GPT-2's (fused ``c_attn``).

Each format runs on one of the book's Flax modules and ttnn programs: ``LlamaAttention`` and
``Qwen3Attention`` on grouped-query attention (:mod:`crosscheck.variants.grouped_query`, whose
machinery they share), ``GPT2Attention`` on ``MultiHeadAttentionCombinedQKV``; their porting tables
say where each format keeps the same weights. Torch references: :mod:`crosscheck.references.hf`
(transformers itself, an optional package).
"""

from __future__ import annotations

from collections.abc import Mapping

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.tt import decode_programs as dp
from crosscheck.tt import programs as tp
from crosscheck.variants import portmap as pm
from crosscheck.variants.common import build_flax, has_linear, heads_args, matrix
from crosscheck.variants.grouped_query import (
    GQA_COMMON,
    GQA_FIELDS,
    gqa_fit_guess,
    gqa_widths,
    infer_gqa_widths,
    resolve_gqa,
    rope_options,
)
from crosscheck.variants.variant import Shapes, Variant

#: transformers' names -> the book's (the Flax module's and the ttnn program's).
_HF_QKVO = (("q_proj", "W_query"), ("k_proj", "W_key"), ("v_proj", "W_value"), ("o_proj", "out_proj"))


def _hf_gqa(cfg: AttnConfig) -> pm.PortMap:
    d_out, kv, hd = gqa_widths(cfg)
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


def _infer_hf_gqa(shapes: Shapes, known: Mapping) -> dict:
    return infer_gqa_widths(shapes, known, "q_proj.weight", "k_proj.weight", "q_proj.bias", "q_norm.weight")


def _infer_gpt2(shapes: Shapes, known: Mapping) -> dict:
    w = matrix(shapes, "c_attn.weight")
    return dict(d_in=w[0], d_out=w[0]) if w else {}


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
            found = rope_options(found, options, cls, ("rope_theta", "context_length"))
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


def _gpt2_masked_forward(module, x, cfg: AttnConfig, keep, p: float):
    """GPT2Attention drops with ``nn.functional.dropout`` inside its eager call: its steps with the mask given."""
    from crosscheck.references.dropout_masks import gpt2_forward_masked

    return gpt2_forward_masked(module, x, keep, p)


#: The transformers classes of each format (built lazily: crosscheck.references.hf imports nothing heavy).
_HF_SPECS = {
    "llama": lambda hf: hf.Spec("llama", "LlamaConfig", "LlamaAttention", "LlamaRotaryEmbedding"),
    "qwen3": lambda hf: hf.Spec("qwen3", "Qwen3Config", "Qwen3Attention", "Qwen3RotaryEmbedding"),
    "gpt2": lambda hf: hf.Spec("gpt2", "GPT2Config", "GPT2Attention"),
}


def _hf_qkvo(module) -> bool:
    return all(has_linear(module, n) for n, _ in _HF_QKVO) and hasattr(module, "config")


def _is_hf_llama(module) -> bool:
    return _hf_qkvo(module) and getattr(module, "q_norm", None) is None and getattr(module, "k_norm", None) is None


def _is_hf_qwen3(module) -> bool:
    return _hf_qkvo(module) and all(hasattr(getattr(module, n, None), "weight") for n in ("q_norm", "k_norm"))


def _is_gpt2(module) -> bool:
    """transformers' GPT2Attention (self-attention): Conv1D ``c_attn`` and ``c_proj`` (``nf``, weight (in, out))."""
    conv = lambda n: hasattr(getattr(module, n, None), "nf") and hasattr(getattr(module, n), "weight")  # noqa: E731
    return conv("c_attn") and conv("c_proj") and not hasattr(module, "q_attn")


VARIANTS: tuple[Variant, ...] = (
    Variant(
        name="LlamaAttention",
        family="transformers",
        summary="transformers' Llama: q/k/v/o_proj (bias per attention_bias), RoPE, kv groups",
        fields=(*GQA_FIELDS, "qkv_bias"),
        port_table=_hf_gqa,
        make_torch=_hf_module("llama"),
        matches=_is_hf_llama,
        infer=_infer_hf_gqa,
        resolve_config=resolve_gqa(qk_norm=False),
        torch_call=_hf_forward("llama"),
        torch_config=_hf_config(rope=True),
        fit_guess_of=gqa_fit_guess("q_proj.weight", "k_proj.weight"),
        needs=("transformers",),
        **GQA_COMMON,
    ),
    Variant(
        name="Qwen3Attention",
        family="transformers",
        summary="transformers' Qwen3: Llama's layout + q_norm/k_norm (RMSNorm, eps 1e-6)",
        fields=(*GQA_FIELDS, "qkv_bias"),
        port_table=_hf_gqa,
        make_torch=_hf_module("qwen3"),
        matches=_is_hf_qwen3,
        infer=_infer_hf_gqa,
        resolve_config=resolve_gqa(qk_norm=True),
        torch_call=_hf_forward("qwen3"),
        torch_config=_hf_config(rope=True),
        fit_guess_of=gqa_fit_guess("q_proj.weight", "k_proj.weight"),
        needs=("transformers",),
        **GQA_COMMON,
    ),
    Variant(
        name="GPT2Attention",
        family="transformers",
        summary="transformers' GPT-2: Conv1D c_attn (in, 3E) = q|k|v, c_proj; causal",
        fields=("d_in", "num_heads", "context_length", "dropout"),
        port_table=_gpt2,
        make_flax=build_flax("MultiHeadAttentionCombinedQKV", lambda cfg: dict(heads_args(cfg), qkv_bias=True)),
        make_torch=_hf_module("gpt2"),
        ttnn_forward=tp.multi_head_attention_combined_qkv,
        ttnn_sdpa=tp.multi_head_attention_combined_qkv_sdpa,
        ttnn_decode=dp.COMBINED_QKV_DECODE,
        matches=_is_gpt2,
        infer=_infer_gpt2,
        bf16_roundings=10,
        takes_attention_impl=True,
        splits_heads_of="n_embd (= d_in)",
        shard_modes=("batch", "heads", "sequence"),
        resolve_config=lambda cfg: cfg.replace(d_out=cfg.d_in, qkv_bias=True),
        # n_embd is d_in (3 in the seed), which two heads cannot split.
        defaults=(("num_heads", 1),),
        torch_call=_gpt2_forward,
        torch_masked_forward=_gpt2_masked_forward,
        torch_config=_hf_config(rope=False),
        flax_class="MultiHeadAttentionCombinedQKV",
        in_default_run=False,
        needs=("transformers",),
        # The book's combined-QKV re-run, which names what it cannot break down (GPT-2 has no ``qkv``).
        torch_stages="crosscheck.checks.stage_reruns:rerun_combined",
    ),
)
