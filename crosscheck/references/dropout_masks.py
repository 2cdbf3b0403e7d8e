"""Identical dropout masks for torch and Flax: one draw per dropout site, given to both frameworks.

A *site* is one place where a module applies dropout to attention weights (the book's
``self.dropout(attn_weights)``): one for ``CausalAttention`` and the fused multi-head
classes, one per head for ``MultiHeadAttentionWrapper``, one inside
``nn.MultiheadAttention``. Site ``i`` of a run gets the JAX key ``fold_in(key(seed), i)``.

* Flax: :class:`SiteKeys` is the modules' ``attention_fn``. With dropout active the modules
  hand it ``dropout_rate`` and their own ``dropout_rng``; it replaces that key with its site's
  key and calls :func:`jaxattn.dot_product_attention` with the table's dropout implementation
  (:func:`jaxattn.implementations.for_dropout`: the naive kernel, the book's dropout),
  so the math is jaxattn's own; nothing here recomputes attention.
* The mask itself: :func:`site_mask` reads back what the core applies with that key, through
  the core: uniform weights (zero queries and keys) times identity values give each weight's
  keep flag as the output, ``(batch, heads, q_tokens, kv_tokens)``, True = kept. It assumes
  only that the core's draw depends on the key, the rate and the shapes; if it ever depends
  on something else the torch and Flax outputs differ and the check fails, never passes.
* torch: :func:`inject_masks` replaces the module's ``nn.Dropout`` submodules (``p > 0``, in
  call order) by ``MaskDropout`` (:func:`mask_dropout_class`), which multiplies by
  ``keep / (1 - p)`` exactly as ``nn.Dropout`` multiplies by its own Bernoulli draw over
  ``1 - p``. Where dropout happens inside one functional call (``nn.MultiheadAttention``,
  transformers' GPT-2) the variant's entry supplies a forward that takes the mask
  (``Variant.torch_masked_forward``): :func:`multihead_forward_masked`, :func:`gpt2_forward_masked`.

Sites are paired by call order (the wrapper's heads run ``heads_0 .. heads_{n-1}`` in Flax and
``heads.0 .. heads.{n-1}`` in torch); counts, rates and element counts are checked, and every
``MaskDropout`` must run exactly once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crosscheck.errors import BadInputError


@dataclass(frozen=True)
class Site:
    """One dropout site as the attention core sees it: the weights are ``(batch, heads, q_tokens, kv_tokens)``."""

    batch: int
    heads: int
    kv_heads: int
    q_tokens: int
    kv_tokens: int
    rate: float

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.q_tokens, self.kv_tokens)


def site_key(seed: int, index: int):
    """The JAX key of site ``index`` in a run with ``seed``."""
    import jax

    return jax.random.fold_in(jax.random.key(seed), index)


class SiteKeys:
    """A jaxattn ``attention_fn`` that gives dropout site ``i`` the key :func:`site_key` ``(seed, i)``.

    Calls without dropout (inference, or a module whose rate is 0) go to the core unchanged.
    ``sites`` lists the dropout calls in order; it is filled while the module is traced, so
    build one per traced function (a retrace starts again at site 0).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.sites: list[Site] = []

    def __call__(
        self,
        query,
        key,
        value,
        bias=None,
        mask=None,
        *,
        is_causal=False,
        dropout_rate=0.0,
        dropout_rng=None,
        precision=None,
    ):
        from jaxattn import dot_product_attention, implementations

        extra = {} if precision is None else {"precision": precision}
        if dropout_rate > 0.0:
            batch, q_tokens, heads, _ = query.shape  # (b, T, N, hd)
            kv_tokens, kv_heads = key.shape[1], key.shape[2]  # (b, S, K, hd)
            extra.update(
                implementation=implementations.for_dropout(),
                dropout_rate=dropout_rate,
                dropout_rng=site_key(self.seed, len(self.sites)),
            )
            self.sites.append(Site(batch, heads, kv_heads, q_tokens, kv_tokens, float(dropout_rate)))
        return dot_product_attention(query, key, value, bias, mask, is_causal=is_causal, **extra)


