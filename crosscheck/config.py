"""The hyperparameters of one attention layer, shared by every backend."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class AttnConfig:
    """Constructor arguments of the book's classes, in the book's names.

    ``num_heads`` is ignored by single-head variants; ``causal`` only matters for
    ``TorchMultiheadAttention`` (every other variant's causality is fixed by its math).
    For ``TorchMultiheadAttention`` ``d_out`` equals ``d_in`` (``embed_dim``).
    """

    d_in: int = 3
    d_out: int = 2
    context_length: int = 6
    dropout: float = 0.0
    num_heads: int = 2
    qkv_bias: bool = False
    causal: bool = True
    #: Grouped-query attention (``GroupedQueryAttention`` and the Hugging Face formats): key/value heads,
    #: 0 = ``num_heads`` (plain multi-head). See :meth:`kv_heads`.
    num_kv_groups: int = 0
    #: Per-head dim, 0 = ``d_out // num_heads`` (see :meth:`resolved_head_dim`); independent of ``d_in``.
    head_dim: int = 0
    #: Qwen3's RMSNorm (eps 1e-6) on each query and key head before RoPE.
    qk_norm: bool = False
    #: RoPE base (the book's ``theta_base``, transformers' ``rope_theta``).
    rope_theta: float = 10_000.0
    #: The book's Llama 3 ``freq_config`` as canonical JSON (keys ``factor``, ``low_freq_factor``,
    #: ``high_freq_factor``, ``original_context_length``), "" = no scaling. A string keeps the config
    #: hashable and its JSON flat; read it with :meth:`freq_config`.
    rope_scaling: str = ""

    def kv_heads(self) -> int:
        """Key/value heads: ``num_kv_groups``, or ``num_heads`` when 0."""
        return self.num_kv_groups or self.num_heads

    def resolved_head_dim(self) -> int:
        """``head_dim``, or ``d_out // num_heads`` when 0."""
        return self.head_dim or self.d_out // max(self.num_heads, 1)

    def freq_config(self) -> dict | None:
        """The book's ``freq_config`` dict, or ``None`` without Llama 3 scaling."""
        return json.loads(self.rope_scaling) if self.rope_scaling else None

    @staticmethod
    def encode_freq_config(freq_config: dict | None) -> str:
        """``freq_config`` (the book's keys) as the canonical string :attr:`rope_scaling` holds."""
        if not freq_config:
            return ""
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")
        missing = [k for k in keys if k not in freq_config]
        if missing:
            raise ValueError(f"freq_config needs {', '.join(keys)}; missing {', '.join(missing)}")
        return json.dumps({k: float(freq_config[k]) for k in keys}, sort_keys=True)

    def replace(self, **changes) -> AttnConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


#: The book's running example: 6 tokens of 3-d embeddings, d_out=2, two heads.
SEED_CONFIG = AttnConfig()
