"""RoPE and RMS-norm against the book's torch code (llms-from-scratch 1.0.19, in crosscheck/references/torch_gqa.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.norms import rms_norm
from jaxattn.rope import apply_rope, compute_rope_params, freq_config_from_rope_scaling
from jaxattn.tolerance import gamma
from tests.bounds import rope_error, trig_error

torch = pytest.importorskip("torch")
torch_gqa = pytest.importorskip("crosscheck.references.torch_gqa")

LLAMA32_FREQ = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 8192}
SMALL_FREQ = {"factor": 13.0, "low_freq_factor": 3.0, "high_freq_factor": 6.0, "original_context_length": 100}


def max_abs(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("freq_config", [None, LLAMA32_FREQ, SMALL_FREQ], ids=["plain", "llama3.2", "small"])
@pytest.mark.parametrize("head_dim, theta", [(2, 10_000.0), (6, 1_000_000.0), (64, 500_000.0), (128, 10_000.0)])
def test_tables_equal_the_books(head_dim, theta, freq_config):
    """Eager and jitted, every one of 4096 positions: a one-ulp frequency error would show as ~1e-4 here."""
    book_cos, book_sin = torch_gqa.compute_rope_params(head_dim, theta, 4096, freq_config)
    jitted = jax.jit(lambda: compute_rope_params(head_dim, theta, 4096, freq_config))
    for cos, sin in (compute_rope_params(head_dim, theta, 4096, freq_config), jitted()):
        assert cos.shape == sin.shape == (4096, head_dim) and cos.dtype == jnp.float32
        err = max(max_abs(cos, book_cos.numpy()), max_abs(sin, book_sin.numpy()))
        bound = 2 * trig_error()  # the same float32 angles, two libraries' cos and sin
        assert err <= bound, f"cos/sin {cos.shape} vs the book's {tuple(book_cos.shape)}: max |diff| = {err:.3g}"


def test_scaling_changes_only_the_low_frequencies():
    """Hand-checkable: with head_dim=2 the one frequency is 1 (wavelength 2*pi, short): Llama 3 keeps it."""
    freq = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 64}
    cos, sin = compute_rope_params(2, 10_000.0, 3, freq)
    np.testing.assert_allclose(cos[:, 0], np.cos([0.0, 1.0, 2.0]), atol=trig_error(), rtol=0)  # exact angles
    plain, _ = compute_rope_params(64, 10_000.0, 50)
    scaled, _ = compute_rope_params(64, 10_000.0, 50, freq)
    assert max_abs(plain[:, :4], scaled[:, :4]) == 0.0  # high frequencies (short waves) kept
    assert max_abs(plain[:, 31], scaled[:, 31]) > 0.0  # the lowest frequency is divided by the factor


@pytest.mark.parametrize("offset", [0, 3, "traced"])
def test_apply_rope_equals_the_books_in_our_layout(offset):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)  # (b, T, heads, hd)
    cos, sin = compute_rope_params(8, 10_000.0, 16, LLAMA32_FREQ)
    book_cos, book_sin = torch_gqa.compute_rope_params(8, 10_000.0, 16, LLAMA32_FREQ)
    start = 7 if offset == "traced" else offset
    # The book rotates positions 0..T-1 of the tables it is given: hand it the rows from `start`.
    expected = torch_gqa.apply_rope(torch.from_numpy(x).transpose(1, 2), book_cos[start:], book_sin[start:])
    if offset == "traced":
        got = jax.jit(lambda x, o: apply_rope(x, cos, sin, offset=o))(x, jnp.int32(7))
    else:
        got = apply_rope(jnp.asarray(x), cos, sin, offset=offset)
    err = max_abs(got, expected.transpose(1, 2).numpy())
    bound = 2 * float(rope_error(x).max())  # two float32 rotations, each with its own library's tables
    assert err <= bound, f"apply_rope {x.shape} at offset {start}: max |diff| = {err:.3g} > bound {bound:.3g}"


def test_apply_rope_keeps_the_dtype_and_rotates_in_float32():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 2, 6)), jnp.bfloat16)
    cos, sin = compute_rope_params(6, 10_000.0, 4)
    got = apply_rope(x, cos, sin)
    assert got.dtype == jnp.bfloat16
    exact = apply_rope(x.astype(jnp.float32), cos, sin)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(exact.astype(jnp.bfloat16)))


def test_rotation_keeps_norms_and_scores_depend_on_distance_only():
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)).astype(np.float32)) for _ in range(2))
    cos, sin = compute_rope_params(16, 10_000.0, 64)
    rq = apply_rope(q, cos, sin, offset=9)
    # |rq| = |q| exactly. The computed rotation is off by rope_error per entry (its norm by at most that
    # vector's norm), and each float32 norm (16 squares summed, a root) by gamma(17) relative at most.
    a, e_q, e_k = np.abs(np.asarray(q, np.float64)), rope_error(q), rope_error(k)
    norm = float(np.linalg.norm(a))
    bound = float(np.linalg.norm(e_q)) + 2 * gamma(17) * norm
    np.testing.assert_allclose(jnp.linalg.norm(rq), jnp.linalg.norm(q), atol=bound, rtol=0)
    score = lambda i, j: float(jnp.sum(apply_rope(q, cos, sin, offset=i) * apply_rope(k, cos, sin, offset=j)))  # noqa: E731
    # Equal in exact arithmetic (the angle difference is the same); each computed score is off by its two
    # rotations' errors times the other factor, plus a 16-term dot product's rounding.
    rot = lambda x: np.abs(np.asarray(x, np.float64))[..., [*range(8, 16), *range(8)]]  # noqa: E731 - |rot(x)|
    mq, mk = a + rot(q), np.abs(np.asarray(k, np.float64)) + rot(k)  # bound |rotated q|, |rotated k|
    one = float((e_q * mk + mq * e_k).sum() + gamma(16) * (mq * mk).sum())
    assert abs(score(5, 2) - score(40, 37)) <= 2 * one, (abs(score(5, 2) - score(40, 37)), 2 * one)


def test_apply_rope_errors_name_the_shapes(without_typecheck):
    cos, sin = compute_rope_params(8, 10_000.0, 4)
    with pytest.raises(ValueError, match=r"positions 2\.\.5 exceed the tables' 4 rows"):
        apply_rope(jnp.ones((1, 4, 1, 8)), cos, sin, offset=2)
    with pytest.raises(ValueError, match=r"got cos \(4, 8\)"):
        apply_rope(jnp.ones((1, 4, 1, 6)), cos, sin)
    with pytest.raises(ValueError, match=r"head_dim=7 must be even"):
        compute_rope_params(7)


def test_freq_config_from_transformers_rope_scaling():
    hf = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    assert freq_config_from_rope_scaling(hf) == LLAMA32_FREQ
    assert freq_config_from_rope_scaling(None) is None
    assert freq_config_from_rope_scaling({"rope_type": "default"}) is None
    with pytest.raises(ValueError, match=r"rope_type='yarn' is not supported"):
        freq_config_from_rope_scaling({"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"original_max_position_embeddings"):
        freq_config_from_rope_scaling({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    with pytest.raises(ValueError, match=r"freq_config needs exactly the keys"):
        compute_rope_params(8, freq_config={"factor": 8.0})


@pytest.mark.parametrize("with_shift", [False, True])
def test_rms_norm_equals_the_books(with_shift):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 5, 6)).astype(np.float32) * 3
    book = torch_gqa.RMSNorm(6, eps=1e-6, bias=with_shift)
    with torch.no_grad():
        book.scale.copy_(torch.from_numpy(rng.normal(size=6).astype(np.float32)))
        if with_shift:
            book.shift.copy_(torch.from_numpy(rng.normal(size=6).astype(np.float32)))
        expected = book(torch.from_numpy(x)).numpy()
    shift = jnp.asarray(book.shift.detach().numpy()) if with_shift else None
    got = rms_norm(jnp.asarray(x), jnp.asarray(book.scale.detach().numpy()), 1e-6, shift)
    # Per entry: the mean of 6 squares (gamma(7), halved by the root), + eps, rsqrt (2 ulp), two products and the
    # shift: within gamma(6 + 6) of |x / rms * scale| + |shift| for each of the two implementations.
    scale = np.abs(book.scale.detach().numpy()).astype(np.float64)
    x64 = x.astype(np.float64)
    magnitude = np.abs(x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)) * scale
    if with_shift:
        magnitude = magnitude + np.abs(book.shift.detach().numpy())
    bound = 2 * gamma(12) * float(magnitude.max())
    assert max_abs(got, expected) <= bound, (max_abs(got, expected), bound)
    half = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.ones(6), 1e-6)
    assert half.dtype == jnp.bfloat16  # computed in float32, returned in the input's dtype
