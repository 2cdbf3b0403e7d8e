"""``flax.nnx.MultiHeadAttention`` with a torch ``nn.MultiheadAttention``'s weights.

Called as its documentation shows: ``layer(x, mask=..., is_causal=True)`` for causal attention (a key-padding
mask through ``mask``), and for decoding ``decode=True``, ``init_cache(shape)``, then one token per call with
``is_causal=True``, as Flax's own examples pass it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crosscheck.jax_layers.weights import MhaWeights, merged_stages


def layer(weights: MhaWeights, *, decode: bool = False) -> nnx.MultiHeadAttention:
    """The layer with the torch weights in NNX's layout (``query.kernel (E, N, H)`` ..., ``out.kernel (N, H, E)``)."""
    e, n, h = weights.embed_dim, weights.num_heads, weights.head_dim
    module = nnx.MultiHeadAttention(
        num_heads=n,
        in_features=e,
        qkv_features=e,
        out_features=e,
        use_bias=weights.bias,
        dropout_rate=0.0,
        decode=decode,
        precision=jax.lax.Precision.HIGHEST,
        rngs=nnx.Rngs(0),
    )
    for name, w, b in (("query", weights.w_q, weights.b_q), ("key", weights.w_k, weights.b_k),
                       ("value", weights.w_v, weights.b_v)):  # fmt: skip
        projection = getattr(module, name)
        projection.kernel[...] = jnp.asarray(w.T.reshape(e, n, h))
        if b is not None:
            assert projection.bias is not None  # use_bias=weights.bias
            projection.bias[...] = jnp.asarray(b.reshape(n, h))
    module.out.kernel[...] = jnp.asarray(weights.w_o.T.reshape(n, h, e))
    if weights.b_o is not None:
        assert module.out.bias is not None
        module.out.bias[...] = jnp.asarray(weights.b_o)
    return module


def key_mask(attention_mask: np.ndarray | None):
    return None if attention_mask is None else jnp.asarray(attention_mask, bool)[:, None, None, :]


def _with_recorded_out(module: nnx.MultiHeadAttention, recorded: dict) -> None:
    """Replace ``module.out`` by a stand-in that keeps its input (the heads merged) and calls the real one."""
    out_projection = module.out

    def recording_out(inputs, **kwargs):
        recorded["attention"] = inputs
        return out_projection(inputs, **kwargs)

    module.out = recording_out  # type: ignore[assignment]  # a callable stand-in, called as the projection


def _stages_of_call(module, xs, recorded: dict, **call) -> dict:
    out = module(xs, **call)
    found = {name: getattr(module, name)(xs) for name in ("query", "key", "value")}
    found["attention"] = recorded["attention"]
    return merged_stages(found, out, xs.shape)


def stages(weights: MhaWeights, x: np.ndarray, *, causal: bool, attention_mask: np.ndarray | None = None) -> dict:
    """Every stage of one forward pass, each ``(B, T, E)``: the layer's own projections applied to ``x``, the input
    of its ``out`` projection and the output."""
    module = layer(weights)
    recorded: dict = {}
    _with_recorded_out(module, recorded)
    return _stages_of_call(module, jnp.asarray(x), recorded, mask=key_mask(attention_mask), is_causal=causal,
                           decode=False)  # fmt: skip


def decode_stages(weights: MhaWeights, x: np.ndarray) -> dict:
    """The stages of decoding ``x`` one token at a time through the layer's cache, each ``(B, T, E)`` (step t
    at position t); ``"output"`` is the decoded output."""
    module = layer(weights, decode=True)
    module.init_cache(x.shape)
    recorded: dict = {}
    _with_recorded_out(module, recorded)
    steps = [_stages_of_call(module, jnp.asarray(x[:, t : t + 1]), recorded, is_causal=True) for t in range(x.shape[1])]
    return {name: np.concatenate([s[name] for s in steps], axis=1) for name in steps[0]}
