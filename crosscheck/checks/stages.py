"""``crosscheck --stages``: every intermediate torch, Flax and ttnn share, compared stage by stage.

A mismatch in the output says *that* a port went wrong; the first stage over its bound says
*where*. Each backend exposes the same stages, in the book's order:

=================  =============================================================================
``queries`` ...    ``queries``, ``keys``, ``values`` after the projection, heads split
``*_normed``       queries and keys after the QK RMSNorm (Qwen3's ``qk_norm``)
``*_rope``         queries and keys after RoPE (grouped-query attention)
``scores``         the book's omega, ``queries @ keys.T``: before the mask and the ``1/sqrt(d)``
``weights``        the attention weights after the mask, the scale and the softmax
``context``        the context vectors, heads split, before ``out_proj`` / the head concat
``output``         what the layer returns (after ``out_proj`` where it has one)
=================  =============================================================================

Where they come from:

* torch: a functional re-run of the torch reference module (its own ``nn.Linear``/parameters,
  the book's ops in the book's order), checked to equal the module's own output before it is used;
* Flax: ``apply(..., capture_intermediates=True)``: the projections' outputs and what the modules
  sow (``queries``/``keys``/``values``/``attn_scores``/``attn_weights``/``context_vec``). Variants
  with a choice of core run the ``naive`` one, the one that has the weights;
* ttnn: the generic (non-SDPA) program, inside :func:`crosscheck.tt.ops.recording_stages`,
  which collects what the program :func:`~crosscheck.tt.ops.tap`\\ s.

Layouts are normalised before comparing: heads-first ``(batch, heads, tokens, dim)`` for every
stage but ``output`` (a missing batch or head axis becomes 1; the wrapper's heads are stacked).
Bounds: each backend's row of the tolerance table (:func:`crosscheck.pipeline.compare.policy_for`: float32
for Flax, the variant's bf16 row for ttnn), scaled by the stage's own ``max(1, max|ref|)``; PCC is
gated at ``output`` only (see :func:`compare_stages`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from crosscheck.checks.stage_reruns import no_torch_stages
from crosscheck.checks.stages_report import (
    STAGES,
    BackendStages,
    Raw,
    StageRow,
    StagesReport,
    VariantStages,
    compare_stages,
    heads_first,
    normalise,
    render,
    variant_stages,
)
from crosscheck.errors import BadInputError
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline import flax_runner, placement
from crosscheck.pipeline.cases import Case
from crosscheck.pipeline.progress import Steps
from crosscheck.porting import port

#: The report model, layouts and views live in :mod:`crosscheck.checks.stages_report`; re-exported here.
__all__ = [
    "BACKENDS",
    "STAGES",
    "BackendStages",
    "Raw",
    "StageRow",
    "StagesReport",
    "VariantStages",
    "compare_stages",
    "flax_stages",
    "heads_first",
    "normalise",
    "render",
    "run",
    "token_labels",
    "torch_stages",
    "ttnn_stages",
]

#: Backends with stages of their own (torch is the reference).
BACKENDS = ("flax", "ttnn")

# --- torch: the functional re-runs live in crosscheck.checks.stage_reruns ------------------------------


def torch_stages(case: Case) -> Raw:
    """The torch reference's stages on ``case`` (float32), from a re-run checked against the module's output."""
    import torch

    rerun = case.variant.torch_stages_rerun()
    if rerun is None:
        raise no_torch_stages(case.torch_module)
    cfg = case.variant.resolve(case.config)
    raw: Raw = {}
    with torch.no_grad():
        x = torch.from_numpy(np.array(case.x, dtype=np.float32))
        out = rerun(case.torch_module, x, cfg, raw)
        ref = case.variant.torch_forward(case.torch_module, x, case.config, None)
    out, ref = out.numpy(), ref.numpy()
    gap = float(np.max(np.abs(out - ref))) if out.shape == ref.shape else float("inf")
    if not gap <= 1e-6 * cmp.ref_scale(ref):
        raise RuntimeError(
            f"{case.variant.name}: the torch stage re-run gives output {out.shape} that differs from the module's "
            f"{ref.shape} by {gap:.3g}: the re-run no longer mirrors the reference"
        )
    raw = {k: [t.numpy() for t in ts] for k, ts in raw.items()}
    raw["output"] = [ref]
    return raw


# --- Flax: captured and sown intermediates ----------------------------------------------------------

#: Sown name -> stage (``queries``/``keys``/``values`` are sown as they enter the core).
_SOWN = {
    "queries": "queries",
    "keys": "keys",
    "values": "values",
    "attn_scores": "scores",
    "attn_weights": "weights",
    "context_vec": "context",
}


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _collect_sown(tree: Mapping, raw: Raw) -> None:
    """Depth first, heads in order (``heads_2`` before ``heads_10``): the module's own sows, then its children's."""
    for key, stage in _SOWN.items():
        if key in tree:
            raw.setdefault(stage, []).append(np.asarray(tree[key][0]))
    for name in sorted((n for n, v in tree.items() if isinstance(v, Mapping)), key=_natural):
        _collect_sown(tree[name], raw)


def _captured(tree: Mapping, name: str) -> np.ndarray | None:
    sub = tree.get(name)
    return None if not isinstance(sub, Mapping) or "__call__" not in sub else np.asarray(sub["__call__"][0])


def flax_gqa(tree: Mapping, raw: Raw, cfg) -> None:
    """Grouped-query attention sows what enters the core: the rotated queries and keys. The projections
    and norms are the submodules' captured outputs ``(b, T, heads * hd)`` / ``(b, T, heads, hd)``."""
    raw["queries_rope"], raw["keys_rope"] = raw.pop("queries"), raw.pop("keys")
    hd = cfg.resolved_head_dim()
    for stage, sub in (("queries", "W_query"), ("keys", "W_key")):
        t = _captured(tree, sub)  # (b, T, n * hd)
        assert t is not None  # the projections' outputs are always captured
        raw[stage] = [np.swapaxes(t.reshape(*t.shape[:-1], -1, hd), 1, 2)]  # (b, n, T, hd)
    for stage, sub in (("queries_normed", "q_norm"), ("keys_normed", "k_norm")):
        t = _captured(tree, sub)
        if t is not None:
            raw[stage] = [np.swapaxes(t, 1, 2)]  # (b, T, n, hd) -> (b, n, T, hd)