@dataclass(frozen=True)
class LayerSite:
    """A dropout site of a Linen module that is not jaxattn's (a registered plugin): one ``nn.Dropout`` call,
    whatever it drops (``shape``: its input's), found by :class:`DropoutSites`."""

    shape: tuple[int, ...]
    rate: float
    #: The shape the mask is drawn at: ``shape`` with ``broadcast_dims`` set to 1.
    draw_shape: tuple[int, ...]


def layer_mask(seed: int, index: int, site: LayerSite) -> np.ndarray:
    """``site.shape`` bool, True = kept: ``jax.random.bernoulli(site_key(seed, index), 1 - rate)`` at the draw
    shape, broadcast: what :class:`DropoutSites` applies at that site."""
    import jax

    keep = jax.random.bernoulli(site_key(seed, index), 1.0 - site.rate, site.draw_shape)
    return np.array(np.broadcast_to(np.asarray(jax.device_get(keep)), site.shape))  # a writable copy, for torch


class DropoutSites:
    """A Linen method interceptor (``nn.intercept_methods``) that gives every active ``nn.Dropout`` call its
    site's mask: call ``i`` returns ``x * keep / (1 - rate)`` with ``keep`` = :func:`layer_mask` ``(seed, i)``,
    the product ``nn.Dropout`` forms with its own draw. For modules that drop with ``flax.linen.Dropout``
    rather than through jaxattn's ``attention_fn`` (:class:`SiteKeys`): registered plugins. ``sites``
    lists the calls in order; it is filled while the module is traced. A ``broadcast_dims`` mask is drawn at
    its broadcast shape and expanded, so torch gets the full mask its ``nn.Dropout`` multiplies by.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.sites: list[LayerSite] = []

    def __call__(self, next_fun, args, kwargs, context):
        import jax
        import jax.numpy as jnp
        from flax import linen as nn

        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dropout):
            return next_fun(*args, **kwargs)
        x = args[0]
        called = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
        deterministic = module.deterministic if called is None else called
        if deterministic or module.rate == 0.0:
            return next_fun(*args, **kwargs)
        if module.rate >= 1.0:  # nn.Dropout's own rule: everything dropped
            return jnp.zeros_like(x)
        shape = tuple(1 if d in module.broadcast_dims else n for d, n in enumerate(x.shape))
        keep = jax.random.bernoulli(site_key(self.seed, len(self.sites)), 1.0 - module.rate, shape)
        self.sites.append(LayerSite(tuple(x.shape), float(module.rate), shape))
        keep = jnp.broadcast_to(keep, x.shape)
        return jnp.where(keep, x / (1.0 - module.rate), jnp.zeros_like(x))


def site_mask(seed: int, index: int, site: Site) -> np.ndarray:
    """``(batch, heads, q_tokens, kv_tokens)`` bool, True = kept: what the core drops with site ``index``'s key.

    Zero queries and keys make every weight ``1 / kv_tokens``; values ``(batch, S, kv_heads, S)``
    holding the identity make the context of query ``t`` in head ``n`` the row of weights
    itself, ``keep / (kv_tokens * (1 - rate))`` or exactly 0.
    """
    import jax

    out = _kept_weights()(site_key(seed, index), site)  # (b, T, N, S)
    return np.transpose(np.asarray(jax.device_get(out)) > 0.0, (0, 2, 1, 3))  # (b, N, T, S)


@functools.cache
def _kept_weights():
    """The read-back as one jitted function (compiled once per site shape, not op by op)."""
    import jax
    import jax.numpy as jnp

    from jaxattn import dot_product_attention, implementations

    def kept(key, site: Site):
        b, n, k, t, s = site.batch, site.heads, site.kv_heads, site.q_tokens, site.kv_tokens
        eye = jnp.broadcast_to(jnp.eye(s, dtype=jnp.float32)[None, :, None, :], (b, s, k, s))  # (b, S, K, S)
        return dot_product_attention(
            jnp.zeros((b, t, n, 1), jnp.float32),
            jnp.zeros((b, s, k, 1), jnp.float32),
            eye,
            implementation=implementations.for_dropout(),
            dropout_rate=site.rate,
            dropout_rng=key,
        )  # (b, T, N, S)

    return jax.jit(kept, static_argnums=1)


def masks_for(seed: int, sites: Sequence[Site | LayerSite]) -> list[np.ndarray]:
    """Every site's keep mask, in site order."""
    return [layer_mask(seed, i, s) if isinstance(s, LayerSite) else site_mask(seed, i, s) for i, s in enumerate(sites)]


