"""How far two float computations of the same attention may differ: a bound derived from the computation.

Two correct float32 implementations of attention (one pass against blockwise, one device against a ring of
them, a KV cache against the full forward, jitted against eager) sum in different orders, so their outputs
differ by rounding. A fixed bound such as ``1e-6`` holds on the machine where it was picked and fails on the
next one, whose XLA build vectorises (and so sums) differently. The bound here follows the standard
forward error analysis of floating-point sums and products (Higham, *Accuracy and Stability of Numerical
Algorithms*, ch. 3): a dot product of length ``n`` computed in any order is within ``gamma(n) * sum |a_i b_i|``
of the exact value, ``gamma(n) = n u / (1 - n u)`` with ``u`` the unit roundoff (``2**-24`` for float32).

Each function returns a bound on the error of *one* computation against exact arithmetic, from the actual
operands; two computations of the same quantity then differ by at most the sum of their two bounds
(:func:`attention_bound`, :func:`projected_attention_bound`, :func:`attention_grad_bound` return that sum).
The bounds are first order in ``u`` (products of two rounding errors, ``O(u**2)``, are left out) and worst
case: the observed difference is usually 10-1000x smaller, yet a wrong mask, scale or weight moves outputs
by far more than the bound. The forward bounds weigh each key's error by its exact softmax weight when the
masking is given, and take the worst key when it is not (then they hold for every mask); the gradient bound
always needs the masking. Where a first-order analysis is impractical (gradients through a whole layer,
RMS norms and RoPE before the scores, scores so large that softmax is a max), :func:`reference_bound`
derives the bound from a float64 run instead: a small multiple of the float32 reference's own error.

Shapes follow :func:`jaxattn.dot_product_attention`: ``q (B, S, N, H)``, ``k (B, T, K, H)``,
``v (B, T, K, Hv)``, with ``N`` a multiple of ``K`` (grouped kv heads). Everything is numpy in float64 on
the host: a bound costs a few host matmuls (the exact weights among them) and never runs a JAX program.
"""

from __future__ import annotations

import numpy as np

#: Rounding steps per softmax weight besides the sum over keys: the score's scaling, the bias addition,
#: the subtraction of the row max, exp (XLA's and torch's are within 2 ulp), the division (or the
#: reciprocal and the product), and up to two online-softmax rescalings per key block folded in.
SOFTMAX_OPS = 8


def unit_roundoff(dtype=np.float32) -> float:
    """``u``: half the gap between 1 and the next float of ``dtype`` (``2**-24`` for float32)."""
    return float(np.finfo(dtype).eps) / 2


def gamma(n: int, dtype=np.float32) -> float:
    """``n u / (1 - n u)``: the relative error bound of a sum or dot product of ``n`` terms, any order."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma({n}) is unbounded in {np.dtype(dtype).name}: {n} terms x u = {nu:.3g} >= 1")
    return nu / (1 - nu)


def _abs64(x) -> np.ndarray:
    return np.abs(np.asarray(x, np.float64))


def linear_error(x, kernel, bias=None, *, x_err=0.0, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude and error bound, elementwise, of ``x @ kernel + bias`` computed in ``dtype``.

    ``x (..., d_in)`` may carry an elementwise error bound ``x_err`` (broadcastable) from an earlier step.
    Returns ``(|x| @ |kernel| + |bias|, error)``, both ``(..., d_out)``: the first bounds the result's
    magnitude, the second its distance from the exact product of the exact ``x``.
    """
    ax, aw = _abs64(x), _abs64(kernel)
    magnitude = ax @ aw
    err = gamma(aw.shape[0] + 1, dtype) * magnitude + np.broadcast_to(np.asarray(x_err, np.float64), ax.shape) @ aw
    if bias is not None:
        magnitude = magnitude + _abs64(bias)
        err = err + gamma(aw.shape[0] + 1, dtype) * _abs64(bias)
    return magnitude, err


