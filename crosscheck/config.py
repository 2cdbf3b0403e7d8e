"""The hyperparameters of one attention layer, shared by every backend."""

from __future__ import annotations

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

    def replace(self, **changes) -> "AttnConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


#: The book's running example: 6 tokens of 3-d embeddings, d_out=2, two heads.
SEED_CONFIG = AttnConfig()