# --- torch ---------------------------------------------------------------------------------------


def _torch_nn():
    from torch import nn

    return nn


@functools.cache
def mask_dropout_class():
    """``MaskDropout(keep, p, name)``: ``nn.Dropout(p)`` with its keep mask given (torch imported only here).

    ``forward(x) = x * (keep / (1 - p))``, the product ``nn.Dropout`` forms with its own Bernoulli
    draw; it counts its calls so a site skipped or run twice is caught (:func:`check_calls`).
    """
    from torch import nn

    class MaskDropout(nn.Module):
        def __init__(self, keep, p: float, name: str):
            super().__init__()
            self.keep, self.p, self.site_name, self.calls = keep, float(p), name, 0

        def forward(self, x):
            if self.keep.numel() != x.numel():
                raise BadInputError(
                    f"{self.site_name}: the dropout mask {tuple(self.keep.shape)} "
                    f"does not fit the weights {tuple(x.shape)}"
                )
            self.calls += 1
            return x * (self.keep.reshape(x.shape).to(x.dtype) / (1.0 - self.p))

    return MaskDropout


def dropout_modules(module) -> list[tuple[str, Any]]:
    """``(name, nn.Dropout)`` of every dropout submodule with ``p > 0``, in definition (= call) order."""
    nn = _torch_nn()
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Dropout) and m.p > 0.0]


def inject_masks(module, masks: Sequence[np.ndarray], sites: Sequence[Site | LayerSite]) -> list:
    """Replace ``module``'s ``nn.Dropout`` submodules by ``MaskDropout`` (in place); returns them.

    :class:`BadInputError` when the number of torch dropout modules, or one's rate, differs from the
    Flax sites: the two modules would not drop in the same places.
    """
    import torch

    found = dropout_modules(module)
    if len(found) != len(sites):
        raise BadInputError(
            f"{type(module).__name__}: {len(found)} torch dropout module(s) "
            f"({', '.join(n for n, _ in found) or 'none'}) "
            f"but the Flax module applies dropout at {len(sites)} site(s)"
        )
    cls = mask_dropout_class()
    injected = []
    for (name, old), keep, site in zip(found, masks, sites, strict=True):
        if abs(old.p - site.rate) > 1e-12:
            raise BadInputError(f"{name}: torch dropout p={old.p} but the Flax site's rate is {site.rate}")
        new = cls(torch.from_numpy(np.ascontiguousarray(keep)), old.p, name)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
        injected.append(new)
    return injected


def check_calls(injected: Sequence[Any]) -> None:
    """Every injected mask was applied exactly once (a skipped or repeated site is no shared mask)."""
    wrong = [f"{m.site_name} ran {m.calls}x" for m in injected if m.calls != 1]
    if wrong:
        raise BadInputError("dropout masks not applied once each: " + ", ".join(wrong))


