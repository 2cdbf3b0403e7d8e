"""The open table of attention implementations behind :func:`jaxattn.dot_product_attention`.

Each :class:`Implementation` names a kernel (:mod:`jaxattn.kernels`) and declares
what it supports: masks, bias, grouped kv heads, ``q_offset``, dropout, dtypes,
platforms, and whether it returns the attention weights. ``implementation=None``
("auto") takes the supporting implementation with the highest :attr:`Implementation.auto`
score for the call (by platform, dtype and length); an explicit name that cannot
serve a call raises ``ValueError`` with the implementation and the reason.

Built in: ``naive``, ``blockwise``, ``xla`` (every platform), ``flash`` and ``cudnn`` (GPU only;
on another backend naming them raises a ``ValueError`` that names the backend). More register with :func:`register`
without touching the dispatcher; :mod:`jaxattn.sharding` registers ``ring`` (whose mesh is its context), and
``import jaxattn`` imports it:

    from jaxattn import implementations
    implementations.register(implementations.Implementation("mine", my_kernel, platforms=("gpu",)))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jaxattn.kernels import cudnn, flash
from jaxattn.kernels.blockwise import blockwise_attention
from jaxattn.kernels.naive import naive_attention
from jaxattn.kernels.xla import xla_attention

#: ``kernel(query, key, value, bias, mask, *, scale, is_causal, q_offset, dropout_rate, dropout_rng, precision)``
#: ``-> (context, attn_weights or None)``; see :mod:`jaxattn.kernels`.
Kernel = Callable[..., tuple[Any, Any | None]]

FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")

#: ``"auto"`` switches from the naive kernel to the blockwise one at this many query tokens
#: (see the README's performance section for the sweep).
AUTO_BLOCKWISE_MIN_TOKENS = 256


@dataclass(frozen=True)
class Call:
    """What an implementation is asked to do: shapes, dtype, features and the platform it runs on."""

    platform: str  # jax.default_backend(): "cpu", "gpu", "tpu"
    dtype: str  # the query's dtype name
    batch: int
    q_tokens: int
    kv_tokens: int
    heads: int
    kv_heads: int
    head_dim: int
    value_head_dim: int
    has_mask: bool
    has_bias: bool
    is_causal: bool
    q_offset: bool  # a non-zero or traced q_offset
    dropout: bool
    same_dtypes: bool  # query, key and value share one dtype


@dataclass(frozen=True)
class Implementation:
    """One row of the table: a kernel and what it supports.

    ``auto`` scores the implementation for a call it supports (higher wins; ``None``:
    never picked automatically for that call). ``check`` may refuse a call for a
    reason the flags cannot express, returning the reason.
    """

    name: str
    kernel: Kernel
    summary: str = ""
    mask: bool = True
    bias: bool = True
    grouped_heads: bool = True
    q_offset: bool = True
    dropout: bool = False
    returns_weights: bool = False
    value_head_dim: bool = True  # value head_dim may differ from the query's
    mixed_dtypes: bool = True  # query, key and value may differ in dtype
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    platforms: tuple[str, ...] | None = None  # None: every platform
    auto: Callable[[Call], float | None] = field(default=lambda call: None)
    check: Callable[[Call], str | None] = field(default=lambda call: None)
    #: The kernel multiplies every value by its weight (0 for a masked key), as jax.nn: a non-finite value
    #: reaches every row by itself. ``False`` (a kernel that skips causal blocks): the dispatcher adds it.
    every_value: bool = False

    def refusal(self, call: Call) -> str | None:
        """Why this implementation cannot serve ``call`` (every reason, joined by ``"; "``), or ``None`` when it can.

        All of them, not the first: a user who fixes one reason should not meet the next only then
        (cuDNN on a CPU with float32 needs a GPU *and* a 16-bit dtype).
        """
        needs = [
            (call.has_mask and not self.mask, "a mask"),
            (call.has_bias and not self.bias, "a bias"),
            (call.kv_heads != call.heads and not self.grouped_heads, "grouped key/value heads"),
            (call.q_offset and not self.q_offset, "a q_offset"),
            (call.dropout and not self.dropout, "dropout (it needs the full attention weights)"),
            (
                call.value_head_dim != call.head_dim and not self.value_head_dim,
                f"a value head_dim ({call.value_head_dim}) other than the query's ({call.head_dim})",
            ),
            (not call.same_dtypes and not self.mixed_dtypes, "query, key and value of different dtypes"),
        ]
        reasons = []
        missing = [what for lacking, what in needs if lacking]
        if missing:
            reasons.append("it does not support " + ", ".join(missing))
        if call.dtype not in self.dtypes:
            reasons.append(f"it does not support dtype {call.dtype} (supports {', '.join(self.dtypes)})")
        if self.platforms is not None and call.platform not in self.platforms:
            reasons.append(f"it runs on {', '.join(self.platforms)}, not on {call.platform}")
        checked = self.check(call)
        if checked is not None:
            reasons.append(checked)
        return "; ".join(reasons) or None


_TABLE: dict[str, Implementation] = {}


def register(implementation: Implementation, *, replace: bool = False) -> Implementation:
    """Add ``implementation`` to the table (``replace=True`` to swap one of the same name)."""
    if not implementation.name or implementation.name == "auto":
        raise ValueError(f"an implementation needs a name other than 'auto', got {implementation.name!r}")
    if implementation.name in _TABLE and not replace:
        raise ValueError(f"implementation {implementation.name!r} is already registered (pass replace=True)")
    _TABLE[implementation.name] = implementation
    return implementation


def unregister(name: str) -> None:
    """Remove ``name`` from the table (tests and experiments)."""
    _TABLE.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered implementation names, in registration order."""
    return tuple(_TABLE)


