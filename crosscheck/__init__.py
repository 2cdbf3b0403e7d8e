"""crosscheck: run torch, Flax and ttnn on the same attention weights and compare.

Imports here stay light (no torch, no JAX) so that the ttnn worker can import
the package in an interpreter that has only numpy and ttnn.
"""

from crosscheck.config import SEED_CONFIG, AttnConfig
from crosscheck.errors import BadInputError, CrosscheckError, MismatchError, PortError

__version__ = "0.1.0"

__all__ = ["AttnConfig", "SEED_CONFIG", "BadInputError", "CrosscheckError", "MismatchError", "PortError"]
