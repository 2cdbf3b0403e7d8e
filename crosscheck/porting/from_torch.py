"""A torch module -> ``(flax_module, variables)``: which variant it is (its structure and attributes), its
config (its state, attributes and transformers config, plus what the caller passes), and its weights ported.

The torch module is only inspected here: torch itself is never imported.
"""

from __future__ import annotations

from typing import Any

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.porting.formats import UNBOUNDED_CONTEXT, PortedFrom, remember
from crosscheck.porting.statedict import infer_config
from crosscheck.porting.torch_to_flax import load_state_dict
from crosscheck.variants import registry


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
    matches = registry.recognising(torch_module)
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
    The module remembers its source (:func:`crosscheck.porting.formats.ported_from`):
    ``to_state_dict(flax_module, variables)`` gives back the same keys (transformers' ``q_proj.weight`` ...,
    no ``mask`` where the source's state dict had none) and the same values, bit for bit.
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
        remember(flax_module, source)
        return flax_module, variables
    from jaxattn.nnx import load_params

    model = load_params(flax_module, variables["params"], keep_dtype=True)
    remember(model, source)
    return model
