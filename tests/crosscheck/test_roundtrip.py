"""Torch -> Flax -> torch reproduces keys, dtypes and values exactly; nothing invented.

Every float dtype (float64, float32, bfloat16, float16) and every module the porter recognises
(the book's chapter-3 classes, ``nn.MultiheadAttention``, the book's GQA classes) goes through
``port.from_torch`` and back through ``port.to_state_dict``; the result must be bit-equal to the
source state dict, key for key and dtype for dtype, and load into a fresh module with ``strict=True``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from crosscheck.errors import BadInputError, PortError  # noqa: E402
from crosscheck.pipeline import budget  # noqa: E402
from crosscheck.porting import port
from crosscheck.references import torch_ref as tr  # noqa: E402
from crosscheck.references.torch_gqa import Llama3GroupedQueryAttention, Qwen3GroupedQueryAttention  # noqa: E402
from tests.bounds import check_layer  # noqa: E402

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

MODULES = {
    "SelfAttentionV1": lambda: tr.SelfAttentionV1(3, 2),
    "SelfAttentionV2": lambda: tr.SelfAttentionV2(3, 2, qkv_bias=True),
    "CausalAttention": lambda: tr.CausalAttention(3, 2, 6, 0.0),
    "MultiHeadAttentionWrapper": lambda: tr.MultiHeadAttentionWrapper(3, 2, 6, 0.0, 2),
    "MultiHeadAttention": lambda: tr.MultiHeadAttention(4, 4, 6, 0.0, 2, qkv_bias=True),
    "MultiHeadAttentionCombinedQKV": lambda: tr.MultiHeadAttentionCombinedQKV(4, 4, 2, 6),
    "TorchMultiheadAttention": lambda: torch.nn.MultiheadAttention(4, 2, batch_first=True),
}
GQA = {
    "Llama3GroupedQueryAttention": lambda: Llama3GroupedQueryAttention(8, 8, 4, 2),
    "Qwen3GroupedQueryAttention": lambda: Qwen3GroupedQueryAttention(8, 4, 2, head_dim=4, qk_norm=True),
}


def _bits(t: "torch.Tensor") -> np.ndarray:
    """The raw bits of a tensor, so that equality is exact (and NaN-proof) in every dtype."""
    t = t.detach().contiguous()
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.view(view).numpy()


def _assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want) or set(got) == set(want), (sorted(got), sorted(want))
    for key, ref in want.items():
        assert got[key].dtype == ref.dtype, (key, got[key].dtype, ref.dtype)
        assert tuple(got[key].shape) == tuple(ref.shape), key
        np.testing.assert_array_equal(_bits(got[key]), _bits(ref), err_msg=key)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(MODULES) + sorted(GQA))
def test_round_trip_is_exact_for_every_dtype(name, dtype):
    torch.manual_seed(0)
    module = (MODULES.get(name) or GQA[name])().to(dtype)
    options = {"rope_theta": 10_000.0, "context_length": 64} if name in GQA else {}
    flax_module, variables = port.from_torch(module, **options)
    back = port.to_state_dict(flax_module, variables, return_tensors="pt")
    _assert_same(back, module.state_dict())
    fresh = (MODULES.get(name) or GQA[name])().to(dtype)
    fresh.load_state_dict(back, strict=True)


def test_numpy_round_trip_keeps_bfloat16_and_float64():
    module = tr.CausalAttention(3, 2, 6, 0.0).to(torch.bfloat16)
    flax_module, variables = port.from_torch(module)
    back = port.to_state_dict(flax_module, variables)
    assert {str(v.dtype) for v in back.values()} == {"bfloat16"}
    module64 = tr.MultiHeadAttention(4, 4, 6, 0.0, 2).double()
    flax_module, variables = port.from_torch(module64)
    back = port.to_state_dict(flax_module, variables)
    assert {v.dtype for v in back.values()} == {np.dtype(np.float64)}
    for key, ref in module64.state_dict().items():
        np.testing.assert_array_equal(back[key], ref.numpy())


class _NoMaskCombined(torch.nn.Module):
    """The book's ``MHAPyTorchScaledDotProduct``: qkv + proj, causal through SDPA, a ``context_length``
    attribute but no ``mask`` buffer."""

    def __init__(self, d_in=4, d_out=4, num_heads=2, context_length=6):
        super().__init__()
        self.num_heads, self.d_out, self.head_dim = num_heads, d_out, d_out // num_heads
        self.context_length = context_length
        self.qkv = torch.nn.Linear(d_in, 3 * d_out, bias=False)
        self.proj = torch.nn.Linear(d_out, d_out)
        self.dropout = 0.0

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, b, H, T, hd)
        context_vec = torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True)  # (b, H, T, hd)
        return self.proj(context_vec.transpose(1, 2).reshape(b, t, self.d_out))


def test_no_buffer_is_invented_and_nothing_allocated_for_an_unbounded_context():
    torch.manual_seed(0)
    module = _NoMaskCombined().eval()
    assert "mask" not in module.state_dict()
    flax_module, variables = port.from_torch(module)
    assert flax_module.context_length == port.UNBOUNDED_CONTEXT
    # A 2^30 x 2^30 mask would be 4 EiB: building it must not even be tried, forward or back.
    back = port.to_state_dict(flax_module, variables, return_tensors="pt")
    _assert_same(back, module.state_dict())
    x = torch.rand(2, 9, 4)  # longer than the unused context_length attribute: SDPA has no limit either
    want = module(x).detach().numpy()
    import jax

    with jax.default_matmul_precision("highest"):
        got = np.asarray(flax_module.apply(variables, jax.numpy.asarray(x.numpy())))
    check_layer(flax_module, variables["params"], x.numpy(), got, want, "flax vs torch SDPA")


def test_a_huge_context_mask_is_refused_before_allocation():
    import jaxattn

    module = jaxattn.CausalAttention(d_in=3, d_out=2, context_length=100_000, dropout=0.0)
    variables = port.load_state_dict(module, {k: v for k, v in tr.CausalAttention(3, 2, 6, 0.0).state_dict().items()
                                              if k != "mask"})
    with budget.limited("1G"), pytest.raises(BadInputError, match=r"mask buffers of context_length 100000.*37.3 GiB"):
        port.to_state_dict(module, variables)
    # Without the buffer the same variables port back at once.
    assert sorted(port.to_state_dict(module, variables, buffers=False)) == ["W_key.weight", "W_query.weight", "W_value.weight"]


def test_a_modulelist_of_non_causal_heads_is_not_a_wrapper():
    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList([tr.SelfAttentionV2(3, 2) for _ in range(2)])

    with pytest.raises(BadInputError, match=r"not a MultiHeadAttentionWrapper.*heads\.0 \(SelfAttentionV2\), heads\.1"):
        port.from_torch(Heads())


def test_heads_of_different_context_lengths_are_refused():
    module = tr.MultiHeadAttentionWrapper(3, 2, 6, 0.0, 2)
    module.heads[1] = tr.CausalAttention(3, 2, 7, 0.0)
    with pytest.raises(BadInputError, match=r"heads\.1 differ"):
        port.from_torch(module)


def test_duplicate_aliases_are_refused_naming_both_keys():
    sd = {k: v.numpy() for k, v in tr.SelfAttentionV2(3, 2).state_dict().items()}
    sd["W_val.weight"] = sd["W_value.weight"] + 1
    import jaxattn

    with pytest.raises(PortError, match=r"'W_value.weight' and 'W_val.weight' both name 'W_value.weight'"):
        port.load_state_dict(jaxattn.SelfAttentionV2(d_in=3, d_out=2), sd)
    from crosscheck.pipeline import engine

    with pytest.raises(PortError, match="duplicate aliases"):
        engine.run(["SelfAttentionV2"], weights=sd, backends=("torch",))
    # One alias alone is still accepted.
    alone = dict(sd)
    del alone["W_value.weight"]
    port.load_state_dict(jaxattn.SelfAttentionV2(d_in=3, d_out=2), alone)


@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16, torch.float16), ids=str)
def test_weights_kept_in_their_dtype_still_compute_the_torch_result(dtype):
    """Keeping a float64/bf16/fp16 weight as it is (for the exact round trip) changes no output: the module
    computes in float32 from it, as torch does from the same values upcast."""
    import jax
    import jax.numpy as jnp

    torch.manual_seed(0)
    module = tr.MultiHeadAttention(4, 4, 6, 0.0, 2).to(dtype).eval()
    flax_module, variables = port.from_torch(module)
    x = torch.rand(1, 5, 4)
    want = module.float()(x).detach().numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(flax_module.apply(variables, jnp.asarray(x.numpy())))
    assert got.dtype == np.float32
    check_layer(flax_module, variables["params"], x.numpy(), got, want, f"{dtype} weights: flax vs torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ("llama", "qwen3", "gpt2"))
def test_transformers_layers_round_trip_exactly(kind, dtype):
    pytest.importorskip("transformers", reason="the Hugging Face formats need the [hf] extra")
    from .test_hf import _module, gpt2_config, llama_config, qwen3_config

    config = {"llama": llama_config, "qwen3": qwen3_config, "gpt2": gpt2_config}[kind]()
    module = _module(kind, config).to(dtype)
    variant, _ = port.recognise(module)
    flax_module, variables = port.from_torch(module)
    back = port.to_state_dict(flax_module, variables, return_tensors="pt", variant=variant.name)
    _assert_same(back, module.state_dict())
