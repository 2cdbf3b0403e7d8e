"""The cross-check as a Python API: the same weights and inputs through torch, Flax and ttnn.

    from crosscheck import engine
    report = engine.run()                       # the seed sentence, every variant, every backend
    report = engine.run(["MultiHeadAttention"], weights="mha.pt", inputs="x.npy", backends=("torch", "flax"))
    assert report.passed, report.failing_variants

Every backend is compared with the torch float32 reference (the book's classes run in
``eval()`` mode), using :mod:`crosscheck.compare`. The ``torch`` row itself is that
float32 reference against the same module run in float64: it shows how far the
reference is from exact arithmetic, the scale every other bound is judged on.

Dropout: every backend runs in inference mode (torch ``eval()``, Flax
``deterministic=True``), where dropout is the identity; a ``dropout`` rate is carried
in the config only. Two frameworks' dropout streams could never be compared anyway.

Errors: :class:`BadInputError` for anything the user gave that cannot be used (exit 2
in the CLI); a failed verdict is a :class:`Result` with ``passed=False`` (exit 1).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from crosscheck import compare as cmp
from crosscheck import inputs as inp
from crosscheck import port, registry
from crosscheck import portmap as pm
from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError, MismatchError, PortError

BACKENDS = ("torch", "flax", "ttnn")
DTYPES = ("float32", "bfloat16", "float16")
TTNN_RUNTIMES = ("auto", "device", "host")
#: The book's seed: ``torch.manual_seed(123)`` before building each layer.
TORCH_SEED = 123
#: Config fields a user may override; the CLI flag of each is ``--`` + the name with dashes.
OVERRIDABLE = ("d_in", "d_out", "context_length", "dropout", "num_heads", "qkv_bias", "causal")

#: ``progress(done, total, description)`` — called after each step.
Progress = Callable[[int, int, str], None]


# --- report --------------------------------------------------------------------------------------


@dataclass
class Result:
    """One variant on one backend, against its reference."""

    variant: str
    backend: str
    runtime: str  # "cpu" for torch/flax, "host" or "device" for ttnn
    dtype: str  # the dtype the backend computed in
    reference: str  # what it was compared with
    shape: Optional[list[int]]
    reference_shape: Optional[list[int]]
    max_abs_err: Optional[float]
    max_rel_err: Optional[float]
    pcc: Optional[float]
    ulp: Optional[int]
    passed: bool
    thresholds: dict
    failures: list[str] = field(default_factory=list)
    seconds: Optional[float] = None
    source: Optional[str] = None  # the outputs file, for `bundle compare`

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    results: list[Result]
    configs: dict[str, dict]
    input: dict
    weights: str
    versions: dict
    ttnn_runtime: Optional[dict] = None
    backends: tuple[str, ...] = BACKENDS
    seconds: Optional[float] = None

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def raise_for_mismatch(self) -> None:
        """Raise :class:`MismatchError` naming each failing variant, backend and reason."""
        if not self.passed:
            lines = [f"{r.variant} / {r.backend}: {f}" for r in self.results if not r.passed for f in r.failures]
            raise MismatchError(f"mismatch in {', '.join(self.failing_variants)}:\n  " + "\n  ".join(lines))

    @property
    def failing_variants(self) -> list[str]:
        seen: list[str] = []
        for r in self.results:
            if not r.passed and r.variant not in seen:
                seen.append(r.variant)
        return seen

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failing_variants": self.failing_variants,
            "results": [r.to_dict() for r in self.results],
            "configs": self.configs,
            "input": self.input,
            "weights": self.weights,
            "backends": list(self.backends),
            "versions": self.versions,
            "ttnn_runtime": self.ttnn_runtime,
            "policy": {
                "rel_floor": cmp.REL_FLOOR,
                "note": "max_rel_err = max |a-r| / max(|r|, rel_floor * max|r|); ulp only for float32 outputs",
            },
            "seconds": self.seconds,
        }


# --- cases ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One variant ready to run: its config, THE weights (canonical torch keys -> float32) and its input."""

    variant: registry.Variant
    config: AttnConfig
    state_dict: dict[str, np.ndarray]
    x: np.ndarray  # float32, (tokens, d_in) or (batch, tokens, d_in) as the variant takes it
    torch_module: Any = None


