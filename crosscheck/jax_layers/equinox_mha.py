"""``equinox.nn.MultiheadAttention`` with a torch ``nn.MultiheadAttention``'s weights.

Equinox's layer is unbatched and takes a boolean ``mask (T, S)`` (True = attend): causal attention and
padded keys are that mask, and a batch is ``jax.vmap``. Its ``Linear`` keeps torch's ``(out, in)`` layout, so
the weights need no transpose. It has no matmul-precision argument: calls run under
``jax.default_matmul_precision("highest")``. It has no KV cache, so there is no decode row.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from crosscheck.jax_layers.weights import MhaWeights, visible


def _leaf(projection: str, name: str):
    return lambda m: getattr(getattr(m, projection), name)


def layer(weights: MhaWeights) -> eqx.nn.MultiheadAttention:
    module = eqx.nn.MultiheadAttention(
        num_heads=weights.num_heads,
        query_size=weights.embed_dim,
        use_query_bias=weights.bias,
        use_key_bias=weights.bias,
        use_value_bias=weights.bias,
        use_output_bias=weights.b_o is not None,
        key=jax.random.key(0),
    )
    names = ("query_proj", "key_proj", "value_proj", "output_proj")
    ws = (weights.w_q, weights.w_k, weights.w_v, weights.w_o)
    bs = (weights.b_q, weights.b_k, weights.b_v, weights.b_o)
    for name, w, b in zip(names, ws, bs, strict=True):
        module = eqx.tree_at(_leaf(name, "weight"), module, jnp.asarray(w))
        if b is not None:
            module = eqx.tree_at(_leaf(name, "bias"), module, jnp.asarray(b))
    return module


def _call(module, x: np.ndarray, causal: bool, attention_mask: np.ndarray | None) -> np.ndarray:
    xs = jnp.asarray(x)
    masks = jnp.asarray(visible(x.shape[1], causal, attention_mask, x.shape[0]))  # (B, T, S)
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.vmap(lambda xb, mb: module(xb, xb, xb, mask=mb))(xs, masks))


def stages(weights: MhaWeights, x: np.ndarray, *, causal: bool, attention_mask: np.ndarray | None = None) -> dict:
    """Every stage, each ``(B, T, E)``: the layer's own projections over the tokens, the layer with its output
    projection replaced by the identity (the heads merged), and the output."""
    module = layer(weights)
    xs = jnp.asarray(x)
    with jax.default_matmul_precision("highest"):
        found = {
            name: np.asarray(jax.vmap(jax.vmap(getattr(module, f"{name}_proj")))(xs))
            for name in ("query", "key", "value")
        }
    no_out = eqx.tree_at(lambda m: m.output_proj, module, eqx.nn.Identity())
    found["attention"] = _call(no_out, x, causal, attention_mask)
    return {**found, "output": _call(module, x, causal, attention_mask)}
