"""The resource budget: what a run will allocate, estimated from shapes before anything is allocated.

Every size a user controls (flags, a file's tensor headers, a bundle's config) is turned into
an estimate of the bytes the run will hold at its peak, and a run over the limit is refused
with :class:`BadInputError` (exit 2) naming the flag or file, the estimate and the limit.
Counts that drive loops (heads, repeats, sweep lengths, decode steps) have fixed bounds.

The limit: ``--max-memory`` (``8G``, ``512M``, ``1.5GiB``, plain bytes; K/M/G/T are powers
of 1024), else :data:`DEFAULT_FRACTION` of the machine's physical memory (or the process's
address-space limit, ``RLIMIT_AS``, where that is lower). It enters from the
outside: :func:`limited` sets it for the code run inside it (a :mod:`contextvars` variable, so
the library's entry points read it with :func:`current` without an argument on every call).

The estimates are deliberately pessimistic (every copy the pipeline makes is counted, float64
for the torch reference); their formulas are in :func:`case_terms` and :func:`bench_terms`.

Only the standard library and numpy are imported here (the ttnn worker reads bundles with it).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from crosscheck.errors import BadInputError

#: The default limit is this fraction of the machine's physical memory.
DEFAULT_FRACTION = 0.5
#: Bounds on counts that drive loops or build one module each.
MAX_HEADS = 1024
MAX_REPEATS = 1000
MAX_WARMUP = 100
MAX_SWEEP_LENGTHS = 1000
MAX_DECODE_STEPS = 65536

#: Bytes per element held for each kind of tensor, counting every copy a cross-check keeps:
#: weights: numpy float32 + torch float32 + torch float64 reference + Flax copy (+ init temporaries);
#: inputs and activations: the same four; attention scores: scores, masked scores and weights
#: live together in the float64 torch reference (3 x 8); a mask buffer: torch float32, its
#: float64 copy and the numpy state dict (4 + 8 + 4).
_WEIGHT_BYTES, _ACTIVATION_BYTES, _SCORE_BYTES, _MASK_BYTES = 24, 24, 24, 16

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def physical_memory() -> int:
    """Bytes of physical memory of this machine (``os.sysconf``); 8 GiB where it cannot tell."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def format_bytes(n: float) -> str:
    """``n`` bytes for a message: ``6.4 GiB``, ``512 MiB``, ``37 B``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 1000 * size else f"{n / size:.3e} {unit}"
    return f"{int(n)} B"


def parse_size(text: str) -> int:
    """``"8G"``, ``"512MiB"``, ``"1.5gb"``, ``"1000000"`` -> bytes (K/M/G/T are powers of 1024); > 0."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 8G, 512M, 1.5GiB or a number of bytes)")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"must be at least 1 byte, got {text!r}")
    return int(value)


def _max_memory_arg(text: str) -> int:
    import argparse

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_budget_option(parser) -> None:
    """``--max-memory`` on an argparse parser (crosscheck, bench, bundle): runs estimated to need more are
    refused before any work."""
    g = parser.add_argument_group("resource budget")
    g.add_argument(
        "--max-memory",
        type=_max_memory_arg,
        metavar="SIZE",
        help=f"refuse, before any allocation, a run estimated to need more memory than SIZE (e.g. 8G, 512M; "
        f"K/M/G/T are powers of 1024; default: {DEFAULT_FRACTION:g} of the machine's physical memory, or the "
        "process's address-space limit RLIMIT_AS if lower)",
    )


@dataclass(frozen=True)
class Budget:
    """A memory limit and where it came from (for the message)."""

    limit: int
    source: str

    def check(self, estimate: int, what: str, fix: str) -> None:
        """Raise :class:`BadInputError` when ``estimate`` bytes exceed the limit.

        ``what``: what needs the memory ("CausalAttention: the mask buffer (context_length 40000^2)");
        ``fix``: the flag or file to change ("lower --context-length").
        """
        if estimate > self.limit:
            raise BadInputError(
                f"{what} needs an estimated {format_bytes(estimate)}, over the memory budget of "
                f"{format_bytes(self.limit)} ({self.source}); {fix}, or raise --max-memory"
            )


