"""The weights of a ``torch.nn.MultiheadAttention`` state dict, split per projection, and the reference stages.

``torch.nn.MultiheadAttention`` (self-attention, ``embed_dim = kdim = vdim``) keeps the three input
projections stacked: ``in_proj_weight (3E, E)`` is ``[W_q; W_k; W_v]`` in torch's ``(out, in)`` layout, and
``in_proj_bias (3E,)`` likewise; ``out_proj.weight (E, E)``, ``out_proj.bias (E,)``. Without bias the two bias
entries are absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MhaWeights:
    """Per-projection weights in torch's ``(out, in)`` layout; biases ``None`` without bias."""

    w_q: np.ndarray
    w_k: np.ndarray
    w_v: np.ndarray
    w_o: np.ndarray
    b_q: np.ndarray | None
    b_k: np.ndarray | None
    b_v: np.ndarray | None
    b_o: np.ndarray | None
    num_heads: int

    @property
    def embed_dim(self) -> int:
        return self.w_q.shape[0]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def bias(self) -> bool:
        return self.b_q is not None


def split(state_dict: dict[str, np.ndarray], num_heads: int) -> MhaWeights:
    """The stacked torch state dict as :class:`MhaWeights` (float32 numpy)."""
    w = np.asarray(state_dict["in_proj_weight"], np.float32)  # (3E, E)
    w_q, w_k, w_v = np.split(w, 3)
    b = state_dict.get("in_proj_bias")
    b_q, b_k, b_v = (None, None, None) if b is None else np.split(np.asarray(b, np.float32), 3)
    b_o = state_dict.get("out_proj.bias")
    return MhaWeights(
        w_q=w_q, w_k=w_k, w_v=w_v, w_o=np.asarray(state_dict["out_proj.weight"], np.float32),
        b_q=b_q, b_k=b_k, b_v=b_v, b_o=None if b_o is None else np.asarray(b_o, np.float32),
        num_heads=num_heads,
    )  # fmt: skip


def visible(tokens: int, causal: bool, attention_mask: np.ndarray | None, batch: int) -> np.ndarray:
    """``(B, T, S)`` bool: which keys each query sees (causal and/or real keys)."""
    seen = np.ones((batch, tokens, tokens), bool)
    if causal:
        seen &= np.tril(np.ones((tokens, tokens), bool))
    if attention_mask is not None:
        seen &= np.asarray(attention_mask, bool)[:, None, :]
    return seen


def reference_stages(
    weights: MhaWeights, x: np.ndarray, *, causal: bool, attention_mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The stages of self-attention in float64 (``x (B, T, E)``): projections, the attention (the heads merged,
    before ``out_proj``) and the output. A query that sees no key gets a zero attention row."""
    x64 = np.asarray(x, np.float64)
    batch, tokens, _ = x64.shape

    def project(w, b):
        y = x64 @ w.astype(np.float64).T
        return y if b is None else y + b

    q, k, v = project(weights.w_q, weights.b_q), project(weights.w_k, weights.b_k), project(weights.w_v, weights.b_v)
    n, h = weights.num_heads, weights.head_dim

    def heads(t):  # (B, T, E) -> (B, N, T, H)
        return t.reshape(batch, tokens, n, h).transpose(0, 2, 1, 3)

    scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) / np.sqrt(h)  # (B, N, T, S)
    seen = visible(tokens, causal, attention_mask, batch)[:, None]  # (B, 1, T, S)
    scores = np.where(seen, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(seen, np.exp(scores - row_max), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    weights_ = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    attention = (weights_ @ heads(v)).transpose(0, 2, 1, 3).reshape(batch, tokens, n * h)  # (B, T, E)
    return {"query": q, "key": k, "value": v, "attention": attention, "output": project_out(weights, attention)}


def project_out(weights: MhaWeights, attention: np.ndarray) -> np.ndarray:
    out = np.asarray(attention, np.float64) @ weights.w_o.astype(np.float64).T
    return out if weights.b_o is None else out + weights.b_o


def merged_stages(found: dict, output, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A layer's stages as ``(B, T, E)`` numpy arrays (its heads merged) for an input of ``shape`` ``(B, T, E)``,
    with its ``output``."""
    merged = {name: np.asarray(a).reshape(*shape[:2], -1) for name, a in found.items()}
    return {**merged, "output": np.asarray(output)}
