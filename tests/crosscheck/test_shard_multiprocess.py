"""Two processes on this machine form one JAX cluster (jax.distributed.initialize, localhost coordinator,
CPU devices, gloo collectives): ring attention across both processes' devices equals one device, and so
does MultiHeadAttention split by jaxattn.sharding.shard(..., "sequence").

The worker is tests/crosscheck/multiprocess_ring.py; each process has 2 CPU devices, so the ring has 4
members and two of its hops cross the process boundary.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("multiprocess_ring.py")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ring_attention_across_two_processes_equals_one_device():
    port = free_port()
    # Each worker sets its own device count; it compiles as the suite does (tests/conftest.py).
    env = {**os.environ, "XLA_FLAGS": os.environ.get("JAXATTN_TEST_COMPILE_FLAGS", ""), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), "2"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reports = []
    for code, out, err in outs:
        assert code == 0, f"worker exited {code}:\n{out}\n{err[-3000:]}"
        reports.append(json.loads(out.strip().splitlines()[-1]))
    first, second = sorted(reports, key=lambda r: r["process"])
    assert first["devices"] == second["devices"] == 4 and first["local_devices"] == 2
    assert first["collective_permute"] and second["collective_permute"]  # keys and values really travel
    assert first["passed"], first
    # Each within the bound derived from the computation (jaxattn.tolerance), computed by the worker
    assert first["max_abs_diff"] <= first["bound"] and first["grad_max_abs_diff"] <= first["grad_bound"]
    assert first["module_max_abs_diff"] <= first["module_bound"]  # shard(MultiHeadAttention, mesh, "sequence")
