"""The training-mode cross-check: torch and Flax with dropout active, on identical dropout masks.

``crosscheck --train [--dropout P]`` (P defaults to 0.1): every variant runs in training mode
(torch ``train()``, Flax ``deterministic=False``) and every dropout site drops the same
elements with the same ``1 / (1 - P)`` scaling in both frameworks
(:mod:`crosscheck.references.dropout_masks`). Rows, per variant:

* torch float32 against the same module in float64, on the same masks (the reference's own
  rounding, as in the forward check);
* Flax float32 against torch float32 (the forward check's float32 bound).

Variants whose modules have no dropout (``SimplifiedSelfAttention``, ``SelfAttentionV1``/``V2``,
the GQA classes: jaxattn's ``GroupedQueryAttention`` has none, so transformers' Llama and
Qwen3 run with ``attention_dropout=0``) run in training mode all the same; their rows say
"no dropout". With ``--grad`` the gradients are taken on the same masks
(:mod:`crosscheck.checks.grad_check`). torch and Flax only: ttnn has no training mode here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from crosscheck.checks import grad_check
from crosscheck.errors import BadInputError
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline import flax_runner, placement
from crosscheck.pipeline.cases import Case, torch_reference_module
from crosscheck.pipeline.progress import Progress, Steps
from crosscheck.pipeline.request import RunRequest
from crosscheck.pipeline.results import CheckOutcome, Result, result_of
from crosscheck.porting import port
from crosscheck.references import dropout_masks as dm


def has_dropout(case: Case) -> bool:
    """Whether ``case``'s modules apply dropout: the variant has a dropout rate and it is above 0."""
    return "dropout" in case.variant.fields and case.variant.resolve(case.config).dropout > 0.0


def training_case(case: Case) -> Case:
    """``case`` as it runs in training mode: a variant without dropout gets rate 0 in torch too.

    (transformers' Llama/Qwen3 read ``attention_dropout`` from the config; jaxattn's
    ``GroupedQueryAttention`` has no dropout, so the pair is compared without it.)
    """
    if "dropout" in case.variant.fields or case.config.dropout == 0.0:
        return case
    cfg = case.config.replace(dropout=0.0)
    return dataclasses.replace(
        case, config=cfg, torch_module=torch_reference_module(case.variant, cfg, case.state_dict)
    )


# --- Flax ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class FlaxTrainer:
    """``case``'s jaxattn module on THE weights, in training mode with the site keys of ``seed``.

    ``apply(variables, x)`` runs the module; ``sites`` holds the dropout sites of the last trace.
    ``attention_impl``: the core for a run without dropout (``None``: the module's default).
    """

    case: Case
    seed: int
    train: bool
    attention_impl: str | None = None

    def __post_init__(self):
        import jax
        import jax.numpy as jnp

        case = self.case
        self.module = flax_runner.flax_module(case.variant, case.config, "float32", self.attention_impl)
        variables = port.port_variables(case.variant, case.config, case.state_dict)
        self.variables = jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.float32), variables)
        params = inspect.signature(type(self.module).__call__).parameters
        self.kwargs: dict[str, Any] = {"deterministic": not self.train} if "deterministic" in params else {}
        if case.attention_mask is not None:
            self.kwargs["attention_mask"] = jnp.asarray(case.attention_mask, dtype=jnp.bool_)
        self.sites: Sequence[dm.Site | dm.LayerSite] = []

    def apply(self, variables, x):
        """The module's output; records the dropout sites while it is traced."""
        import jax

        module, rngs = self.module, {}
        if self.train and hasattr(module, "attention_fn"):
            keys = dm.SiteKeys(self.seed)
            module = module.clone(attention_fn=keys)
            self.sites = keys.sites  # filled as the module is traced
            # The modules draw their 'dropout' key before calling attention_fn, which replaces it.
            rngs = {"dropout": jax.random.key(self.seed)}
        elif self.train:  # a module that drops with flax.linen.Dropout itself (a registered plugin)
            from flax import linen as nn

            sites = dm.DropoutSites(self.seed)
            self.sites = sites.sites  # filled as the module is traced
            with nn.intercept_methods(sites):
                return module.apply(variables, x, rngs={"dropout": jax.random.key(self.seed)}, **self.kwargs)
        return module.apply(variables, x, rngs=rngs, **self.kwargs)


