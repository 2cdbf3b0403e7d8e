"""crosscheck: run torch, Flax and ttnn on the same attention weights and compare.

Imports here stay light (no torch, no JAX) so that the ttnn worker can import
the package in an interpreter that has only numpy and ttnn. Everywhere else the package needs the
``[crosscheck]`` extra (torch, safetensors, rich): :mod:`crosscheck.extra` says so at import, in one line.
"""

from crosscheck import extra

extra.require()

# The check comes before any other import, so that a missing torch is named before anything fails on it.
from crosscheck.config import SEED_CONFIG, AttnConfig  # noqa: E402
from crosscheck.errors import BadInputError, CrosscheckError, MismatchError, PortError  # noqa: E402

__version__ = "0.2.0"  # the jaxattn distribution's version (tests/test_packaging.py keeps them equal)

__all__ = ["SEED_CONFIG", "AttnConfig", "BadInputError", "CrosscheckError", "MismatchError", "PortError"]
