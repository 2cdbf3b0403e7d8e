"""Test glue for the derived error bounds of :mod:`jaxattn.tolerance`: one copy for the whole suite.

Two float32 computations of the same layer that sum in different orders (Flax and torch, jitted and eager,
a KV cache and the full forward, sharded and one device) are compared against a bound derived from the
computation, never a constant picked on one CPU:

* :func:`layer_bound` / :func:`layer_error`: the first-order bound of
  :func:`jaxattn.tolerance.projected_attention_bound`, its kernels read from a module's Flax params (the
  book's layouts: ``W_query``/``W_key``/``W_value`` with or without ``out_proj``, ``qkv`` + ``proj``,
  ``in_proj`` + ``out_proj``, the wrapper's ``heads_i``, raw V1 matrices, no params at all);
  :func:`torch_layer_bound` the same for the torch modules (the book's classes, ``nn.MultiheadAttention``)
  and :func:`case_layer` for crosscheck's cases;
* :func:`layer64` and :func:`layer_grads64`: the same layer in float64 (numpy, or JAX under :func:`x64` for
  gradients), written here from the book's formulas, independent of jaxattn's code, for
  :func:`jaxattn.tolerance.reference_bound` where a first-order analysis is impractical (RoPE and QK-norm
  stacks, gradients through a module);
* :func:`check_layer`: one assertion for two float32 computations of a layer, by whichever of the two
  routes applies; :func:`check_within` prints the measured difference and the bound;
* small pieces: :func:`one_head` (the book's ``(*batch, T, d)`` as ``(B, T, 1, d)``), :func:`weights_error`
  (softmax weights), :func:`trig_error` / :func:`rope_error` (cos, sin, RoPE), :func:`x64` (float64 in JAX
  on 0.10, ``jax.enable_x64``, and on 0.7, ``jax.experimental.enable_x64``).

Everything runs on the test's small arrays on the host: no JAX program is compiled for a bound, except
the float64 gradient program of :func:`layer_grads64` (one per call).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from jaxattn import tolerance


@contextlib.contextmanager
def x64():
    """JAX with float64 enabled inside the block: ``jax.enable_x64`` (0.10), ``jax.experimental.enable_x64`` (0.7)."""
    import jax

    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(True):
            yield
    else:  # JAX 0.7
        from jax.experimental import enable_x64

        with enable_x64():
            yield


def max_abs(a, b) -> float:
    """``max |a - b|`` in float64 (0 for empty arrays)."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0.0))


# --- the book's layouts, read from Flax params ------------------------------------------------------


@dataclass
class Layout:
    """One attention layer as plain matrices: ``x @ w_query + b_query`` ... ``context @ w_out + b_out``.

    ``rope``: ``(theta, freq_config)`` when queries and keys are rotated (GroupedQueryAttention);
    ``q_norm``/``k_norm``: RMS norm scales per head when they are normalised first (Qwen3).
    """

    w_query: np.ndarray
    w_key: np.ndarray
    w_value: np.ndarray
    b_query: np.ndarray | None
    b_key: np.ndarray | None
    b_value: np.ndarray | None
    w_out: np.ndarray | None
    b_out: np.ndarray | None
    num_heads: int
    head_dim: int
    scale: float
    causal: bool
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    rope: tuple | None = None
    identity: bool = False  # SimplifiedSelfAttention: q = k = v = x, no projection

    @property
    def first_order(self) -> bool:
        """Whether :func:`jaxattn.tolerance.projected_attention_bound` covers the layer (no RoPE, no norm)."""
        return self.rope is None and self.q_norm is None


# The readers keep the leaves as they are (numpy, JAX arrays, or tracers when layer_grads64 differentiates).


def _leaf(tree, name):
    node = tree[name]
    return node["kernel"] if isinstance(node, dict) else node


def _bias(tree, name):
    node = tree.get(name)
    return None if not isinstance(node, dict) or "bias" not in node else node["bias"]


