"""The host model and the programs speak the real ttnn 0.81.1 API: names, keywords, kinds, defaults.

Real signatures come from nanobind's ``__nb_signature__`` (default values as objects) or,
for ttnn's Python-level ops (``from_torch``, ``to_torch``), from ``inspect.signature``.
"""

import pytest

from crosscheck.tt import host_model as hm
from tests.conformance.helpers import Param, host_signature, real_signatures, resolve, signature_problems


@pytest.mark.parametrize("dotted", hm.IMPLEMENTED)
def test_host_model_signature_equals_real(real_ttnn, dotted):
    real = real_signatures(real_ttnn, dotted)
    host = host_signature(resolve(hm, dotted), dotted)
    assert signature_problems(real, host) == [], (
        f"ttnn.{dotted}: host model ({', '.join(map(str, host))}) differs from every real overload:\n"
        + "\n".join(", ".join(map(str, o.params)) for o in real)
    )


def test_signature_check_catches_a_wrong_kind_and_default(real_ttnn):
    """The comparison itself can fail: softmax with positional memory_config, or numeric_stable=False."""
    real = real_signatures(real_ttnn, "softmax")

    def positional(input_tensor, dim=-1, memory_config=None, compute_kernel_config=None, numeric_stable=True): ...

    def unstable(input_tensor, dim=-1, *, memory_config=None, compute_kernel_config=None, numeric_stable=False): ...

    def right(input_tensor, dim=-1, *, memory_config=None, compute_kernel_config=None, numeric_stable=True): ...

    assert "memory_config: kind positional != real keyword_only" in signature_problems(real, host_signature(positional))
    assert "numeric_stable: default False != real True" in signature_problems(real, host_signature(unstable))
    assert signature_problems(real, host_signature(right)) == []


def test_real_signatures_read_values_of_nanobind_defaults(real_ttnn):
    """ttnn-notes §2: linear's keywords, and typecast's two overloads, as 0.81.1 declares them."""
    (linear,) = real_signatures(real_ttnn, "linear")
    assert linear.params[:4] == (
        Param("input_tensor_a", "positional", "<required>"),
        Param("input_tensor_b", "positional", "<required>"),
        Param("bias", "keyword_only", "None"),
        Param("transpose_a", "keyword_only", "False"),
    )
    assert Param("prefetcher_pipes", "keyword_only", "[]") in linear.params
    typecast = real_signatures(real_ttnn, "typecast")
    assert [[p.name for p in o.params if p.kind == "positional"] for o in typecast] == [
        ["input_tensor", "dtype"],
        ["input_tensor", "input_dtype", "output_dtype"],
    ]
    (softmax,) = real_signatures(real_ttnn, "softmax")
    assert Param("dim", "positional", "-1") in softmax.params


def test_every_implemented_name_exists_in_real_ttnn(real_ttnn):
    missing = []
    for dotted in hm.IMPLEMENTED:
        try:
            resolve(real_ttnn, dotted)
        except AttributeError:
            missing.append(dotted)
    assert missing == [], f"host model implements names real ttnn 0.81.1 lacks: {missing}"


def test_cache_ops_are_modelled_with_the_wheels_signatures(real_ttnn):
    """The KV-cache ops the decode programs call, as 0.81.1 declares them (positions are uint32 positionals)."""
    assert {"fill_cache", "update_cache", "fill_implicit_tile_padding"} <= set(hm.IMPLEMENTED)
    (fill,) = real_signatures(real_ttnn, "fill_cache")
    assert fill.params == (
        Param("cache_tensor", "positional", "<required>"),
        Param("input_tensor", "positional", "<required>"),
        Param("batch_idx", "positional", "<required>"),
        Param("update_idx", "keyword_only", "0"),
    )
    (update,) = real_signatures(real_ttnn, "update_cache")
    assert update.params == (
        Param("cache", "positional", "<required>"),
        Param("input", "positional", "<required>"),
        Param("update_idx", "positional", "<required>"),
        Param("batch_offset", "keyword_only", "0"),
        Param("compute_kernel_config", "keyword_only", "None"),
    )
    (pad,) = real_signatures(real_ttnn, "fill_implicit_tile_padding")
    assert [p.name for p in pad.params] == ["input_tensor", "fill_value", "memory_config"]
    (sdpa,) = real_signatures(real_ttnn, "transformer.scaled_dot_product_attention")
    assert Param("attn_mask", "keyword_only", "None") in sdpa.params  # the SDPA twins pass padding through it


def test_gqa_ops_are_modelled_with_the_wheels_signatures(real_ttnn):
    """grouped_query_attention's ops as 0.81.1 declares them: rms_norm's keyword-only epsilon/weight
    (default epsilon 1e-12, so the program passes the book's 1e-6), repeat_interleave's positional
    ``repeats``/``dim`` (torch's ``repeat_interleave(repeats, dim)``), slice's positional bounds."""
    assert {"rms_norm", "repeat_interleave", "slice", "concat", "multiply", "add"} <= set(hm.IMPLEMENTED)
    (rms,) = real_signatures(real_ttnn, "rms_norm")
    assert rms.params[:3] == (
        Param("input_tensor", "positional", "<required>"),
        Param("epsilon", "keyword_only", "1e-12"),
        Param("weight", "keyword_only", "None"),
    )
    assert Param("compute_kernel_config", "keyword_only", "None") in rms.params
    (rep,) = real_signatures(real_ttnn, "repeat_interleave")
    assert rep.params == (
        Param("input_tensor", "positional", "<required>"),
        Param("repeats", "positional", "<required>"),
        Param("dim", "positional", "<required>"),
        Param("memory_config", "keyword_only", "None"),
    )
    doc = real_ttnn.repeat_interleave.__doc__ or ""
    assert "Repeats elements of a :attr:`tensor` in the given :attr:`dim`" in doc
    assert r"\frac{x}{\sqrt{\epsilon+\frac{1}{N}\sum_{i=1}^{N}x^{2}}} \cdot \gamma" in (real_ttnn.rms_norm.__doc__ or "")
