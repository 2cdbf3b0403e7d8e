"""A deliberately wrong port of ``ALiBiAttention``: the table sends torch's ``W_key`` to Flax's ``W_value``
and back, so ``crosscheck --stages`` names ``W_key`` as the first stage over its bound."""

from alibi import ALiBiAttention, TorchALiBiAttention

import crosscheck
from crosscheck.variants import portmap as pm

SWAP = {"W_key": "W_value", "W_value": "W_key"}


def swapped(cfg):
    return pm.PortMap(
        tuple(
            entry
            for name in ("W_query", "W_key", "W_value")
            for entry in pm.linear(name, (SWAP.get(name, name),), cfg.d_in, cfg.d_out, bias=False)
        )
        + tuple(pm.linear("out_proj", ("out_proj",), cfg.d_out, cfg.d_out, bias=True)),
        ignored=("alibi",),
    )


crosscheck.register_variant(
    "ALiBiSwapped",
    torch_module=TorchALiBiAttention,
    flax_module=ALiBiAttention,
    config={"d_in": 3, "d_out": 4, "num_heads": 2, "context_length": 6},
    port=swapped,
)
