"""``ALiBiAttention`` with an NNX twin beside its Linen class: ``crosscheck --api nnx|both`` runs it."""

import jax
import jax.numpy as jnp
from alibi import ALiBiAttention, TorchALiBiAttention, slopes
from flax import nnx

import crosscheck


class NnxALiBiAttention(nnx.Module):
    def __init__(self, d_in, d_out, num_heads, context_length, *, rngs):
        self.num_heads = num_heads
        self.W_query = nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs)
        self.W_key = nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs)
        self.W_value = nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs)
        self.out_proj = nnx.Linear(d_out, d_out, rngs=rngs)

    def __call__(self, x):
        b, T, d_out = x.shape[0], x.shape[1], self.out_proj.in_features
        hd = d_out // self.num_heads
        q, k, v = (
            W(x).reshape(b, T, self.num_heads, hd).transpose(0, 2, 1, 3)  # (b, H, T, hd)
            for W in (self.W_query, self.W_key, self.W_value)
        )
        pos = jnp.arange(T, dtype=jnp.float32)
        alibi = -jnp.asarray(slopes(self.num_heads))[:, None, None] * jnp.maximum(pos[:, None] - pos[None, :], 0)
        scores = q @ k.transpose(0, 1, 3, 2) / hd**0.5 + alibi  # (b, H, T, T)
        scores = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), scores, -jnp.inf)
        context = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, T, -1)  # (b, T, d_out)
        return self.out_proj(context)


crosscheck.register_variant(
    "ALiBiAttentionNNX",
    torch_module=TorchALiBiAttention,
    flax_module=(ALiBiAttention, NnxALiBiAttention),
    config={"d_in": 3, "d_out": 4, "num_heads": 2, "context_length": 6},
)