def get(name: str) -> Implementation:
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {name!r}; known: {', '.join(_TABLE)} (or None / 'auto')"
        ) from None


def for_dropout() -> str:
    """The implementation that runs a call with active dropout: the first registered one that takes it.

    Built in, ``naive``: it forms the full weights dropout acts on (the book's draw, inverted scaling).
    """
    for implementation in _TABLE.values():
        if implementation.dropout:
            return implementation.name
    raise ValueError(f"no registered attention implementation takes dropout; known: {', '.join(_TABLE)}")


def requested(name: str, *, dropout: bool) -> str | None:
    """The ``implementation=`` a layer asks the core for when its ``attention_impl`` is ``name``.

    With dropout active, :func:`for_dropout` whatever ``name`` says (the draw is then the same from
    every setting); otherwise ``name``, ``None`` for ``"auto"``.
    """
    if dropout:
        return for_dropout()
    return None if name == "auto" else name


def select(name: str | None, call: Call) -> Implementation:
    """The implementation for ``call``: ``name`` if it can serve it, else the best ``auto`` choice."""
    if name is not None and name != "auto":
        chosen = get(name)
        reason = chosen.refusal(call)
        if reason is not None:
            raise ValueError(f"attention implementation {chosen.name!r} cannot serve this call: {reason}")
        return chosen
    scored = [
        (score, -i, impl)
        for i, impl in enumerate(_TABLE.values())
        if impl.refusal(call) is None and (score := impl.auto(call)) is not None
    ]
    if not scored:
        why = "; ".join(
            f"{impl.name!r}: {impl.refusal(call) or 'not chosen automatically for it'}" for impl in _TABLE.values()
        )
        raise ValueError(f"no registered attention implementation supports this call ({call}): {why}")
    return max(scored, key=lambda t: t[:2])[2]


# --- "auto": what each implementation scores, per platform ---------------------------------------
# On a CPU: naive below AUTO_BLOCKWISE_MIN_TOKENS, blockwise from there (the README's sweep). On a GPU
# the lax-loop blockwise path is ~25x slower than a fused kernel (an earlier GPU report: 4.65 ms against 0.17 ms
# at 8 x 1024 tokens), so: cudnn for bf16/fp16 where it takes the call, the Pallas flash kernel for
# float32 and what cuDNN refuses, xla (or naive) for masks, bias and q_offset while their (T, S)
# float32 scores stay under SCORES_MEMORY_BOUND; past the bound the flash kernel takes masks, bias and
# q_offset (tile by tile, no scores held). Only what flash cannot serve past the bound (float64, head
# dims over 256) still goes to blockwise, the one kernel that then fits (slow, but it runs).

