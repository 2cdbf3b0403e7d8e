"""Run by tests/test_compile_report.py in a pytest of its own (not collected in the suite: no test_ prefix)."""

import jax
import numpy as np


def test_three_shapes_compile_three_programs():
    double = jax.jit(lambda x: x * 2.0 + 1.0)
    for n in (3, 5, 7):  # numpy inputs: no eager jnp op compiles a program of its own
        assert double(np.ones(n, np.float32)).shape == (n,)


def test_nothing_compiled():
    assert 1 + 1 == 2