def _split3(tree, name):
    """A fused ``(d_in, 3 d)`` projection's kernel and bias as ``[(kernel, bias)] * 3`` (q, k, v columns)."""
    kernel, bias = tree[name]["kernel"], _bias(tree, name)
    d = kernel.shape[1] // 3
    return [(kernel[:, i * d : (i + 1) * d], None if bias is None else bias[i * d : (i + 1) * d]) for i in range(3)]


def layouts(module, params) -> list[Layout]:
    """The layer(s) a jaxattn module (Linen or NNX: read by class name and fields) computes with ``params``.

    One :class:`Layout`, or one per head for ``MultiHeadAttentionWrapper`` (its outputs are concatenated).
    """
    name = type(module).__name__
    params = {} if params is None else dict(params)
    if name == "MultiHeadAttentionWrapper":
        return [layouts_one("CausalAttention", module, params[f"heads_{i}"]) for i in range(module.num_heads)]
    return [layouts_one(name, module, params)]


_LAYOUTS = {
    "SimplifiedSelfAttention", "SelfAttentionV1", "SelfAttentionV2", "CausalAttention", "MultiHeadAttention",
    "MultiHeadAttentionCombinedQKV", "TorchMultiheadAttention", "GroupedQueryAttention",
}


def layouts_one(name, module, params) -> Layout:
    """The :class:`Layout` of one jaxattn class ``name`` (``module`` gives its fields: heads, causality, RoPE)."""
    if name not in _LAYOUTS:
        raise ValueError(f"tests/bounds.py does not know the layout of {name}")
    if name == "SimplifiedSelfAttention":
        return Layout(None, None, None, None, None, None, None, None, 1, 0, 1.0, False, identity=True)
    if name in ("MultiHeadAttentionCombinedQKV", "TorchMultiheadAttention"):
        (wq, bq), (wk, bk), (wv, bv) = _split3(params, "qkv" if "qkv" in params else "in_proj")
        out = "proj" if "proj" in params else "out_proj"
        heads = module.num_heads
        d = wq.shape[1] // heads
        causal = True if name == "MultiHeadAttentionCombinedQKV" else bool(module.causal)
        return Layout(wq, wk, wv, bq, bk, bv, _leaf(params, out), _bias(params, out), heads, d, d**-0.5, causal)
    wq, wk, wv = (_leaf(params, n) for n in ("W_query", "W_key", "W_value"))
    bq, bk, bv = (_bias(params, n) for n in ("W_query", "W_key", "W_value"))
    w_out = _leaf(params, "out_proj") if "out_proj" in params else None
    b_out = _bias(params, "out_proj")
    if name == "GroupedQueryAttention":
        d = module.resolved_head_dim
        norm = (params["q_norm"]["scale"], params["k_norm"]["scale"]) if module.qk_norm else (None, None)
        freq = None if module.freq_config is None else dict(module.freq_config)
        return Layout(wq, wk, wv, bq, bk, bv, w_out, b_out, module.num_heads, d, d**-0.5, True, *norm,
                      rope=(float(module.rope_theta), freq))
    heads = getattr(module, "num_heads", 1) if name == "MultiHeadAttention" else 1
    d = wq.shape[1] // heads
    causal = name in ("MultiHeadAttention", "CausalAttention")
    return Layout(wq, wk, wv, bq, bk, bv, w_out, b_out, heads, d, d**-0.5, causal)


