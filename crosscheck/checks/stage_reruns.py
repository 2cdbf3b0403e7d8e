"""The functional re-runs of the torch references for ``crosscheck --stages``, one per family, and the
by-submodule stages of registered plugins.

A variant's entry names its re-run as an importable ``"crosscheck.checks.stage_reruns:rerun_mha"``
(:attr:`crosscheck.variants.variant.Variant.torch_stages`): ``(torch module, x, resolved cfg, raw) -> output``,
recording each stage in ``raw`` with the module's own parameters and the book's ops in the book's order.
:mod:`crosscheck.checks.stages` checks the re-run's output against the module's own before it uses the stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from crosscheck.checks.stages_report import STAGES, Raw
from crosscheck.errors import BadInputError


def no_torch_stages(m) -> BadInputError:
    """The refusal for a torch layer that has no re-run (transformers' layers run their projections their way)."""
    return BadInputError(
        f"--stages: no stage breakdown of the torch layer {type(m).__name__} (transformers' layers); stages "
        "cover the book's chapter-3 classes, nn.MultiheadAttention and the book's GroupedQueryAttention"
    )


# --- torch: a functional re-run of the reference module -------------------------------------------


def _torch_attention(raw: Raw, q, k, v, *, causal: bool, scaled: bool = True):
    """The book's attention step without padding; records scores, weights and context; returns the context."""
    import torch

    attn_scores = q @ k.transpose(-2, -1)  # (..., T, S)
    masked = attn_scores
    if causal:
        hidden = torch.triu(torch.ones(attn_scores.shape[-2:], dtype=torch.bool), diagonal=1)
        masked = attn_scores.masked_fill(hidden, -torch.inf)
    attn_weights = torch.softmax(masked / k.shape[-1] ** 0.5 if scaled else masked, dim=-1)
    context_vec = attn_weights @ v  # (..., T, dv)
    for name, t in (("scores", attn_scores), ("weights", attn_weights), ("context", context_vec)):
        raw.setdefault(name, []).append(t)
    return context_vec


def _qkv(raw: Raw, q, k, v):
    for name, t in (("queries", q), ("keys", k), ("values", v)):
        raw.setdefault(name, []).append(t)
    return q, k, v


def _split(t, b: int, tokens: int, heads: int):
    """``(b, T, heads * hd)`` -> ``(b, heads, T, hd)``: the book's ``view(...).transpose(1, 2)``."""
    return t.view(b, tokens, heads, -1).transpose(1, 2)


def _merge(t):
    """``(b, heads, T, hd)`` -> ``(b, T, heads * hd)``."""
    b, heads, tokens, hd = t.shape
    return t.transpose(1, 2).contiguous().view(b, tokens, heads * hd)


# The functional re-runs of the torch references, each named by its entries' ``Variant.torch_stages``
# (``"crosscheck.checks.stage_reruns:rerun_mha"``): ``(torch module, x, resolved cfg, raw) -> output``.


def rerun_simplified(m, x, cfg, raw):
    return _torch_attention(raw, x, x, x, causal=False, scaled=False)


def rerun_v1(m, x, cfg, raw):
    q, k, v = _qkv(raw, x @ m.W_query, x @ m.W_key, x @ m.W_value)
    return _torch_attention(raw, q, k, v, causal=False)


def rerun_v2(m, x, cfg, raw):
    q, k, v = _qkv(raw, m.W_query(x), m.W_key(x), m.W_value(x))
    return _torch_attention(raw, q, k, v, causal=False)


def rerun_causal(m, x, cfg, raw):
    q, k, v = _qkv(raw, m.W_query(x), m.W_key(x), m.W_value(x))  # (b, T, d_out)
    return _torch_attention(raw, q, k, v, causal=True)


def rerun_wrapper(m, x, cfg, raw):
    import torch

    return torch.cat([rerun_causal(head, x, cfg, raw) for head in m.heads], dim=-1)  # (b, T, H * d_out)


def rerun_mha(m, x, cfg, raw):
    b, tokens, _ = x.shape
    q, k, v = _qkv(raw, *(_split(p(x), b, tokens, m.num_heads) for p in (m.W_query, m.W_key, m.W_value)))
    return m.out_proj(_merge(_torch_attention(raw, q, k, v, causal=True)))  # (b, T, d_out)


def rerun_combined(m, x, cfg, raw):
    if not hasattr(m, "qkv"):
        raise no_torch_stages(m)
    b, tokens, _ = x.shape
    qkv = m.qkv(x).view(b, tokens, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)  # (3, b, H, T, hd)
    q, k, v = _qkv(raw, *qkv.unbind(0))
    return m.proj(_merge(_torch_attention(raw, q, k, v, causal=True)))


def rerun_torch_mha(m, x, cfg, raw):
    import torch.nn.functional as F

    b, tokens, _ = x.shape
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)  # (b, T, 3E): [q | k | v]
    q, k, v = _qkv(raw, *(_split(t, b, tokens, m.num_heads) for t in qkv.chunk(3, dim=-1)))
    return m.out_proj(_merge(_torch_attention(raw, q, k, v, causal=cfg.causal)))


