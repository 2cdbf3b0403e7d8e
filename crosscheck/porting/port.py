"""Torch <-> Flax weight porting, driven by the tables in :mod:`crosscheck.variants.portmap`.

* :func:`load_state_dict` — torch state dict -> Flax ``variables`` (validated); a whole model's
  state dict with a layer ``prefix`` (``model.layers.3.self_attn.``, ``transformer.h.0.attn.``,
  the book's ``trf_blocks.0.att.``).
* :func:`to_state_dict` — Flax ``variables`` -> torch state dict (keys, layouts and buffers), in
  any format whose Flax module it is (transformers' key names too), under a ``prefix``; by default
  in the format the module was ported from (:func:`ported_from`), so that a round trip is exact.
* :func:`from_torch` — a torch module (the book's classes, users' copies of
  them, the fused-QKV class, ``torch.nn.MultiheadAttention``, the book's two
  ``GroupedQueryAttention`` classes, transformers' ``LlamaAttention``, ``Qwen3Attention`` and
  ``GPT2Attention``) -> ``(flax_module, variables)``; what the weights cannot carry (RoPE)
  comes from the module's config or from keyword arguments.
* :func:`load_file` — ``.pt``/``.pth`` (``weights_only=True``) or ``.safetensors`` -> state dict.

Every error names each offending key with the expected and the found shape (or dtype). Both
directions refuse alike: a key (torch) or parameter path (Flax) the table does not list, and a
parameter that is not floating point (float16, bfloat16, float32, float64).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError, PortError
from crosscheck.variants import portmap as pm
from crosscheck.variants import registry

StateDict = Mapping[str, Any]


# --- arrays ------------------------------------------------------------------------------------


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor, JAX array or array-like as a numpy array (bfloat16 kept as ml_dtypes.bfloat16)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(value, "shape", np.shape(value)))


def _dtype_name(value: Any) -> str:
    """A tensor's or array's dtype as numpy spells it (``int32``, ``bfloat16``), without importing torch."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        dtype = np.asarray(value).dtype
    return str(dtype).removeprefix("torch.")


#: The parameter dtypes both directions port (exactly): torch's and JAX's floating types.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _not_floating(what: str, value: Any) -> str | None:
    """A problem line when ``value`` is no floating-point tensor: an integer or bool weight would be ported
    bit for bit and then computed with as if it were a weight (or fail later, far from its key)."""
    name = _dtype_name(value)
    if name in FLOAT_DTYPES:
        return None
    return f"{what}: dtype {name}; expected a floating dtype ({', '.join(FLOAT_DTYPES)})"


# --- flax module <-> variant + config ----------------------------------------------------------


def _variant_arg(variant) -> registry.Variant:
    if isinstance(variant, registry.Variant):
        return variant
    try:
        return registry.get(str(variant))
    except KeyError as err:
        raise BadInputError(str(err.args[0])) from None


def config_of(flax_module, variant=None) -> tuple[registry.Variant, AttnConfig]:
    """The registry variant and :class:`AttnConfig` a jaxattn module was built with.

    ``variant`` (a name or entry): the torch format, when several share the module's class
    (``LlamaAttention`` runs on ``GroupedQueryAttention``); default: the variant named like the class.
    """
    name = type(flax_module).__name__
    candidates = registry.for_flax_class(name)
    if not candidates:
        raise BadInputError(f"not a jaxattn attention module: {name}")
    chosen = candidates[0] if variant is None else _variant_arg(variant)
    if chosen not in candidates:
        raise BadInputError(
            f"{chosen.name} runs on jaxattn.{chosen.flax_class_name}, not {name}; "
            f"formats of {name}: {', '.join(v.name for v in candidates)}"
        )
    raw = chosen.config_of(flax_module)
    cfg = chosen.resolve(raw)
    fixed = [f"{k}={getattr(raw, k)}" for k in ("qkv_bias", "qk_norm") if getattr(raw, k) != getattr(cfg, k)]
    if fixed:
        raise BadInputError(f"{name} with {', '.join(fixed)} is not a {chosen.name} (the format fixes it)")
    return chosen, cfg


