"""Torch state dict -> ttnn parameters, following ``ttnn.model_preprocessing``'s conventions.

Driven by the same tables as torch -> Flax (:mod:`crosscheck.variants.portmap`): each
:class:`~crosscheck.variants.portmap.Entry` says its layout, :func:`~crosscheck.variants.portmap.to_ttnn`
gives the ttnn layout (``nn.Linear`` weights ``(in, out)``, biases ``(1, out)``) and
validation is :func:`crosscheck.porting.port.check_state_dict`, so a state dict is accepted
or refused here exactly as on the Flax side, with the same messages. Every tensor
is bfloat16, TILE, on the device (``preprocess_linear_weight`` /
``preprocess_linear_bias`` then ``to_device``).

The result mirrors the torch module tree with attribute access, as
``ttnn.model_preprocessing.ParameterDict`` does: ``parameters.W_query.weight``,
``parameters.heads[0].W_key.bias``, ``parameters.out_proj.bias``. torch's bare
``in_proj_weight``/``in_proj_bias`` become ``parameters.in_proj.weight``/``.bias``
so the fused projection reads like any other linear. The tree uses the book's names
whatever the torch format (each entry's ``ttnn_key``): transformers' ``q_proj.weight``
is ``parameters.W_query.weight``, ``q_norm.weight`` is ``parameters.q_norm.scale``
(``(1, head_dim)``), GPT-2's ``c_attn.weight`` is ``parameters.qkv.weight``.

Numpy only (no torch): runs in the ttnn interpreter.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from crosscheck.porting.port import check_state_dict, to_numpy
from crosscheck.variants import portmap as pm


class ParameterDict(dict):
    """A dict with attribute access, like ``ttnn.model_preprocessing.ParameterDict``."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no parameter {name!r}; have {sorted(self)}") from None


class ParameterList(list):
    """``nn.ModuleList`` children (``parameters.heads[0]``)."""


#: torch attribute -> (module, leaf) where torch keeps a linear's tensors as bare parameters.
_BARE = {"in_proj_weight": ("in_proj", "weight"), "in_proj_bias": ("in_proj", "bias")}


def tree_path(torch_key: str) -> tuple[str, ...]:
    """Where a torch key lives in the parameter tree (``in_proj_weight`` -> ``in_proj.weight``)."""
    if torch_key in _BARE:
        return _BARE[torch_key]
    return tuple(torch_key.split("."))


def _insert(tree: ParameterDict, path: tuple[str, ...], value: Any) -> None:
    node: Any = tree
    for part, nxt in itertools.pairwise(path):
        child_is_list = nxt.isdigit()
        if isinstance(node, ParameterList):
            index = int(part)
            while len(node) <= index:
                node.append(None)
            if node[index] is None:
                node[index] = ParameterList() if child_is_list else ParameterDict()
            node = node[index]
        else:
            if part not in node:
                node[part] = ParameterList() if child_is_list else ParameterDict()
            node = node[part]
    if isinstance(node, ParameterList):
        index = int(path[-1])
        while len(node) <= index:
            node.append(None)
        node[index] = value
    else:
        node[path[-1]] = value


def ttnn_arrays(portmap: pm.PortMap, state_dict: Mapping[str, Any], owner: str) -> dict[str, np.ndarray]:
    """Validated float32 arrays in ttnn layout, by the book-layout key the programs read (``Entry.ttnn_name``)."""
    canonical = check_state_dict(portmap, state_dict, owner)
    out = {}
    for entry in portmap.entries:
        array = np.asarray(to_numpy(canonical[entry.torch_key]), dtype=np.float32)
        array = np.ascontiguousarray(pm.to_ttnn(entry.layout, array))
        assert array.shape == entry.ttnn_shape, (entry.torch_key, array.shape, entry.ttnn_shape)
        out[entry.ttnn_name] = array
    return out


def preprocess_parameters(
    ttnn, device, portmap: pm.PortMap, state_dict: Mapping[str, Any], owner: str
) -> ParameterDict:
    """The ttnn parameter tree of ``state_dict`` (validated against ``portmap``): bf16 TILE tensors on ``device``."""
    tree = ParameterDict()
    for key, array in ttnn_arrays(portmap, state_dict, owner).items():
        tensor = ttnn.from_torch(array, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=device)
        _insert(tree, tree_path(key), tensor)
    return tree