def flax_stages(case: Case, dtype: str = "float32") -> Raw:
    """The jaxattn module's stages on ``case``: one jitted ``apply`` capturing every intermediate.

    Parameters through ``port.port_variables`` (looked up at call time, as the Flax backend does),
    matmuls at :func:`crosscheck.pipeline.flax_runner.matmul_precision`.
    """
    import inspect

    import jax
    import jax.numpy as jnp

    variant, cfg = case.variant, case.variant.resolve(case.config)
    module = flax_runner.flax_module(variant, case.config, dtype, "naive" if variant.takes_attention_impl else None)
    variables = jax.tree.map(
        lambda a: jnp.asarray(a, dtype=jnp.float32), port.port_variables(variant, case.config, case.state_dict)
    )
    kwargs = {"deterministic": True} if "deterministic" in inspect.signature(type(module).__call__).parameters else {}
    apply = jax.jit(lambda v, x: module.apply(v, x, capture_intermediates=True, mutable=["intermediates"], **kwargs))
    x = jnp.asarray(case.x, dtype=placement.jax_dtype(dtype))
    with jax.default_matmul_precision(flax_runner.matmul_precision(dtype)):
        out, state = apply(variables, x)
    tree = jax.device_get(state["intermediates"])
    raw: Raw = {}
    _collect_sown(tree, raw)
    fix = variant.flax_stages_fix()
    if fix is not None:
        fix(tree, raw, cfg)
    if not variant.projects_x:
        for name in ("queries", "keys", "values"):  # x itself: no projection to compare
            raw.pop(name, None)
    raw.setdefault("context", [np.asarray(out)])  # sections 3.3-3.4 return the context vectors as they are
    raw["output"] = [np.asarray(out)]
    return raw


# --- ttnn: the program's taps ----------------------------------------------------------------------


def ttnn_stages(cases: Sequence[Case], runtime: str = "auto") -> tuple[dict[str, Raw], dict]:
    """``({variant: stages}, runtime info)``: each case's generic ttnn program with its taps recorded.

    The SDPA twins fuse scores, weights and context into one op, so the generic program runs
    whatever head_dim is (its output is what the forward check compares for head_dim % 32 != 0).
    """
    from crosscheck.tt import ops
    from crosscheck.tt import runtime as rt

    found: dict[str, Raw] = {}
    with rt.open_runtime(runtime) as opened:
        info = {"name": opened.name, "description": opened.description, "python": None}
        for case in cases:
            if case.variant.no_ttnn:  # no program to tap (a registered plugin without one)
                continue
            with ops.recording_stages() as taps:
                out = rt.run_variant(
                    opened, case.variant, case.config, case.state_dict, case.x, program=case.variant.ttnn_program
                )
                raw = {k: [np.asarray(opened.ttnn.to_torch(t), dtype=np.float32) for t in ts] for k, ts in taps.items()}
            if not case.variant.projects_x:
                for name in ("queries", "keys", "values"):
                    raw.pop(name, None)
            raw["output"] = [np.asarray(out, dtype=np.float32)]
            found[case.variant.name] = raw
    return found, info