#: The most bytes of float32 ``(B, N, T, S)`` scores "auto" lets a GPU implementation hold.
SCORES_MEMORY_BOUND = 1 << 30


def scores_bytes(call: Call) -> int:
    """Bytes of the call's float32 ``(B, N, T, S)`` scores: what naive and xla hold at once."""
    return 4 * call.batch * call.heads * call.q_tokens * call.kv_tokens


def _fits(call: Call) -> bool:
    return scores_bytes(call) <= SCORES_MEMORY_BOUND


def _auto_naive(call: Call) -> float | None:
    if call.platform != "gpu" or call.dropout or _fits(call):  # dropout: the GPU kernels refuse it
        return 1.0
    return None


def _auto_blockwise(call: Call) -> float | None:
    if call.platform == "gpu":
        return None if _fits(call) else 2.0
    return 2.0 if call.q_tokens >= AUTO_BLOCKWISE_MIN_TOKENS else None


def _auto_gpu(score: float, *, bounded: bool = False) -> Callable[[Call], float | None]:
    """``score`` on a GPU (while the scores fit, if ``bounded``), never elsewhere."""
    return lambda call: score if call.platform == "gpu" and (not bounded or _fits(call)) else None


def _auto_flash(call: Call) -> float | None:
    """4 on a GPU; for a mask, bias or q_offset 2.5: under xla's 3 (while the scores fit), over blockwise's 2."""
    if call.platform != "gpu":
        return None
    return 2.5 if call.has_mask or call.has_bias or call.q_offset else 4.0


def _flash_check(call: Call) -> str | None:
    too_big = [dim for dim in dict.fromkeys((call.head_dim, call.value_head_dim)) if dim > flash.MAX_HEAD_DIM]
    if too_big:
        return f"it takes head dims up to {flash.MAX_HEAD_DIM}, not {', '.join(map(str, too_big))}"
    return None


register(
    Implementation(
        "naive",
        naive_attention,
        summary="the book's path: full (T, S) weights in float32, returned; the only one with dropout",
        dropout=True,
        returns_weights=True,
        every_value=True,
        auto=_auto_naive,
    )
)
register(
    Implementation(
        "blockwise",
        blockwise_attention,
        summary="online softmax over key blocks in pure JAX, O(T x block) memory, causal blocks skipped",
        auto=_auto_blockwise,
    )
)
register(
    Implementation(
        "xla",
        xla_attention,
        summary="jax.nn.dot_product_attention(implementation='xla'), with q_offset and zero rows added",
        value_head_dim=False,
        mixed_dtypes=False,
        every_value=True,
        auto=_auto_gpu(3.0, bounded=True),
        # XLA:CPU has no float16 x float16 -> float32 dot, which jax.nn's xla path asks for.
        check=lambda call: (
            "XLA:CPU cannot run its float16 products" if call.platform == "cpu" and call.dtype == "float16" else None
        ),
    )
)
register(
    Implementation(
        "flash",
        flash.flash_attention,
        summary="FlashAttention-2 in Pallas (Triton on a GPU), forward and custom_vjp backward, causal blocks skipped "
        "(q_offset too), masks and bias read tile by tile (dbias too)",
        mixed_dtypes=False,
        dtypes=("float32", "bfloat16", "float16"),
        platforms=("gpu",),
        auto=_auto_flash,
        check=_flash_check,
    )
)
register(
    Implementation(
        "cudnn",
        cudnn.cudnn_attention,
        summary="jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's fused attention, bf16/fp16",
        mask=False,
        bias=False,
        q_offset=False,
        mixed_dtypes=False,
        dtypes=cudnn.DTYPES,
        platforms=("gpu",),
        auto=_auto_gpu(5.0),
        check=lambda call: cudnn.refusal(call.head_dim, call.value_head_dim),
    )
)