def rerun_gqa(m, x, cfg, raw):
    from crosscheck.references.torch_gqa import apply_rope, compute_rope_params

    if not hasattr(m, "W_query"):  # transformers' layers name and run their projections their own way
        raise no_torch_stages(m)
    b, tokens, _ = x.shape
    heads, groups, hd = m.num_heads, m.num_kv_groups, m.head_dim
    q, k, v = _qkv(
        raw,
        _split(m.W_query(x), b, tokens, heads),
        _split(m.W_key(x), b, tokens, groups),
        _split(m.W_value(x), b, tokens, groups),
    )  # (b, H, T, hd); (b, G, T, hd)
    if getattr(m, "q_norm", None) is not None:
        q, k = m.q_norm(q), m.k_norm(k)
        raw["queries_normed"], raw["keys_normed"] = [q], [k]
    cos, sin = compute_rope_params(
        hd, theta_base=cfg.rope_theta, context_length=max(cfg.context_length, tokens), freq_config=cfg.freq_config()
    )
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    raw["queries_rope"], raw["keys_rope"] = [q], [k]
    group = heads // groups
    context_vec = _torch_attention(
        raw, q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), causal=True
    )  # (b, H, T, hd)
    return m.out_proj(_merge(context_vec))


def submodule_stage(path: Sequence[str]) -> str:
    """The stage of a submodule at Linen ``path`` (``("heads_0", "W_key")`` -> ``heads_0.W_key``): its torch
    dotted name with list members as Linen names them; a name that is one of :data:`STAGES` gets ``()``."""
    name = ".".join(path)
    return f"{name}()" if name in STAGES else name


def rerun_by_submodule(m, x, cfg, raw):
    """Any torch layer (a registered plugin's): the output of every named submodule (its first call, where
    it is an array of rank 2..4), recorded by forward hooks in the order they return."""
    from crosscheck.variants.byname import flax_path

    def record(stage):
        def hook(module, args, out):
            if hasattr(out, "dim") and 2 <= out.dim() <= 4 and stage not in raw:
                raw[stage] = [out.detach().clone()]

        return hook

    handles = [
        sub.register_forward_hook(record(submodule_stage(flax_path(f"{name}.x", "other")[:-1])))
        for name, sub in m.named_modules()
        if name
    ]
    try:
        return m(x)
    finally:
        for handle in handles:
            handle.remove()


def flax_by_submodule(tree: Mapping, raw: Raw, cfg) -> None:
    """Any Linen layer (a registered plugin's): every submodule's captured output (its first call) under the
    stage its torch twin has (:func:`submodule_stage`); ``--stages`` compares the names both sides have."""

    def walk(node: Mapping, path: tuple[str, ...]) -> None:
        for key, sub in node.items():
            if not isinstance(sub, Mapping):
                continue
            out = sub.get("__call__")
            if isinstance(out, tuple) and out and hasattr(out[0], "ndim") and 2 <= out[0].ndim <= 4:
                raw.setdefault(submodule_stage((*path, key)), [np.asarray(out[0])])
            walk(sub, (*path, key))

    walk(tree, ())
