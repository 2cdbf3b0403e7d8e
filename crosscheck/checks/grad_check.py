"""The gradient cross-check: torch autograd against ``jax.grad``, per parameter under its torch name.

``crosscheck --grad``: the loss is ``sum(output * R)`` for a fixed ``R`` of the output's
shape, standard normal from numpy's ``default_rng([seed, 1])``; its gradients with respect to
the input and to every parameter are taken in torch (autograd, float32, TF32 off) and in JAX
(``jax.grad`` of the jitted module, float32, matmul precision "highest"). The Flax gradient
tree is mapped back to torch keys and layouts through the porting table
(:func:`crosscheck.porting.port.to_state_dict`: a kernel's gradient is the transposed weight's), so
each row names a torch parameter (``W_query.weight``, ``heads.1.W_key.bias``,
``in_proj_weight``) or ``input``. Bound: the ``("flax grad", "float32")`` row of
:data:`crosscheck.pipeline.compare.POLICY`.

Inference mode by default; with ``--train`` the gradients are taken in training mode on the
masks of :mod:`crosscheck.checks.train_check`, which runs this check (dropout's gradient is the same
mask and scale). Modules are run by the caller's ``trainer`` (``apply(variables, x)``,
``variables``, ``module``, ``sites``) and ``torch_forward``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from crosscheck.errors import BadInputError
from crosscheck.pipeline import compare as cmp
from crosscheck.pipeline import flax_runner
from crosscheck.pipeline.cases import Case
from crosscheck.pipeline.results import Result, result_of
from crosscheck.porting import port

#: The loss, as reports name it.
LOSS = "sum(output * R), R ~ N(0, 1) of the output's shape from numpy default_rng([seed, 1])"
#: The row name of the input's gradient.
INPUT = "input"
#: JAX's matmul precision in --train/--grad whatever --matmul-precision says: true float32, as torch with TF32 off.
MATMUL_PRECISION = "highest"


def loss_weights(shape, seed: int) -> np.ndarray:
    """``R``: the fixed float32 weights of the loss ``sum(output * R)``."""
    return np.random.default_rng([seed, 1]).standard_normal(shape).astype(np.float32)


def torch_grads(case: Case, forward, module, seed: int, dtype=None) -> dict[str, np.ndarray]:
    """``{torch name: gradient}`` of ``sum(forward(x) * R)`` for the input and every parameter of ``module``.

    ``dtype``: ``torch.float64`` for the float64 reference (``x`` and ``R`` cast from float32).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    x = torch.from_numpy(np.array(case.x, dtype=np.float32)).to(dtype).requires_grad_(True)
    with no_tf32():
        out = forward(x)
        loss = (out * torch.from_numpy(loss_weights(tuple(out.shape), seed)).to(dtype)).sum()
        loss.backward()
    assert x.grad is not None  # x requires grad and the loss depends on it
    grads = {INPUT: x.grad.numpy()}
    for name, p in module.named_parameters():
        grads[name] = np.zeros(tuple(p.shape), p.detach().numpy().dtype) if p.grad is None else p.grad.numpy()
    return grads


def flax_output_and_grads(case: Case, trainer, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray], list]:
    """``(output, {torch name: gradient}, dropout sites)``: the module's output and ``jax.grad`` of the loss.

    One jitted ``value_and_grad``; the parameter gradients are mapped to torch keys and layouts.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(case.x, dtype=jnp.float32)
    r = loss_weights(_output_shape(trainer, x), seed)

    def loss(params, x):
        out = trainer.apply({**trainer.variables, "params": params}, x)
        return jnp.sum(out * r), out

    params = trainer.variables.get("params", {})
    with jax.default_matmul_precision(MATMUL_PRECISION):
        (_, out), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    g_params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), g_params)
    grads = {INPUT: np.asarray(jax.device_get(g_x))}
    if g_params:
        grads.update(port.to_state_dict(trainer.module, {"params": g_params}, variant=case.variant))
    return np.asarray(jax.device_get(out)), grads, list(trainer.sites)


def grad_rows(
    case: Case,
    flax_grads: dict,
    torch_module: Callable,
    seed: int,
    detail: dict,
    attention_impl: str | None,
    step: Callable[[str], None],
) -> list[Result]:
    """One row per gradient of ``case`` (input first, then the parameters in torch's order).

    ``flax_grads``: from :func:`flax_output_and_grads`. ``torch_module(dtype)`` -> ``(module,
    forward)``: a fresh copy of the torch reference in ``dtype`` (training mode on the same masks,
    or ``eval()``); float32 is the reference, float64 measures its own rounding, which widens the
    bound of an ill-conditioned gradient (:func:`crosscheck.pipeline.compare.grad_policy`). ``detail`` goes
    into every row, with ``reference_float32_error``.
    """
    import torch

    name = case.variant.name
    module32, forward32 = torch_module(torch.float32)
    t_grads = torch_grads(case, forward32, module32, seed)
    module64, forward64 = torch_module(torch.float64)
    t64 = torch_grads(case, forward64, module64, seed, torch.float64)
    params = list(t_grads)  # input, then torch's parameter order
    missing = [k for k in params if k not in flax_grads]
    if missing:
        raise BadInputError(f"{name}: no Flax gradient for torch parameter(s) {', '.join(missing)}")
    impl = (attention_impl or flax_runner.AUTO) if case.variant.takes_attention_impl and not detail["train"] else None
    rows = []
    for key in params:
        ref_error = cmp.max_abs_err(t_grads[key], t64[key])
        tol = cmp.grad_policy(ref_error, cmp.ref_scale(t_grads[key]))
        row = result_of(
            name,
            "flax",
            flax_runner.platform(),
            "float32",
            f"torch grad: {key}",
            flax_grads[key],
            t_grads[key],
            tol,
            detail={"parameter": key, **detail, "reference_float32_error": ref_error},
        )
        row.attention_impl = impl
        rows.append(row)
    step(f"flax grad {name}")
    return rows


def _output_shape(trainer, x) -> tuple[int, ...]:
    """The module's output shape (a trace, no compile)."""
    import jax

    return tuple(jax.eval_shape(trainer.apply, trainer.variables, x).shape)


class no_tf32:
    """torch matmuls in true float32 inside the block (TF32 off on CUDA, precision "highest"); restored after."""

    def __enter__(self):
        import torch

        self._saved = (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(),
        )
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        return self

    def __exit__(self, *exc):
        import torch

        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, precision = self._saved
        torch.set_float32_matmul_precision(precision)
        return False
