"""Causal attention over a sliding window of 2 keys with dropout on the weights; a crosscheck plugin for --train.

``WindowDropoutTwice`` (a second registration) drops the weights twice in Flax and once in torch: the two
sides cannot share their dropout masks, which the check must refuse, not compare.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch

import crosscheck

WINDOW = 2


def visible(T):  # (T, T): query t sees keys t - WINDOW + 1 .. t
    t = jnp.arange(T)
    return (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - WINDOW)


class TorchWindowDropout(torch.nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout):
        super().__init__()
        self.W_query = torch.nn.Linear(d_in, d_out, bias=False)
        self.W_key = torch.nn.Linear(d_in, d_out, bias=False)
        self.W_value = torch.nn.Linear(d_in, d_out, bias=False)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x):
        T = x.shape[-2]
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        scores = q @ k.transpose(-2, -1) / k.shape[-1] ** 0.5
        seen = torch.from_numpy(jax.device_get(visible(T)).copy())
        weights = scores.masked_fill(~seen, -torch.inf).softmax(dim=-1)
        return self.dropout(weights) @ v


class WindowDropout(nn.Module):
    d_in: int
    d_out: int
    context_length: int
    dropout: float
    drops: int = 1

    @nn.compact
    def __call__(self, x, deterministic=True):
        q, k, v = (nn.Dense(self.d_out, use_bias=False, name=n)(x) for n in ("W_query", "W_key", "W_value"))
        scores = q @ jnp.swapaxes(k, -2, -1) / k.shape[-1] ** 0.5
        weights = jax.nn.softmax(jnp.where(visible(x.shape[-2]), scores, -jnp.inf), axis=-1)
        for _ in range(self.drops):
            weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        return weights @ v


class WindowDropoutTwice(WindowDropout):
    drops: int = 2


CONFIG = {"d_in": 3, "d_out": 4, "context_length": 6, "dropout": 0.5}
crosscheck.register_variant("WindowDropout", torch_module=TorchWindowDropout, flax_module=WindowDropout, config=CONFIG)
crosscheck.register_variant(
    "WindowDropoutTwice", torch_module=TorchWindowDropout, flax_module=WindowDropoutTwice, config=CONFIG
)
