"""Shared fixtures. Strict dtype promotion catches silent float64/bf16 mixes in the core."""

import importlib.util

import jax
import pytest

# tests/conformance needs the real ttnn: `make test` runs it in .venv-ttnn (Python 3.12).
collect_ignore = [] if importlib.util.find_spec("ttnn") else ["conformance"]

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def seed_inputs():
    from crosscheck.seed import INPUTS

    return INPUTS


@pytest.fixture
def without_typecheck():
    """Turn jaxtyping's runtime checks off, to reach the ValueError a user without them gets."""
    from jaxtyping import config

    config.update("jaxtyping_disable", True)
    yield
    config.update("jaxtyping_disable", False)
