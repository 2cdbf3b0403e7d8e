"""The one Flax runner: a jaxattn module on THE weights, jitted, in the chosen dtype and attention core.

Both the in-process backend (:func:`crosscheck.pipeline.backends.flax_output`) and the bundle
worker (``python -m crosscheck.tt.worker --backend flax``) call :func:`run_flax`, so the
two routes cannot drift apart. It lives in its own module, below both, because the
backends start the worker (:func:`crosscheck.tt.worker.run_in_interpreter`) and the
worker runs this: a home in either would make an import circle. JAX, Flax and jaxattn
are imported inside the functions; torch never.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.porting import port
from crosscheck.variants import registry

DTYPES = ("float32", "bfloat16", "float16")
#: What the attention core is called when nobody chooses: the modules' own default.
AUTO = "auto"


def attention_impl_names() -> tuple[str, ...]:
    """The names ``attention_impl`` accepts: ``"auto"`` and ``jaxattn.implementations.names()``."""
    from jaxattn import implementations

    return (AUTO, *implementations.names())


def check_attention_impl(name: str | None) -> None:
    """Raise :class:`BadInputError` listing the known names unless ``name`` is ``None`` or one of them."""
    if name is None:
        return
    known = attention_impl_names()
    if name not in known:
        raise BadInputError(f"unknown attention impl {name!r}; known: {', '.join(known)}")


def describe_attention_impl(name: str) -> str:
    """``name``, and for ``"auto"`` what it picks on a CPU (the threshold is jaxattn's)."""
    if name != AUTO:
        return name
    from jaxattn.implementations import AUTO_BLOCKWISE_MIN_TOKENS as n

    if platform() == "gpu":  # jaxattn.implementations: never the lax loop, never T x T past a bound
        return f"{AUTO} (gpu: cudnn for bfloat16/float16, flash for float32; xla for masks and offsets)"
    return f"{AUTO} (naive below {n} tokens, blockwise from {n})"


def platform() -> str:
    """Where JAX runs the Flax backend: ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``jax.default_backend()``)."""
    import jax

    return jax.default_backend()


def _jax_dtype(dtype: str):
    from crosscheck.pipeline import placement

    return placement.jax_dtype(dtype, DTYPES)


def flax_module(variant: registry.Variant, cfg: AttnConfig, dtype: str = "float32", attention_impl: str | None = None):
    """``variant``'s jaxattn module at ``cfg``, computing in ``dtype``, with ``attention_impl`` where it takes one.

    ``attention_impl=None`` keeps the module's own default. A variant without a selectable
    core ignores it: the caller decides whether asking one of those is an error.
    """
    module = variant.flax_module(cfg)
    if hasattr(module, "dtype"):
        module = module.clone(dtype=_jax_dtype(dtype))
    if attention_impl is not None and variant.takes_attention_impl:
        module = module.clone(attention_impl=attention_impl)
    return module


def matmul_precision(dtype: str) -> str:
    """The matmul precision a cross-check in ``dtype`` runs at: ``"highest"`` (true float32) for float32.

    JAX's default on a GPU computes float32 matmuls in TF32 (10-bit mantissa), which no
    float32 tolerance survives; bfloat16/float16 runs keep the default, their own precision.
    ``--matmul-precision`` chooses another one for float32 (:mod:`crosscheck.pipeline.placement`).
    """
    from crosscheck.pipeline import placement

    return placement.matmul_precision(dtype)


def _float32_variables(variant, cfg, state_dict) -> dict:
    """THE weights ported to ``variant``'s Flax variables, as float32 arrays (Linen and NNX alike)."""
    import jax
    import jax.numpy as jnp

    variables = port.port_variables(variant, cfg, state_dict)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.float32), variables)


def _inference_kwargs(module) -> dict:
    """``deterministic=True`` where the module's ``__call__`` takes it (the variants with dropout)."""
    import inspect

    return {"deterministic": True} if "deterministic" in inspect.signature(type(module).__call__).parameters else {}


def _prepare(variant, cfg, state_dict, dtype, attention_impl, **clone):
    """``(module, float32 variables, call kwargs)`` for ``variant`` at ``cfg`` on THE weights."""
    module = flax_module(variant, cfg, dtype, attention_impl)
    if clone:
        module = module.clone(**clone)
    return module, _float32_variables(variant, cfg, state_dict), _inference_kwargs(module)


def module_call(case, dtype: str, attention_impl: str | None):
    """``(module, variables, input, keyword arguments)`` of ``case`` (a :class:`crosscheck.pipeline.cases.Case`)
    as :func:`run_flax` applies them, for a caller that applies the module its own way (split over devices)."""
    import jax.numpy as jnp

    module, variables, kwargs = _prepare(case.variant, case.config, case.state_dict, dtype, attention_impl)
    if case.attention_mask is not None:
        kwargs["attention_mask"] = jnp.asarray(case.attention_mask, dtype=jnp.bool_)
    return module, variables, jnp.asarray(case.x, dtype=_jax_dtype(dtype)), kwargs


