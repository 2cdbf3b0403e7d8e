"""What precision each product of a traced function asks for (tests of the ``precision`` plumbing)."""

from __future__ import annotations

import jax


def dot_precisions(fn, *args) -> list:
    """The ``precision`` of every ``dot_general`` in ``fn``'s jaxpr, sub-jaxprs (jit, loops, branches,
    custom_jvp/vjp) included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found
