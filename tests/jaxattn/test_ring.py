"""Ring attention (jaxattn.kernels.ring) on 8 forced host CPU devices equals one device, forward and gradients.

The reference is the naive kernel on one device (itself checked against jax.nn and torch elsewhere).
tests/conftest.py forces 8 host devices before JAX initialises; on a GPU machine the rings and the
reference run on them too (tests/host_cpu.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxattn
from jaxattn import sharding
from jaxattn.kernels.naive import naive_attention
from jaxattn.kernels.ring import ring_attention, ring_layout, zigzag_positions
from jaxattn.tolerance import attention_bound, attention_grad_bound
from tests.host_cpu import on_the_host

HIGHEST = functools.partial(jax.default_matmul_precision, "highest")


@pytest.fixture(autouse=True)
def host():
    with on_the_host():
        yield


def mesh_of(n):
    assert len(jax.devices("cpu")) >= 8, "tests/conftest.py forces 8 host devices"
    return Mesh(np.array(jax.devices("cpu")[:n]), ("seq",))


def qkv(batch, tokens, heads, kv_heads, seed=0, head_dim=8):
    rng = np.random.default_rng(seed)
    shapes = ((batch, tokens, heads, head_dim), (batch, tokens, kv_heads, head_dim), (batch, tokens, kv_heads, head_dim))
    return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def ring(mesh, **kw):
    return jax.jit(lambda q, k, v, bias, mask: ring_attention(
        q, k, v, bias, mask, scale=8**-0.5, mesh=mesh, axis_name="seq", **kw))


def reference(q, k, v, bias, mask, **kw):
    return naive_attention(q, k, v, bias, mask, scale=8**-0.5, **kw)[0]


# (devices, batch, tokens, heads, kv_heads, causal, mask kind): token counts 1, 13, 100, 203 are not
# multiples of 8 (padded and masked); 3 devices check the zig-zag exchange for an odd ring.
CASES = [
    (8, 2, 100, 4, 2, True, None),
    (8, 1, 13, 2, 2, True, "keys"),
    (8, 3, 64, 4, 1, False, "keys"),
    (8, 1, 203, 2, 2, False, "full+bias"),
    (3, 2, 100, 2, 2, True, None),
    (8, 1, 1, 2, 2, True, None),
]


def masks(kind, batch, heads, tokens, seed=1):
    rng = np.random.default_rng(seed)
    if kind is None:
        return None, None
    if kind == "keys":  # padding: some keys of every row invisible, and one row sees none at all (zeros)
        mask = rng.random((batch, 1, 1, tokens)) > 0.3
        return None, jnp.asarray(mask)
    mask = rng.random((batch, heads, tokens, tokens)) > 0.2
    bias = rng.normal(size=(1, heads, tokens, tokens)).astype(np.float32)
    return jnp.asarray(bias), jnp.asarray(mask)


@pytest.mark.parametrize("case", CASES, ids=[f"n{c[0]}-b{c[1]}-T{c[2]}-h{c[3]}/{c[4]}-{'causal' if c[5] else 'full'}-{c[6]}" for c in CASES])
def test_forward_equals_one_device(case):
    devices, batch, tokens, heads, kv_heads, causal, kind = case
    q, k, v = qkv(batch, tokens, heads, kv_heads)
    bias, mask = masks(kind, batch, heads, tokens)
    with HIGHEST():
        got = ring(mesh_of(devices), is_causal=causal)(q, k, v, bias, mask)
        want = reference(q, k, v, bias, mask, is_causal=causal)
    assert got.shape == want.shape == (batch, tokens, heads, 8)
    err = float(jnp.max(jnp.abs(got - want)))
    bound = attention_bound(q, k, v, scale=8**-0.5, bias=bias, mask=mask, is_causal=causal)
    assert err <= bound, f"{case}: ring vs one device {want.shape}: max |diff| = {err:.3g} > derived bound {bound:.3g}"


def test_derived_bound_catches_a_ring_without_its_causal_mask():
    """A ring that dropped the causal mask (or a reference that did) is far outside the derived bound."""
    q, k, v = qkv(1, 13, 2, 2)
    _, mask = masks("keys", 1, 2, 13)
    with HIGHEST():
        got = ring(mesh_of(8), is_causal=True)(q, k, v, None, mask)
        not_causal = reference(q, k, v, None, mask, is_causal=False)
    bound = attention_bound(q, k, v, scale=8**-0.5, mask=mask, is_causal=True)
    err = float(jnp.max(jnp.abs(got - not_causal)))
    assert err > 10 * bound, f"a missing causal mask moved the output by {err:.3g}, the bound is {bound:.3g}"


def test_gradients_equal_one_device():
    """Not causal, grouped kv heads, a key mask, 37 tokens (padded): causal gradients through the ring are
    checked through the modules in tests/jaxattn/test_sharding.py (sequence mode)."""
    causal = False
    q, k, v = qkv(2, 37, 4, 2, seed=3)
    _, mask = masks("keys", 2, 4, 37, seed=4)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=(2, 37, 4, 8)), jnp.float32)
    mesh = mesh_of(8)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    ring_fn = loss(lambda q, k, v: ring_attention(q, k, v, None, mask, scale=8**-0.5, is_causal=causal, mesh=mesh,
                                                  axis_name="seq"))
    ref_fn = loss(lambda q, k, v: reference(q, k, v, None, mask, is_causal=causal))
    with HIGHEST():
        got = jax.jit(jax.grad(ring_fn, argnums=(0, 1, 2)))(q, k, v)
        want = jax.jit(jax.grad(ref_fn, argnums=(0, 1, 2)))(q, k, v)
    bounds = attention_grad_bound(q, k, v, weights, scale=8**-0.5, mask=mask, is_causal=causal)
    for name, g, w in zip("qkv", got, want):
        err = float(jnp.max(jnp.abs(g - w)))
        assert float(jnp.max(jnp.abs(w))) > 0.1  # a real gradient, not zeros on both sides
        assert err <= bounds[name], (
            f"d loss / d {name} {w.shape}: ring vs one device max |diff| = {err:.3g} > derived bound {bounds[name]:.3g}"
        )


def test_zigzag_balances_the_causal_work_at_every_step():
    """Hand count: visible (query, key) pairs per device per ring step are equal, and every token is held once."""
    devices, chunk = 4, 5
    held = np.stack([np.asarray(zigzag_positions(d, devices, chunk)) for d in range(devices)])  # (n, 2C)
    assert sorted(held.ravel().tolist()) == list(range(2 * devices * chunk))
    for step in range(devices):
        work = [int((held[(d - step) % devices][None, :] <= held[d][:, None]).sum()) for d in range(devices)]
        if step == 0:  # the diagonal block: two causal triangles and one full chunk
            assert work == [chunk * (chunk + 1) + chunk * chunk] * devices
        else:  # half of every block pair, on every device
            assert work == [2 * chunk * chunk] * devices, (step, work)
    # The plain order is the imbalance zig-zag removes: device 0 would see only its own block.
    plain = np.arange(2 * devices * chunk).reshape(devices, 2 * chunk)
    assert int((plain[1][None, :] <= plain[0][:, None]).sum()) == 0


def test_layout_pads_little():
    assert ring_layout(1000, 8) == (64, 64)  # 1024 padded tokens, one tile per chunk
    assert ring_layout(65536, 8) == (4096, 512)
    assert ring_layout(8200, 8) == (528, 264)  # two evened-out tiles, not 2 x 512
    assert ring_layout(1, 8) == (8, 8)


def test_keys_and_values_travel_by_collective_permute():
    q, k, v = qkv(1, 64, 2, 2)
    hlo = ring(mesh_of(8), is_causal=True).lower(q, k, v, None, None).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo  # no device ever gathers the whole sequence


def test_implementation_needs_a_mesh_and_serves_inside_one():
    q, k, v = qkv(1, 24, 2, 2, seed=7)
    with pytest.raises(ValueError, match="ring.*needs a mesh"):
        jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="ring")
    with pytest.raises(ValueError, match="ring.*q_tokens 5 != kv_tokens 24"), sharding.ring_mesh(mesh_of(8)):
        jaxattn.dot_product_attention(q[:, :5], k, v, implementation="ring")
    with pytest.raises(ValueError, match="q_offset"), sharding.ring_mesh(mesh_of(8)):
        jaxattn.dot_product_attention(q, k, v, is_causal=True, q_offset=3, implementation="ring")

    @jax.jit
    def f(q, k, v):
        with sharding.ring_mesh(mesh_of(8), "seq"):
            return jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="ring")

    with HIGHEST():
        err = float(jnp.max(jnp.abs(f(q, k, v) - reference(q, k, v, None, None, is_causal=True))))
    bound = attention_bound(q, k, v, is_causal=True)
    assert err <= bound, f"ring through dot_product_attention: max |diff| = {err:.3g} > derived bound {bound:.3g}"
    assert "ring" in jaxattn.implementations.names()
    assert sharding.current_ring_mesh() is None  # the context is gone after use


def test_refuses_an_axis_not_in_the_mesh():
    q, k, v = qkv(1, 8, 2, 2)
    with pytest.raises(ValueError, match="'tokens' is not an axis of the mesh"):
        ring_attention(q, k, v, scale=1.0, mesh=mesh_of(2), axis_name="tokens")
