"""Attention over several devices: a mesh plus a shard mode, and nothing else to learn.

The one documented way from the modules::

    mesh = jaxattn.sharding.make_mesh(8, "devices")            # or any jax.sharding.Mesh you have
    sharded = jaxattn.sharding.shard(model, mesh, "sequence")   # or "batch", "heads"
    y = sharded.apply(variables, x)                             # jitted; equals model.apply(variables, x)

Modes (JAX's SPMD partitioner does the work; nothing here is a runtime of its own):

* ``"batch"``: the input's batch axis is split over the mesh axis, parameters are
  replicated. A batch that the devices do not divide is padded with zero rows
  (sliced off again).
* ``"heads"``: the projections' parameters are split by heads (the columns of
  ``W_query``/``W_key``/``W_value``, the rows of ``out_proj``), the input replicated:
  each device computes its heads, ``out_proj`` sums the partial products. Every
  split dimension must be divisible by the device count (the error names it).
* ``"sequence"``: the tokens are split; the projections run on each device's tokens
  and attention goes through ring attention (:mod:`jaxattn.kernels.ring`,
  ``attention_impl="ring"``), so memory per device is ``O(T / n)``. A token count
  the devices do not divide is padded, and the padding masked through
  ``attention_mask`` (the padded keys are invisible, the padded queries sliced off).

Every mode refuses what the module alone refuses, with the module's message, and, on every path
(``apply``, ``call``, under ``jit`` or not), what a split forward pass cannot promise to equal: a KV
cache (``decode=True``, ``mutable=``) and active dropout (see :class:`Sharded`).

How parameters are split follows Flax's logical-axis convention: :data:`PARAM_AXES`
gives each projection's parameters logical axis names (``("embed", "heads")`` for
``W_query/kernel``), the mode's :func:`default_rules` map logical names to the mesh
axis, and :func:`flax.linen.logical_to_mesh_sharding` turns them into
``NamedSharding``\\ s. Pass ``rules=`` to put your own mapping first (Flax's
first-match order), e.g. ``rules=(("qkv", "devices"),)`` to split the fused
projections too. ``model.init`` is untouched: it still returns plain arrays;
:func:`logical_axes` (or :func:`boxed` for ``nn.LogicallyPartitioned`` leaves) gives
the annotations separately.

The ``"ring"`` implementation of :func:`jaxattn.dot_product_attention` is registered here (its row
of :mod:`jaxattn.implementations`; ``import jaxattn`` imports this module). Its kernel,
:func:`jaxattn.kernels.ring.ring_attention`, takes the mesh as an argument: :func:`ring_kernel` passes
it the mesh of :func:`ring_mesh`, a context around the *tracing* of the call;
:meth:`Sharded.apply` enters it for you. Under your own ``jax.jit``, enter it inside
the jitted function (a context around a cached jitted call is not seen again).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from jaxattn import implementations
from jaxattn.attention import dot_product_attention
from jaxattn.checks import check_sizes
from jaxattn.kernels.ring import ring_attention

MODES = ("batch", "heads", "sequence")

#: Logical axis names of each projection's parameters, by the Flax submodule name (the torch name).
#: ``heads``: query heads x head_dim; ``kv_heads``: key/value heads x head_dim (as many as the query
#: heads except in grouped-query attention); ``qkv``: the fused ``(3, heads, head_dim)`` columns of
#: ``qkv``/``in_proj``, replicated by default because an even split of them cuts across q, k and v.
PARAM_AXES: dict[str, dict[str, tuple[str, ...]]] = {
    "W_query": {"kernel": ("embed", "heads"), "bias": ("heads",)},
    "W_key": {"kernel": ("embed", "kv_heads"), "bias": ("kv_heads",)},
    "W_value": {"kernel": ("embed", "kv_heads"), "bias": ("kv_heads",)},
    "qkv": {"kernel": ("embed", "qkv"), "bias": ("qkv",)},
    "in_proj": {"kernel": ("embed", "qkv"), "bias": ("qkv",)},
    "out_proj": {"kernel": ("heads", "embed"), "bias": ("embed",)},
    "proj": {"kernel": ("heads", "embed"), "bias": ("embed",)},
    "q_norm": {"scale": ("head_dim",)},
    "k_norm": {"scale": ("head_dim",)},
}
#: Logical axes of a module's input ``x`` ``(batch, tokens, features)`` and ``attention_mask`` ``(batch, tokens)``.
INPUT_AXES = ("batch", "length", "embed")
MASK_AXES = ("batch", "length")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "qkv", "head_dim")
_SPLIT = {"batch": ("batch",), "heads": ("heads", "kv_heads"), "sequence": ("length",)}

Rules = Sequence[tuple[str, str | None]]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown shard mode {mode!r}; choose from {', '.join(MODES)}")
    return mode


def default_rules(mode: str, axis: str) -> tuple[tuple[str, str | None], ...]:
    """Flax logical-axis rules of ``mode``: its split axes -> ``axis``, every other logical axis replicated."""
    split = _SPLIT[check_mode(mode)]
    return tuple((name, axis if name in split else None) for name in LOGICAL_AXES)


def make_mesh(devices: int, axis: str = "devices") -> Mesh:
    """A 1-D mesh of the first ``devices`` JAX devices named ``axis``.

    ``ValueError`` for a count that is not a positive integer (naming it), or more devices than JAX sees
    (naming both counts; on a CPU, with the ``XLA_FLAGS`` setting that makes more host devices).
    """
    check_sizes("make_mesh", devices=devices)
    available = jax.devices()
    if devices > len(available):
        hint = ""
        if jax.default_backend() == "cpu":  # host devices can be forced; GPUs cannot be conjured
            hint = (
                f"; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={devices} "
                "before JAX initialises (crosscheck --devices does it)"
            )
        raise ValueError(f"asked for {devices} devices, JAX sees {len(available)} ({jax.default_backend()}){hint}")
    return Mesh(np.array(available[:devices]), (axis,))


# --- parameters: logical axes from the table, mesh shardings from the rules ------------------------


def _path_names(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def _leaf_axes(path, leaf) -> PartitionSpec:
    """The logical axes of one parameter: its submodule's row in :data:`PARAM_AXES`, else replicated."""
    names = _path_names(path)
    if len(names) >= 2 and names[-2] in PARAM_AXES:
        axes = PARAM_AXES[names[-2]].get(names[-1])
        if axes is not None and len(axes) == np.ndim(leaf):
            return PartitionSpec(*axes)
    return PartitionSpec()


