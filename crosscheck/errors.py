"""Typed errors: the CLI maps bad input to exit 2 and mismatches to exit 1."""


class CrosscheckError(Exception):
    """Base of every error crosscheck raises on purpose."""


class BadInputError(CrosscheckError, ValueError):
    """The user's input (file, state dict, hyperparameters, shapes) cannot be used."""


class PortError(BadInputError):
    """A state dict does not fit the variant: missing, unexpected or mis-shaped keys."""


class MismatchError(CrosscheckError):
    """Backends disagree beyond the tolerance policy."""
