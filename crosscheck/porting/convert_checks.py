"""What ``crosscheck convert`` checks before it writes: finite weights, an input the layer takes, the memory
budget, the exact round trip through the Flax file, and torch and Flax agreeing on one input.

A failed check raises :class:`MismatchError` (or :class:`BadInputError` for bad input) and nothing is
written. torch is imported only to run the torch module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError, MismatchError
from crosscheck.pipeline import budget, flax_runner
from crosscheck.pipeline import compare as cmp
from crosscheck.porting.flax_files import SEP
from crosscheck.variants import portmap as pm


def check_finite(weights: Mapping[str, np.ndarray], portmap: pm.PortMap, src: str) -> None:
    """NaN or infinite weights are refused, as the torch -> Flax direction refuses them: a check of a layer
    whose outputs are NaN on both sides proves nothing, and without the check nothing would say so."""
    paths = {e.torch_key: SEP.join(("params", *e.flax_path)) for e in portmap.entries}
    for key, array in weights.items():
        if not np.isfinite(np.asarray(array, dtype=np.float32)).all():
            raise BadInputError(
                f"{src}: weight {key!r} ({paths.get(key, key)}) has NaN or infinite values (or overflows float32)"
            )


def check_input(v, cfg: AttnConfig, x: np.ndarray, src: str) -> None:
    """The check's input against the layer the metadata describes, before torch or JAX sees it."""
    if x.shape[-1] != cfg.d_in:
        raise BadInputError(
            f"{v.name}: the input's last dimension is {x.shape[-1]} but the layer in {src} takes "
            f"d_in={cfg.d_in} (its metadata)"
        )
    tokens = x.shape[-2]
    if "context_length" in v.fields and tokens > cfg.context_length:
        raise BadInputError(
            f"{v.name}: input has tokens={tokens}, beyond context_length={cfg.context_length} "
            f"({src}'s metadata); pass --tokens or an --input of at most {cfg.context_length} tokens"
        )


def _input_flag(inputs) -> str:
    if isinstance(inputs, (str, os.PathLike)):
        return f"the shape of --input {os.fspath(inputs)}"
    return "--tokens/--batch"


def check_budget(v, cfg: AttnConfig, x_shape, inputs, src: str) -> None:
    """The torch module, its mask buffers and the check's activations against the memory budget, before any
    is built; what the metadata sizes is named as such (no flag changes it)."""
    flag = _input_flag(inputs)
    terms = [
        dataclasses.replace(t, flag=f"the layer's sizes in {src}'s metadata") if t.kept else t
        for t in budget.case_terms(v, cfg, x_shape, flag)
    ]
    budget.check_terms(terms, f"{v.name} ({src})")


def _has_unloaded_buffers(module, sd: Mapping) -> bool:
    """Whether the torch module registers buffers (the causal mask) that the source file did not carry."""
    return bool(set(module.state_dict()) - set(sd))


def run_torch_module(v, cfg: AttnConfig, sd: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The variant's torch module at ``cfg`` on the state dict ``sd`` (float32), run on ``x``."""
    import torch

    module = v.torch_module(cfg)
    module.load_state_dict(
        {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in sd.items()},
        strict=not _has_unloaded_buffers(module, sd),
    )
    module.eval()
    with torch.no_grad():
        return v.torch_forward(module, torch.from_numpy(np.asarray(x, np.float32)), cfg).numpy()


def check_exact(back: Mapping[str, np.ndarray], raw: Mapping[str, np.ndarray], portmap: pm.PortMap, where: str) -> None:
    """Every parameter of ``raw`` comes back from the Flax file bit for bit, in its dtype."""
    canonical = {pm.canonical_key(k): a for k, a in raw.items()}
    for entry in portmap.entries:
        want, got = canonical[entry.torch_key], back[entry.torch_key]
        if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
            raise MismatchError(f"{where}: {entry.torch_key} does not come back exactly from the Flax file")


def check_outputs(v, cfg, state_dict: Mapping, x: np.ndarray, ref: np.ndarray, where: str) -> tuple[float, float]:
    """``(max abs error, bound)`` of the Flax module on ``state_dict`` (the file's tensors) against the torch
    output ``ref``, run as every cross-check runs it (:func:`crosscheck.pipeline.flax_runner.run_flax`, float32 at
    precision highest); raises :class:`MismatchError` (nothing written) when over the table's float32 bound."""
    float32 = {k: np.asarray(a, dtype=np.float32) for k, a in state_dict.items()}
    out = flax_runner.run_flax(v, cfg, float32, x)
    tol = cmp.policy_for("flax", "float32")
    verdict = cmp.compare(out, ref, tol, computed_in="float32")
    if not verdict.passed:
        raise MismatchError(
            f"{where}: the Flax module and torch disagree ({'; '.join(verdict.failures)}); nothing written"
        )
    assert verdict.metrics is not None and tol.max_abs is not None  # a pass has metrics; the float32 row a bound
    return float(verdict.metrics.max_abs_err), float(tol.max_abs)