def logical_axes(variables: Any) -> Any:
    """The tree of ``variables`` with each leaf replaced by its logical ``PartitionSpec`` (``()``: replicated)."""
    return jax.tree_util.tree_map_with_path(_leaf_axes, variables)


def boxed(variables: Any) -> Any:
    """``variables`` with every annotated parameter boxed as ``nn.LogicallyPartitioned`` (opt-in; init is unchanged)."""

    def box(path, leaf):
        axes = _leaf_axes(path, leaf)
        return nn.LogicallyPartitioned(leaf, tuple(axes)) if len(axes) else leaf

    return jax.tree_util.tree_map_with_path(box, variables)


def _rules(mode: str, axis: str, rules: Rules | None) -> tuple:
    return tuple(rules or ()) + default_rules(mode, axis)


def param_shardings(variables: Any, mesh: Mesh, mode: str, axis: str | None = None, rules: Rules | None = None) -> Any:
    """``NamedSharding`` per leaf of ``variables``: :func:`logical_axes` through ``nn.logical_to_mesh_sharding``.

    Raises ``ValueError`` naming the parameter, its shape and the device count when a split
    dimension is not divisible by the devices.
    """
    axis = _axis(mesh, axis)
    shardings = nn.logical_to_mesh_sharding(logical_axes(variables), mesh, _rules(mode, axis, rules))

    def check(path, leaf, sharding):
        for size, entry in zip(np.shape(leaf), sharding.spec, strict=False):  # a spec may be shorter
            if entry is None:
                continue
            parts = math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry))
            if size % parts:
                raise ValueError(
                    f"shard mode {mode!r}: parameter {'/'.join(_path_names(path))} of shape {tuple(np.shape(leaf))} "
                    f"cannot be split over {parts} devices ({size} is not a multiple of {parts})"
                )
        return sharding

    return jax.tree_util.tree_map_with_path(check, variables, shardings)