def select_variants(names: Optional[Iterable[str]]) -> list[registry.Variant]:
    """Registry variants by case-insensitive name (all when ``names`` is empty), in registry order."""
    if not names:
        return list(registry.VARIANTS)
    chosen = []
    for name in names:
        try:
            v = registry.get(name)
        except KeyError as err:
            raise BadInputError(str(err.args[0])) from None
        if v not in chosen:
            chosen.append(v)
    return chosen


def _float32_state_dict(sd: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """Canonical keys, float32 values: the weights as every backend receives them."""
    out = {}
    for key, value in sd.items():
        array = port.to_numpy(value)
        if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating) or str(array.dtype) == "bfloat16"):
            if key.split(".")[-1] == "mask":  # the causal buffer may be saved as bool/int
                array = array.astype(np.float32)
            else:
                raise BadInputError(f"{source}: weight {key!r} has dtype {array.dtype}; expected a floating dtype")
        array = np.ascontiguousarray(array.astype(np.float32))
        if not np.isfinite(array).all():
            # Every backend would agree on NaN outputs; agreement on garbage is not a pass.
            raise BadInputError(f"{source}: weight {key!r} has NaN or infinite values (or overflows float32)")
        out[pm.canonical_key(str(key))] = array
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fits(variant: registry.Variant, sd: Mapping[str, Any]) -> Optional[str]:
    """``None`` when ``sd`` fits ``variant`` at the config its shapes imply, else the port error."""
    cfg = AttnConfig(**{**AttnConfig().to_dict(), **dict(variant.defaults), **port.infer_config(variant, sd)})
    if "context_length" in variant.fields and "context_length" not in port.infer_config(variant, sd):
        cfg = cfg.replace(context_length=1)  # no mask buffer to check
    if variant.name == "MultiHeadAttentionWrapper":
        cfg = cfg.replace(num_heads=port.infer_config(variant, sd).get("num_heads", 1))
    try:
        port.check_state_dict(variant.portmap(cfg), sd, variant.name)
    except BadInputError as err:
        return str(err)
    return None


def match_variants(sd: Mapping[str, Any], candidates: Sequence[registry.Variant]) -> list[registry.Variant]:
    """The variants among ``candidates`` whose keys and shapes ``sd`` fits.

    Raises :class:`BadInputError` with the port error of the closest candidate when none fits.
    """
    errors = {v.name: _fits(v, sd) for v in candidates if v.portmap(AttnConfig()).entries}
    fitting = [v for v in candidates if errors.get(v.name, "no params") is None]
    if fitting:
        return fitting
    if not errors:
        raise BadInputError("weights were given but no selected variant has parameters")
    closest = min(errors, key=lambda n: errors[n].count("\n"))
    raise PortError(f"the weights fit no variant; closest: {errors[closest]}")


def resolve_config(
    variant: registry.Variant,
    overrides: Mapping[str, Any],
    inferred: Mapping[str, Any],
    tokens: int,
    d_in: int,
) -> AttnConfig:
    """The config ``variant`` runs with: seed defaults < what the weights pin down < explicit flags.

    An explicit flag that contradicts the weights is an error naming both values; so is
    an input whose ``d_in`` or token count the weights cannot take.
    """
    relevant = set(variant.fields)
    inferred = {k: v for k, v in inferred.items() if k in relevant}
    for key, value in inferred.items():
        if key in overrides and overrides[key] != value:
            raise BadInputError(
                f"{variant.name}: {_flag(key)} {_show(overrides[key])} contradicts the weights, "
                f"whose shapes give {key}={_show(value)}"
            )
    if "d_in" in inferred and inferred["d_in"] != d_in:
        raise BadInputError(
            f"{variant.name}: the input's last dimension is {d_in} but the weights take d_in={inferred['d_in']}"
        )
    if "d_in" in overrides and overrides["d_in"] != d_in:
        raise BadInputError(f"{variant.name}: --d-in {overrides['d_in']} but the input's last dimension is {d_in}")
    values = {**AttnConfig().to_dict(), **dict(variant.defaults), "d_in": d_in}
    if "context_length" not in inferred:
        values["context_length"] = tokens  # nothing pins it: the input's own length
    values.update(inferred)
    values.update({k: v for k, v in overrides.items() if k in AttnConfig.__dataclass_fields__})
    cfg = AttnConfig(**values)
    _check_config(variant, cfg, tokens, from_weights="context_length" in inferred)
    return cfg


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_config(variant: registry.Variant, cfg: AttnConfig, tokens: int, from_weights: bool) -> None:
    rc = variant.resolve(cfg)
    name = variant.name
    for key in ("d_in", "d_out", "num_heads", "context_length"):
        if key in variant.fields and getattr(rc, key) < 1:
            raise BadInputError(f"{name}: {key} must be >= 1, got {getattr(rc, key)}")
    if not 0.0 <= rc.dropout < 1.0:
        raise BadInputError(f"{name}: dropout must be in [0, 1), got {rc.dropout}")
    if name in ("MultiHeadAttention", "MultiHeadAttentionCombinedQKV", "TorchMultiheadAttention"):
        if rc.d_out % rc.num_heads:
            what = "embed_dim (= d_in)" if name == "TorchMultiheadAttention" else "d_out"
            raise BadInputError(f"{name}: {what}={rc.d_out} must be divisible by num_heads={rc.num_heads}")
    if "context_length" in variant.fields and tokens > rc.context_length:
        source = "the weights' mask buffer" if from_weights else "--context-length"
        raise BadInputError(f"{name}: input has tokens={tokens}, beyond context_length={rc.context_length} ({source})")


