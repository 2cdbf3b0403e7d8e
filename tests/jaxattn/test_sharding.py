"""jaxattn.sharding on 8 forced host CPU devices: every shard mode equals one device, forward and gradients.

Equality alone could hold with nothing split, so each mode is also checked in the compiled program:
heads mode sums partial out_proj products (all-reduce), sequence mode passes keys round the ring
(collective-permute), and the parameters are placed as the logical-axis table says. On a GPU machine
the tests see JAX as a CPU machine does (tests/host_cpu.py): meshes, arrays, the one-device references
and jaxattn's ``auto`` choice.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import jaxattn
from jaxattn import sharding
from jaxattn.tolerance import reference_bound
from tests.bounds import chain_length, check_layer, layer_grads64, max_abs
from tests.host_cpu import as_a_cpu_machine

HIGHEST = functools.partial(jax.default_matmul_precision, "highest")


@pytest.fixture(autouse=True)
def cpu_machine(monkeypatch):
    with as_a_cpu_machine(monkeypatch):
        yield


@pytest.fixture
def mesh(cpu_machine):
    return sharding.make_mesh(8, "devices")


def mha():
    return jaxattn.MultiHeadAttention(16, 16, 256, 0.0, 8, qkv_bias=True)


MODULES = {
    "MultiHeadAttention": mha,
    "GroupedQueryAttention": lambda: jaxattn.GroupedQueryAttention(16, 8, 8, head_dim=4, qk_norm=True),
    "MultiHeadAttentionCombinedQKV": lambda: jaxattn.MultiHeadAttentionCombinedQKV(16, 16, 8, 256),
    "TorchMultiheadAttention": lambda: jaxattn.TorchMultiheadAttention(16, 8, causal=False),
}

# (mode, module, batch, tokens): batch 3 and tokens 37 / 101 are not multiples of 8 (padded). Not causal
# (TorchMultiheadAttention) in sequence mode: tests/jaxattn/test_ring.py and tests/crosscheck/test_shard_cli.py.
CASES = [
    ("batch", "MultiHeadAttention", 3, 21),
    ("batch", "GroupedQueryAttention", 16, 21),
    ("heads", "MultiHeadAttention", 2, 21),
    ("heads", "GroupedQueryAttention", 1, 21),
    ("heads", "TorchMultiheadAttention", 2, 21),
    ("sequence", "MultiHeadAttention", 2, 37),
    ("sequence", "GroupedQueryAttention", 1, 64),
    ("sequence", "MultiHeadAttentionCombinedQKV", 3, 101),
]


def inputs(batch, tokens, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, tokens, 16)), jnp.float32)


def init(module, x):
    return jax.jit(module.init)(jax.random.key(0), x)


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_forward_equals_one_device(case, mesh):
    mode, name, batch, tokens = case
    module = MODULES[name]()
    x = inputs(batch, tokens)
    variables = init(module, x)
    with HIGHEST():
        want = jax.jit(module.apply)(variables, x)
        got = sharding.shard(module, mesh, mode).apply(variables, x)
    assert got.shape == want.shape
    check_layer(module, variables["params"], x, got, want, f"{case}: {want.shape} sharded vs 1 device")


def test_padding_mask_is_kept_in_sequence_mode(mesh):
    module = mha()
    x = inputs(2, 29, seed=1) * 10
    real = np.ones((2, 29), bool)
    real[1, :6] = False  # left padding on the second row
    variables = init(module, x)
    with HIGHEST():
        want = jax.jit(module.apply)(variables, x, attention_mask=real)
        got = sharding.shard(module, mesh, "sequence").apply(variables, x, attention_mask=real)
    check_layer(module, variables["params"], x, got, want, "sequence mode with attention_mask", attention_mask=real)


@pytest.fixture(scope="module")
def gradient_case():
    """The module, its variables, input, cotangent, one device's float32 gradients and the float64 ones
    (tests/bounds.py): computed once for the three modes, on the host as the tests run (as_a_cpu_machine)."""
    with pytest.MonkeyPatch.context() as monkeypatch, as_a_cpu_machine(monkeypatch):
        module = mha()
        x = inputs(3, 19, seed=2)
        variables = init(module, x)
        weights = jnp.asarray(np.random.default_rng(3).normal(size=(3, 19, 16)), jnp.float32)
        with HIGHEST():
            loss = lambda v, x: jnp.sum(module.apply(v, x) * weights)  # noqa: E731
            want = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
        exact = layer_grads64(module, variables["params"], x, weights)
    return module, variables, x, weights, want, ({"params": exact[0]}, exact[1])


@pytest.mark.parametrize("mode", sharding.MODES)
def test_gradients_equal_one_device(mode, mesh, gradient_case):
    """Within 4x one device's own float32 error against float64 (a first-order bound through the whole
    backward pass is impractical; jaxattn.tolerance.reference_bound)."""
    module, variables, x, weights, want, exact = gradient_case
    sharded = sharding.shard(module, mesh, mode)
    with HIGHEST():
        got = jax.jit(jax.grad(lambda v, x: jnp.sum(sharded.call(v, x) * weights), argnums=(0, 1)))(variables, x)
    flat_want, flat_got = jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)
    flat_exact = jax.tree.leaves(exact)
    assert len(flat_want) == len(flat_got) == len(flat_exact) == 9  # 4 kernels, 4 biases, x
    length = chain_length(module, variables["params"], x) + x.shape[0] * x.shape[1]  # weight grads sum over B T
    for (path, w), g, e in zip(flat_want, flat_got, flat_exact):
        assert g.shape == w.shape == e.shape
        bound = reference_bound(w, e, reduction_length=length)
        err = max_abs(g, e)
        assert err <= bound, (
            f"[{mode}] d loss / d {jax.tree_util.keystr(path)} {w.shape}: max |sharded - float64| = {err:.3g} > "
            f"bound {bound:.3g} (one device: {max_abs(w, e):.3g})"
        )


def compiled_text(mode, mesh, module, x):
    sharded = sharding.shard(module, mesh, mode)
    variables = init(module, x)
    return jax.jit(sharded.call).lower(sharded.place(variables), x).compile().as_text()


def test_each_mode_really_splits_the_work(mesh):
    module, x = mha(), inputs(8, 32)
    heads = compiled_text("heads", mesh, module, x)
    assert "all-reduce" in heads and "collective-permute" not in heads
    sequence = compiled_text("sequence", mesh, module, x)
    assert "collective-permute" in sequence
    batch = compiled_text("batch", mesh, module, x)
    assert not any(op in batch for op in ("all-reduce", "collective-permute", "all-gather"))  # rows are independent


def test_parameters_follow_the_logical_axis_table_and_user_rules(mesh):
    module = mha()
    variables = init(module, inputs(1, 4))
    assert all(type(leaf) is not nn.LogicallyPartitioned for leaf in jax.tree.leaves(variables))  # init unchanged
    axes = sharding.logical_axes(variables)["params"]
    assert axes["W_query"]["kernel"] == PartitionSpec("embed", "heads")
    assert axes["out_proj"]["kernel"] == PartitionSpec("heads", "embed")
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(variables, mesh, "heads"))["params"]
    assert specs["W_query"]["kernel"] == PartitionSpec(None, "devices")
    assert specs["W_key"]["bias"] == PartitionSpec("devices")
    assert specs["out_proj"]["kernel"] == PartitionSpec("devices", None)
    assert all(e is None for e in specs["out_proj"]["bias"])  # replicated
    for mode in ("batch", "sequence"):
        replicated = jax.tree.map(lambda s: s.spec, sharding.param_shardings(variables, mesh, mode))
        assert all(spec == PartitionSpec() or all(e is None for e in spec) for spec in jax.tree.leaves(replicated))

    fused = jaxattn.MultiHeadAttentionCombinedQKV(16, 16, 8, 16)
    fused_vars = init(fused, inputs(1, 4))
    default = sharding.param_shardings(fused_vars, mesh, "heads")["params"]["qkv"]["kernel"].spec
    assert all(e is None for e in default)  # the (3, heads, head_dim) columns stay whole by default
    own = sharding.param_shardings(fused_vars, mesh, "heads", rules=[("qkv", "devices")])["params"]["qkv"]["kernel"]
    assert own.spec == PartitionSpec(None, "devices")  # the user's rule comes first
    boxed = sharding.boxed(variables)["params"]["W_query"]["kernel"]
    assert isinstance(boxed, nn.LogicallyPartitioned) and boxed.names == ("embed", "heads")


def test_bad_requests_name_the_numbers(mesh):
    with pytest.raises(ValueError, match="unknown shard mode 'tokens'"):
        sharding.shard(mha(), mesh, "tokens")
    with pytest.raises(ValueError, match="'model' is not an axis of the mesh"):
        sharding.shard(mha(), mesh, "batch", axis="model")
    with pytest.raises(ValueError, match="SelfAttentionV1 has no attention_impl"):
        sharding.shard(jaxattn.SelfAttentionV1(4, 4), mesh, "sequence")
    with pytest.raises(ValueError, match="asked for 9 devices, JAX sees 8"):
        sharding.make_mesh(9)
    six_heads = jaxattn.MultiHeadAttention(12, 12, 8, 0.0, 6)
    variables = init(six_heads, jnp.ones((1, 4, 12)))
    with pytest.raises(ValueError, match=r"W_\w+/kernel of shape \(12, 12\) cannot be split over 8 devices \(12 is not a multiple of 8\)"):
        sharding.shard(six_heads, mesh, "heads").apply(variables, jnp.ones((1, 4, 12)))