def _axis(mesh: Mesh, axis: str | None) -> str:
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"a mesh with axes {mesh.axis_names} needs axis= to say which one to shard over")
        axis = mesh.axis_names[0]
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    return axis


# --- the ring implementation's mesh: a context around tracing ---------------------------------------

_RING: contextvars.ContextVar[tuple[Mesh, str] | None] = contextvars.ContextVar("jaxattn_ring_mesh", default=None)


@contextlib.contextmanager
def ring_mesh(mesh: Mesh, axis: str | None = None) -> Iterator[None]:
    """Within this context ``implementation="ring"`` splits the tokens over ``axis`` of ``mesh``."""
    token = _RING.set((mesh, _axis(mesh, axis)))
    try:
        yield
    finally:
        _RING.reset(token)


def current_ring_mesh() -> tuple[Mesh, str] | None:
    """``(mesh, axis)`` of the innermost :func:`ring_mesh`, or ``None``."""
    return _RING.get()


def ring_refusal(call) -> str | None:
    """Why ``implementation="ring"`` cannot serve ``call`` (an :class:`jaxattn.implementations.Call`), or ``None``."""
    reasons = []  # every one, as the table's refusals
    if _RING.get() is None:
        reasons.append(
            "it needs a mesh: trace the call inside jaxattn.sharding.ring_mesh(mesh, axis), "
            "or use jaxattn.sharding.shard(module, mesh, 'sequence')"
        )
    if call.q_tokens != call.kv_tokens:
        reasons.append(
            f"it is self-attention over one sharded sequence (q_tokens {call.q_tokens} != kv_tokens {call.kv_tokens})"
        )
    return "; ".join(reasons) or None


def ring_kernel(
    query, key, value, bias, mask, *, scale, is_causal, q_offset, dropout_rate, dropout_rng, precision=None
):
    """The :data:`jaxattn.implementations.Kernel` of ``"ring"``: :func:`ring_attention` on the context's mesh."""
    ctx = _RING.get()
    if ctx is None:
        raise ValueError("ring attention needs a mesh: trace the call inside jaxattn.sharding.ring_mesh(mesh, axis)")
    mesh, axis = ctx
    out = ring_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal, mesh=mesh, axis_name=axis, precision=precision
    )
    return out, None


#: The ``"ring"`` row of the table: registered here, where its mesh context lives; never chosen by "auto".
implementations.register(
    implementations.Implementation(
        "ring",
        ring_kernel,
        summary="ring attention over a mesh axis (shard_map + ppermute, zig-zag token order), O(T / devices) per "
        "device; needs jaxattn.sharding.ring_mesh or shard(..., 'sequence')",
        q_offset=False,
        mixed_dtypes=False,
        check=ring_refusal,
    )
)


# --- the module wrapper ----------------------------------------------------------------------------


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


#: What a sharded call is, for the refusals below: the limit and its reason in one place.
_SUPPORTED = (
    "a sharded call is one deterministic forward pass of the module (and its gradients), split over the "
    "devices, returning the module's output"
)