def _per_head(x: np.ndarray, heads: int) -> np.ndarray:
    """(B, T, K, H) -> (B, heads, T, H), repeating kv heads for grouped-query attention."""
    x = np.moveaxis(x, 2, 1)
    return np.repeat(x, heads // x.shape[1], axis=1) if x.shape[1] != heads else x


def _visible(shape, mask, bias, is_causal: bool, q_offset) -> np.ndarray | None:
    """Where a query sees a key, ``(B, N, S, T)`` (``shape``), or ``None`` when everywhere: the mask (broadcast
    as :func:`jaxattn.dot_product_attention` takes it), the causal diagonal shifted by ``q_offset``, and the
    finite entries of ``bias`` (a ``-inf`` bias hides a key as a mask does)."""
    visible = None
    if mask is not None:
        m = np.asarray(mask, bool)
        visible = np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), shape)
    if is_causal:
        causal = np.arange(shape[3])[None, :] <= int(q_offset) + np.arange(shape[2])[:, None]  # (S, T)
        visible = causal if visible is None else visible & causal
    if bias is not None and not np.isfinite(np.asarray(bias, np.float64)).all():
        finite = np.isfinite(np.asarray(bias, np.float64))
        visible = finite if visible is None else visible & finite
    return None if visible is None else np.broadcast_to(visible, shape)


def _heads(x: np.ndarray) -> np.ndarray:
    """An unbatched ``(T, N, H)`` operand as ``(1, T, N, H)``; batched ones as they are."""
    return x[None] if x.ndim == 3 else x


def _weights64(hq: np.ndarray, hk: np.ndarray, scale: float, bias, visible) -> np.ndarray:
    """The exact softmax weights ``(B, N, S, T)`` in float64 from per-head ``q``, ``k``; a row that sees no key
    is all zeros."""
    logits = scale * (hq @ np.swapaxes(hk, -1, -2))
    if bias is not None:
        b = np.asarray(bias, np.float64)
        logits = logits + np.where(np.isfinite(b), b, 0.0)
    if visible is not None:
        logits = np.where(visible, logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True, initial=-np.inf)
    e = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def _attention_terms(q, k, v, scale, bias, q_err, k_err, v_err, mask, is_causal, q_offset, dtype) -> dict:
    """What the forward and gradient bounds share, per head ``(B, N, ...)``: the operands and their errors, the
    exact weights ``p`` and each weight's relative error ``weight_rel`` (see :func:`attention_error`)."""
    q64, k64, v64 = (_heads(np.asarray(a, np.float64)) for a in (q, k, v))
    heads, head_dim, tokens = q64.shape[2], q64.shape[3], k64.shape[1]
    scale = 1.0 / np.sqrt(head_dim) if scale is None else float(scale)
    dq, dk, dv = (
        np.broadcast_to(np.asarray(e, np.float64), a.shape) for e, a in ((q_err, q64), (k_err, k64), (v_err, v64))
    )
    hq, hk, hv, hdq, hdk, hdv = (_per_head(a, heads) for a in (q64, k64, v64, dq, dk, dv))
    shape = (q64.shape[0], heads, q64.shape[1], tokens)
    visible = _visible(shape, mask, bias, is_causal, q_offset)
    p = _weights64(hq, hk, scale, bias, visible)  # (B, N, S, T)
    aq, ak = np.abs(hq), np.abs(hk)
    b = 0.0 if bias is None else np.abs(np.asarray(bias, np.float64))
    magnitude = aq @ np.swapaxes(ak, -1, -2)  # (B, N, S, T): sum_d |q_d| |k_d|
    score = abs(scale) * magnitude + np.where(np.isfinite(b), b, 0.0)
    score_err = (
        abs(scale)
        * (hdq @ np.swapaxes(ak, -1, -2) + aq @ np.swapaxes(hdk, -1, -2) + gamma(head_dim, dtype) * magnitude)
        + gamma(2, dtype) * score
    )
    # A score off by d_j moves its weight by exp(d_j) / sum_i p_i exp(d_i): by at most expm1(e_j + sum_i p_i
    # expm1(e_i)) relative, for |d_j| <= e_j (Jensen's inequality bounds the denominator from below). With the
    # masking not given, p is unknown: the largest expm1(e_i) over the keys bounds that weighted mean.
    known = mask is not None or bool(is_causal)
    if known:
        shift = (p * np.expm1(score_err)).sum(axis=-1, keepdims=True)  # (B, N, S, 1)
    else:
        shift = np.expm1(score_err).max(axis=-1, keepdims=True, initial=0.0)
    weight_rel = np.expm1(score_err + shift) + gamma(tokens + SOFTMAX_OPS, dtype)  # (B, N, S, T)
    return dict(
        known=known,
        hq=hq,
        hk=hk,
        hv=hv,
        hdq=hdq,
        hdk=hdk,
        hdv=hdv,
        p=p,
        scale=scale,
        weight_rel=weight_rel,
        tokens=tokens,
    )


