"""Torch side: padding masks on ``torch_ref`` and the KV-cache classes of ``torch_kv_cache``.

Every check compares numbers: decoding with a cache against the full masked forward, a padded
batch against each sequence run alone, the cached ``MultiHeadAttention`` against a verbatim copy
of the book package's class, and ``attention_mask=None`` against the book's ops, bit for bit.
"""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch", reason="the torch references need torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from crosscheck.references import torch_kv_cache as kv  # noqa: E402
from crosscheck.references import torch_ref  # noqa: E402
from jaxattn.tolerance import linear_error  # noqa: E402
from tests.bounds import torch_layer_bound  # noqa: E402
from tests.crosscheck import book_kv_cache  # noqa: E402

D_IN = 4
CONTEXT = 96
EMBED = 6  # nn.MultiheadAttention: d_in == d_out

# name -> (plain factory, cached factory); the same arguments, so the same state-dict keys
CACHED = {
    "CausalAttention": dict(d_in=D_IN, d_out=6, context_length=CONTEXT, dropout=0.0, qkv_bias=True),
    "MultiHeadAttentionWrapper": dict(d_in=D_IN, d_out=3, context_length=CONTEXT, dropout=0.0, num_heads=2, qkv_bias=True),
    "MultiHeadAttention": dict(d_in=D_IN, d_out=6, context_length=CONTEXT, dropout=0.0, num_heads=3, qkv_bias=True),
    "MultiHeadAttentionCombinedQKV": dict(d_in=D_IN, d_out=6, num_heads=3, context_length=CONTEXT, qkv_bias=True),
    "MultiheadAttention": dict(embed_dim=EMBED, num_heads=3),
}


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn from U(-1, 1): zero-initialised biases would hide a mis-placed bias."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1.0, 1.0)
    return module.eval()


def make_plain(name: str, seed: int = 0, **overrides) -> nn.Module:
    args = {**CACHED[name], **overrides}
    if name == "MultiheadAttention":
        module = nn.MultiheadAttention(args["embed_dim"], args["num_heads"], batch_first=True)
    else:
        module = getattr(torch_ref, name)(**args)
    return randomise(module, seed)


def make_cached(name: str, plain: nn.Module, **overrides) -> nn.Module:
    module = getattr(kv, name)(**{**CACHED[name], **overrides})
    module.load_state_dict(plain.state_dict(), strict=True)
    return module.eval()


