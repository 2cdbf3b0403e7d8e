"""Rotary position embeddings (RoPE) as the book writes them, in our ``(batch, tokens, heads, head_dim)`` layout.

Layout: **split halves**, as the book's ``llama3.py``/``qwen3.py`` and Hugging Face's
``rotate_half``: dimension ``i`` pairs with ``i + head_dim // 2`` (not Meta's interleaved
``(2i, 2i + 1)`` pairs), and the tables repeat the ``head_dim // 2`` angles twice::

    angles[p] = p * inv_freq                         (head_dim // 2,)
    cos[p], sin[p] = cos/sin(concat(angles, angles))  (head_dim,)
    rope(x)[p] = x * cos[p] + concat(-x2, x1) * sin[p]

Llama 3's frequency scaling (``freq_config``, the book's keys ``factor``, ``low_freq_factor``,
``high_freq_factor``, ``original_context_length``) divides the low frequencies by ``factor`` and
blends the medium ones; :func:`freq_config_from_rope_scaling` reads transformers'
``rope_scaling`` into that dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

#: The book's ``freq_config`` keys, and transformers' name for each in ``rope_scaling``.
FREQ_CONFIG_KEYS = {
    "factor": "factor",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "original_context_length": "original_max_position_embeddings",
}

__all__ = [
    "FREQ_CONFIG_KEYS",
    "apply_rope",
    "compute_rope_params",
    "freq_config_from_rope_scaling",
    "inverse_frequencies",
]


def inverse_frequencies(
    head_dim: int, theta_base: float = 10_000.0, freq_config: Mapping[str, float] | None = None
) -> Float[Array, " half"]:
    """The ``head_dim // 2`` rotation frequencies, float32, with Llama 3's scaling when ``freq_config`` is given."""
    if head_dim < 2 or head_dim % 2 != 0:
        raise ValueError(f"RoPE: head_dim={head_dim} must be even and >= 2")
    # Everything here is static, so it runs once on the host, op by op in float32 as the book's
    # torch code does: under jit, XLA would rewrite `theta ** e` and `x / 3.0` into other roundings,
    # and a one-ulp change of a frequency moves the angle at position 4095 by ~1e-4.
    with jax.ensure_compile_time_eval():
        exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / jnp.float32(head_dim)
        inv_freq = np.asarray(1.0 / (jnp.float32(theta_base) ** exponents))  # (hd // 2,), XLA's powf = torch's
    if freq_config is None:
        return jnp.asarray(inv_freq)
    config = _check_freq_config(freq_config)
    f32 = np.float32
    factor, low, high = f32(config["factor"]), f32(config["low_freq_factor"]), f32(config["high_freq_factor"])
    original = f32(config["original_context_length"])
    low_freq_wavelen = original / low  # longer waves than this: divided by factor
    high_freq_wavelen = original / high  # shorter waves than this: kept
    # torch evaluates `scalar / tensor` (the book's `2 * torch.pi / inv_freq`) as `scalar * (1 / tensor)`;
    # written the same way, the tables agree with the book's to the last bit.
    wavelen = f32(2 * math.pi) * (f32(1.0) / inv_freq)  # (hd // 2,)
    scaled = inv_freq / factor
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, scaled, inv_freq)
    smooth_factor = (original * (f32(1.0) / wavelen) - low) / (high - low)  # scalar / tensor again
    smoothed_inv_freq = (f32(1.0) - smooth_factor) * scaled + smooth_factor * inv_freq
    is_medium_freq = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return jnp.asarray(np.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama).astype(np.float32))