def address_space_limit() -> int | None:
    """This process's address-space limit in bytes (``RLIMIT_AS``, soft), or ``None`` where it has none."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def default_budget() -> Budget:
    """:data:`DEFAULT_FRACTION` of the physical memory, or the process's address-space limit where that is lower.

    A process limited to less address space cannot hold more, however much memory the machine has.
    """
    total = physical_memory()
    half = Budget(
        int(total * DEFAULT_FRACTION), f"default: {DEFAULT_FRACTION:g} of {format_bytes(total)} physical memory"
    )
    limit = address_space_limit()
    if limit is not None and limit < half.limit:
        return Budget(
            limit,
            f"default: the process's address-space limit (RLIMIT_AS), below {DEFAULT_FRACTION:g} "
            f"of {format_bytes(total)} physical memory",
        )
    return half


_CURRENT: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("crosscheck_budget", default=None)


def current() -> Budget:
    """The budget set by the innermost :func:`limited`, else the default."""
    return _CURRENT.get() or default_budget()


def budget_for(max_memory: int | str | None) -> Budget:
    """The :class:`Budget` of ``max_memory`` (bytes or a size string; ``None``: the current one); checks it."""
    if max_memory is None:
        return current()
    limit = parse_size(max_memory) if isinstance(max_memory, str) else int(max_memory)
    if limit < 1:
        raise BadInputError(f"--max-memory must be at least 1 byte, got {max_memory!r}")
    return Budget(limit, f"--max-memory {format_bytes(limit)}")


@contextlib.contextmanager
def limited(max_memory: int | str | None) -> Iterator[Budget]:
    """Run the body under ``max_memory`` bytes (an int or a size string; ``None``: the default)."""
    budget = budget_for(max_memory)
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)


def check_count(value: int, limit: int, flag: str) -> None:
    """A count that drives a loop (heads, repeats, steps): ``BadInputError`` naming ``flag`` above ``limit``."""
    if value > limit:
        raise BadInputError(f"{flag} {value} is over the limit of {limit} (each one is a module or a pass of work)")


def nbytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of a dense tensor of ``shape`` (Python ints: no overflow, whatever the header claims)."""
    n = itemsize
    for d in shape:
        n *= int(d)
    return n


def check_tensors(sizes: Sequence[tuple[str, Sequence[int], int]], where: str) -> None:
    """Tensors about to be read (``(name, shape, itemsize)``, from a file header) against the budget.

    Checked before they are materialised, so an expanded or lying tensor (``zeros(1).expand(60000,
    60000)`` saved to ``.pt``: 4 bytes of storage, 13.4 GiB dense) is refused, not allocated.
    Each dense tensor is counted four times (numpy, float32 copy, torch and JAX copies).
    """
    total = sum(nbytes(shape, 4 if itemsize < 4 else itemsize) for _, shape, itemsize in sizes)
    if not sizes:
        return
    big = max(sizes, key=lambda s: nbytes(s[1], s[2]))
    current().check(
        4 * total,
        f"{where} (largest tensor {big[0]!r} of shape {tuple(int(d) for d in big[1])})",
        "store smaller tensors (an expanded view is saved with its dense shape)",
    )


# --- estimates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One part of an estimate: its bytes, what it is, and the flag that sets it."""

    nbytes: int
    what: str
    flag: str
    #: Held for the whole run (weights, buffers), not only while the case runs (scores, activations).
    kept: bool = True


def case_terms(variant, cfg, x_shape: Sequence[int], input_flag: str = "--tokens/--batch") -> list[Term]:
    """The memory one cross-check case holds, term by term.

    weights (from the variant's porting table) x 24 B, buffers (the causal masks, context_length^2
    each) x 16 B, inputs and activations (batch x tokens x (d_in + 4 widths)) x 24 B, attention
    scores (batch x heads x tokens^2) x 24 B, RoPE tables (context_length x head_dim) x 16 B.
    ``variant``: a :class:`crosscheck.variants.registry.Variant`; ``cfg``: its config; ``x_shape``: the input.
    """
    rc = variant.resolve(cfg)
    heads = rc.num_heads if "num_heads" in variant.fields else 1
    check_count(heads, MAX_HEADS, "--num-heads")
    batch = int(x_shape[0]) if len(x_shape) == 3 else 1
    tokens, d_in = int(x_shape[-2]), int(x_shape[-1])
    width = max(rc.d_out, heads * max(rc.resolved_head_dim(), 1))
    # Entries of the table are cheap to list once heads are bounded; their shapes are exact.
    portmap = variant.portmap(cfg)
    params = sum(nbytes(e.torch_shape, 1) for e in portmap.entries)
    buffers = sum(nbytes(b.torch_shape, 1) for b in portmap.buffers)
    weight_flag = "--d-in/--d-out" + "".join(
        f"/--{f.replace('_', '-')}" for f in ("num_heads", "head_dim") if f in variant.fields
    )
    terms = [
        Term(params * _WEIGHT_BYTES, f"weights ({params} parameters)", weight_flag),
        Term(
            buffers * _MASK_BYTES,
            f"mask buffers ({len(portmap.buffers)} x context_length {rc.context_length}^2)",
            "--context-length",
        ),
        Term(
            batch * tokens * (d_in + 4 * width) * _ACTIVATION_BYTES,
            f"inputs and activations (batch {batch} x tokens {tokens} x width {d_in}+4x{width})",
            f"{input_flag} (or the width: --d-out/--head-dim)" if width > tokens else input_flag,
            False,
        ),
        Term(
            batch * heads * tokens * tokens * _SCORE_BYTES,
            f"attention scores (batch {batch} x heads {heads} x tokens {tokens}^2)",
            input_flag,
            False,
        ),
    ]
    if "rope_theta" in variant.fields:
        terms.append(
            Term(
                rc.context_length * max(rc.resolved_head_dim(), 1) * 16,
                f"RoPE tables (context_length {rc.context_length} x head_dim)",
                "--context-length",
            )
        )
    return terms


