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

__all__ = [
    "SEED_CONFIG",
    "AttnConfig",
    "BadInputError",
    "CrosscheckError",
    "MismatchError",
    "PortError",
    "register_variant",
    "unregister_variant",
]

#: Names this module gives from elsewhere on first use, keeping ``import crosscheck`` light.
_LAZY = {
    "register_variant": "crosscheck.variants.plugins",
    "unregister_variant": "crosscheck.variants.plugins",
}


def __getattr__(name: str):
    """:func:`crosscheck.variants.plugins.register_variant` and ``unregister_variant``, imported when asked."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crosscheck' has no attribute {name!r}")
