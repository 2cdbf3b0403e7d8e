"""ALiBi (Press et al. 2022): causal attention with a linear distance penalty per head; a crosscheck plugin."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch

import crosscheck


def slopes(num_heads):  # head h penalises distance by 2^(-8 (h + 1) / num_heads)
    return [2.0 ** (-8.0 * h / num_heads) for h in range(1, num_heads + 1)]


class TorchALiBiAttention(torch.nn.Module):
    def __init__(self, d_in, d_out, num_heads, context_length):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_out // num_heads
        self.W_query, self.W_key, self.W_value = (torch.nn.Linear(d_in, d_out, bias=False) for _ in range(3))
        self.out_proj = torch.nn.Linear(d_out, d_out)
        pos = torch.arange(context_length)
        distance = (pos[:, None] - pos[None, :]).clamp(min=0)  # (T, T): how far back each key is
        alibi = -torch.tensor(slopes(num_heads))[:, None, None] * distance  # (H, T, T)
        self.register_buffer("alibi", alibi, persistent=False)

    def forward(self, x):
        b, T, _ = x.shape
        q, k, v = (
            W(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)  # (b, H, T, hd)
            for W in (self.W_query, self.W_key, self.W_value)
        )
        scores = q @ k.transpose(2, 3) / self.head_dim**0.5 + self.alibi[:, :T, :T]  # (b, H, T, T)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -torch.inf)
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, T, -1)  # (b, T, d_out)
        return self.out_proj(context)


class ALiBiAttention(nn.Module):
    d_in: int
    d_out: int
    num_heads: int
    context_length: int

    @nn.compact
    def __call__(self, x):
        b, T, _ = x.shape
        hd = self.d_out // self.num_heads
        q, k, v = (
            nn.Dense(self.d_out, use_bias=False, name=n)(x).reshape(b, T, self.num_heads, hd).transpose(0, 2, 1, 3)
            for n in ("W_query", "W_key", "W_value")
        )  # (b, H, T, hd)
        pos = jnp.arange(T, dtype=jnp.float32)
        distance = jnp.maximum(pos[:, None] - pos[None, :], 0)  # (T, T)
        alibi = -jnp.asarray(slopes(self.num_heads))[:, None, None] * distance  # (H, T, T)
        scores = q @ k.transpose(0, 1, 3, 2) / hd**0.5 + alibi  # (b, H, T, T)
        scores = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), scores, -jnp.inf)
        context = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, T, -1)  # (b, T, d_out)
        return nn.Dense(self.d_out, name="out_proj")(context)


DEFAULTS = {"d_in": 3, "d_out": 4, "num_heads": 2, "context_length": 6}  # flags change them
crosscheck.register_variant(
    "ALiBiAttention", torch_module=TorchALiBiAttention, flax_module=ALiBiAttention, config=DEFAULTS
)
