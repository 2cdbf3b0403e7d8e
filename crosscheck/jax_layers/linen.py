"""``flax.linen.MultiHeadDotProductAttention`` with a torch ``nn.MultiheadAttention``'s weights.

Linen's layer takes no ``is_causal``: causal attention is ``mask=nn.make_causal_mask(...)`` (combined with a
key-padding mask by ``nn.combine_masks``), as Flax's examples build it. Decoding is the layer's ``decode=True``
cache: ``init`` with the full-length input shapes the cache, then one token per ``apply`` with
``mutable=["cache"]`` and no mask (the cache masks the keys not yet written), as Flax's decoding examples do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from crosscheck.jax_layers.weights import MhaWeights, merged_stages


def layer(weights: MhaWeights, *, decode: bool = False) -> nn.MultiHeadDotProductAttention:
    return nn.MultiHeadDotProductAttention(
        num_heads=weights.num_heads,
        qkv_features=weights.embed_dim,
        out_features=weights.embed_dim,
        use_bias=weights.bias,
        dropout_rate=0.0,
        deterministic=True,
        decode=decode,
        precision=jax.lax.Precision.HIGHEST,
    )


def params(weights: MhaWeights) -> dict:
    """Linen's layout: ``query/kernel (E, N, H)``, ``query/bias (N, H)`` ..., ``out/kernel (N, H, E)``."""
    e, n, h = weights.embed_dim, weights.num_heads, weights.head_dim

    def projection(w, b):
        p = {"kernel": jnp.asarray(w.T.reshape(e, n, h))}
        return p if b is None else {**p, "bias": jnp.asarray(b.reshape(n, h))}

    out = {"kernel": jnp.asarray(weights.w_o.T.reshape(n, h, e))}
    if weights.b_o is not None:
        out["bias"] = jnp.asarray(weights.b_o)
    return {
        "query": projection(weights.w_q, weights.b_q),
        "key": projection(weights.w_k, weights.b_k),
        "value": projection(weights.w_v, weights.b_v),
        "out": out,
    }


def mask(x: np.ndarray, causal: bool, attention_mask: np.ndarray | None):
    """``(B, 1, T, T)`` (Flax's float32 masks, 1 = attend), or ``None``: ``nn.make_causal_mask`` and, for the
    real keys, ``nn.make_attention_mask(queries, keys)``, combined by ``nn.combine_masks``."""
    causal_mask = nn.make_causal_mask(jnp.ones(x.shape[:2])) if causal else None
    keys = None
    if attention_mask is not None:
        keys = nn.make_attention_mask(jnp.ones(x.shape[:2], bool), jnp.asarray(attention_mask, bool))
    return nn.combine_masks(causal_mask, keys)


def _recording(record_into: dict):
    """An ``nn.intercept_methods`` interceptor that keeps the input of the layer's ``out`` projection."""

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name == "out":
            record_into["attention"] = args[0]
        return next_fun(*args, **kwargs)

    return record


def stages(weights: MhaWeights, x: np.ndarray, *, causal: bool, attention_mask: np.ndarray | None = None) -> dict:
    """Every stage of one forward pass, each ``(B, T, E)``: the projections (``capture_intermediates``), the input
    of ``out`` (the heads merged; recorded by ``nn.intercept_methods``) and the output."""
    recorded: dict = {}
    with nn.intercept_methods(_recording(recorded)):
        out, state = layer(weights).apply(
            {"params": params(weights)},
            jnp.asarray(x),
            mask=mask(x, causal, attention_mask),
            capture_intermediates=True,
        )
    found = {name: state["intermediates"][name]["__call__"][0] for name in ("query", "key", "value")}
    return merged_stages({**found, **recorded}, out, x.shape)


def decode_stages(weights: MhaWeights, x: np.ndarray) -> dict:
    """The stages of decoding ``x`` one token at a time through the layer's cache, each ``(B, T, E)`` (step t
    at position t); ``"output"`` is the decoded output."""
    module = layer(weights, decode=True)
    cache = module.init(jax.random.key(0), jnp.asarray(x))["cache"]
    variables = {"params": params(weights)}
    steps = []
    for t in range(x.shape[1]):
        recorded: dict = {}
        with nn.intercept_methods(_recording(recorded)):
            out, mutated = module.apply(
                {**variables, "cache": cache},
                jnp.asarray(x[:, t : t + 1]),
                mutable=["cache", "intermediates"],
                capture_intermediates=True,
            )
        cache = mutated["cache"]
        found = {name: mutated["intermediates"][name]["__call__"][0] for name in ("query", "key", "value")}
        steps.append(merged_stages({**found, **recorded}, out, x[:, t : t + 1].shape))
    return {name: np.concatenate([s[name] for s in steps], axis=1) for name in steps[0]}