def _output_error(t: dict, dtype) -> np.ndarray:
    """:func:`attention_error` for every output entry, ``(B, N, S | 1, Hv)``."""
    rel = t["weight_rel"] + gamma(t["tokens"], dtype)  # (B, N, S, T)
    if t["known"]:
        return (t["p"] * rel) @ np.abs(t["hv"]) + t["p"] @ t["hdv"]
    # Any mask: an output row is a convex combination of the values it sees, so at most the largest over keys.
    v_max = np.abs(t["hv"]).max(axis=-2, keepdims=True, initial=0.0)  # (B, N, 1, Hv)
    dv_max = t["hdv"].max(axis=-2, keepdims=True, initial=0.0)
    return rel.max(axis=-1, keepdims=True, initial=0.0) * v_max + dv_max


def _context_magnitude(t: dict) -> np.ndarray:
    """Bound on ``|o|`` (plus its values' errors) for every output entry, ``(B, N, S | 1, Hv)``."""
    values = np.abs(t["hv"]) + t["hdv"]
    return t["p"] @ values if t["known"] else values.max(axis=-2, keepdims=True, initial=0.0)


def attention_error(
    q,
    k,
    v,
    *,
    scale: float | None = None,
    bias=None,
    mask=None,
    is_causal: bool = False,
    q_offset: int = 0,
    q_err=0.0,
    k_err=0.0,
    v_err=0.0,
    dtype=np.float32,
) -> float:
    """Bound on ``max |o - o_exact|`` for one computation of ``softmax(scale q k^T + bias, where=mask) v`` in
    ``dtype``, from the operands ``q``, ``k``, ``v`` themselves (the exact weights are part of the bound).

    Holds for every summation order, one pass or blockwise (online softmax), and grouped kv heads. ``mask``,
    ``is_causal`` and ``q_offset`` as :func:`jaxattn.dot_product_attention` takes them (a ``-inf`` bias hides
    a key too); a row that sees no key gives zeros, exactly. Neither ``mask`` nor ``is_causal`` given: the bound
    holds for every mask (a mask only removes keys), through the worst case over the keys; given (``mask=True``
    for a computation with no mask at all), it uses the exact weights of that computation and is tighter.
    ``q_err``, ``k_err`` and ``v_err`` are elementwise error bounds the operands already carry (from
    :func:`linear_error`, say); ``v`` may be a bound on the values' magnitudes, ``q`` and ``k`` must be the
    operands (their signs fix the weights).

    The steps, with ``p_j`` the exact weights of a row: a score's error is at most ``e_j = scale (|dq| |k_j| +
    |q| |dk_j| + gamma(H) |q| |k_j|)`` plus its own rounding (``gamma(2)`` of ``|scale q k_j| + |bias|``); the
    scores off by ``d_j``, ``|d_j| <= e_j``, move weight ``j`` by the factor ``exp(d_j) / sum_i p_i exp(d_i)``,
    within ``expm1(e_j + sum_i p_i expm1(e_i))`` of 1 (relative); the weights' own rounding adds
    ``gamma(T + SOFTMAX_OPS)`` relative (the subtraction of the row max rounds ``s_j - m`` by ``u |s_j - m|``,
    which matters only where ``p_j = exp(s_j - m)`` is small: ``u sum_j p_j |s_j - m| <= u log T``, inside the
    slack); the weighted sum of ``T`` values adds ``gamma(T) sum_j p_j |v_j|``, the values' errors
    ``sum_j p_j |dv_j|``. So, per output entry: ``sum_j p_j (rel_j + gamma(T)) |v_j| + sum_j p_j |dv_j|``. For
    every mask: ``p_j`` unknown, ``sum_i p_i expm1(e_i) <= max_i expm1(e_i)`` and the output entry at most
    ``max_j (rel_j + gamma(T)) max_j |v_j| + max_j |dv_j|``.
    """
    t = _attention_terms(q, k, v, scale, bias, q_err, k_err, v_err, mask, is_causal, q_offset, dtype)
    return float(_output_error(t, dtype).max(initial=0.0))


