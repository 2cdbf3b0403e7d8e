"""A jaxattn smoke test for an installed wheel: run from outside the source tree, without torch.

    python tools/smoke_jaxattn.py

Checks that jaxattn imports from site-packages (not the checkout), that torch is absent (the layers must
not need it), and that the core and a module give the numbers jax.nn gives, within the derived float32
bound of :mod:`jaxattn.tolerance`. Exit 0 and one summary line on success.
"""

import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import tolerance


def main() -> int:
    assert importlib.util.find_spec("torch") is None, "torch is installed: the smoke test wants a jaxattn-only install"
    assert "site-packages" in jaxattn.__file__, f"jaxattn imported from {jaxattn.__file__}, not the installed wheel"
    jax.config.update("jax_default_matmul_precision", "highest")
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 9, 2, 4)).astype(np.float32) for _ in range(3))
    want = np.asarray(jax.nn.dot_product_attention(q, k, v, is_causal=True))
    bound = tolerance.attention_bound(q, k, v)
    for impl in ("naive", "blockwise", "xla"):
        got = np.asarray(jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))
        err = float(np.abs(got - want).max())
        assert err <= bound, f"{impl}: max |diff| {err:.3g} > bound {bound:.3g}"
    module = jaxattn.MultiHeadAttention(d_in=3, d_out=4, context_length=6, dropout=0.0, num_heads=2)
    x = jnp.asarray(rng.normal(size=(1, 6, 3)), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    out = jax.jit(module.apply)(variables, x)
    assert out.shape == (1, 6, 4) and bool(jnp.isfinite(out).all()), out
    print(f"jaxattn {jaxattn.__version__} smoke test passed ({jaxattn.__file__}; jax {jax.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