def _torch_reference_module(case_variant: registry.Variant, cfg: AttnConfig, weights: Optional[dict]):
    import torch

    torch.manual_seed(TORCH_SEED)
    module = case_variant.torch_module(cfg).eval()
    if weights is not None:
        sd = module.state_dict()
        for key, value in weights.items():
            if key in sd:  # THE weights; buffers the file lacks keep the module's own (validated equal)
                sd[key] = torch.from_numpy(np.array(value, dtype=np.float32))
        module.load_state_dict(sd, strict=True)
    return module


def build_cases(
    variants: Optional[Iterable[str]] = None,
    *,
    weights: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
    inputs: Union[None, str, os.PathLike, np.ndarray, inp.RandomInputs] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> tuple[list[Case], inp.Inputs, str]:
    """``(cases, inputs, weights description)``: everything validated before anything runs."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise BadInputError(f"unknown config overrides {unknown}; known: {', '.join(OVERRIDABLE)}")
    chosen = select_variants(variants)
    sd = None
    weights_desc = f"torch.manual_seed({TORCH_SEED}) + the torch reference modules' own init"
    if weights is not None:
        if isinstance(weights, Mapping):
            raw, weights_desc = dict(weights), "state dict (in memory)"
        else:
            raw, weights_desc = port.load_file(weights), os.fspath(weights)
        sd = _float32_state_dict(raw, weights_desc)
        if variants:
            for v in chosen:  # every named variant must take the weights
                err = _fits(v, sd) if v.portmap(AttnConfig()).entries else f"{v.name} has no parameters to load"
                if err:
                    raise BadInputError(err)
        else:
            chosen = match_variants(sd, chosen)
    inferred = {v.name: (port.infer_config(v, sd) if sd is not None else {}) for v in chosen}
    weight_d_in = {i["d_in"] for i in inferred.values() if "d_in" in i}
    d_in_hint = overrides.get("d_in") or (weight_d_in.pop() if len(weight_d_in) == 1 else None)
    data = inp.resolve_inputs(inputs, d_in_hint)
    tokens, d_in = data.array.shape[-2], data.array.shape[-1]
    cases = []
    for v in chosen:
        cfg = resolve_config(v, overrides, inferred[v.name], tokens, d_in)
        module = _torch_reference_module(v, cfg, sd)
        state = sd if sd is not None else {k: t.detach().numpy().copy() for k, t in module.state_dict().items()}
        if sd is not None:
            port.check_state_dict(v.portmap(cfg), state, v.name)  # the mask buffer against the final config
        cases.append(Case(v, cfg, state, inp.for_variant(v, data.array), module))
    return cases, data, weights_desc


# --- backends ------------------------------------------------------------------------------------


def torch_outputs(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 output, float64 output)`` of the torch reference on ``case``."""
    import copy

    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.array(case.x, dtype=np.float32))
        out32 = case.variant.torch_forward(case.torch_module, x, case.config).numpy()
        m64 = copy.deepcopy(case.torch_module).double()
        out64 = case.variant.torch_forward(m64, x.double(), case.config).numpy()
    return out32, out64


def _jax_dtype(dtype: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]


