"""The flash kernel lowers to Triton for a CUDA GPU: checked here, without one.

Without a GPU the kernel runs only in Pallas' interpret mode (``test_flash.py``), which checks
its arithmetic, not that Pallas can turn it into Triton. ``jax.export`` lowers for a platform
that is not present, so Pallas' Triton lowering runs here, in Python. It catches what Triton
refuses: block shapes that are not powers of two, primitives it cannot lower, dtypes. It also
shows which GPU backend Pallas picks. JAX 0.10 picks Mosaic GPU unless told otherwise, and
Mosaic GPU refuses this kernel (it did, before the kernel named Triton).

Left to a GPU (``tools/gpu_check.sh``): Triton's compile to PTX, and the run.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export, lax

import jaxattn
from jaxattn.kernels import flash

TRITON = "__gpu$xla.gpu.triton"


def lower_for_cuda(fn, *args) -> str:
    """The StableHLO text of ``jax.jit(fn)`` lowered for CUDA (the Triton calls carry no compatibility promise)."""
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    return exported.mlir_module()


def triton_kernels(module: str) -> list[tuple[str, int, int]]:
    """``(name, num_warps, num_stages)`` of every Triton custom call, in program order."""
    calls = [line for line in module.splitlines() if f"@{TRITON}" in line]
    found = []
    for line in calls:
        name = re.search(r'name = "(\w+)"', line).group(1)
        warps = int(re.search(r"num_warps = (\d+)", line).group(1))
        stages = int(re.search(r"num_stages = (\d+)", line).group(1))
        found.append((name, warps, stages))
    return found


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


# (dtype, causal, (B, T, S, N, K, H, Hv), mask shape, bias shape, traced q_offset)
CASES = [
    ("float32", True, (2, 256, 256, 4, 4, 64, 64), None, None, False),
    ("float32", False, (1, 200, 300, 6, 2, 80, 48), None, None, False),  # padding, grouped heads, head dims
    ("bfloat16", True, (2, 1024, 1024, 12, 12, 64, 64), None, None, False),  # several 128-blocks
    ("float16", True, (1, 100, 100, 2, 1, 128, 128), None, None, False),
    ("float32", True, (2, 1, 37, 4, 2, 64, 64), None, None, True),  # one decode step, offset traced
    ("bfloat16", True, (2, 8, 520, 4, 4, 64, 64), (2, 1, 1, 520), None, True),  # decode with a padding mask
    ("float32", False, (2, 100, 130, 4, 2, 32, 32), (2, 4, 100, 130), None, False),  # a full mask
    ("float32", False, (1, 64, 64, 4, 4, 16, 16), (1, 1, 64, 64), None, False),  # one mask for every head
    ("float32", True, (2, 100, 100, 4, 4, 32, 32), None, (1, 4, 100, 100), False),  # a per-head bias (ALiBi)
    ("bfloat16", False, (2, 50, 70, 4, 2, 64, 64), (2, 1, 1, 70), (2, 1, 1, 70), False),  # both, grouped
    ("float32", True, (1, 300, 300, 2, 2, 256, 256), None, (1, 1, 300, 1), False),  # biggest head dim
]


@pytest.mark.parametrize("dtype, causal, sizes, mask_shape, bias_shape, traced_offset", CASES)
def test_forward_and_backward_lower_to_triton_kernels(dtype, causal, sizes, mask_shape, bias_shape, traced_offset):
    batch, q_tokens, kv_tokens, heads, kv_heads, head_dim, value_dim = sizes
    args = [spec((batch, q_tokens, heads, head_dim), dtype), spec((batch, kv_tokens, kv_heads, head_dim), dtype),
            spec((batch, kv_tokens, kv_heads, value_dim), dtype),
            None if mask_shape is None else spec(mask_shape, jnp.bool_),
            None if bias_shape is None else spec(bias_shape, jnp.float32),
            spec((), jnp.int32) if traced_offset else None]

    def forward(q, k, v, mask, bias, offset):
        return flash.flash_attention(q, k, v, bias, mask, scale=head_dim**-0.5, is_causal=causal,
                                     q_offset=0 if offset is None else offset, precision=lax.Precision.HIGHEST)[0]

    def backward(q, k, v, mask, bias, offset):
        def loss(q, k, v, bias):
            return forward(q, k, v, mask, bias, offset).astype(jnp.float32).sum()

        return jax.grad(loss, argnums=(0, 1, 2) if bias is None else (0, 1, 2, 3))(q, k, v, bias)

    warps = 4 if max(head_dim, value_dim) <= 64 else 8
    forward_module = lower_for_cuda(forward, *args)
    assert triton_kernels(forward_module) == [("jaxattn_flash_forward", warps, 2)]
    assert "mosaic" not in forward_module.lower()

    names = [name for name, *_ in triton_kernels(lower_for_cuda(backward, *args))]
    expected = ["jaxattn_flash_forward", "jaxattn_flash_dq", "jaxattn_flash_dkdv"]
    assert names == expected + (["jaxattn_flash_dbias"] if bias_shape else [])


@pytest.fixture
def as_if_on_a_gpu(monkeypatch):
    """``jaxattn`` dispatches on ``jax.default_backend()`` at trace time: say "gpu" while lowering for CUDA."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


@pytest.mark.parametrize("implementation", ["flash", "auto"])
def test_a_float32_module_on_a_gpu_runs_the_triton_kernels(as_if_on_a_gpu, implementation):
    """The whole module, dispatch included: ``auto`` on a GPU takes flash for float32 (never the lax loop)."""
    module = jaxattn.MultiHeadAttention(d_in=768, d_out=768, num_heads=12, context_length=16384, dropout=0.0,
                                        attention_impl=implementation, precision="highest")
    x = spec((1, 16384, 768), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 768)))

    def loss(params, x):
        return module.apply(params, x).sum()

    forward = lower_for_cuda(module.apply, params, x)
    assert [name for name, *_ in triton_kernels(forward)] == ["jaxattn_flash_forward"]
    assert "stablehlo.while" not in forward  # no lax loop outside the kernel
    names = [name for name, *_ in triton_kernels(lower_for_cuda(jax.grad(loss), params, x))]
    assert names == ["jaxattn_flash_forward", "jaxattn_flash_dq", "jaxattn_flash_dkdv"]


@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 128, 256])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_tiles_fit_on_chip_and_the_grid_follows_them(head_dim, dtype):
    """Each ``(block, head dim)`` tile within its byte budget (one float32 128 x 64 tile at d=768, 12 heads)."""
    padded, itemsize = flash._pow2_at_least(head_dim), jnp.dtype(dtype).itemsize
    block_q, block_k, (block_q_bwd, block_k_bwd) = flash.default_blocks(padded, itemsize)
    assert max(block_q, block_k) * padded * itemsize <= flash.TILE_BYTES
    assert max(block_q_bwd, block_k_bwd) * padded * itemsize <= flash.TILE_BYTES_BACKWARD
    assert block_q >= block_q_bwd >= 16
    if (head_dim, dtype) == (64, "float32"):
        assert (block_q, block_k, block_q_bwd, block_k_bwd) == (128, 128, 64, 64)

    q = spec((1, 512, 2, head_dim), dtype)
    module = lower_for_cuda(lambda q: flash.flash_attention(q, q, q, scale=1.0)[0], q)
    grid = [int(re.search(rf"grid_{axis} = (\d+)", module).group(1)) for axis in "xyz"]
    assert sorted(grid) == sorted([1, 2, 512 // block_q])  # (batch, heads, query blocks)
