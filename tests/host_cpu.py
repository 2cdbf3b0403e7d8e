"""Tests of CPU-side logic run on the host CPU devices, also where JAX's default backend is a GPU.

tests/conftest.py forces 8 host CPU devices before JAX starts. On a CPU machine they are JAX's
devices; on a GPU machine ``jax.devices()`` is the GPU and the 8 host devices are
``jax.devices("cpu")``. Two kinds of tests belong on them there too:

* Pallas interpret-mode tests: the interpreter runs a kernel as a loop of tiny device programs,
  quick on the host, minutes on a GPU (the compiled GPU kernel has its own ``gpu`` tests);
* multi-device tests (8-device meshes, crosscheck's ``--devices``/``--shard``): they check the
  sharding logic, not the GPU, and a one-GPU machine has one device.

On a CPU machine both helpers change nothing: the host devices are JAX's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def on_the_host() -> Iterator[None]:
    """New arrays and jitted calls go to the first host CPU device (``jax.default_device``)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@contextlib.contextmanager
def as_a_cpu_machine(monkeypatch) -> Iterator[None]:
    """JAX as a CPU machine sees it: :func:`on_the_host`, and ``jax.default_backend()``/``jax.devices()``
    name the host CPU devices.

    For in-process code that asks JAX where it runs: jaxattn's ``auto`` dispatch (a GPU kernel
    would be picked for arrays on the host), crosscheck's device count check, meshes and row labels.
    """
    real_devices = jax.devices
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(jax, "devices", lambda backend=None: real_devices("cpu" if backend is None else backend))
    with on_the_host():
        yield
