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

This module is the face of the port; each part lives in a module of its own:

=========================================  ==============================================================
:mod:`crosscheck.porting.arrays`           tensors as numpy arrays, shapes, dtypes (numpy only)
:mod:`crosscheck.porting.prefixes`         layers under prefixes in a whole model's state dict
:mod:`crosscheck.porting.statedict`        a state dict checked against a porting table; inferred config
:mod:`crosscheck.porting.formats`          a Flax module's variant and config; the source it was ported from
:mod:`crosscheck.porting.torch_to_flax`    torch state dict -> Flax ``variables``
:mod:`crosscheck.porting.flax_to_torch`    Flax ``variables`` -> torch state dict
:mod:`crosscheck.porting.from_torch`       a torch module recognised, configured and ported
:mod:`crosscheck.porting.statefiles`       state dict files: read, write, readable-file check
=========================================  ==============================================================
"""

from __future__ import annotations

from crosscheck.porting.arrays import FLOAT_DTYPES, StateDict, to_numpy
from crosscheck.porting.flax_to_torch import to_state_dict
from crosscheck.porting.formats import UNBOUNDED_CONTEXT, PortedFrom, config_of, ported_from
from crosscheck.porting.from_torch import from_torch, module_state, recognise
from crosscheck.porting.prefixes import layer_prefixes, select_prefix, whole_model_hint
from crosscheck.porting.statedict import check_state_dict, infer_config
from crosscheck.porting.statefiles import load_file, require_readable_file, save_file
from crosscheck.porting.torch_to_flax import load_state_dict, port_variables, variables_from_state_dict

__all__ = [
    "FLOAT_DTYPES",
    "UNBOUNDED_CONTEXT",
    "PortedFrom",
    "StateDict",
    "check_state_dict",
    "config_of",
    "from_torch",
    "infer_config",
    "layer_prefixes",
    "load_file",
    "load_state_dict",
    "module_state",
    "port_variables",
    "ported_from",
    "recognise",
    "require_readable_file",
    "save_file",
    "select_prefix",
    "to_numpy",
    "to_state_dict",
    "variables_from_state_dict",
    "whole_model_hint",
]