def _tokens(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[None] if x.ndim == 2 else x


def layer_error(module, params, x, **kwargs) -> float:
    """Bound on ``max |out - exact|`` for one float32 computation of ``module.apply({"params": params}, x)``.

    :func:`jaxattn.tolerance.projected_attention_error` with the module's kernels (causal where the module
    is; ``kwargs`` pass on, e.g. ``mask``). For RoPE or QK-norm layers (GroupedQueryAttention) there is no
    first-order bound here: compare against :func:`layer64` with :func:`jaxattn.tolerance.reference_bound`.
    """
    x = _tokens(x)
    errors = []
    for lay in layouts(module, params):
        if not lay.first_order:
            raise ValueError(f"{type(module).__name__} rotates or normalises q, k: use layer64 and reference_bound")
        # The layer's own masking (causal or none at all; mask=True: every key): the exact weights, a tighter bound.
        where = {"is_causal": lay.causal, "mask": None if lay.causal else True, **kwargs}
        if lay.identity:
            h = x[:, :, None, :]
            errors.append(tolerance.attention_error(h, h, h, scale=1.0, **where))
            continue
        errors.append(
            tolerance.projected_attention_error(
                x, lay.w_query, lay.w_key, lay.w_value, lay.w_out, num_heads=lay.num_heads, b_query=lay.b_query,
                b_key=lay.b_key, b_value=lay.b_value, b_out=lay.b_out, scale=lay.scale, **where,
            )
        )
    return max(errors)


def layer_bound(module, params, x, **kwargs) -> float:
    """Bound on ``max |a - b|`` for two float32 computations of the layer: twice :func:`layer_error`."""
    return 2 * layer_error(module, params, x, **kwargs)


def chain_length(module, params, x) -> int:
    """Terms on the longest chain of dependent sums of the layer on ``x``: ``d_in`` (projection), the head
    dim (scores, and an RMS norm's mean), ``2 T`` (the softmax's sum and the weighted sum), ``d_out``
    (``out_proj``): the ``reduction_length`` of :func:`jaxattn.tolerance.reference_bound`."""
    x = _tokens(x)
    lay = layouts(module, params)[0]
    d_in, tokens = x.shape[-1], x.shape[1]
    if lay.identity:
        return 2 * d_in + 2 * tokens
    out = 0 if lay.w_out is None else lay.w_out.shape[0]
    norm = 0 if lay.q_norm is None else lay.head_dim
    return d_in + lay.head_dim + norm + 2 * tokens + out


# --- the same layer in float64 -----------------------------------------------------------------------


def inverse_frequencies32(head_dim: int, theta: float, freq_config=None) -> np.ndarray:
    """The book's RoPE frequencies (``compute_rope_params``), float32 as the book computes them: with the
    positions (float32 too) they fix the angles every implementation rotates by, so the float64 reference
    starts from the same float32 angles and takes their cos and sin in float64."""
    import jax
    import jax.numpy as jnp

    f32 = np.float32
    exponents = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    # float32 pow as torch (and XLA) round it; numpy's powf is another function, an ulp off for some entries.
    with jax.ensure_compile_time_eval():  # on the host, also while a float64 gradient program is traced
        inv_freq = f32(1.0) / np.asarray(jnp.float32(theta) ** jnp.asarray(exponents))
    if freq_config is None:
        return inv_freq
    factor, low, high = (f32(freq_config[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    original = f32(freq_config["original_context_length"])
    wavelen = f32(2 * math.pi) * (f32(1.0) / inv_freq)
    scaled = inv_freq / factor
    llama = np.where(wavelen > original / low, scaled, inv_freq)
    smooth = (original * (f32(1.0) / wavelen) - low) / (high - low)
    smoothed = (f32(1.0) - smooth) * scaled + smooth * inv_freq
    medium = (wavelen <= original / low) & (wavelen >= original / high)
    return np.where(medium, smoothed, llama).astype(f32)


def rms_norm64(a, scale, xp=np, eps=1e-6):
    """The book's RMSNorm (``eps=1e-6``, no shift) over the last axis, in ``a``'s (float64) precision."""
    return a / xp.sqrt(xp.mean(a * a, axis=-1, keepdims=True) + eps) * scale


def rope64(a, positions, theta, freq_config=None, *, xp=np):
    """The book's RoPE (split halves) of ``a (B, T, heads, head_dim)`` at ``positions (T,)``: the float32
    angles every implementation rotates by (:func:`inverse_frequencies32`), their cos and sin in float64."""
    head_dim = a.shape[-1]
    inv = inverse_frequencies32(head_dim, theta, freq_config)
    angles = np.asarray(positions, np.float32)[:, None] * inv[None, :]  # float32, as every implementation
    angles = np.concatenate([angles, angles], axis=1).astype(np.float64)[None, :, None, :]
    cos, sin = xp.asarray(np.cos(angles)), xp.asarray(np.sin(angles))
    half = head_dim // 2
    return a * cos + xp.concatenate([-a[..., half:], a[..., :half]], axis=-1) * sin


def _one_layer64(lay: Layout, x, real, xp):
    """``lay`` on ``x (B, T, d_in)`` in float64 with the namespace ``xp`` (numpy, or jax.numpy under x64).

    ``real (B, T)``: real tokens (padding keys hidden, a query that sees none gets a zero context).
    """
    names = ("w_query", "w_key", "w_value", "b_query", "b_key", "b_value", "w_out", "b_out", "q_norm", "k_norm")
    p = {n: None if getattr(lay, n) is None else xp.asarray(getattr(lay, n), dtype=xp.float64) for n in names}
    b, tokens, _ = x.shape

    def project(name):
        y = x @ p[f"w_{name}"]
        return y if p[f"b_{name}"] is None else y + p[f"b_{name}"]

    if lay.identity:
        q = k = v = x[:, :, None, :]
    else:
        q, k, v = (project(n) for n in ("query", "key", "value"))
        q, k, v = (a.reshape(b, tokens, a.shape[-1] // lay.head_dim, lay.head_dim) for a in (q, k, v))
    if p.get("q_norm") is not None:
        q, k = rms_norm64(q, p["q_norm"], xp), rms_norm64(k, p["k_norm"], xp)
    if lay.rope is not None:
        q, k = (rope64(a, np.arange(tokens), *lay.rope, xp=xp) for a in (q, k))
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = (xp.repeat(a, group, axis=2) for a in (k, v))
    scores = xp.einsum("bthd,bshd->bhts", q, k) * lay.scale
    visible = np.ones((b, 1, tokens, tokens), bool)
    if lay.causal:
        visible = visible & np.tril(np.ones((tokens, tokens), bool))
    if real is not None:
        visible = visible & np.asarray(real, bool)[:, None, None, :]
    scores = xp.where(visible, scores, -np.inf)
    top = xp.max(scores, axis=-1, keepdims=True, initial=-np.inf)
    top = xp.where(xp.isfinite(top), top, 0.0)  # a row that sees no key: any finite shift
    e = xp.where(visible, xp.exp(scores - top), 0.0)
    total = xp.sum(e, axis=-1, keepdims=True)
    weights = e / xp.where(total > 0, total, 1.0)
    context = xp.einsum("bhts,bshd->bthd", weights, v)
    context = context.reshape(b, tokens, context.shape[2] * context.shape[3])
    if p["w_out"] is None:
        return context
    out = context @ p["w_out"]
    return out if p["b_out"] is None else out + p["b_out"]


def layer64(module, params, x, *, attention_mask=None) -> np.ndarray:
    """``module.apply({"params": params}, x, attention_mask=...)`` in float64 numpy, from the book's formulas."""
    squeeze = np.ndim(x) == 2
    x = _tokens(x)
    real = None if attention_mask is None else np.asarray(attention_mask, bool).reshape(x.shape[:2])
    out = np.concatenate([_one_layer64(lay, x, real, np) for lay in layouts(module, params)], axis=-1)
    return out[0] if squeeze else out


def layer_grads64(module, params, x, cotangent) -> tuple[dict, np.ndarray]:
    """The float64 gradients of ``sum(module(x) * cotangent)``: ``(params tree, d x)``, numpy float64, the
    tree shaped as ``params`` (every layout of :func:`layouts`). One JAX program, jitted, under :func:`x64`."""
    import jax
    import jax.numpy as jnp

    squeeze = np.ndim(x) == 2
    with x64():
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), {} if params is None else dict(params))
        cot = jnp.asarray(_tokens(cotangent))

        def loss(p, x):
            out = jnp.concatenate([_one_layer64(lay, x, None, jnp) for lay in layouts(module, p)], axis=-1)
            return jnp.sum(out * cot)

        d_params, d_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(p64, jnp.asarray(_tokens(x)))
        d_x = np.asarray(d_x)
        return jax.tree.map(np.asarray, d_params), d_x[0] if squeeze else d_x


# --- core-level helpers ---------------------------------------------------------------------------


def one_head(a) -> np.ndarray:
    """``(*batch, T, d)`` (the book's layout, one head) as ``(B, T, 1, d)``, the layout of
    :func:`jaxattn.tolerance.attention_bound`."""
    a = np.asarray(a, np.float64)
    return a.reshape((-1, *a.shape[-2:]))[:, :, None, :]


def check_within(got, want, bound: float, what: str = "") -> float:
    """Assert ``max |got - want| <= bound``; the message gives both numbers. Returns the difference."""
    err = max_abs(got, want)
    assert err <= bound, f"{what}: max |diff| {err:.3g} > derived bound {bound:.3g}"
    return err


def case_layer(case) -> tuple[object, dict]:
    """``(Flax module, params)`` of a crosscheck ``Case`` or bundle ``BundleCase``: its canonical torch state dict
    ported as crosscheck ports it."""
    from crosscheck.porting import port
    from crosscheck.variants import registry

    variant = registry.get(case.variant) if isinstance(case.variant, str) else case.variant
    module = variant.flax_module(case.config)
    return module, port.port_variables(variant, case.config, case.state_dict).get("params", {})


def check_layer(module, params, x, got, want, what: str = "", *, attention_mask=None, reference=False) -> float:
    """Assert that ``got`` and ``want``, two float32 computations of ``module`` on ``x`` (with ``params``), agree
    within the derived bound; returns the bound.

    First-order layouts: ``max |got - want| <=`` :func:`layer_bound`. RoPE or QK-norm layouts: ``want`` is the
    float32 reference, :func:`layer64` the exact value, and ``max |got - exact| <=``
    :func:`jaxattn.tolerance.reference_bound` (``want``'s own error, times 4). ``attention_mask (B, T)``:
    real tokens; a row with no visible key is compared too (a zero context in both). ``reference=True``: the
    float64 route for a first-order layout too, where the first-order bound does not apply (inputs so large
    that a score's rounding is not small: softmax is then a max, not a small perturbation of one).
    """
    mask = None if attention_mask is None else np.asarray(attention_mask, bool).reshape(np.shape(x)[:-1])
    if not reference and all(lay.first_order for lay in layouts(module, params)):
        where = {} if mask is None else {"mask": mask.reshape((-1, mask.shape[-1]))[:, None, None, :]}
        bound = layer_bound(module, params, x, **where)
        check_within(got, want, bound, what)
        return bound
    exact = layer64(module, params, x, attention_mask=mask)
    bound = tolerance.reference_bound(want, exact, reduction_length=chain_length(module, params, x))
    check_within(got, exact, bound, f"{what} (against float64, the float32 reference {max_abs(want, exact):.3g} off)")
    return bound


def weights_error(q, k, **kwargs) -> float:
    """Bound on ``max |w - w_exact|`` for one float32 computation of the softmax weights ``(B, N, S, T)`` of
    ``q``, ``k`` (layout of :func:`jaxattn.tolerance.attention_error`): the weights are the attention of one-hot
    values (``v = I``), so :func:`jaxattn.tolerance.attention_error` with them bounds the weights too (its
    ``gamma(T)`` of the weighted sum is slack here: a sum with one non-zero product is exact)."""
    k = np.asarray(k)
    tokens = k.shape[-3]
    eye = np.broadcast_to(np.eye(tokens)[:, None, :], (*k.shape[:-3], tokens, k.shape[-2], tokens))
    return tolerance.attention_error(q, k, eye, **kwargs)


def weights_bound(q, k, **kwargs) -> float:
    """Twice :func:`weights_error`: two float32 computations of the same weights."""
    return 2 * weights_error(q, k, **kwargs)


#: float32 ``cos``/``sin`` in XLA, torch and numpy are each within 2 ulp of the exact value of their float32
#: argument (XLA and glibc document < 1 ulp for most ranges; 2 leaves room for range reduction at 4096 rad).
TRIG_ULPS = 2


def trig_error(dtype=np.float32) -> float:
    """Bound on ``|cos(a) - fl(cos(a))|`` (and sin) for one float implementation: ``TRIG_ULPS`` ulp of a value
    of at most 1, an ulp there being at most ``2 u``."""
    return TRIG_ULPS * 2 * tolerance.unit_roundoff(dtype)


def rope_error(x) -> np.ndarray:
    """Elementwise bound on one float32 RoPE of ``x (..., head_dim)`` (split halves) against the exact rotation
    by the same float32 angles: ``x cos + rot(x) sin`` with tables off by :func:`trig_error`, two products and
    a sum rounded (``gamma(2)``)."""
    a = np.abs(np.asarray(x, np.float64))
    half = a.shape[-1] // 2
    pair = np.concatenate([a[..., half:], a[..., :half]], axis=-1)  # |rot(x)|
    return (trig_error() + tolerance.gamma(2)) * (a + pair)


# --- torch modules (the book's classes, nn.MultiheadAttention) as the same layouts ----------------------


_TORCH_NAMES = {
    "MultiheadAttention": "TorchMultiheadAttention",  # nn.MultiheadAttention and crosscheck's cached twin
}


def torch_params(module) -> tuple[str, dict, object]:
    """``(jaxattn class name, Flax-layout params, fields)`` of a torch attention module: the book's classes
    (crosscheck.references.torch_ref, crosscheck.references.torch_kv_cache, the book package's) or ``nn.MultiheadAttention``.
    Linear ``weight`` becomes ``kernel = weight.T``, as crosscheck's port does."""
    from types import SimpleNamespace

    state = {k: v.detach().cpu().double().numpy() for k, v in module.state_dict().items() if k != "mask"}
    state = {k: v for k, v in state.items() if not k.endswith(".mask")}
    params: dict = {}
    for key, value in state.items():
        *path, leaf = key.split(".")
        if path and path[0] == "heads":  # the wrapper's heads.i -> heads_i
            path = [f"heads_{path[1]}", *path[2:]]
        if not path:  # SelfAttentionV1's raw matrices, nn.MultiheadAttention's in_proj_weight / in_proj_bias
            if leaf.startswith("in_proj_"):
                params.setdefault("in_proj", {})["kernel" if leaf == "in_proj_weight" else "bias"] = (
                    value.T if leaf == "in_proj_weight" else value
                )
            else:
                params[leaf] = value
            continue
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node["kernel" if leaf == "weight" else leaf] = value.T if leaf == "weight" else value
    name = _TORCH_NAMES.get(type(module).__name__, type(module).__name__)
    heads = len([k for k in params if k.startswith("heads_")]) or getattr(module, "num_heads", 1)
    fields = SimpleNamespace(num_heads=heads, causal=getattr(module, "causal", None))
    return name, params, fields


def torch_layer_error(module, x, *, causal=None, mask=None) -> float:
    """:func:`layer_error` of a torch attention module on ``x`` (a tensor or array): ``causal`` for
    ``nn.MultiheadAttention`` (its forward takes the mask as an argument), ``mask (B, T)`` real tokens."""
    name, params, fields = torch_params(module)
    if causal is not None:
        fields.causal = causal
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, np.float64)
    where = {}
    if mask is not None:
        m = np.asarray(mask.cpu().numpy() if hasattr(mask, "cpu") else mask).astype(bool)
        where["mask"] = m.reshape((-1, m.shape[-1]))[:, None, None, :]
    named = type(name, (), dict(vars(fields)))()
    return layer_error(named, params, x, **where)


def torch_layer_bound(module, x, **kwargs) -> float:
    """Twice :func:`torch_layer_error`: two float32 computations of the torch module's layer."""
    return 2 * torch_layer_error(module, x, **kwargs)