def compute_rope_params(
    head_dim: int,
    theta_base: float = 10_000.0,
    context_length: int = 4096,
    freq_config: Mapping[str, float] | None = None,
    dtype: Any = jnp.float32,
) -> tuple[Float[Array, "context_length head_dim"], Float[Array, "context_length head_dim"]]:
    """The book's ``compute_rope_params``: ``(cos, sin)`` tables for positions ``0 .. context_length-1``.

    Computed in float32 (as the book, whose ``inv_freq`` is ``.float()``) and returned in ``dtype``.
    """
    inv_freq = inverse_frequencies(head_dim, theta_base, freq_config)  # (hd // 2,)
    positions = jnp.arange(context_length, dtype=jnp.float32)  # (context_length,)
    angles = positions[:, None] * inv_freq[None, :]  # (context_length, hd // 2)
    angles = jnp.concatenate([angles, angles], axis=1)  # (context_length, hd)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def freq_config_from_rope_scaling(rope_scaling: Mapping[str, Any] | None) -> dict[str, float] | None:
    """transformers' ``config.rope_scaling`` as the book's ``freq_config``.

    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` -> ``{"factor", "low_freq_factor", "high_freq_factor",
    "original_context_length"}``; ``None`` or ``rope_type`` ``"default"`` -> ``None``. Any other
    ``rope_type`` (``"linear"``, ``"dynamic"``, ``"yarn"``, ...) raises ``ValueError`` naming it.
    Older configs spell ``rope_type`` as ``type``; both are read.
    """
    if rope_scaling is None:
        return None
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(
            f"rope_scaling: rope_type={rope_type!r} is not supported (only 'llama3' and 'default'); "
            f"got {dict(rope_scaling)}"
        )
    missing = [hf for hf in FREQ_CONFIG_KEYS.values() if hf not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling: rope_type='llama3' needs {missing}; got {dict(rope_scaling)}")
    return {book: float(rope_scaling[hf]) for book, hf in FREQ_CONFIG_KEYS.items()}


def apply_rope(
    x: Float[Array, "batch tokens heads head_dim"],
    cos: Float[Array, "positions head_dim"],
    sin: Float[Array, "positions head_dim"],
    *,
    offset: int | Int[Array, ""] = 0,
) -> Float[Array, "batch tokens heads head_dim"]:
    """The book's ``apply_rope`` for ``x`` in ``(batch, tokens, heads, head_dim)``, positions ``offset .. offset+T-1``.

    A known ``offset`` (a Python or NumPy integer, or a concrete JAX scalar) is checked here: positions
    below 0 or past the tables' rows raise ``ValueError`` naming both. A traced ``offset`` (a KV cache's
    index under ``jit``) cannot be checked while tracing: the rows are gathered by position, and a
    position outside the tables gives NaN rows, never the clamped rows of another position (which would
    rotate by the wrong angle and look fine). The modules never get there: a KV cache longer than their
    ``context_length`` (the tables' rows) is refused. The rotation runs in float32 and the result has
    ``x``'s dtype.
    """
    _, tokens, _, head_dim = x.shape
    if head_dim % 2 != 0 or cos.shape[-1] != head_dim or sin.shape != cos.shape:
        raise ValueError(
            f"apply_rope: x {x.shape} needs an even head_dim and cos/sin tables (positions, {head_dim}); "
            f"got cos {cos.shape}, sin {sin.shape}"
        )
    rows = cos.shape[0]
    known = _known_offset(offset)
    if known is not None and (known < 0 or known + tokens > rows):
        where = "start before position 0 of" if known < 0 else "exceed"
        raise ValueError(f"apply_rope: positions {known}..{known + tokens - 1} {where} the tables' {rows} rows")
    if known == 0:
        cos, sin = cos[:tokens], sin[:tokens]  # (T, hd)
    else:  # the offset as an array, known or not: eager decoding compiles one gather, not one slice per position
        positions = jnp.asarray(offset, jnp.int32) + jnp.arange(tokens, dtype=jnp.int32)  # (T,)
        inside = ((positions >= 0) & (positions < rows))[:, None]  # (T, 1)
        safe = jnp.clip(positions, 0, max(rows - 1, 0))
        nan = jnp.asarray(jnp.nan, cos.dtype)
        cos = jnp.where(inside, jnp.take(cos, safe, axis=0), nan)  # (T, hd)
        sin = jnp.where(inside, jnp.take(sin, safe, axis=0), nan)
    cos = cos.astype(jnp.float32)[None, :, None, :]  # (1, T, 1, hd)
    sin = sin.astype(jnp.float32)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : head_dim // 2], x32[..., head_dim // 2 :]  # (b, T, heads, hd // 2) each
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # (b, T, heads, hd)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def _known_offset(offset) -> int | None:
    """``offset`` as a Python int when its value is known while tracing, ``None`` when it is traced."""
    if isinstance(offset, jax.core.Tracer):
        return None
    value = np.asarray(offset)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"apply_rope: offset must be an integer scalar, got {offset!r}")
    return int(value)


def _check_freq_config(freq_config: Mapping[str, float]) -> dict[str, float]:
    config = dict(freq_config)
    if set(config) != set(FREQ_CONFIG_KEYS):
        raise ValueError(
            f"freq_config needs exactly the keys {sorted(FREQ_CONFIG_KEYS)}; got {sorted(config)} "
            "(transformers' rope_scaling: use freq_config_from_rope_scaling)"
        )
    if config["high_freq_factor"] == config["low_freq_factor"]:
        raise ValueError(
            f"freq_config: high_freq_factor={config['high_freq_factor']} must differ from "
            f"low_freq_factor={config['low_freq_factor']}"
        )
    return config