def flax_train_output(case: Case, seed: int, train: bool = True) -> tuple[np.ndarray, list[dm.Site | dm.LayerSite]]:
    """``(output, dropout sites)`` of the jitted jaxattn module in training mode, float32 at precision highest."""
    import jax
    import jax.numpy as jnp

    trainer = FlaxTrainer(case, seed, train)
    with jax.default_matmul_precision(grad_check.MATMUL_PRECISION):
        out = jax.jit(trainer.apply)(trainer.variables, jnp.asarray(case.x, dtype=jnp.float32))
    return np.asarray(jax.device_get(out)), list(trainer.sites)


# --- torch ---------------------------------------------------------------------------------------


def torch_train_module(case: Case, masks: Sequence[np.ndarray], sites: Sequence[dm.Site | dm.LayerSite], dtype=None):
    """A copy of ``case``'s torch module, in ``dtype``, and ``forward(x)`` in training mode on the masks."""
    module = copy.deepcopy(case.torch_module)
    if dtype is not None:
        module = module.to(dtype)

    def forward(x):
        import torch

        mask = None if case.attention_mask is None else torch.from_numpy(np.asarray(case.attention_mask, dtype=bool))
        return dm.torch_forward_masked(case.variant, module, x, case.config, masks, sites, mask)

    return module, forward


def torch_eval_module(case: Case, dtype=None):
    """A copy of ``case``'s torch module in ``eval()`` (in ``dtype``) and its forward (dropout off)."""
    import torch

    module = copy.deepcopy(case.torch_module).eval()
    if dtype is not None:
        module = module.to(dtype)
    mask = None if case.attention_mask is None else torch.from_numpy(np.asarray(case.attention_mask, dtype=bool))
    return module, lambda x: case.variant.torch_forward(module, x, case.config, mask)


def torch_train_output(case: Case, masks, sites, dtype: str = "float32") -> np.ndarray:
    """The torch reference in training mode on ``masks`` (float32 or float64), TF32 off."""
    import torch

    tdtype = placement.torch_dtype(dtype)
    _, forward = torch_train_module(case, masks, sites, tdtype)
    with grad_check.no_tf32(), torch.no_grad():
        return forward(torch.from_numpy(np.asarray(case.x)).to(tdtype)).numpy()


# --- the check -----------------------------------------------------------------------------------


def dropout_detail(case: Case, sites: Sequence[dm.Site | dm.LayerSite], masks: Sequence[np.ndarray]) -> dict:
    """What a training row reports about dropout: the rate, the sites and the fraction of weights kept."""
    if not sites:
        return {"dropout": "no dropout", "sites": 0}
    kept = float(np.mean(np.concatenate([m.ravel() for m in masks])))
    return {"dropout": sites[0].rate, "sites": len(sites), "kept_fraction": kept}


def reference_label(detail: dict, what: str) -> str:
    """The ``vs`` text of a training row: it says "no dropout" where there is none."""
    return f"{what}, no dropout" if detail["dropout"] == "no dropout" else f"{what}, same masks"


@dataclasses.dataclass
class TrainingRun:
    """One case in training mode: its sites and masks (shared by the train and grad rows).

    ``flax_grads``: the Flax gradients by torch name, when they were asked for (one compile for both).
    """

    case: Case
    sites: list
    masks: list
    flax_out: np.ndarray
    detail: dict
    flax_grads: dict | None = None