@dataclass(frozen=True)
class PortedFrom:
    """What a module ported from torch remembers of its source, so that :func:`to_state_dict` writes the
    same state dict back by default: the format (``LlamaAttention``, ``Qwen3Attention`` and the book's
    ``GroupedQueryAttention`` share one Flax class, and the Flax module alone cannot tell them apart) and
    whether the source's state dict carried the ``mask`` buffers (``None``: not known)."""

    variant: str
    buffers: bool | None = None


_PORTED_FROM = "_crosscheck_ported_from"


def ported_from(flax_module) -> PortedFrom | None:
    """The source :func:`from_torch` or :func:`load_state_dict` recorded on ``flax_module`` (``None``: none).

    A record on the module object itself: a Linen ``clone()`` or ``replace()`` makes a new object
    without it, and :func:`to_state_dict` then needs ``variant=``.
    """
    record = getattr(flax_module, _PORTED_FROM, None)
    return record if isinstance(record, PortedFrom) else None


def _remember(flax_module, record: PortedFrom) -> None:
    if _is_nnx(flax_module):
        setattr(flax_module, _PORTED_FROM, record)  # NNX keeps it as a static attribute (split/merge, clone)
    else:
        object.__setattr__(flax_module, _PORTED_FROM, record)  # Linen modules refuse setattr once built


# --- prefixes ------------------------------------------------------------------------------------


def select_prefix(state_dict: StateDict, prefix: str) -> dict[str, Any]:
    """The entries of a whole model's ``state_dict`` under ``prefix``, with the prefix removed.

    Raises :class:`BadInputError` naming the prefix, a few keys and the layer prefixes the state
    dict does hold (:func:`layer_prefixes`) when nothing is under it.
    """
    if not prefix:
        return dict(state_dict)
    found = {str(k)[len(prefix) :]: v for k, v in state_dict.items() if str(k).startswith(prefix)}
    if not found:
        sample = ", ".join(repr(str(k)) for k in list(state_dict)[:3])
        layers = layer_prefixes(state_dict)
        hint = f"; attention layers found under {_list_prefixes(layers)}" if layers and layers != [""] else ""
        raise BadInputError(
            f"no key starts with the prefix {prefix!r} (the state dict has {len(state_dict)} keys, e.g. {sample})"
            + hint
        )
    return found


def _layer_anchors() -> set[str]:
    """One key per format that only a layer of that format has (its first parameter: ``W_query.weight``,
    ``heads.0.W_query.weight``, ``q_proj.weight``, ``c_attn.weight``, ``in_proj_weight`` ...)."""
    anchors = set()
    for v in registry.VARIANTS:
        entries = v.portmap(v.resolve(AttnConfig(**{**AttnConfig().to_dict(), **dict(v.defaults)}))).entries
        if entries:
            anchors.add(entries[0].torch_key)
    return anchors