def run_flax(
    variant: registry.Variant,
    cfg: AttnConfig,
    state_dict: Mapping[str, Any],
    x: np.ndarray,
    *,
    dtype: str = "float32",
    attention_impl: str | None = None,
    attention_mask: np.ndarray | None = None,
    api: str = "linen",
) -> np.ndarray:
    """The jitted jaxattn module on ``x`` with ``state_dict`` ported to float32 parameters, computing in ``dtype``.

    ``api="nnx"``: the :mod:`jaxattn.nnx` twin under ``nnx.jit`` (:func:`run_flax_nnx`).

    Inference mode (``deterministic=True`` where the module has dropout), matmuls at
    :func:`matmul_precision`. ``attention_mask``: ``x.shape[:-1]``, 1 = real token. The
    weights are ported through ``port.port_variables``, looked up at call time so a test
    can tamper with them.
    """
    if api == "nnx":
        return run_flax_nnx(
            variant, cfg, state_dict, x, dtype=dtype, attention_impl=attention_impl, attention_mask=attention_mask
        )
    import jax
    import jax.numpy as jnp

    module, variables, kwargs = _prepare(variant, cfg, state_dict, dtype, attention_impl)
    if attention_mask is not None:
        kwargs["attention_mask"] = jnp.asarray(attention_mask, dtype=jnp.bool_)
    apply = jax.jit(lambda v, x: module.apply(v, x, **kwargs))
    with jax.default_matmul_precision(matmul_precision(dtype)):
        out = apply(variables, jnp.asarray(x, dtype=_jax_dtype(dtype)))
    return np.asarray(jax.device_get(out))


def nnx_module(
    variant: registry.Variant,
    cfg: AttnConfig,
    state_dict: Mapping[str, Any],
    dtype: str = "float32",
    attention_impl: str | None = None,
):
    """``variant``'s :mod:`jaxattn.nnx` module at ``cfg`` computing in ``dtype``, THE weights loaded as float32."""
    from flax import nnx

    from jaxattn.nnx import load_params

    options = {"dtype": _jax_dtype(dtype)}
    if attention_impl is not None and variant.takes_attention_impl:
        options["attention_impl"] = attention_impl
    # Built concretely: nnx.eval_shape would leave the RNG state abstract, which nnx.jit cannot take.
    module = variant.flax_module(cfg, "nnx", rngs=nnx.Rngs(0), **options)
    return load_params(module, _float32_variables(variant, cfg, state_dict)["params"])


def run_flax_nnx(
    variant: registry.Variant,
    cfg: AttnConfig,
    state_dict: Mapping[str, Any],
    x: np.ndarray,
    *,
    dtype: str = "float32",
    attention_impl: str | None = None,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`run_flax` through the NNX module (:func:`nnx_module`) under ``nnx.jit``: same weights, same core."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    module = nnx_module(variant, cfg, state_dict, dtype, attention_impl)
    kwargs = _inference_kwargs(module)
    if attention_mask is not None:
        kwargs["attention_mask"] = jnp.asarray(attention_mask, dtype=jnp.bool_)
    apply = nnx.jit(lambda m, x: m(x, **kwargs))
    with jax.default_matmul_precision(matmul_precision(dtype)):
        out = apply(module, jnp.asarray(x, dtype=_jax_dtype(dtype)))
    return np.asarray(jax.device_get(out))


def run_flax_decode(
    variant: registry.Variant,
    cfg: AttnConfig,
    state_dict: Mapping[str, Any],
    x: np.ndarray,
    prompt_len: int,
    *,
    dtype: str = "float32",
    attention_impl: str | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Prefill ``x[:, :prompt_len]``, then decode ``x``'s other tokens one at a time through the KV cache.

    Flax's convention: the module with ``decode=True``, its ``'cache'`` collection made by
    ``init`` on an input of ``x``'s length, one jitted ``apply(..., mutable=["cache"])``
    per chunk. Returns the chunks' context vectors concatenated along the tokens (the
    full forward's shape) and how many times the step function compiled (2: the prompt
    and the single token). ``attention_mask`` covers ``x``'s tokens; each chunk brings its part.
    """
    import jax
    import jax.numpy as jnp

    xs = jnp.asarray(x, dtype=_jax_dtype(dtype))
    if xs.ndim != 3 or not 1 <= prompt_len <= xs.shape[1]:
        raise BadInputError(
            f"{variant.name}: decoding needs (batch, tokens, d_in) input and 1 <= prompt_len <= tokens; "
            f"got shape {tuple(xs.shape)}, prompt_len={prompt_len}"
        )
    module, variables, kwargs = _prepare(variant, cfg, state_dict, dtype, attention_impl, decode=True)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, dtype=jnp.bool_)

    @jax.jit
    def step(params, cache, chunk, chunk_mask):
        extra = {} if chunk_mask is None else {"attention_mask": chunk_mask}
        out, state = module.apply({**params, "cache": cache}, chunk, mutable=["cache"], **kwargs, **extra)
        return out, state["cache"]

    with jax.default_matmul_precision(matmul_precision(dtype)):
        cache = jax.jit(lambda: module.init(jax.random.key(0), jnp.zeros_like(xs), **kwargs)["cache"])()
        bounds = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, xs.shape[1])]
        outs = []
        for start, stop in bounds:
            out, cache = step(variables, cache, xs[:, start:stop], None if mask is None else mask[:, start:stop])
            outs.append(out)
        out = jnp.concatenate(outs, axis=1)
    return np.asarray(jax.device_get(out)), step._cache_size()  # type: ignore[attr-defined]  # private, not in stubs
