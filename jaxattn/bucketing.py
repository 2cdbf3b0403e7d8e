"""Pad variable-length inputs up to a few bucket lengths so ``jax.jit`` compiles a few times, not once per length.

``jax.jit`` specialises on shapes: a stream of prompts of 1..N tokens compiles
N programs. Rounding ``tokens`` up to a bucket (a power of two, or a multiple of
128) bounds that to ``O(log N)`` or ``N / 128`` programs.

Why padding is exact for the causal modules: padding is appended *after* the
real tokens, query ``i`` only attends keys ``j <= i``, and every other step
(Q/K/V and output projections) is per token. So real positions never see the
padding, and slicing the output back to ``tokens`` gives the unpadded result.
(This does not hold for non-causal attention, where every query sees every key.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

BucketPolicy = Literal["pow2", "multiple", "none"]

#: Host (numpy) arrays are padded on the host: an eager ``jnp.pad`` would compile once per input length.
AnyArray = Array | np.ndarray


def bucket_tokens(
    tokens: int, *, policy: BucketPolicy = "pow2", multiple: int = 128, maximum: int | None = None
) -> int:
    """The padded length for ``tokens``: next power of two, or next multiple of ``multiple``.

    ``maximum`` (e.g. the module's ``context_length``) caps the bucket; ``tokens``
    itself above ``maximum`` is an error.
    """
    if tokens < 1:
        raise ValueError(f"bucket_tokens: tokens must be >= 1, got {tokens}")
    if maximum is not None and tokens > maximum:
        raise ValueError(f"bucket_tokens: tokens={tokens} exceeds maximum={maximum}")
    if policy == "none":
        bucket = tokens
    elif policy == "pow2":
        bucket = 1 << (tokens - 1).bit_length()
    elif policy == "multiple":
        if multiple < 1:
            raise ValueError(f"bucket_tokens: multiple must be >= 1, got {multiple}")
        bucket = -(-tokens // multiple) * multiple
    else:
        raise ValueError(f"bucket_tokens: policy must be 'pow2', 'multiple' or 'none', got {policy!r}")
    return bucket if maximum is None else min(bucket, maximum)


def pad_tokens(x: Float[AnyArray, "*batch tokens d"], length: int) -> Float[AnyArray, "*batch length d"]:
    """Append zero tokens on axis ``-2`` up to ``length`` (numpy in, numpy out; JAX in, JAX out)."""
    tokens = x.shape[-2]
    if length < tokens:
        raise ValueError(f"pad_tokens: length={length} is shorter than tokens={tokens}")
    pad = [(0, 0)] * x.ndim
    pad[-2] = (0, length - tokens)
    return np.pad(x, pad) if isinstance(x, np.ndarray) else jnp.pad(x, pad)


def bucketed(
    apply: Callable[[Float[AnyArray, "*batch padded d_in"]], Float[Array, "*batch padded d_out"]],
    *,
    policy: BucketPolicy = "pow2",
    multiple: int = 128,
    maximum: int | None = None,
) -> Callable[[Float[AnyArray, "*batch tokens d_in"]], Float[Array, "*batch tokens d_out"]]:
    """Wrap a (jitted) causal ``apply(x)`` so it only ever sees bucket lengths.

    The wrapper pads ``x`` outside ``apply`` with :func:`pad_tokens` (pass numpy
    inputs to keep the pad itself from compiling per length), calls ``apply`` and slices the output back to
    the real ``tokens``. Only valid for causal ``apply`` functions (see module doc).
    """

    def call(x):
        tokens = x.shape[-2]
        length = bucket_tokens(tokens, policy=policy, multiple=multiple, maximum=maximum)
        return apply(pad_tokens(x, length))[..., :tokens, :]

    return call