def flax_output(case: Case, dtype: str = "float32") -> np.ndarray:
    """The jitted jaxattn module on ``case`` with float32 parameters, computing in ``dtype``."""
    import inspect

    import jax
    import jax.numpy as jnp

    jdtype = _jax_dtype(dtype)
    module = case.variant.flax_module(case.config)
    if hasattr(module, "dtype"):
        module = module.clone(dtype=jdtype)
    variables = port.port_variables(case.variant, case.config, case.state_dict)
    variables = jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.float32), variables)
    kwargs = {"deterministic": True} if "deterministic" in inspect.signature(type(module).__call__).parameters else {}
    apply = jax.jit(lambda v, x: module.apply(v, x, **kwargs))
    out = apply(variables, jnp.asarray(case.x, dtype=jdtype))
    return np.asarray(jax.device_get(out))


def _ttnn_runtime_module():
    try:
        from crosscheck.tt import runtime as rt
    except ImportError as err:
        raise BadInputError(
            f"the ttnn backend is unavailable: crosscheck.tt.runtime cannot be imported ({err}); "
            "choose --backends torch,flax or --ttnn-python PATH"
        ) from None
    return rt


def ttnn_outputs_in_process(cases: Sequence[Case], runtime: str, progress: Callable[[str], None]):
    """``({variant: output}, runtime info, versions, seconds per variant)`` in this interpreter."""
    rt = _ttnn_runtime_module()
    outputs, seconds = {}, {}
    with rt.open_runtime(runtime) as opened:
        info = {"name": opened.name, "description": opened.description, "python": None}
        for case in cases:
            t0 = time.perf_counter()
            outputs[case.variant.name] = np.asarray(rt.run_variant(opened, case.variant, case.config, case.state_dict, case.x))
            seconds[case.variant.name] = time.perf_counter() - t0
            progress(f"ttnn {case.variant.name}")
    return outputs, info, dict(rt.ttnn_versions()), seconds


def _check_ttnn_available(runtime: str, python: Optional[str]) -> None:
    """Fail before the slow part when the ttnn backend cannot run as asked."""
    if python is not None:
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise BadInputError(f"--ttnn-python: python interpreter not found or not executable: {python}")
        return
    rt = _ttnn_runtime_module()
    if runtime == "device":
        ok, reason = rt.detect_device()
        if not ok:
            raise BadInputError(f"ttnn runtime 'device' is not available: {reason}")


def bundle_cases(cases: Sequence[Case]):
    from crosscheck.bundle import BundleCase

    return [BundleCase(c.variant.name, c.config, dict(c.state_dict), np.asarray(c.x, dtype=np.float32)) for c in cases]


def ttnn_outputs_elsewhere(cases: Sequence[Case], runtime: str, python: str):
    """The same, through a bundle run by ``python`` (B's worker), e.g. the 3.12 venv with real ttnn."""
    from crosscheck.bundle import write_bundle
    from crosscheck.tt.worker import run_in_interpreter

    with tempfile.TemporaryDirectory(prefix="crosscheck-") as tmp:
        bundle, out = os.path.join(tmp, "bundle.safetensors"), os.path.join(tmp, "outputs.safetensors")
        write_bundle(bundle, bundle_cases(cases), meta={"purpose": "ttnn backend"})
        t0 = time.perf_counter()
        outputs, meta = run_in_interpreter(python, bundle, out, backend="ttnn", runtime=runtime)
        elapsed = time.perf_counter() - t0
    info = {"name": meta.get("runtime"), "description": meta.get("runtime_description"), "python": meta.get("python", python)}
    return outputs, info, dict(meta.get("versions", {})), {c.variant.name: elapsed / len(cases) for c in cases}


# --- versions ------------------------------------------------------------------------------------


def versions(ttnn: Optional[dict] = None) -> dict:
    out: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "jax", "flax"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if ttnn is None:
        try:
            ttnn = dict(_ttnn_runtime_module().ttnn_versions())
        except BadInputError as err:
            ttnn = {"ttnn": None, "ttnn_reason": str(err)}
        except Exception as err:  # a broken ttnn install must not hide the report
            ttnn = {"ttnn": None, "ttnn_reason": f"{type(err).__name__}: {err}"}
    out["ttnn"] = ttnn.get("ttnn")
    out["ttnn_reason"] = ttnn.get("ttnn_reason")
    return out


# --- run -----------------------------------------------------------------------------------------