def _natural(text: str) -> tuple:
    """Sort key that puts ``layers.2.`` before ``layers.10.``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))


def layer_prefixes(state_dict: StateDict) -> list[str]:
    """The prefixes under which ``state_dict`` holds attention layers (``model.layers.0.self_attn.``), sorted.

    ``[""]`` when it is one bare layer; ``[]`` when no format's keys are in it. A layer inside another
    (the wrapper's ``heads.0.`` under its own prefix) counts once, under the outer prefix.
    """
    anchors = _layer_anchors()
    found: set[str] = set()
    for key in state_dict:
        key = pm.canonical_key(str(key))
        for anchor in anchors:
            if key == anchor:
                found.add("")
            elif key.endswith("." + anchor):
                found.add(key[: len(key) - len(anchor)])
    outer = [p for p in found if not any(q != p and p.startswith(q) for q in found)]
    return sorted(outer, key=_natural)


def _list_prefixes(prefixes: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(p) for p in prefixes[:limit])
    return shown + (f" ... ({len(prefixes)} in all)" if len(prefixes) > limit else "")


def whole_model_hint(state_dict: StateDict, option: str = "--prefix", under: str = "") -> str | None:
    """A sentence naming ``option`` and the layer prefixes, when ``state_dict`` holds layers under prefixes
    and no bare layer (a whole model's state dict read as one layer); else ``None``. ``under``: the prefix
    ``state_dict`` was selected with, put before each prefix found."""
    layers = [under + p for p in layer_prefixes(state_dict)]
    if not layers or under in layers:
        return None
    many = f"{len(layers)} attention layers" if len(layers) > 1 else "an attention layer"
    return f"it holds {many} under a prefix, not one bare layer: choose one with {option} ({_list_prefixes(layers)})"


# --- validation ----------------------------------------------------------------------------------


def check_state_dict(portmap: pm.PortMap, state_dict: StateDict, owner: str) -> dict[str, Any]:
    """Validate ``state_dict`` against ``portmap``; return it with canonical keys.

    Raises :class:`PortError` naming every missing, unexpected and mis-shaped key
    (with expected and found shapes) and every buffer whose values are wrong.
    """
    clashes = pm.alias_collisions(state_dict)
    if clashes:
        raise PortError(f"{owner}: ambiguous state dict, duplicate aliases:\n  " + "\n  ".join(clashes))
    canonical: dict[str, Any] = {}
    for key, value in state_dict.items():
        canonical[pm.canonical_key(str(key))] = value
    params = portmap.by_torch_key()
    buffers = {b.torch_key: b for b in portmap.buffers}
    canonical = {k: v for k, v in canonical.items() if k not in portmap.ignored}
    problems: list[str] = []
    for key, entry in params.items():
        if key not in canonical:
            problems.append(f"missing key {key!r} (expected shape {entry.torch_shape})")
        elif _shape(canonical[key]) != entry.torch_shape:
            problems.append(f"key {key!r}: expected shape {entry.torch_shape}, found {_shape(canonical[key])}")
        elif wrong := _not_floating(f"key {key!r}", canonical[key]):
            problems.append(wrong)
    for key, value in canonical.items():
        if key in params:
            continue
        if key in buffers:
            buf = buffers[key]
            if _shape(value) != buf.torch_shape:
                problems.append(f"buffer {key!r}: expected shape {buf.torch_shape}, found {_shape(value)}")
            elif not np.array_equal(to_numpy(value).astype(np.float32) != 0, buf.expected() != 0):
                problems.append(f"buffer {key!r}: not the causal mask triu(ones({buf.torch_shape[0]}), 1)")
            continue
        problems.append(f"unexpected key {key!r} (shape {_shape(value)})")
    if problems:
        hint = whole_model_hint(state_dict, "--prefix (prefix= in Python)")
        head = f"{owner}: state dict does not fit" + (f" ({hint})" if hint else "")
        raise PortError(head + ":\n  " + "\n  ".join(problems))
    return canonical


# --- torch -> flax -------------------------------------------------------------------------------


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


def variables_from_state_dict(portmap: pm.PortMap, state_dict: StateDict, owner: str, dtype=None) -> dict:
    """``{"params": ...}`` from a validated state dict, each array in Flax layout."""
    canonical = check_state_dict(portmap, state_dict, owner)
    params: dict = {}
    for entry in portmap.entries:
        array = pm.to_flax(entry.layout, to_numpy(canonical[entry.torch_key]))
        if dtype is not None:
            array = array.astype(dtype)
        _set(params, entry.flax_path, np.ascontiguousarray(array))
    return {"params": params}


def _format_of(flax_module, state_dict: StateDict, variant) -> tuple[registry.Variant, AttnConfig]:
    """The format ``state_dict`` is in, among those of ``flax_module``'s class (the one it fits)."""
    if variant is not None:
        return config_of(flax_module, variant)
    candidates = registry.for_flax_class(type(flax_module).__name__)
    for candidate in candidates[1:]:
        try:
            chosen, cfg = config_of(flax_module, candidate)
            check_state_dict(chosen.portmap(cfg), state_dict, chosen.name)
        except BadInputError:
            continue
        return chosen, cfg
    return config_of(flax_module)


def load_state_dict(flax_module, state_dict: StateDict, prefix: str = "", *, variant=None) -> dict:
    """Flax ``variables`` for ``flax_module`` from a torch state dict (validated, exact).

    ``prefix``: read the layer under it in a whole model's state dict (``model.layers.0.self_attn.``).
    ``variant``: the torch format (a name, e.g. ``"LlamaAttention"``); default: the one whose keys
    the state dict has, among the formats of ``flax_module``'s class. The module remembers it
    (:func:`ported_from`): :func:`to_state_dict` writes that format back by default.

    Dtypes: a module at the default ``param_dtype`` (float32) keeps each weight's own floating
    dtype, so that :func:`to_state_dict` gives back exactly what came in (float64 stays a numpy
    array where JAX runs without x64; the module computes in float32 from it); a module built with
    another ``param_dtype`` gets its weights cast to it.
    """
    import jax

    state_dict = select_prefix(state_dict, prefix)
    variant, cfg = _format_of(flax_module, state_dict, variant)
    variables = variables_from_state_dict(variant.portmap(cfg), state_dict, variant.name)
    _remember(flax_module, PortedFrom(variant.name))
    param_dtype = getattr(flax_module, "param_dtype", None)
    return jax.tree.map(lambda a: _as_param(a, param_dtype), variables)


def _as_param(array: np.ndarray, param_dtype) -> Any:
    import jax
    import jax.numpy as jnp

    if param_dtype is not None and np.dtype(param_dtype) != np.float32:
        return jnp.asarray(array, dtype=param_dtype)
    if array.dtype == np.float64 and not jax.config.jax_enable_x64:  # type: ignore[attr-defined]  # dynamic option
        return array  # exact: a JAX array would be float32
    return jnp.asarray(array)


# --- flax -> torch -------------------------------------------------------------------------------


def to_state_dict(
    flax_module,
    variables: Any = None,
    return_tensors: str = "np",
    *,
    prefix: str = "",
    variant=None,
    buffers: bool | None = None,
) -> dict[str, Any]:
    """The torch state dict (keys, layouts, and the ``mask`` buffers) of Flax ``variables``.

    ``flax_module``: a Linen module with its ``variables``, or a :mod:`jaxattn.nnx` module alone
    (its ``nnx.Param`` state is the variables) or with an ``nnx.State`` of its parameters.

    ``return_tensors="np"`` gives numpy arrays; ``"pt"`` gives torch tensors,
    ready for ``torch_module.load_state_dict``. ``variant``: the torch format to write
    (``"LlamaAttention"`` writes ``q_proj.weight`` ...); default: the format the module was
    ported from (:func:`ported_from`: :func:`from_torch`, :func:`load_state_dict`), else the one
    named like the module's class; ``prefix`` goes before every key (``model.layers.0.self_attn.``).

    Keys and dtypes are the parameters' own (float64, float32, bfloat16, float16 round-trip
    exactly); a parameter of another dtype, a missing or mis-shaped one, and a parameter path the
    format does not have are refused, each named (as :func:`load_state_dict` refuses torch keys).
    ``buffers``: write the causal ``mask`` buffers; default: what the source's state dict carried
    when the module came from :func:`from_torch` (a non-persistent ``mask`` is not written back),
    else yes, unless the module's ``context_length`` is :data:`UNBOUNDED_CONTEXT` (a source without
    a mask). They are in the weights' dtype when those share one (torch's ``module.to(dtype)`` moves
    the buffers with them), else float32 (the torch reference's own). Their size is checked against
    the memory budget (:mod:`crosscheck.pipeline.budget`) before allocation.
    """
    variables = _linen_variables(flax_module, variables)
    remembered = ported_from(flax_module)
    if variant is None and remembered is not None:
        variant = remembered.variant
    variant, cfg = config_of(flax_module, variant)
    portmap = variant.portmap(cfg)
    params = variables.get("params", {})
    out: dict[str, Any] = {}
    problems = []
    for entry in portmap.entries:
        where = f"Flax parameter {'/'.join(entry.flax_path)}"
        try:
            value = np.asarray(_get(params, entry.flax_path))
        except (KeyError, TypeError, IndexError):
            problems.append(f"missing {where} (for {entry.torch_key!r})")
            continue
        if value.shape != entry.flax_shape:
            problems.append(f"{where}: expected shape {entry.flax_shape}, found {value.shape}")
            continue
        wrong = _not_floating(f"{where} (for {entry.torch_key!r})", value)
        if wrong:
            problems.append(wrong)
            continue
        out[entry.torch_key] = np.ascontiguousarray(pm.from_flax(entry.layout, value))
    known = {e.flax_path[:i] for e in portmap.entries for i in range(1, len(e.flax_path) + 1)}
    problems += [
        f"unexpected Flax parameter {'/'.join(path)} (shape {_shape(leaf)})"
        for path, leaf in _leaves(params)
        if path not in known
    ]
    if problems:
        raise PortError(f"{variant.name}: variables do not fit:\n  " + "\n  ".join(problems))
    if buffers is None and remembered is not None:
        buffers = remembered.buffers
    if buffers is None:
        buffers = not _unbounded(cfg)
    if buffers and portmap.buffers:
        from crosscheck.pipeline import budget

        # Before the allocation: CausalAttention(context_length=100000) would need 37 GiB of mask.
        total = sum(budget.nbytes(b.torch_shape, 4) for b in portmap.buffers)
        budget.current().check(
            total,
            f"{variant.name}: the mask buffers of context_length {cfg.context_length}",
            "pass buffers=False (no mask keys) or a smaller context_length",
        )
        dtypes = {a.dtype for a in out.values()}
        like = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
        for buf in portmap.buffers:
            out[buf.torch_key] = buf.expected().astype(like)
    out = {prefix + k: v for k, v in out.items()}
    if return_tensors == "pt":
        return {k: _to_torch(v) for k, v in out.items()}
    if return_tensors != "np":
        raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
    return out


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` of a nested mapping of parameters."""
    if isinstance(tree, Mapping):
        for key, sub in tree.items():
            yield from _leaves(sub, (*path, str(key)))
    else:
        yield path, tree


def _linen_variables(flax_module, variables: Any) -> Mapping:
    """``variables`` as Linen's ``{"params": ...}``: an NNX module's (or an ``nnx.State``'s) ``nnx.Param`` tree."""
    if variables is not None and not _is_nnx(variables):
        return variables
    source = flax_module if variables is None else variables
    if not _is_nnx(source):
        raise BadInputError(f"to_state_dict: a Linen module ({type(flax_module).__name__}) needs its variables")
    from jaxattn.nnx import params_of

    return {"params": params_of(source)}


def _is_nnx(obj: Any) -> bool:
    """Whether ``obj`` is an NNX module or state (without importing flax for Linen users' numpy trees)."""
    return type(obj).__module__.startswith(("flax.nnx", "jaxattn.nnx"))


#: The context length :func:`from_torch` gives a module whose source has no ``mask`` buffer and no
#: ``context_length`` (the book's ``PyTorchMultiHeadAttention``): no limit, and no buffer written back.
UNBOUNDED_CONTEXT = 1 << 30


def _unbounded(cfg: AttnConfig) -> bool:
    return cfg.context_length >= UNBOUNDED_CONTEXT


def _to_torch(array: np.ndarray):
    """A numpy array (ml_dtypes bfloat16 included, which ``torch.from_numpy`` does not know) as a tensor."""
    import torch

    array = np.ascontiguousarray(array)
    if str(array.dtype) == "bfloat16":
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


# --- config inference ----------------------------------------------------------------------------


def infer_config(
    variant: registry.Variant, state_dict: StateDict, known: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The hyperparameters a state dict's keys and shapes pin down for ``variant``.

    Returns only what is certain (``d_in``, ``d_out``, ``qkv_bias``, ``context_length``
    from the ``mask`` buffer, ``num_heads`` for the wrapper); the caller supplies the rest.
    Which keys tell what is the variant's own fact (:meth:`registry.Variant.infer_config`);
    ``known`` (flags, a config file) makes more certain (the kv heads once the head dim is known).
    """
    return variant.infer_config({pm.canonical_key(str(k)): _shape(v) for k, v in state_dict.items()}, known)


# --- torch module -> flax -----------------------------------------------------------------------


def _dropout_p(module) -> float:
    drop = getattr(module, "dropout", 0.0)
    return float(getattr(drop, "p", drop) or 0.0)


def module_state(torch_module) -> dict[str, Any]:
    """``torch_module.state_dict()`` and the ``mask`` tensors it leaves out.

    A ``mask`` registered with ``persistent=False`` (or kept as a plain tensor attribute) is not in
    the state dict, yet it is what makes the layer causal and what bounds its tokens; the port reads
    it, checks it like a saved one, and would otherwise take the layer for a non-causal one.
    """
    state = dict(torch_module.state_dict())
    for name, sub in torch_module.named_modules():
        mask = getattr(sub, "mask", None)
        key = f"{name}.mask" if name else "mask"
        if key not in state and hasattr(mask, "shape") and hasattr(mask, "dtype"):
            state[key] = mask
    return state


def _book_config(variant: registry.Variant, torch_module) -> AttnConfig:
    """A book-style module's config: what its state (masks included) pins down, then its attributes."""
    cls = type(torch_module).__name__
    found = infer_config(variant, module_state(torch_module))
    if "num_heads" in variant.fields:
        num_heads = getattr(torch_module, "num_heads", None)
        if num_heads is None:
            raise BadInputError(f"{cls}: has no num_heads attribute; cannot split heads")
        found["num_heads"] = int(num_heads)
    if "context_length" in variant.fields and "context_length" not in found:
        # No mask buffer: nothing in the source bounds the tokens (the book's SDPA classes are causal through
        # is_causal, whatever context_length attribute they keep), and no buffer is written back.
        found["context_length"] = UNBOUNDED_CONTEXT
    found["dropout"] = _dropout_p(torch_module)
    return AttnConfig(**{**dict(d_in=0, d_out=0, context_length=0), **found})


def recognise(torch_module, **options) -> tuple[registry.Variant, AttnConfig]:
    """Which variant a torch module is, and its config, from its structure and attributes.

    Each registry entry recognises its own modules (:meth:`registry.Variant.recognises`);
    the entries exclude each other, so at most one answers. ``options``: what the module
    cannot carry, by the names in :attr:`registry.Variant.options` (``rope_theta``,
    ``freq_config`` or ``rope_scaling``, ``context_length``); a name the variant does not
    read is an error.
    """
    cls = type(torch_module).__name__
    matches = [v for v in registry.VARIANTS if v.recognises(torch_module)]
    if not matches:
        raise BadInputError(
            f"cannot recognise torch module {cls}: expected one of the book's attention classes "
            f"(W_query/W_key/W_value, heads, qkv+proj, GroupedQueryAttention), torch.nn.MultiheadAttention "
            f"or transformers' LlamaAttention, Qwen3Attention, GPT2Attention"
        )
    if len(matches) > 1:
        raise BadInputError(f"torch module {cls} looks like several variants: {', '.join(v.name for v in matches)}")
    variant = matches[0]
    unknown = sorted(set(options) - set(variant.options))
    if unknown:
        takes = f"it reads only {', '.join(variant.options)}" if variant.options else "it reads none"
        raise BadInputError(f"{cls} ({variant.name}): unknown option(s) {', '.join(unknown)}; {takes}")
    if variant.torch_config is not None:
        return variant, variant.resolve(variant.torch_config(torch_module, recognise, options))
    return variant, _book_config(variant, torch_module)


def from_torch(torch_module, *, api: str = "linen", **options) -> Any:
    """``(flax_module, variables)`` equivalent to ``torch_module``, with its weights ported; with
    ``api="nnx"``, the :mod:`jaxattn.nnx` module alone, its ``nnx.Param`` holding the weights.

    Recognises the book's classes by structure (so users' own copies work),
    the fused-QKV class and ``torch.nn.MultiheadAttention`` (``batch_first``
    self-attention; pass ``causal=True`` to the Flax module when you feed torch a causal mask),
    the book's two ``GroupedQueryAttention`` classes (Llama 3, Qwen3) and transformers'
    ``LlamaAttention``, ``Qwen3Attention`` (their ``config``: transformers 5's
    ``rope_parameters`` or 4.x's ``rope_theta``/``rope_scaling``) and ``GPT2Attention``.

    ``options``: what the module cannot carry: ``rope_theta``, ``freq_config`` (the book's
    keys) or ``rope_scaling`` (transformers' dict), ``context_length``. The book's classes
    need ``rope_theta`` and ``context_length``; a value that contradicts a module's config
    is an error. The RoPE modules' ``apply(variables, x)`` is causal, positions ``0 .. T-1``.

    A ``mask`` buffer registered with ``persistent=False`` counts as a saved one (:func:`module_state`).
    The module remembers its source (:func:`ported_from`): ``to_state_dict(flax_module, variables)``
    gives back the same keys (transformers' ``q_proj.weight`` ..., no ``mask`` where the source's
    state dict had none) and the same values, bit for bit.
    """
    if api not in registry.FLAX_APIS:
        raise BadInputError(f"from_torch: api must be one of {', '.join(registry.FLAX_APIS)}; got {api!r}")
    variant, cfg = recognise(torch_module, **options)
    flax_module = variant.flax_module(cfg, api)
    variables = load_state_dict(flax_module, module_state(torch_module), variant=variant)
    saved = torch_module.state_dict()
    buffers = [b.torch_key for b in variant.portmap(cfg).buffers]
    source = PortedFrom(variant.name, all(k in saved for k in buffers) if buffers else None)
    if api == "linen":
        _remember(flax_module, source)
        return flax_module, variables
    from jaxattn.nnx import load_params

    model = load_params(flax_module, variables["params"], keep_dtype=True)
    _remember(model, source)
    return model


# --- files ---------------------------------------------------------------------------------------


def require_readable_file(path: str, what: str) -> None:
    """Raise :class:`BadInputError` unless ``path`` is an existing, readable file (``what``: "weights", "input")."""
    if not os.path.exists(path):
        raise BadInputError(f"{what} file not found: {path}")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise BadInputError(f"{what} file is not a readable file: {path}")


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``.

    Accepts a bare state dict or one nested under ``state_dict`` / ``model_state_dict``.
    Raises :class:`BadInputError` naming the file and the problem.
    """
    path = os.fspath(path)
    require_readable_file(path, "weights")
    ext = os.path.splitext(path)[1].lower()
    from crosscheck.porting import tensorfiles

    if ext == ".safetensors":
        return tensorfiles.read_safetensors(path, "safetensors file")[0]
    if ext in (".pt", ".pth", ".bin"):
        return _as_state_dict(tensorfiles.read_pt(path, "weights file"), path)
    raise BadInputError(f"unsupported weights format {ext or '(none)'} for {path}: use .pt, .pth or .safetensors")


def _as_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping):
        for nested in ("state_dict", "model_state_dict"):
            if nested in obj and isinstance(obj[nested], Mapping):
                obj = obj[nested]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise BadInputError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    out = {}
    for key, value in obj.items():
        if not hasattr(value, "shape"):
            raise BadInputError(f"{path}: entry {key!r} is not a tensor ({type(value).__name__}); not a state dict")
        out[str(key)] = to_numpy(value)
    return out


def save_file(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a state dict as ``.safetensors`` or ``.pt`` (by extension)."""
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file as st_save

        st_save(arrays, path)
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)


def port_variables(variant: registry.Variant, cfg: AttnConfig, state_dict: StateDict, dtype: Any | None = None) -> dict:
    """Validated Flax variables for ``variant`` at ``cfg`` (numpy leaves)."""
    return variables_from_state_dict(variant.portmap(cfg), state_dict, variant.name, dtype)
