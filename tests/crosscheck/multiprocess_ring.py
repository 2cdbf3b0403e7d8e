"""One of several processes of tests/crosscheck/test_shard_multiprocess.py: ring attention across processes.

``python multiprocess_ring.py PORT PROCESS_ID NUM_PROCESSES``: joins the JAX cluster whose coordinator
listens on localhost:PORT (process 0 runs it), with 2 CPU devices per process and CPU collectives
over gloo, runs sequence-parallel ring attention over every device of every process, and on process 0
compares the gathered result (forward and the gradient of the queries) with one device; then the same
for MultiHeadAttention split by ``jaxattn.sharding.shard(..., "sequence")``. Each within the bound
derived from the computation (jaxattn.tolerance, tests/bounds.py), reported beside it. Prints one
JSON line; exits 1 on a mismatch.
"""

import json
import os
import sys

# Before JAX starts: 2 CPU devices here, beside the compile flags the test passes on.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
os.environ["JAX_PLATFORMS"] = "cpu"  # those, on a GPU machine too: the cluster is of host devices (gloo)

import jax  # noqa: E402

port, process_id, num_processes = (int(a) for a in sys.argv[1:4])
# CPU collectives between processes: gloo (TCP), bundled with jaxlib.
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"localhost:{port}", num_processes=num_processes, process_id=process_id,
    local_device_ids=[0, 1], initialization_timeout=120,
)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from jaxattn.kernels.naive import naive_attention  # noqa: E402
from jaxattn.kernels.ring import ring_attention  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
devices = jax.devices()  # every process's devices: the ring spans processes
mesh = Mesh(np.array(devices), ("seq",))
rng = np.random.default_rng(0)  # the same arrays in every process
batch, tokens, heads, head_dim = 2, 45, 2, 8  # 45 tokens: not a multiple of the 4 devices
q_np, k_np, v_np = (rng.normal(size=(batch, tokens, heads, head_dim)).astype(np.float32) for _ in range(3))
w_np = rng.normal(size=(batch, tokens, heads, head_dim)).astype(np.float32)
replicated = NamedSharding(mesh, PartitionSpec())


def global_array(x):
    return jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])


def loss_ring(q, k, v, w):
    out = ring_attention(q, k, v, scale=head_dim**-0.5, is_causal=True, mesh=mesh, axis_name="seq")
    return jnp.sum(out * w), out


q, k, v, w = (global_array(x) for x in (q_np, k_np, v_np, w_np))
(_, out), grad_q = jax.jit(jax.value_and_grad(loss_ring, has_aux=True))(q, k, v, w)
out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
grad_q = np.asarray(multihost_utils.process_allgather(grad_q, tiled=True))
hlo = jax.jit(loss_ring).lower(q, k, v, w).compile().as_text()

# The module route: MultiHeadAttention split by sequence over both processes (jaxattn.sharding.shard).
import jaxattn  # noqa: E402
from jaxattn import sharding  # noqa: E402

module = jaxattn.MultiHeadAttention(16, 16, 64, 0.0, 4)
x_np = rng.normal(size=(2, 45, 16)).astype(np.float32)
variables = jax.jit(module.init, out_shardings=replicated)(jax.random.key(0), global_array(x_np))
module_out = sharding.shard(module, mesh, "sequence").apply(variables, global_array(x_np))
module_out = np.asarray(multihost_utils.process_allgather(module_out, tiled=True))
params_np = jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), variables)

report = {"process": process_id, "devices": len(devices), "local_devices": jax.local_device_count(),
          "collective_permute": "collective-permute" in hlo}
if process_id == 0:
    local = jax.local_devices()[0]

    def loss_one(q, k, v, w):
        out = naive_attention(q, k, v, None, None, scale=head_dim**-0.5, is_causal=True)[0]
        return jnp.sum(out * w), out

    args = [jax.device_put(x, local) for x in (q_np, k_np, v_np, w_np)]
    (_, want), want_grad = jax.jit(jax.value_and_grad(loss_one, has_aux=True))(*args)
    report["max_abs_diff"] = float(np.max(np.abs(out - np.asarray(want))))
    report["grad_max_abs_diff"] = float(np.max(np.abs(grad_q - np.asarray(want_grad))))
    params_local = jax.device_put(params_np, local)
    want_module = jax.jit(module.apply)(params_local, jax.device_put(x_np, local))
    report["module_max_abs_diff"] = float(np.max(np.abs(module_out - np.asarray(want_module))))
    from jaxattn.tolerance import attention_bound, attention_grad_bound
    from tests.bounds import layer_bound

    where = dict(scale=head_dim**-0.5, is_causal=True)
    report["bound"] = attention_bound(q_np, k_np, v_np, **where)
    report["grad_bound"] = attention_grad_bound(q_np, k_np, v_np, w_np, **where)["q"]
    report["module_bound"] = layer_bound(module, params_np["params"], x_np)
    report["passed"] = (report["max_abs_diff"] <= report["bound"]
                        and report["grad_max_abs_diff"] <= report["grad_bound"]
                        and report["module_max_abs_diff"] <= report["module_bound"])
print(json.dumps(report), flush=True)
jax.distributed.shutdown()
sys.exit(0 if report.get("passed", True) else 1)
