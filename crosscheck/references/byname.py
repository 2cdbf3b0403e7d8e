"""The kind of module that holds each parameter of a torch module, for porting by name
(:mod:`crosscheck.variants.byname`)."""

from __future__ import annotations

from torch import nn

from crosscheck.variants.byname import Kind

_NORMS: tuple[type, ...] = (nn.LayerNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.LayerNorm,)


def kind_of(module: nn.Module) -> Kind:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _NORMS) or type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "other"


def parameter_kinds(module: nn.Module) -> list[tuple[str, Kind, tuple[int, ...]]]:
    """``(state-dict key, kind of its module, shape)`` for every parameter of ``module``."""
    owners = dict(module.named_modules())
    found = []
    for key, parameter in module.named_parameters():
        owner = owners[key.rsplit(".", 1)[0]] if "." in key else module
        found.append((key, kind_of(owner), tuple(parameter.shape)))
    return found