def plain_forward(plain: nn.Module, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
    if isinstance(plain, nn.MultiheadAttention):
        return torch_ref.torch_multihead_forward(plain, x, True, attention_mask=attention_mask)
    return plain(x, attention_mask=attention_mask)


def d_in_of(name: str) -> int:
    return EMBED if name == "MultiheadAttention" else D_IN


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


def within(a: torch.Tensor, b: torch.Tensor, bound: float, what: str = "") -> None:
    """Two float32 computations of the same layer (other kernels, other chunks: other summation orders)
    agree within the layer's derived bound (tests/bounds.py, jaxattn.tolerance)."""
    diff = max_diff(a, b)
    assert diff <= bound, f"{what}: max |diff| {diff:.3g} > derived bound {bound:.3g}"


def decode(cached: nn.Module, x: torch.Tensor, prompt_len: int, chunk: int = 1, attention_mask=None):
    """Prefill ``x[:, :prompt_len]``, then feed the rest ``chunk`` tokens at a time; outputs concatenated."""
    outputs = []
    out, cache = cached(x[:, :prompt_len], use_cache=True, start_pos=0,
                        attention_mask=None if attention_mask is None else attention_mask[:, :prompt_len])
    outputs.append(out)
    pos = prompt_len
    while pos < x.shape[1]:
        end = min(pos + chunk, x.shape[1])
        mask = None if attention_mask is None else attention_mask[:, :end]
        out, cache = cached(x[:, pos:end], use_cache=True, start_pos=pos, cache=cache, attention_mask=mask)
        outputs.append(out)
        pos = end
    return torch.cat(outputs, dim=1), cache


def cache_length(cache) -> int:
    while isinstance(cache[0], tuple):  # the wrapper: a tuple of per-head caches
        cache = cache[0]
    return cache[0].shape[-2]


# ---------------------------------------------------------------------------------------------
# The cached classes: same keys, same ops without a cache, decoding equals the full forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CACHED))
def test_state_dicts_load_strictly_both_ways(name):
    plain = make_plain(name)
    cached = getattr(kv, name)(**CACHED[name])
    assert list(cached.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert cached.state_dict()[key].shape == value.shape, key
    cached.load_state_dict(plain.state_dict(), strict=True)
    other = make_plain(name, seed=1)
    other.load_state_dict(cached.state_dict(), strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    if name != "MultiheadAttention":
        assert inspect.signature(getattr(kv, name).__init__) == inspect.signature(getattr(torch_ref, name).__init__)


@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention_keys_and_init_follow_nn_multihead_attention(bias):
    torch.manual_seed(3)
    ours = kv.MultiheadAttention(8, 2, bias=bias)
    torch.manual_seed(3)
    theirs = nn.MultiheadAttention(8, 2, bias=bias, batch_first=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key  # same draws, same order
    x = torch.randn(2, 5, 8)
    for causal in (True, False):
        ours.causal = causal
        bound = torch_layer_bound(theirs, x, causal=causal)
        want = torch_ref.torch_multihead_forward(theirs.eval(), x, causal)
        within(ours(x)[0], want, bound, f"bias={bias} causal={causal}")


@pytest.mark.parametrize("name", list(CACHED))
def test_use_cache_false_equals_the_plain_class(name):
    plain = make_plain(name)
    cached = make_cached(name, plain)
    torch.manual_seed(5)
    x = torch.randn(3, 9, d_in_of(name))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :2] = False
    mask[2, 7:] = False
    for attention_mask in (None, mask):
        out, next_cache = cached(x, attention_mask=attention_mask)
        assert next_cache is None
        want = plain_forward(plain, x, attention_mask)
        if name == "MultiheadAttention":  # nn.MultiheadAttention runs its own kernel: not the same ops
            within(out, want, torch_layer_bound(plain, x, causal=True, mask=attention_mask), name)
        else:
            assert torch.equal(out, want), f"{name}: max |diff| {max_diff(out, want):.3g}"


@pytest.mark.parametrize("name", [n for n in CACHED if n != "MultiheadAttention"])
def test_use_cache_false_equals_the_plain_class_with_dropout_in_training(name):
    plain = make_plain(name, dropout=0.3).train()
    cached = make_cached(name, plain, dropout=0.3).train()
    x = torch.randn(2, 7, D_IN)
    torch.manual_seed(11)
    want = plain(x)
    torch.manual_seed(11)
    out, _ = cached(x)
    assert torch.equal(out, want)
    torch.manual_seed(11)
    assert not torch.equal(plain.eval()(x), want), "dropout must have changed something"


def test_multihead_attention_dropout_acts_in_training_only():
    module = randomise(kv.MultiheadAttention(EMBED, 3, dropout=0.5), seed=0)
    x = torch.randn(2, 7, EMBED)
    want, _ = module(x)
    assert torch.equal(module(x)[0], want)  # eval: deterministic
    torch.manual_seed(0)
    assert max_diff(module.train()(x)[0], want) > 1e-3
    module.dropout = 0.0
    assert max_diff(module(x)[0], want) == 0.0


@pytest.mark.parametrize("name", list(CACHED))
@pytest.mark.parametrize("prompt_len, chunk", [(1, 1), (2, 1), (7, 1), (4, 3)])
def test_prefill_then_decoding_equals_the_full_forward(name, prompt_len, chunk):
    plain = make_plain(name)
    cached = make_cached(name, plain)
    torch.manual_seed(prompt_len)
    x = torch.randn(2, 12, d_in_of(name))
    want = plain_forward(plain, x)
    got, cache = decode(cached, x, prompt_len, chunk)
    assert cache_length(cache) == 12
    within(got, want, torch_layer_bound(plain, x, causal=True), f"{name} decode vs full")


@pytest.mark.parametrize("name", list(CACHED))
def test_long_prompt_then_decoding_to_96_tokens(name):
    plain = make_plain(name)
    cached = make_cached(name, plain)
    torch.manual_seed(64)
    x = torch.randn(2, 96, d_in_of(name))
    got, cache = decode(cached, x, 64)
    assert cache_length(cache) == 96
    within(got, plain_forward(plain, x), torch_layer_bound(plain, x, causal=True), f"{name} decode to 96 tokens")


def test_cache_layouts():
    x = torch.randn(2, 4, D_IN)
    for name, want in [
        ("CausalAttention", (2, 4, 6)),  # no heads dim
        ("MultiHeadAttention", (2, 3, 4, 2)),
        ("MultiHeadAttentionCombinedQKV", (2, 3, 4, 2)),
    ]:
        _, (keys, values) = make_cached(name, make_plain(name))(x, use_cache=True)
        assert keys.shape == values.shape == want, name
    _, cache = make_cached("MultiHeadAttentionWrapper", make_plain("MultiHeadAttentionWrapper"))(x, use_cache=True)
    assert len(cache) == 2 and all(k.shape == v.shape == (2, 4, 3) for k, v in cache)
    _, (keys, _) = make_cached("MultiheadAttention", make_plain("MultiheadAttention"))(
        torch.randn(2, 4, EMBED), use_cache=True
    )
    assert keys.shape == (2, 3, 4, 2)


@pytest.mark.parametrize("name", list(CACHED))
def test_cache_arguments_are_checked(name):
    cached = make_cached(name, make_plain(name))
    x = torch.randn(2, 4, d_in_of(name))
    _, cache = cached(x, use_cache=True)
    with pytest.raises(ValueError, match="start_pos=3 must equal the cached length 4"):
        cached(x[:, :1], use_cache=True, start_pos=3, cache=cache)
    with pytest.raises(ValueError, match="start_pos=2 without a cache"):
        cached(x[:, :1], use_cache=True, start_pos=2)
    with pytest.raises(ValueError, match="use_cache=False"):
        cached(x[:, :1], use_cache=False, start_pos=4, cache=cache)
    with pytest.raises(ValueError, match=r"\(batch, start_pos \+ num_tokens\) = \(2, 5\).*got shape \(2, 1\)"):
        cached(x[:, :1], use_cache=True, start_pos=4, cache=cache, attention_mask=torch.ones(2, 1))
    if name != "MultiheadAttention":
        with pytest.raises(ValueError, match=f"exceed context_length={CONTEXT}"):
            cached(torch.randn(1, CONTEXT + 1, D_IN))


# ---------------------------------------------------------------------------------------------
# The book package's cached MultiHeadAttention (llms-from-scratch 1.0.19), verbatim
# ---------------------------------------------------------------------------------------------


def book_with_row_slice() -> type:
    """The book's class with one substitution: the causal mask's rows ``[-num_tokens:, :]``, not columns.

    The verbatim class can only prefill (see the test below); this is the smallest change that
    lets it decode, made on its own source so that nothing else can differ.
    """
    source = inspect.getsource(book_kv_cache.MultiHeadAttention)
    assert source.count("causal_mask[:, -num_tokens:]") == 1
    namespace = {"torch": torch, "nn": nn}
    exec(source.replace("causal_mask[:, -num_tokens:]", "causal_mask[-num_tokens:, :]"), namespace)
    return namespace["MultiHeadAttention"]


def book_pair(book_class, seed=0):
    ours = make_cached("MultiHeadAttention", make_plain("MultiHeadAttention", seed=seed))
    book = book_class(**CACHED["MultiHeadAttention"]).eval()
    missing, unexpected = book.load_state_dict(ours.state_dict(), strict=False)
    assert (missing, unexpected) == ([], ["mask"]), "the book's cached class has no mask buffer, nothing else differs"
    return ours, book


def test_prefill_equals_the_book_package_verbatim():
    ours, book = book_pair(book_kv_cache.MultiHeadAttention)
    x = torch.randn(2, 7, D_IN)
    out, (keys, values) = ours(x, use_cache=True)
    book_out, (book_keys, book_values) = book(x, use_cache=True)
    bound = torch_layer_bound(ours, x)
    within(out, book_out, bound, "prefill vs the book's")
    assert torch.equal(keys, book_keys) and torch.equal(values, book_values)
    within(ours(x)[0], book(x)[0], bound, "no cache vs the book's")


def test_the_book_package_verbatim_cannot_take_a_decoding_step():
    """Pins the reason for our row slice: ``[:, -num_tokens:]`` is ``(S, 1)`` for a one-token step."""
    _, book = book_pair(book_kv_cache.MultiHeadAttention)
    x = torch.randn(2, 5, D_IN)
    _, cache = book(x[:, :4], use_cache=True)
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        book(x[:, 4:], use_cache=True, start_pos=4, cache=cache)


@pytest.mark.parametrize("prompt_len", [1, 2, 7])
def test_decoding_equals_the_book_package_with_the_row_slice(prompt_len):
    ours, book = book_pair(book_with_row_slice(), seed=prompt_len)
    torch.manual_seed(prompt_len)
    x = torch.randn(3, 12, D_IN)
    got, cache = decode(ours, x, prompt_len)
    book_outputs = []
    book_out, book_cache = book(x[:, :prompt_len], use_cache=True)
    book_outputs.append(book_out)
    for pos in range(prompt_len, 12):
        book_out, book_cache = book(x[:, pos:pos + 1], use_cache=True, start_pos=pos, cache=book_cache)
        book_outputs.append(book_out)
    within(got, torch.cat(book_outputs, dim=1), torch_layer_bound(ours, x), "decode vs the book's")
    for i, name in enumerate(("W_key", "W_value")):  # the cached projections: x @ W.T + b, rounded twice at most
        linear = getattr(ours, name)
        kernel, b = linear.weight.detach().double().numpy().T, linear.bias.detach().double().numpy()
        within(cache[i], book_cache[i], 2 * float(linear_error(x.double().numpy(), kernel, b)[1].max()), name)


# ---------------------------------------------------------------------------------------------
# attention_mask=None: the book's ops, bit for bit (the forwards as they were before padding masks)
# ---------------------------------------------------------------------------------------------


def before_simplified(m, x):
    attn_scores = x @ x.transpose(-2, -1)
    attn_weights = torch.softmax(attn_scores, dim=-1)
    return attn_weights @ x


def before_v1(m, x):
    keys, queries, values = x @ m.W_key, x @ m.W_query, x @ m.W_value
    attn_scores = queries @ keys.transpose(-2, -1)
    attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
    return attn_weights @ values


def before_v2(m, x):
    keys, queries, values = m.W_key(x), m.W_query(x), m.W_value(x)
    attn_scores = queries @ keys.transpose(-2, -1)
    attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
    return attn_weights @ values


def before_causal(m, x):
    b, num_tokens, d_in = x.shape
    keys, queries, values = m.W_key(x), m.W_query(x), m.W_value(x)
    attn_scores = queries @ keys.transpose(1, 2)
    attn_scores = attn_scores.masked_fill(m.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
    attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
    attn_weights = m.dropout(attn_weights)
    return attn_weights @ values


def before_wrapper(m, x):
    return torch.cat([before_causal(head, x) for head in m.heads], dim=-1)


def before_mha(m, x):
    b, num_tokens, d_in = x.shape
    keys = m.W_key(x).view(b, num_tokens, m.num_heads, m.head_dim).transpose(1, 2)
    queries = m.W_query(x).view(b, num_tokens, m.num_heads, m.head_dim).transpose(1, 2)
    values = m.W_value(x).view(b, num_tokens, m.num_heads, m.head_dim).transpose(1, 2)
    attn_scores = queries @ keys.transpose(2, 3)
    mask_bool = m.mask.bool()[:num_tokens, :num_tokens]
    attn_scores = attn_scores.masked_fill(mask_bool, -torch.inf)
    attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
    attn_weights = m.dropout(attn_weights)
    context_vec = (attn_weights @ values).transpose(1, 2)
    context_vec = context_vec.contiguous().view(b, num_tokens, m.d_out)
    return m.out_proj(context_vec)


def before_combined(m, x):
    batch_size, num_tokens, embed_dim = x.shape
    qkv = m.qkv(x).view(batch_size, num_tokens, 3, m.num_heads, m.head_dim)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    queries, keys, values = qkv.unbind(0)
    attn_scores = queries @ keys.transpose(-2, -1)
    attn_scores = attn_scores.masked_fill(m.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
    attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
    attn_weights = m.dropout(attn_weights)
    context_vec = (attn_weights @ values).transpose(1, 2)
    context_vec = context_vec.contiguous().view(batch_size, num_tokens, m.num_heads * m.head_dim)
    return m.proj(context_vec)


# name -> (module factory, the forward as it was); dropout 0.3 so training mode exercises it
REFERENCE = {
    "SimplifiedSelfAttention": (lambda: torch_ref.SimplifiedSelfAttention(), before_simplified),
    "SelfAttentionV1": (lambda: torch_ref.SelfAttentionV1(D_IN, 6), before_v1),
    "SelfAttentionV2": (lambda: torch_ref.SelfAttentionV2(D_IN, 6, qkv_bias=True), before_v2),
    "CausalAttention": (lambda: torch_ref.CausalAttention(D_IN, 6, 16, 0.3, qkv_bias=True), before_causal),
    "MultiHeadAttentionWrapper": (
        lambda: torch_ref.MultiHeadAttentionWrapper(D_IN, 3, 16, 0.3, num_heads=2, qkv_bias=True), before_wrapper,
    ),
    "MultiHeadAttention": (
        lambda: torch_ref.MultiHeadAttention(D_IN, 6, 16, 0.3, num_heads=3, qkv_bias=True), before_mha,
    ),
    "MultiHeadAttentionCombinedQKV": (
        lambda: torch_ref.MultiHeadAttentionCombinedQKV(D_IN, 6, 3, 16, 0.3, qkv_bias=True), before_combined,
    ),
}
UNBATCHED = {"SimplifiedSelfAttention", "SelfAttentionV1", "SelfAttentionV2"}


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("training", [False, True])
def test_no_attention_mask_is_bit_identical_to_the_book_ops(name, training):
    factory, before = REFERENCE[name]
    module = randomise(factory(), seed=2).train(training)
    for shape in ([(7, D_IN)] if name in UNBATCHED else []) + [(2, 7, D_IN)]:
        x = torch.randn(*shape)
        torch.manual_seed(9)
        out = module(x)
        torch.manual_seed(9)
        want = before(module, x)
        assert torch.equal(out, want), f"{name} {shape}: max |diff| {max_diff(out, want):.3g}"


# ---------------------------------------------------------------------------------------------
# Padding: a padded batch equals each sequence alone; rows that see no key are zero, never NaN
# ---------------------------------------------------------------------------------------------

# name -> (module, forward(module, x, attention_mask), causal, output projection or None)
def padding_cases():
    cases = {}
    for name, (factory, _) in REFERENCE.items():
        module = randomise(factory(), seed=4)
        proj = getattr(module, "out_proj", None) or getattr(module, "proj", None)
        causal = name not in UNBATCHED and name != "SimplifiedSelfAttention"
        cases[name] = (module, lambda m, x, mask=None: m(x, attention_mask=mask), causal, proj)
    for causal in (True, False):
        module = randomise(nn.MultiheadAttention(D_IN, 2, batch_first=True), seed=4)  # even heads: the fast path runs
        forward = (lambda c: lambda m, x, mask=None: torch_ref.torch_multihead_forward(m, x, c, attention_mask=mask))(causal)
        cases[f"torch_multihead_forward(causal={causal})"] = (module, forward, causal, module.out_proj)
    return cases


PADDING = padding_cases()


def padded_batch(lengths, total, side, seed=0, fill=1e3):
    """``(x, mask, real)``: each sequence at its real positions, large garbage in the padding."""
    torch.manual_seed(seed)
    real = [torch.randn(n, D_IN) for n in lengths]
    x = fill * torch.randn(len(lengths), total, D_IN)
    mask = torch.zeros(len(lengths), total, dtype=torch.bool)
    for i, seq in enumerate(real):
        where = slice(total - len(seq), total) if side == "left" else slice(0, len(seq))
        x[i, where] = seq
        mask[i, where] = True
    return x, mask, real


@pytest.mark.parametrize("name", list(PADDING))
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_equals_each_sequence_alone(name, side):
    module, forward, _, _ = PADDING[name]
    total = 9
    x, mask, real = padded_batch([total - pad for pad in (0, 1, 3)], total, side)
    out = forward(module, x, mask)
    assert torch.isfinite(out).all()
    for i, seq in enumerate(real):
        alone = forward(module, seq if name in UNBATCHED else seq[None])
        alone = alone if name in UNBATCHED else alone[0]
        at_real = out[i][mask[i]]
        causal = "causal=False" not in name if "torch_multihead" in name else None
        within(at_real, alone, torch_layer_bound(module, seq, causal=causal), f"{name} {side} row {i}")


@pytest.mark.parametrize("name", sorted(UNBATCHED))
def test_unbatched_input_takes_a_tokens_mask(name):
    module = PADDING[name][0]
    x = torch.randn(6, D_IN)
    mask = torch.tensor([0, 1, 1, 0, 1, 1], dtype=torch.bool)
    out = module(x, attention_mask=mask)
    bound = torch_layer_bound(module, x, mask=mask)
    within(out, module(x[None], attention_mask=mask[None])[0], bound, f"{name} unbatched vs batched")
    within(out[mask], module(x[mask]), bound, f"{name} the real tokens alone")  # padding anywhere
    with pytest.raises(ValueError, match=r"x.shape\[:-1\] = \(6,\)"):
        module(x, attention_mask=mask[None])


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3),
    side=st.sampled_from(["left", "right"]),
    seed=st.integers(0, 2**16),
)
def test_padding_property_multi_head_attention(lengths, side, seed):
    module = randomise(torch_ref.MultiHeadAttention(D_IN, 4, 16, 0.0, num_heads=2), seed=seed)
    x, mask, real = padded_batch(lengths, max(lengths) + 1, side, seed=seed)
    out = module(x, attention_mask=mask)
    for i, seq in enumerate(real):
        within(out[i][mask[i]], module(seq[None])[0], torch_layer_bound(module, seq[None]), f"row {i}")


def capture_projection_input(proj):
    """A forward hook that records ``proj``'s input (the context vectors) and leaves its output alone."""
    seen = {}

    def hook(module, args, output):
        seen["input"] = args[0]

    return seen, proj.register_forward_hook(hook)


@pytest.mark.parametrize("name", list(PADDING))
def test_rows_that_see_no_key_give_a_zero_context(name):
    module, forward, causal, proj = PADDING[name]
    x, mask, _ = padded_batch([6, 3], 6, "left")
    mask = torch.cat([mask, torch.zeros(1, 6, dtype=torch.bool)])  # a third row: all padding
    x = torch.cat([x, torch.randn(1, 6, D_IN)])
    dead = torch.zeros(3, 6, dtype=torch.bool)
    dead[2] = True
    if causal:
        dead[1, :3] = True  # left padding under the causal mask: the query sees padded keys only
    # no_grad too: nn.MultiheadAttention's fast path (eval, no grad) gives NaN there, its SDPA path zeros
    for grad_mode in (torch.enable_grad, torch.no_grad):
        seen, handle = capture_projection_input(proj) if proj is not None and "torch_multihead" not in name else ({}, None)
        try:
            with grad_mode():
                out = forward(module, x, mask)
        finally:
            if handle is not None:
                handle.remove()
        assert torch.isfinite(out).all(), grad_mode.__name__
        if proj is None:
            assert torch.equal(out[dead], torch.zeros_like(out[dead]))
        else:
            bias = proj.bias.detach()
            assert torch.equal(out[dead], bias.expand_as(out[dead])), "out_proj of a zero context is its bias"
        if "input" in seen:
            context = seen["input"]
            assert torch.equal(context[dead], torch.zeros_like(context[dead]))
        assert not torch.equal(out[~dead], torch.zeros_like(out[~dead]))


class NaNWatch(TorchFunctionMode):
    """Records every torch op whose output holds a NaN or an Inf other than the mask's ``-inf``."""

    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and (t.isnan().any() or (t == torch.inf).any()):
                self.bad.append(getattr(func, "__name__", str(func)))
        return out


@pytest.mark.parametrize("name", list(PADDING))
def test_no_nan_for_inputs_times_1e4_with_padding(name):
    module, forward, _, _ = PADDING[name]
    x, mask, _ = padded_batch([6, 3, 1], 6, "left", seed=1, fill=1.0)
    mask[2] = False
    x = (1e4 * x).requires_grad_(True)
    with NaNWatch() as watch:
        out = forward(module, x, mask)
    assert torch.isfinite(out).all(), f"{name}: {torch.isnan(out).sum().item()} NaN"
    if "torch_multihead" not in name:  # not even inside: a row with no visible key never meets softmax all -inf
        assert watch.bad == [], f"{name}: NaN or +inf out of {watch.bad}"
    assert torch.isfinite(forward(module, 1e4 * torch.randn(2, 6, D_IN))).all()
    if "torch_multihead" not in name:  # ours never makes a NaN, not even inside: gradients stay finite
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in module.parameters())
        module.zero_grad()


@pytest.mark.parametrize("name", list(PADDING))
def test_bool_int_and_float_masks_agree_and_bad_masks_fail_loudly(name):
    module, forward, _, _ = PADDING[name]
    x, mask, _ = padded_batch([5, 2], 5, "right")
    want = forward(module, x, mask)
    for other in (mask.long(), mask.float()):
        assert torch.equal(forward(module, x, other), want)
    with pytest.raises(ValueError, match=r"= \(2, 5\).*got shape \(2, 4\)"):
        forward(module, x, mask[:, :4])
    additive = torch.zeros(2, 5).masked_fill(~mask, -torch.inf)
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        forward(module, x, additive)


# ---------------------------------------------------------------------------------------------
# Decoding a left-padded batch: the mask grows by a column of ones per step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CACHED))
def test_decoding_a_left_padded_batch_equals_the_padded_full_forward(name):
    plain = make_plain(name, seed=6)
    cached = make_cached(name, plain)
    prompt, steps, pads = 6, 5, (0, 1, 3)
    torch.manual_seed(6)
    x = torch.randn(len(pads), prompt + steps, d_in_of(name))
    mask = torch.ones(len(pads), prompt + steps, dtype=torch.bool)
    for i, pad in enumerate(pads):
        mask[i, :pad] = False
        x[i, :pad] = 1e3  # garbage in the padding
    want = plain_forward(plain, x, mask)
    outputs = []
    out, cache = cached(x[:, :prompt], use_cache=True, attention_mask=mask[:, :prompt].long())
    outputs.append(out)
    step_mask = mask[:, :prompt].long()
    for pos in range(prompt, prompt + steps):
        step_mask = torch.cat([step_mask, torch.ones(len(pads), 1, dtype=torch.long)], dim=1)
        out, cache = cached(x[:, pos:pos + 1], use_cache=True, start_pos=pos, cache=cache, attention_mask=step_mask)
        outputs.append(out)
    got = torch.cat(outputs, dim=1)
    assert torch.isfinite(got).all()
    bound = torch_layer_bound(plain, x, causal=True, mask=mask)  # padded keys hidden: their garbage counts nowhere
    within(got[mask], want[mask], bound, f"{name} padded decode vs full")
    within(got, want, bound, f"{name} with the padded queries")  # the padded queries too: zero context in both
    for i, pad in enumerate(pads):  # and each sequence decoded alone
        alone = plain_forward(plain, x[i:i + 1, pad:])[0]
        within(got[i, pad:], alone, torch_layer_bound(plain, x[i:i + 1, pad:], causal=True), f"{name} row {i} alone")
    with NaNWatch() as watch:  # inputs x 1e4, padded: nothing non-finite anywhere in the decode
        huge, _ = decode(cached, 1e4 * x, prompt, attention_mask=mask)
    assert torch.isfinite(huge).all() and watch.bad == [], f"{name}: NaN or +inf out of {watch.bad}"
