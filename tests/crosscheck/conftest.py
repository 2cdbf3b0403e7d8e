"""Builders shared by the torch-vs-Flax tests: one torch reference, its weights ported to Flax."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch reference needs torch")

from crosscheck.config import AttnConfig  # noqa: E402
from crosscheck.porting import port  # noqa: E402


def make_pair(variant, cfg: AttnConfig, seed: int = 0):
    """``(torch_module, flax_module, variables)`` sharing weights; every parameter random and non-zero.

    torch initialises some biases to zero (``nn.MultiheadAttention``); re-drawing all of
    them makes a mis-ported bias visible.
    """
    torch.manual_seed(seed)
    torch_module = variant.torch_module(cfg).eval()
    with torch.no_grad():
        for p in torch_module.parameters():
            p.uniform_(-1.0, 1.0)
    flax_module = variant.flax_module(cfg)
    variables = port.load_state_dict(flax_module, torch_module.state_dict())
    return torch_module, flax_module, variables


def make_input(variant, cfg: AttnConfig, batch: int, tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (tokens, cfg.d_in) if (variant.unbatched and batch == 0) else (max(batch, 1), tokens, cfg.d_in)
    return rng.normal(size=shape).astype(np.float32)


@pytest.fixture
def pair_builder():
    return make_pair