def check_terms(terms: Sequence[Term], owner: str) -> None:
    """The sum of ``terms`` against the budget; the message names the largest term and its flag."""
    total = sum(t.nbytes for t in terms)
    big = max(terms, key=lambda t: t.nbytes)
    current().check(total, f"{owner}: the run (mostly {big.what}: {format_bytes(big.nbytes)})", f"lower {big.flag}")


def check_cases(cases: Sequence[tuple], input_flag: str = "--tokens/--batch") -> None:
    """Cases ``(variant, cfg, x_shape)`` run one after another against the budget, before any is built.

    What each case keeps (weights, mask buffers) adds up over the cases, since every torch module
    is built first; what a case needs only while it runs (scores, activations) counts for the
    largest case alone.
    """
    if not cases:
        return
    per_case = [(variant.name, case_terms(variant, cfg, x_shape, input_flag)) for variant, cfg, x_shape in cases]
    kept = [(name, t) for name, terms in per_case for t in terms if t.kept]
    transient = max(
        ((name, [t for t in terms if not t.kept]) for name, terms in per_case),
        key=lambda nt: sum(t.nbytes for t in nt[1]),
    )
    total = sum(t.nbytes for _, t in kept) + sum(t.nbytes for t in transient[1])
    name, big = max(kept + [(transient[0], t) for t in transient[1]], key=lambda nt: nt[1].nbytes)
    current().check(total, f"{name}: the run (mostly {big.what}: {format_bytes(big.nbytes)})", f"lower {big.flag}")


def bench_terms(tokens: int, batch: int, d_model: int, heads: int, itemsize: int, impls: Sequence[str]) -> list[Term]:
    """The memory one bench shape holds: weights (4 d^2, torch + JAX + fused copies) x 4 copies, inputs and
    activations (batch x tokens x 5 d) x 4 copies, and for the implementations that materialise the
    scores (torch-book, torch-compile, jax-naive, jax-xla, jax-auto) batch x heads x tokens^2 x 3, plus
    the book's causal mask (tokens^2, float32)."""
    size = max(itemsize, 4)
    terms = [
        Term(4 * d_model * d_model * size * 4, f"weights (4 x d_model {d_model}^2)", "--d-model"),
        Term(
            batch * tokens * 5 * d_model * size * 4,
            f"activations (batch {batch} x tokens {tokens} x 5 d_model)",
            "--batch/--tokens/--d-model",
        ),
    ]
    naive = {"torch-book", "torch-compile", "jax-naive", "jax-xla", "jax-auto"}
    if naive & set(impls):
        terms.append(
            Term(
                batch * heads * tokens * tokens * size * 3,
                f"attention scores (batch {batch} x heads {heads} x tokens {tokens}^2)",
                "--tokens/--batch/--heads (or --impls without naive-score implementations)",
            )
        )
    if {"torch-book", "torch-compile"} & set(impls):
        terms.append(Term(tokens * tokens * 4 * 2, f"the book's mask buffer (tokens {tokens}^2)", "--tokens"))
    return terms


def with_max_memory(fn):
    """Give ``fn`` a ``max_memory=`` keyword (bytes or a size string) that runs it under :func:`limited`."""

    @functools.wraps(fn)
    def wrapper(*args, max_memory: int | str | None = None, **kwargs):
        with limited(max_memory):
            return fn(*args, **kwargs)

    return wrapper