def run_training(case: Case, seed: int, with_grads: bool = False) -> TrainingRun:
    """Flax first (its trace finds the dropout sites), then the masks those sites draw."""
    case = training_case(case)
    grads = None
    if with_grads:
        flax_out, grads, sites = grad_check.flax_output_and_grads(case, FlaxTrainer(case, seed, train=True), seed)
    else:
        flax_out, sites = flax_train_output(case, seed, train=True)
    if bool(sites) != has_dropout(case):
        raise BadInputError(
            f"{case.variant.name}: the Flax module applied dropout at {len(sites)} site(s) at rate "
            f"{case.config.dropout}: expected {'some' if has_dropout(case) else 'none'}"
        )
    masks = dm.masks_for(seed, sites)
    return TrainingRun(case, sites, masks, flax_out, dropout_detail(case, sites, masks), grads)


def train_rows(run: TrainingRun, backends: Sequence[str], step: Callable[[str], None]) -> list[Result]:
    """The torch (vs float64) and Flax (vs torch float32) rows of one case in training mode."""
    case, name = run.case, run.case.variant.name
    out32 = torch_train_output(case, run.masks, run.sites, "float32")
    rows = []
    if "torch" in backends:
        out64 = torch_train_output(case, run.masks, run.sites, "float64")
        rows.append(
            result_of(
                name,
                "torch",
                "cpu",
                "float32",
                reference_label(run.detail, "torch float64"),
                out32,
                out64,
                cmp.policy_for("torch", "float32"),
                detail=dict(run.detail),
            )
        )
        step(f"torch train {name}")
    if "flax" in backends:
        rows.append(
            result_of(
                name,
                "flax",
                flax_runner.platform(),
                "float32",
                reference_label(run.detail, "torch float32"),
                run.flax_out,
                out32,
                cmp.policy_for("flax", "float32"),
                detail=dict(run.detail),
            )
        )
        step(f"flax train {name}")
    return rows


def run(cases: Sequence[Case], request: RunRequest, progress: Progress | None) -> CheckOutcome:
    """The training rows and/or gradient rows of every case (torch against Flax, float32)."""
    train, grad, seed = request.train, request.grad, request.seed
    refused = [c.variant for c in cases if train and c.variant.no_train]
    if refused:
        raise BadInputError(f"--train cannot run {refused[0].name}: {refused[0].no_train}")
    step = Steps(len(cases) * len(request.run_backends), progress).step
    results: list[Result] = []
    dropouts = set()
    for case in cases:
        if train:
            run_ = run_training(case, seed, with_grads=grad)
            dropouts.add(run_.detail["dropout"])
            results += train_rows(run_, request.run_backends, step)
            if grad:
                assert run_.flax_grads is not None  # run_training(with_grads=True) computed them
                results += grad_check.grad_rows(
                    run_.case,
                    run_.flax_grads,
                    functools.partial(torch_train_module, run_.case, run_.masks, run_.sites),
                    seed,
                    {"train": True, **run_.detail},
                    request.attention_impl,
                    step,
                )
        elif grad:
            trainer = FlaxTrainer(case, seed, train=False, attention_impl=request.attention_impl)
            _, flax_grads, _ = grad_check.flax_output_and_grads(case, trainer, seed)
            results += grad_check.grad_rows(
                case,
                flax_grads,
                functools.partial(torch_eval_module, case),
                seed,
                {"train": False},
                request.attention_impl,
                step,
            )
    for r in results:  # torch runs on the CPU here and JAX at "highest", whatever --torch-device/--matmul-precision say
        r.device = placement.torch_device_label("cpu") if r.backend == "torch" else placement.jax_device()
        r.precision = grad_check.MATMUL_PRECISION
    return CheckOutcome(results, mode=_mode(request, dropouts))


def _mode(request: RunRequest, dropouts: set) -> dict[str, Any]:
    """The JSON ``"mode"`` record of a training run."""
    mode: dict[str, Any] = {"check": "grad" if request.grad else "train", "train": request.train, "seed": request.seed}
    if request.train:
        rates = sorted(d for d in dropouts if d != "no dropout")
        mode["dropout"] = rates[0] if len(rates) == 1 else rates
        mode["masks"] = "jax.random per site: fold_in(key(seed), site), read back from jaxattn's naive kernel"
    if request.grad:
        mode["loss"] = grad_check.LOSS
    if request.skipped_backends:
        mode["skipped_backends"] = dict(request.skipped_backends)
    return mode