def token_labels(inputs: Any, tokens: int) -> list[str]:
    """The seed sentence's words for the default input, else ``0 .. tokens-1``."""
    from crosscheck import seed

    if inputs is None and tokens == len(seed.TOKENS):
        return list(seed.TOKENS)
    return [str(i) for i in range(tokens)]


def run(
    variants: Iterable[str] | None = None,
    *,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    inputs: Any = None,
    backends: Sequence[str] = ("torch", "flax", "ttnn"),
    ttnn_runtime: str = "auto",
    dtype: str = "float32",
    prefix: str = "",
    model_config: Any = None,
    progress: Callable[[int, int, str], None] | None = None,
    **overrides,
) -> StagesReport:
    """Every stage of every variant on Flax and ttnn against torch's (see the module docstring).

    Takes :func:`crosscheck.pipeline.engine.run`'s case options; torch is always the reference, so
    ``backends`` only says which of flax and ttnn run. Padding, decoding and another interpreter's
    ttnn are not staged (they are checks of their own).
    """
    from crosscheck.pipeline.backends import check_ttnn_available
    from crosscheck.pipeline.cases import build_cases
    from crosscheck.pipeline.request import RunRequest

    t0 = time.perf_counter()
    request = RunRequest.create(
        variants,
        weights=weights,
        inputs=inputs,
        backends=tuple(backends),
        ttnn_runtime=ttnn_runtime,
        dtype=dtype,
        prefix=prefix,
        model_config=model_config,
        **overrides,
    )
    staged = [b for b in BACKENDS if b in request.backends]
    if not staged:
        raise BadInputError("--stages compares flax and/or ttnn with torch: add flax or ttnn to --backends")
    if "ttnn" in staged:
        check_ttnn_available(ttnn_runtime, None)
    cases, data, weights_desc = build_cases(
        request.variants,
        weights=weights,
        inputs=inputs,
        overrides=request.config_overrides,
        prefix=prefix,
        model_config=model_config,
    )
    for case in cases:
        if case.variant.torch_stages is None:
            raise no_torch_stages(case.torch_module)
    steps = Steps(len(cases) * (1 + len(staged)), progress)
    torch_raw, flax_raw, ttnn_raw, info = _collect(cases, staged, dtype, ttnn_runtime, steps.step)
    out = [
        variant_stages(
            case.variant.name,
            torch_raw[case.variant.name],
            [
                ("flax", flax_raw.get(case.variant.name), dtype, flax_runner.platform() if "flax" in staged else ""),
                ("ttnn", ttnn_raw.get(case.variant.name), "bfloat16", (info or {}).get("name", "")),
            ],
        )
        for case in cases
    ]
    tokens = cases[0].x.shape[-2] if cases else 0
    return StagesReport(
        out, data.describe(), weights_desc, info, token_labels(inputs, tokens), time.perf_counter() - t0
    )


def _collect(cases: Sequence[Case], staged: Sequence[str], dtype: str, ttnn_runtime: str, step: Callable[[str], None]):
    """``(torch, flax, ttnn raw stages by variant, ttnn runtime info)`` of ``cases`` on the ``staged`` backends."""
    torch_raw, flax_raw = {}, {}
    for case in cases:
        torch_raw[case.variant.name] = torch_stages(case)
        step(f"torch stages {case.variant.name}")
        if "flax" in staged:
            flax_raw[case.variant.name] = flax_stages(case, dtype)
            step(f"flax stages {case.variant.name}")
    ttnn_raw: dict[str, Raw] = {}
    info = None
    if "ttnn" in staged and any(not c.variant.no_ttnn for c in cases):
        ttnn_raw, info = ttnn_stages(cases, ttnn_runtime)
        for case in cases:
            step(f"ttnn stages {case.variant.name}")
    return torch_raw, flax_raw, ttnn_raw, info