def _result(variant: str, backend: str, runtime: str, dtype: str, reference: str, out, ref, tol, seconds=None) -> Result:
    c = cmp.compare(out, ref, tol, computed_in=dtype)
    m = c.metrics
    return Result(
        variant=variant, backend=backend, runtime=runtime, dtype=dtype, reference=reference,
        shape=list(c.shape), reference_shape=list(c.reference_shape),
        max_abs_err=m.max_abs_err if m else None, max_rel_err=m.max_rel_err if m else None,
        pcc=m.pcc if m else None, ulp=m.ulp if m else None,
        passed=c.passed, thresholds=tol.to_dict(), failures=list(c.failures), seconds=seconds,
    )


def _check_choices(backends: Sequence[str], dtype: str, ttnn_runtime: str) -> tuple[str, ...]:
    backends = tuple(dict.fromkeys(b.strip().lower() for b in backends if b.strip()))
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise BadInputError(f"unknown backend(s) {bad or '(none)'}; choose from {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if ttnn_runtime not in TTNN_RUNTIMES:
        raise BadInputError(f"ttnn runtime must be one of {', '.join(TTNN_RUNTIMES)}; got {ttnn_runtime!r}")
    return tuple(b for b in BACKENDS if b in backends)


def run(
    variants: Optional[Iterable[str]] = None,
    *,
    weights: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
    inputs: Union[None, str, os.PathLike, np.ndarray, inp.RandomInputs] = None,
    d_in: Optional[int] = None,
    d_out: Optional[int] = None,
    context_length: Optional[int] = None,
    dropout: Optional[float] = None,
    num_heads: Optional[int] = None,
    qkv_bias: Optional[bool] = None,
    causal: Optional[bool] = None,
    backends: Sequence[str] = BACKENDS,
    ttnn_runtime: str = "auto",
    ttnn_python: Optional[str] = None,
    dtype: str = "float32",
    progress: Optional[Progress] = None,
) -> Report:
    """Run the cross-check and return its :class:`Report` (never raises on a mismatch).

    ``variants``: jaxattn class names (case-insensitive); all when ``None``. With
    ``weights`` and no ``variants``, the variants whose keys and shapes the state dict
    fits. ``inputs``: ``None`` (the seed sentence), a path, an array or
    :class:`crosscheck.inputs.RandomInputs`. ``dtype`` is what Flax computes in; torch
    is always the float32 reference and ttnn computes in bfloat16.
    """
    t_start = time.perf_counter()
    backends = _check_choices(backends, dtype, ttnn_runtime)
    if "ttnn" in backends:
        _check_ttnn_available(ttnn_runtime, ttnn_python)
    overrides = dict(d_in=d_in, d_out=d_out, context_length=context_length, dropout=dropout,
                     num_heads=num_heads, qkv_bias=qkv_bias, causal=causal)
    cases, data, weights_desc = build_cases(variants, weights=weights, inputs=inputs, overrides=overrides)
    total = len(cases) * len(backends)
    done = 0

    def step(description: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, description)

    by_variant: dict[str, list[Result]] = {c.variant.name: [] for c in cases}
    refs: dict[str, np.ndarray] = {}
    for case in cases:
        name = case.variant.name
        t0 = time.perf_counter()
        out32, out64 = torch_outputs(case)
        refs[name] = out32
        if "torch" in backends:
            tol = cmp.policy_for("torch", "float32")
            by_variant[name].append(
                _result(name, "torch", "cpu", "float32", "torch float64", out32, out64, tol, time.perf_counter() - t0)
            )
            step(f"torch {name}")
        if "flax" in backends:
            t0 = time.perf_counter()
            out = flax_output(case, dtype)
            tol = cmp.policy_for("flax", dtype)
            by_variant[name].append(
                _result(name, "flax", "cpu", dtype, "torch float32", out, out32, tol, time.perf_counter() - t0)
            )
            step(f"flax {name}")
    ttnn_info, ttnn_versions = None, None
    if "ttnn" in backends:
        if ttnn_python is None:
            outs, ttnn_info, ttnn_versions, secs = ttnn_outputs_in_process(cases, ttnn_runtime, step)
        else:
            outs, ttnn_info, ttnn_versions, secs = ttnn_outputs_elsewhere(cases, ttnn_runtime, ttnn_python)
            for case in cases:
                step(f"ttnn {case.variant.name}")
        for case in cases:
            name = case.variant.name
            tol = cmp.policy_for("ttnn", "bfloat16", name)
            if name not in outs:
                raise BadInputError(f"the ttnn backend returned no output for {name}")
            by_variant[name].append(
                _result(name, "ttnn", ttnn_info["name"], "bfloat16", "torch float32", outs[name], refs[name], tol, secs.get(name))
            )
    results = [r for c in cases for r in by_variant[c.variant.name]]
    return Report(
        results=results,
        configs={c.variant.name: c.variant.resolve(c.config).to_dict() for c in cases},
        input={**data.describe(), "per_variant_shape": {c.variant.name: list(c.x.shape) for c in cases}},
        weights=weights_desc,
        versions=versions(ttnn_versions),
        ttnn_runtime=ttnn_info,
        backends=backends,
        seconds=time.perf_counter() - t_start,
    )


# --- bundles: export here, run elsewhere, compare here --------------------------------------------


def export_bundle(out: Union[str, os.PathLike], variants=None, *, weights=None, inputs=None, **overrides) -> list[Case]:
    """Write the cases :func:`run` would run to a bundle file for another interpreter."""
    from crosscheck.bundle import write_bundle

    cases, data, weights_desc = build_cases(variants, weights=weights, inputs=inputs, overrides=overrides)
    write_bundle(out, bundle_cases(cases), meta={"input": data.describe(), "weights": weights_desc})
    return cases


_BUNDLE_DTYPE = {"ttnn": "bfloat16", "flax": "float32"}


def compare_outputs(bundle_path, outputs_paths: Sequence[Union[str, os.PathLike]]) -> Report:
    """Compare outputs files (from ``bundle run`` / the worker) with the torch reference of the bundle."""
    from crosscheck.bundle import read_bundle, read_bundle_meta, read_outputs

    t_start = time.perf_counter()
    bcases = read_bundle(bundle_path)
    bmeta = read_bundle_meta(bundle_path)
    cases = []
    for bc in bcases:
        v = select_variants([bc.variant])[0]
        sd = _float32_state_dict(bc.state_dict, f"{bundle_path}: {bc.variant}")
        port.check_state_dict(v.portmap(bc.config), sd, v.name)
        x = inp.validate_array(np.asarray(bc.inputs), f"{bundle_path}: {bc.variant}/inputs")
        _check_config(v, bc.config, x.shape[-2], from_weights=False)
        cases.append(Case(v, bc.config, sd, x, _torch_reference_module(v, bc.config, sd)))
    refs = {c.variant.name: torch_outputs(c)[0] for c in cases}
    results, ttnn_info, ttnn_versions, backends = [], None, None, []
    for path in outputs_paths:
        outs, meta = read_outputs(path)
        backend = meta.get("backend")
        if backend not in _BUNDLE_DTYPE:
            raise BadInputError(f"{path}: outputs of unknown backend {backend!r}; expected ttnn or flax")
        backends.append(backend)
        if backend == "ttnn":
            ttnn_info = {"name": meta.get("runtime"), "description": meta.get("runtime_description"),
                         "python": meta.get("python")}
            ttnn_versions = meta.get("versions", {})
        missing = [c.variant.name for c in cases if c.variant.name not in outs]
        if missing:
            raise BadInputError(f"{path}: no output for {', '.join(missing)} (the bundle has them)")
        dtype = _BUNDLE_DTYPE[backend]
        runtime = meta.get("runtime") if backend == "ttnn" else "cpu"
        for c in cases:
            name = c.variant.name
            tol = cmp.policy_for(backend, dtype, name)
            result = _result(name, backend, str(runtime), dtype, "torch float32", outs[name], refs[name], tol)
            result.source = os.fspath(path)
            results.append(result)
    order = {c.variant.name: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: order[r.variant])
    return Report(
        results=results,
        configs={c.variant.name: c.variant.resolve(c.config).to_dict() for c in cases},
        input={"source": f"bundle {os.fspath(bundle_path)}", **({"bundle_input": bmeta["input"]} if "input" in bmeta else {}),
               "per_variant_shape": {c.variant.name: list(c.x.shape) for c in cases}},
        weights=str(bmeta.get("weights", f"bundle {os.fspath(bundle_path)}")),
        versions=versions(ttnn_versions or {"ttnn": None, "ttnn_reason": "no ttnn outputs compared"}),
        ttnn_runtime=ttnn_info,
        backends=tuple(dict.fromkeys(backends)),
        seconds=time.perf_counter() - t_start,
    )