def attention_bound(q, k, v, **kwargs) -> float:
    """Bound on ``max |a - b|`` for two computations ``a``, ``b`` of the same attention: twice
    :func:`attention_error` (keywords as there)."""
    return 2 * attention_error(q, k, v, **kwargs)


def projected_attention_error(
    x,
    w_query,
    w_key,
    w_value,
    w_out=None,
    *,
    num_heads: int,
    x_kv=None,
    b_query=None,
    b_key=None,
    b_value=None,
    b_out=None,
    scale: float | None = None,
    mask=None,
    is_causal: bool = False,
    q_offset: int = 0,
    qk_rel_err: float = 0.0,
    dtype=np.float32,
) -> float:
    """Bound on the error of one computation of a multi-head attention layer, from its input and weights.

    ``x (B, S, d_in)``; kernels ``(d_in, d_out)`` as Flax stores them (torch's ``weight.T``); heads split
    ``d_out`` in ``num_heads`` equal parts (``w_key``/``w_value`` may have fewer columns: grouped kv heads of
    the same head size). ``x_kv`` defaults to ``x``. ``mask``, ``is_causal``, ``q_offset``: as
    :func:`attention_error` (without them the bound holds for every mask; with them it uses the exact
    weights of that masking). ``qk_rel_err`` is a relative error the queries and keys carry beyond the
    projection's rounding while their values stay those of ``x @ w + b`` (a round trip through another
    dtype, say). Steps that change the values between projection and scores (RoPE, an RMS norm) are outside
    this function: bound the transformed ``q``, ``k`` with :func:`attention_error` and their propagated
    errors, or compare against a float64 reference (:func:`reference_bound`).
    """
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        x = x[None]
    x_kv = x if x_kv is None else np.asarray(x_kv, np.float64).reshape((-1, *np.shape(x_kv)[-2:]))

    def project(x, kernel, bias):
        """The exact projection (its entries bound the computed one's magnitudes) and its rounding error."""
        exact = x @ np.asarray(kernel, np.float64) + (0.0 if bias is None else np.asarray(bias, np.float64))
        return exact, linear_error(x, kernel, bias, dtype=dtype)[1]

    (q, dq), (k, dk), (v, dv) = (
        project(a, w, b) for a, w, b in ((x, w_query, b_query), (x_kv, w_key, b_key), (x_kv, w_value, b_value))
    )
    head_dim = q.shape[-1] // num_heads
    dq, dk = dq + qk_rel_err * np.abs(q), dk + qk_rel_err * np.abs(k)

    def split(a):
        return a.reshape((*a.shape[:2], a.shape[-1] // head_dim, head_dim))

    t = _attention_terms(
        split(q), split(k), split(v), scale, None, split(dq), split(dk), split(dv), mask, is_causal, q_offset, dtype
    )
    out_err = _output_error(t, dtype)  # (B, N, S, head_dim)
    if w_out is None:
        return float(out_err.max(initial=0.0))
    # The context entering out_proj: magnitude at most sum_j p_j (|v_j| + |dv_j|) (the largest over the keys
    # for any mask), error at most out_err.
    context = np.broadcast_to(_context_magnitude(t), out_err.shape)

    def merged(a):  # (B, N, S, head_dim) -> (B, S, N * head_dim), the heads merged as before out_proj
        a = np.broadcast_to(a, (*t["p"].shape[:3], a.shape[-1]))
        return np.moveaxis(a, 1, 2).reshape((a.shape[0], a.shape[2], a.shape[1] * a.shape[3]))

    _, err = linear_error(merged(context), w_out, b_out, x_err=merged(out_err), dtype=dtype)
    return float(err.max(initial=0.0))


def projected_attention_bound(x, w_query, w_key, w_value, w_out=None, **kwargs) -> float:
    """Twice :func:`projected_attention_error`: the bound on two computations of the same layer."""
    return 2 * projected_attention_error(x, w_query, w_key, w_value, w_out, **kwargs)


def _per_kv_head(x: np.ndarray, kv_heads: int) -> np.ndarray:
    """(B, N, ...) per query head -> (B, K, ...): the sum over the ``N // K`` query heads that read a kv head."""
    return x.reshape((x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])).sum(axis=2)


def attention_grad_error(
    q,
    k,
    v,
    d_out,
    *,
    scale: float | None = None,
    bias=None,
    mask=None,
    is_causal: bool = False,
    q_offset: int = 0,
    q_err=0.0,
    k_err=0.0,
    v_err=0.0,
    d_out_err=0.0,
    dtype=np.float32,
) -> dict[str, float]:
    """Bounds on ``max |g - g_exact|`` for one computation of the gradients of ``sum(o * d_out)``, where
    ``o = softmax(scale q k^T + bias, where=mask) v``: ``{"q": ..., "k": ..., "v": ...}``, and ``"bias"`` (the
    gradient summed over the axes ``bias`` broadcasts along) when a bias is given.

    Shapes and keywords as :func:`attention_error`; ``d_out (B, S, N, Hv)`` is the cotangent (the loss's
    gradient with respect to ``o``), ``d_out_err`` an elementwise error it carries (``2 o_err`` for a loss
    ``sum(o**2)``, say). The weights ``P`` are computed exactly (float64) from ``q``, ``k``, so here ``q``,
    ``k``, ``v`` are the operands themselves, not only bounds on their magnitudes, and the mask matters.

    The backward pass, in every implementation (one pass or blockwise, the weights stored or recomputed
    from the log-sum-exp), computes ``dV = P^T dO``, ``dP = dO V^T``, ``D = rowsum(P * dP)`` (or, the same
    number, ``rowsum(dO * O)``), ``dS = P * (dP - D)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``. Each step's
    error, first order, from ``w``, the relative error of a computed weight (the forward's, of
    :func:`attention_error`: the recomputed ``P = exp(s - lse)`` has the same terms) and ``M = |dO| |V|^T``,
    the magnitude of ``dP``:

    * ``dP``: ``gamma(Hv) M`` (plus ``|dO| |dv|^T + |d_out_err| |V|^T``), call it ``E``;
    * ``D``: ``(w + gamma(T)) PM + P.E`` with ``PM = rowsum(P M)``; through ``rowsum(dO * O)`` the forward
      error of ``O`` (``(w + gamma(T)) P |V|`` elementwise) gives the same terms;
    * ``dS``, of magnitude at most ``P (M + PM)``: ``P (w (M + PM) + E + err(D) + gamma(2) (M + PM))``;
    * ``dQ``, ``dK``: ``scale`` times ``gamma(n + 2) |dS| |K|`` (``n`` the sum's length: ``T`` for ``dQ``,
      ``S`` times the query heads a kv head serves for ``dK``; ``+ 2`` the scale's rounding) plus
      ``err(dS) |K|`` and ``|dS| |dk|``, and likewise with ``Q``;
    * ``dV``: ``(gamma(n) + w) P^T |dO| + P^T |d_out_err|``;
    * ``d bias``: ``err(dS)`` summed over the broadcast axes plus ``gamma(terms summed)`` of ``sum |dS|``.

    Worst case, so the observed difference is usually far smaller; a wrong scale or mask moves gradients
    by a fraction of their size, far more.
    """
    t = _attention_terms(q, k, v, scale, bias, q_err, k_err, v_err, mask, is_causal, q_offset, dtype)
    hq, hk, hv, hdq, hdk, hdv, p = (t[n] for n in ("hq", "hk", "hv", "hdq", "hdk", "hdv", "p"))
    aq, ak, av = np.abs(hq), np.abs(hk), np.abs(hv)
    heads, kv_heads = hq.shape[1], _heads(np.asarray(k)).shape[2]
    q_tokens, tokens, value_dim = hq.shape[2], t["tokens"], hv.shape[-1]
    scale, w = abs(t["scale"]), t["weight_rel"]  # w: (B, N, S, T), each weight's relative error
    a_out = np.moveaxis(_heads(_abs64(d_out)), 2, 1)  # (B, N, S, Hv)
    e_out = np.moveaxis(_heads(np.broadcast_to(np.asarray(d_out_err, np.float64), np.shape(d_out))), 2, 1)
    vt = np.swapaxes(av, -1, -2)
    m = a_out @ vt  # (B, N, S, T): |dO| |V|^T bounds |dP|
    e_dp = gamma(value_dim, dtype) * m + a_out @ np.swapaxes(hdv, -1, -2) + e_out @ vt
    pm = (p * m).sum(axis=-1, keepdims=True)  # (B, N, S, 1): bounds |D|
    e_d = (p * ((w + gamma(tokens, dtype)) * m + e_dp)).sum(axis=-1, keepdims=True)
    spread = m + pm  # bounds |dP - D|
    ds = p * spread  # bounds |dS|
    e_ds = p * (w * spread + e_dp + e_d + gamma(2, dtype) * spread)
    group = heads // kv_heads
    errors = {
        "q": scale * (gamma(tokens + 2, dtype) * ds @ ak + e_ds @ ak + ds @ hdk),
        "k": scale
        * _per_kv_head(
            gamma(group * q_tokens + 2, dtype) * np.swapaxes(ds, -1, -2) @ aq
            + np.swapaxes(e_ds, -1, -2) @ aq
            + np.swapaxes(ds, -1, -2) @ hdq,
            kv_heads,
        ),
        "v": _per_kv_head(
            np.swapaxes((gamma(group * q_tokens, dtype) + w) * p, -1, -2) @ a_out + np.swapaxes(p, -1, -2) @ e_out,
            kv_heads,
        ),
    }
    result = {name: float(e.max(initial=0.0)) for name, e in errors.items()}
    if bias is not None:
        b_shape = np.shape(bias)
        b_shape = (1,) * (4 - len(b_shape)) + tuple(b_shape)
        axes = tuple(i for i, (n, full) in enumerate(zip(b_shape, ds.shape, strict=True)) if n == 1 and full != 1)
        terms = int(np.prod([ds.shape[i] for i in axes], dtype=np.int64)) if axes else 1
        summed = e_ds.sum(axis=axes) + gamma(terms, dtype) * ds.sum(axis=axes) if axes else e_ds
        result["bias"] = float(summed.max(initial=0.0))
    return result


def attention_grad_bound(q, k, v, d_out, **kwargs) -> dict[str, float]:
    """Twice :func:`attention_grad_error`, per operand: the bounds on two computations of the same gradients."""
    return {name: 2 * e for name, e in attention_grad_error(q, k, v, d_out, **kwargs).items()}


def reference_bound(ref32, exact64, *, reduction_length: int, multiple: float = 4.0, dtype=np.float32) -> float:
    """Bound on ``max |other - exact64|`` for a float computation ``other`` of what ``ref32`` computes, from the
    reference's own measured error: ``multiple * max(e, gamma(reduction_length) * max |exact64|)`` with
    ``e = max |ref32 - exact64|``.

    For computations whose first-order analysis is impractical (gradients through whole modules, RMS norms
    and RoPE before the scores): their error follows the conditioning of each step (the softmax backward
    subtracts nearly equal terms, a norm divides by a small root mean square) more than its length. The
    float32 reference run against the same computation in float64 (``exact64``: numpy, torch or JAX with x64
    on the same inputs and weights) measures that error at these very inputs: it is a sample of what float32
    rounding does to this computation. Another float32 computation of it, in another summation order, makes
    errors of the same kind and size, so it lies within a small multiple of that sample of the exact value:
    ``multiple`` (4 by default) covers its landing on the other side and a few times farther (a sum's
    rounding error grows as a random walk whose spread differs by a small factor between orders). Where the
    reference happens to be nearly exact (``e`` below a rounding per summed term), the floor
    ``gamma(reduction_length) * max |exact64|`` stands in: ``reduction_length`` is the number of terms on the
    computation's longest chain of dependent sums (for an attention layer: ``d_in + head_dim + 2 T + d_out``;
    for a weight gradient add the ``B T`` positions it sums over).

    This is an estimate from a measurement, not a worst-case bound as :func:`attention_bound`; it still
    moves with the inputs, their size and the machine's own rounding, never a constant picked on one CPU.
    Compare ``other`` against ``exact64``, not against ``ref32``.
    """
    exact = np.asarray(exact64, np.float64)
    own = float(np.abs(np.asarray(ref32, np.float64) - exact).max(initial=0.0))
    floor = gamma(reduction_length, dtype) * float(np.abs(exact).max(initial=0.0))
    return multiple * max(own, floor)
