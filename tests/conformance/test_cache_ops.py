"""The host model's KV-cache ops and SDPA mask rules against the real ttnn 0.81.1 binary.

No op runs without a device, so the rules themselves are checked where the wheel keeps
them: every error text the host model raises for ``fill_cache``/``update_cache`` and for
SDPA masks is a format string of tt-metal's validation (``update_cache_device_operation.cpp``,
``sdpa_device_operation.cpp``) compiled into ``ttnn/build/lib/_ttnncpp.so``. Each row
triggers the host model's check and finds its text, placeholders and all, in the binary.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from crosscheck.tt import host_model as hm


@pytest.fixture(scope="module")
def binary(real_ttnn) -> bytes:
    path = Path(real_ttnn.__file__).parent / "build" / "lib" / "_ttnncpp.so"
    assert path.is_file(), f"{path} is missing from the wheel"
    return path.read_bytes()


@pytest.fixture
def device():
    d = hm.open_device(device_id=0)
    yield d
    hm.close_device(d)


def tt(shape, device, dtype=hm.bfloat16, layout=hm.TILE_LAYOUT):
    return hm.from_torch(np.ones(shape, np.float32), dtype=dtype, layout=layout, device=device)


CACHE = (2, 2, 40, 5)

#: (real format string, host-model call that must raise it).
RULES = [
    ("Operands to update_cache need to be on device!",
     lambda d: hm.update_cache(tt(CACHE, d), hm.from_torch(np.ones((1, 2, 2, 5), np.float32), dtype=hm.bfloat16,
                                                           layout=hm.TILE_LAYOUT), 0)),
    ("Inputs to update_cache must be tilized",
     lambda d: hm.update_cache(tt(CACHE, d), tt((1, 2, 2, 5), d, layout=hm.ROW_MAJOR_LAYOUT), 0)),
    ("Input tensor width ({}) must equal cache tensor width ({})",
     lambda d: hm.update_cache(tt(CACHE, d), tt((1, 2, 2, 33), d), 0)),
    ("Input tensor batch size must be 1 but got {}", lambda d: hm.fill_cache(tt(CACHE, d), tt((2, 2, 4, 5), d), 0)),
    ("Input tensor height ({}) must equal cache tensor height ({})",
     lambda d: hm.fill_cache(tt(CACHE, d), tt((1, 3, 4, 5), d), 0)),
    ("Input and cache tensors must have same dtype!",
     lambda d: hm.fill_cache(tt(CACHE, d), tt((1, 2, 4, 5), d, dtype=hm.float32), 0)),
    ("Batch index ({}) must be less than cache tensor batch size ({})",
     lambda d: hm.fill_cache(tt(CACHE, d), tt((1, 2, 4, 5), d), 2)),
    ("Fill update_idx ({}) must be a multiple of TILE_HEIGHT ({})",
     lambda d: hm.fill_cache(tt(CACHE, d), tt((1, 2, 4, 5), d), 0, update_idx=3)),
    ("Fill update_idx ({}) + input tensor height ({}) must be <= cache tensor height ({})",
     lambda d: hm.fill_cache(tt(CACHE, d), tt((1, 2, 33, 5), d), 0, update_idx=32)),
    ("Cache tensor batch size ({}) must be <= input tensor height ({})",
     lambda d: hm.update_cache(tt((33, 2, 40, 5), d), tt((1, 2, 2, 5), d), 0)),
    ("Batch offset ({}) + cache tensor batch size ({}) must be <= 32",
     lambda d: hm.update_cache(tt(CACHE, d), tt((1, 2, 2, 5), d), 0, batch_offset=31)),
    ("Batch offset must be 0 when cache tensor batch size >= 32",
     lambda d: hm.update_cache(tt((32, 2, 40, 5), d), tt((1, 2, 32, 5), d), 0, batch_offset=1)),
    ("When mask is provided to SDPA, it must be tilized",
     lambda d: hm.transformer.scaled_dot_product_attention(
         tt((1, 1, 4, 32), d), tt((1, 1, 4, 32), d), tt((1, 1, 4, 32), d), is_causal=False,
         attn_mask=tt((1, 1, 4, 4), d, layout=hm.ROW_MAJOR_LAYOUT))),
    ("Mask batch dim must either be 1 (to be broadcasted across all batches) or must match Q batch dimension",
     lambda d: hm.transformer.scaled_dot_product_attention(
         tt((2, 1, 4, 32), d), tt((2, 1, 4, 32), d), tt((2, 1, 4, 32), d), is_causal=False,
         attn_mask=tt((3, 1, 4, 4), d))),
    ("Mask sequence length must match K sequence length",
     lambda d: hm.transformer.scaled_dot_product_attention(
         tt((1, 1, 4, 32), d), tt((1, 1, 4, 32), d), tt((1, 1, 4, 32), d), is_causal=False,
         attn_mask=tt((1, 1, 4, 5), d))),
    ("is_causal and attn_mask cannot both be present. Got is_causal: {}, attn_mask: {}",
     lambda d: hm.transformer.scaled_dot_product_attention(
         tt((1, 1, 4, 32), d), tt((1, 1, 4, 32), d), tt((1, 1, 4, 32), d), attn_mask=tt((1, 1, 4, 4), d))),
]


def _pattern(text: str) -> str:
    """The format string as a regex: each ``{}`` is whatever the host model filled in."""
    return ".*".join(re.escape(part) for part in text.split("{}"))


@pytest.mark.parametrize("text, call", RULES, ids=[r[0][:48] for r in RULES])
def test_host_model_raises_the_real_validation_text(binary, device, text, call):
    assert text.encode() in binary, f"not a format string of ttnn 0.81.1: {text!r}"
    with pytest.raises(RuntimeError, match=_pattern(text)):
        call(device)


def test_the_text_check_can_fail(binary):
    assert b"Fill update_idx must be tile aligned" not in binary  # a plausible text the real op does not have
    assert b"Fill update_idx ({}) must be a multiple of TILE_HEIGHT ({})" in binary


def test_update_cache_takes_any_position_and_fill_cache_only_tile_multiples(device):
    """update_idx is the row written for every user (tt-metal's own test: ``cache[u, :, idx] = x[0, :, u]``)."""
    cache = hm.from_torch(np.zeros((3, 2, 40, 5), np.float32), dtype=hm.bfloat16, layout=hm.TILE_LAYOUT, device=device)
    row = np.arange(1 * 2 * 3 * 5, dtype=np.float32).reshape(1, 2, 3, 5)
    hm.update_cache(cache, hm.from_torch(row, dtype=hm.bfloat16, layout=hm.TILE_LAYOUT, device=device), 17)
    got = np.asarray(hm.to_torch(cache), np.float32)
    for user in range(3):
        np.testing.assert_array_equal(got[user, :, 17], row[0, :, user])
    assert np.count_nonzero(got) == np.count_nonzero(row)
