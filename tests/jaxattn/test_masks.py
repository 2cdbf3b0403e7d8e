"""Mask conventions, tested against each other (ours, the book's, ttnn's additive)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import core, masks
from jaxattn.tolerance import SOFTMAX_OPS, gamma


@pytest.mark.parametrize("n", [1, 2, 6, 33])
def test_book_triu_buffer_is_the_negation_of_our_causal_mask(n):
    book = masks.book_causal_mask(n)
    np.testing.assert_array_equal(book, np.triu(np.ones((n, n)), k=1))  # torch.triu(ones, diagonal=1)
    np.testing.assert_array_equal(masks.from_book_mask(book), masks.make_causal_mask(n))
    np.testing.assert_array_equal(masks.to_book_mask(masks.make_causal_mask(n)), book)


def test_causal_mask_lets_query_i_see_keys_up_to_i():
    m = np.asarray(masks.make_causal_mask(4))
    assert m.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]


def test_additive_mask_gives_the_same_softmax_as_boolean_masking():
    scores = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6)) * 5, jnp.float32)
    boolean = masks.make_causal_mask(6)
    additive = masks.to_additive_mask(boolean)
    via_bool = core.masked_softmax(scores, boolean)
    via_add = core.masked_softmax(scores + additive)
    # Two float32 softmaxes of the same visible scores (the additive value's exp is 0 as -inf's): weights <= 1,
    # each within gamma(T + SOFTMAX_OPS) of exact, relative.
    np.testing.assert_allclose(via_add, via_bool, atol=2 * gamma(6 + SOFTMAX_OPS), rtol=0)
    np.testing.assert_array_equal(masks.from_additive_mask(additive), np.broadcast_to(boolean, (6, 6)))


def test_additive_value_survives_bfloat16_as_a_large_finite_negative():
    v = jnp.asarray(masks.ADDITIVE_MASK_VALUE, jnp.bfloat16).astype(jnp.float32)
    assert np.isfinite(float(v)) and float(v) < -9e8
