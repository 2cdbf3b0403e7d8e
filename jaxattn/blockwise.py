"""Where the blockwise code lived before the kernels got their own package; kept so imports keep working.

The kernel is :mod:`jaxattn.kernels.blockwise`, the fused-QKV path :mod:`jaxattn.fused`,
the ``"auto"`` threshold :data:`jaxattn.implementations.AUTO_BLOCKWISE_MIN_TOKENS`.
"""

from jaxattn.fused import fuse_qkv_params, fused_mha
from jaxattn.implementations import AUTO_BLOCKWISE_MIN_TOKENS
from jaxattn.kernels.blockwise import (
    DEFAULT_BLOCK_SIZE,
    HEAD_GROUP,
    PREFIX_BLOCK_SIZE,
    PREFIX_MAX_BLOCKS,
    PREFIX_ROW_GROUP,
    blockwise_attention,
    blockwise_causal_attention,
    general_blockwise_attention,
)

__all__ = [
    "AUTO_BLOCKWISE_MIN_TOKENS",
    "DEFAULT_BLOCK_SIZE",
    "HEAD_GROUP",
    "PREFIX_BLOCK_SIZE",
    "PREFIX_MAX_BLOCKS",
    "PREFIX_ROW_GROUP",
    "blockwise_attention",
    "blockwise_causal_attention",
    "fuse_qkv_params",
    "fused_mha",
    "general_blockwise_attention",
]