class Sharded:
    """A jaxattn module run over the devices of one mesh axis in one shard mode (see the module docstring).

    ``call(variables, x, attention_mask=None, **kwargs)`` is the traceable body (compose it
    with ``jax.grad``/``jax.jit`` yourself); ``apply`` is it jitted, with the parameters
    placed by :func:`param_shardings` first. Outputs equal ``module.apply(variables, x, ...)``.

    What a sharded call refuses: everything the module alone refuses, with the module's own message
    (the module is traced on the unsplit input first, see :meth:`check`), and the limits of sharding,
    in every mode and on every path (``apply``, ``call``, under ``jit`` or not), each a ``ValueError``
    that says why: a KV cache (``decode=True``, ``mutable=``), because a sharded call returns the output
    of one forward pass and a cache would have to be split and carried alongside (and ring attention has
    no ``q_offset``); active dropout (``deterministic=False`` with a rate > 0), because the output could
    not equal the module alone's (padded rows or tokens change the random mask, ring attention never forms
    the weights dropout acts on). ``rngs`` are accepted (the module alone accepts them and draws nothing
    without dropout). NNX modules are not served: shard their Linen twin.
    """

    def __init__(self, module: nn.Module, mesh: Mesh, mode: str, axis: str | None = None, rules: Rules | None = None):
        self.mode = check_mode(mode)
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"shard takes a Flax Linen module (init/apply), got {type(module).__module__}.{type(module).__name__}; "
                "for a jaxattn.nnx module, shard its Linen twin (jaxattn.<Class>) with jaxattn.nnx.params_of(model)"
            )
        if getattr(module, "decode", False):
            raise ValueError(
                f"shard mode {mode!r}: {type(module).__name__} has decode=True, and a KV cache is not supported: "
                f"{_SUPPORTED}; a cache would have to be split and carried with the mode's shardings, and ring "
                "attention ('sequence') has no q_offset for decoding. Decode on one device"
            )
        self.mesh = mesh
        self.axis = _axis(mesh, axis)
        self.user_rules = tuple(rules or ())
        self.rules = _rules(mode, self.axis, rules)
        self.devices = int(mesh.shape[self.axis])
        #: The module as given: what a sharded call must equal, and refuse as it does.
        self.unsharded = module
        if mode == "sequence":
            if not hasattr(module, "attention_impl"):
                raise ValueError(
                    f"shard mode 'sequence' runs attention as ring attention: {type(module).__name__} has no "
                    "attention_impl (its attention core is fixed)"
                )
            if module.attention_fn is not dot_product_attention:
                raise ValueError(
                    f"shard mode 'sequence' runs attention as ring attention: {type(module).__name__} has its own "
                    f"attention_fn ({getattr(module.attention_fn, '__name__', module.attention_fn)!r}), which "
                    "ring attention would replace; shard it in mode 'batch' or 'heads'"
                )
            module = module.clone(attention_impl="ring")
        self.module = module
        self._jitted: dict[tuple, Any] = {}

    def sharding(self, logical: Sequence[str]) -> NamedSharding:
        """The ``NamedSharding`` of an array with these logical axes under this mode's rules."""
        return nn.logical_to_mesh_sharding(PartitionSpec(*logical), self.mesh, self.rules)

    def param_shardings(self, variables: Any) -> Any:
        return param_shardings(variables, self.mesh, self.mode, self.axis, self.user_rules)

    def place(self, variables: Any) -> Any:
        """``variables`` put on the devices as :meth:`param_shardings` says."""
        return jax.device_put(variables, self.param_shardings(variables))

    def refuse_unsupported(self, kwargs: dict[str, Any]) -> None:
        """The limits of sharding in the call's keyword arguments (see the class docstring)."""
        for name in ("mutable", "capture_intermediates"):
            if kwargs.get(name, False) not in (False, None):
                raise ValueError(
                    f"shard mode {self.mode!r}: {name}={kwargs[name]!r} is not supported: {_SUPPORTED}; "
                    "a KV cache or sown intermediates would have to be split and returned with the mode's "
                    "shardings. Run the module on one device for them"
                )
        rate = getattr(self.unsharded, "dropout", 0.0)
        if not kwargs.get("deterministic", True) and isinstance(rate, int | float) and rate > 0.0:
            raise ValueError(
                f"shard mode {self.mode!r}: dropout is not supported ({type(self.unsharded).__name__} dropout={rate} "
                f"with deterministic=False): {_SUPPORTED}, and with dropout it could not equal the module alone's "
                "(padded rows or tokens change the random mask; ring attention never forms the weights dropout "
                "acts on). Run with deterministic=True, or train with dropout unsharded"
            )

    def check(self, variables: Any, x: Any, *, attention_mask=None, **kwargs) -> None:
        """Refuse what the module alone refuses, with its own message, then the limits of sharding.

        The module is traced (never compiled nor run) on the unsplit input: the split, the padding and
        ring attention must not let through a call the module refuses (a token count over
        ``context_length``, a mask of the wrong shape, ...).
        """
        self.refuse_unsupported(kwargs)
        mask_kwarg = {} if attention_mask is None else {"attention_mask": attention_mask}
        jax.eval_shape(functools.partial(self.unsharded.apply, **mask_kwarg, **kwargs), variables, x)
        if jnp.ndim(x) != 3:
            raise ValueError(
                f"shard mode {self.mode!r} needs input (batch, tokens, features), got shape {jnp.shape(x)}"
            )

    def call(self, variables: Any, x: Float[Array, "batch tokens d_in"], *, attention_mask=None, **kwargs):
        """``module.apply(variables, x, attention_mask=..., **kwargs)`` with this mode's shardings; traceable."""
        x = jnp.asarray(x)
        self.check(variables, x, attention_mask=attention_mask, **kwargs)
        batch, tokens, _ = x.shape
        module = self.module
        mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.bool_)
        if self.mode == "batch" and batch % self.devices:
            rows = -(-batch // self.devices) * self.devices
            x = _pad_axis(x, 0, rows)
            mask = None if mask is None else _pad_axis(mask, 0, rows, True)
        if self.mode == "sequence" and tokens % self.devices:
            padded = -(-tokens // self.devices) * self.devices
            x = _pad_axis(x, 1, padded)
            # Padded tokens go last and are masked as keys: no real query sees them.
            mask = _pad_axis(jnp.ones((batch, tokens), jnp.bool_) if mask is None else mask, 1, padded, False)
            # The real tokens fit context_length (checked above); only the masked padding may go past it.
            if getattr(module, "context_length", padded) < padded:
                module = module.clone(context_length=padded)
        variables = jax.lax.with_sharding_constraint(variables, self.param_shardings(variables))
        x = jax.lax.with_sharding_constraint(x, self.sharding(INPUT_AXES))
        if mask is not None:
            kwargs["attention_mask"] = jax.lax.with_sharding_constraint(mask, self.sharding(MASK_AXES))
        with ring_mesh(self.mesh, self.axis) if self.mode == "sequence" else contextlib.nullcontext():
            out: Any = module.apply(variables, x, **kwargs)  # the output array (no mutable collections)
        return out[:batch, :tokens]

    def apply(self, variables: Any, x, *, attention_mask=None, **kwargs):
        """:meth:`call` jitted: ``attention_mask`` and ``rngs`` are traced, the other keyword arguments static."""
        rngs = kwargs.pop("rngs", None)
        self.refuse_unsupported(kwargs)  # before hashing them: a mutable=[...] list is a refusal, not a TypeError
        for name, value in kwargs.items():
            try:
                hash(value)
            except TypeError:
                raise ValueError(
                    f"Sharded.apply: {name}={value!r} is a static argument of the jitted call and must be "
                    "hashable (arrays go through Sharded.call under your own jax.jit)"
                ) from None
        key = tuple(sorted(kwargs.items()))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(functools.partial(self._call_with_rngs, **kwargs))
        return self._jitted[key](self.place(variables), x, attention_mask, rngs)

    def _call_with_rngs(self, variables, x, attention_mask, rngs, **kwargs):
        return self.call(
            variables, x, attention_mask=attention_mask, **({} if rngs is None else {"rngs": rngs}), **kwargs
        )


def shard(module: nn.Module, mesh: Mesh, mode: str, *, axis: str | None = None, rules: Rules | None = None) -> Sharded:
    """``module`` split over ``axis`` of ``mesh`` (default: its only axis) in ``mode``; see :class:`Sharded`."""
    return Sharded(module, mesh, mode, axis, rules)


__all__ = [
    "INPUT_AXES",
    "LOGICAL_AXES",
    "MASK_AXES",
    "MODES",
    "PARAM_AXES",
    "Sharded",
    "boxed",
    "current_ring_mesh",
    "default_rules",
    "logical_axes",
    "make_mesh",
    "param_shardings",
    "ring_kernel",
    "ring_mesh",
    "ring_refusal",
    "shard",
]