def multihead_forward_masked(module, x, causal: bool, keep: np.ndarray, p: float):
    """``nn.MultiheadAttention`` self-attention (``batch_first``) in training mode with the keep mask given.

    The steps of ``torch.nn.functional.multi_head_attention_forward`` on its ``need_weights``
    path: ``in_proj``, queries scaled by ``1/sqrt(head_dim)``, scores, the causal ``-inf`` mask,
    softmax, dropout ``* keep / (1 - p)`` on the ``(b, heads, T, S)`` weights, weights ``@ v``,
    ``out_proj``. Tested against ``nn.MultiheadAttention`` itself (its own dropout, same seed).
    """
    import torch
    import torch.nn.functional as F

    b, tokens, embed = x.shape
    heads = module.num_heads
    head_dim = embed // heads
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)  # (b, T, E) each

    def split(t):  # (b, T, E) -> (b, H, T, hd)
        return t.reshape(b, tokens, heads, head_dim).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    scores = (q * (1.0 / head_dim) ** 0.5) @ k.transpose(-2, -1)  # (b, H, T, S)
    if causal:
        hidden = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool, device=x.device), diagonal=1)
        scores = scores.masked_fill(hidden, -torch.inf)
    weights = torch.softmax(scores, dim=-1)
    keep_t = torch.from_numpy(np.ascontiguousarray(keep)).to(x.device).reshape(weights.shape)
    weights = weights * (keep_t.to(weights.dtype) / (1.0 - p))
    context = (weights @ v).transpose(1, 2).reshape(b, tokens, embed)  # (b, T, E)
    return module.out_proj(context)


def torch_forward_masked(
    variant,
    module,
    x,
    cfg,
    masks: Sequence[np.ndarray],
    sites: Sequence[Site | LayerSite],
    attention_mask: Any | None = None,
):
    """The torch reference of ``variant`` in training mode on ``x`` with the sites' masks.

    ``module`` is changed in place (its dropout modules replaced); pass a copy.
    """
    module.train()
    if variant.torch_masked_forward is not None and sites:
        if len(sites) != 1:
            raise BadInputError(f"{variant.name}: one dropout site expected inside the torch call, got {len(sites)}")
        return variant.torch_masked_forward(module, x, variant.resolve(cfg), masks[0], sites[0].rate)
    injected = inject_masks(module, masks, sites)
    out = variant.torch_forward(module, x, cfg, attention_mask)
    check_calls(injected)
    return out


def gpt2_forward_masked(module, x, keep: np.ndarray, p: float):
    """transformers' ``GPT2Attention`` (self-attention, eager) in training mode with the keep mask given.

    Its eager steps: ``c_attn`` split into q, k, v, heads ``(b, H, T, hd)``, scores times
    ``module.scaling``, the causal mask, softmax, dropout ``* keep / (1 - p)`` (where it calls
    ``nn.functional.dropout(p=attn_dropout.p)``), weights ``@ v``, ``c_proj`` and
    ``resid_dropout`` (run with ``p = 0`` by :mod:`crosscheck.references.hf`). Tested against
    ``GPT2Attention`` itself (its own dropout, same seed).
    """
    import torch

    if module.resid_dropout.p != 0.0:
        raise BadInputError(
            f"GPT2Attention: resid_dropout p={module.resid_dropout.p}; only the attention dropout is shared"
        )
    unbatched = x.dim() == 2
    x = x[None] if unbatched else x
    b, tokens, _ = x.shape
    heads, head_dim = module.num_heads, module.head_dim

    def split(t):  # (b, T, E) -> (b, H, T, hd)
        return t.reshape(b, tokens, heads, head_dim).transpose(1, 2)

    q, k, v = (split(t) for t in module.c_attn(x).split(module.split_size, dim=2))
    scores = (q @ k.transpose(-1, -2)) * module.scaling  # (b, H, T, T)
    hidden = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool, device=x.device), diagonal=1)
    scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)  # eager adds finfo.min
    weights = torch.softmax(scores, dim=-1)
    keep_t = torch.from_numpy(np.ascontiguousarray(keep)).to(x.device).reshape(weights.shape)
    weights = weights * (keep_t.to(weights.dtype) / (1.0 - p))
    context = (weights @ v).transpose(1, 2).reshape(b, tokens, heads * head_dim)  # (b, T, E)
    out = module.c_proj(context)
    return out[0] if unbatched else out
