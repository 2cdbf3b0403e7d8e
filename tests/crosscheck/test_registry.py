"""The registry is the one home of every per-variant fact: the facts are right, and nobody else holds one.

The first tests read the source of ``crosscheck/`` with :mod:`ast`: a comparison with a
variant's name (``name == "MultiHeadAttention"``, ``name in ("CausalAttention", ...)``),
a family's or a ttnn program's name (``"grouped-query"``, ``"simplified_self_attention"``),
a comparison of an entry's family or ttnn program (``variant.family == ...``,
``v.ttnn_program != ...``) or ``registry.get("<variant>")`` outside ``crosscheck/variants/``
and ``crosscheck/tt/`` is a fact living in the wrong place, so adding a variant would mean
hunting for it. The rest check each entry's facts against the real torch and Flax modules.
"""

import ast
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from crosscheck.config import AttnConfig
from crosscheck.errors import BadInputError
from crosscheck.porting import port
from crosscheck.references import torch_ref
from crosscheck.variants import registry
from tests.bounds import torch_layer_bound

PACKAGE = Path(__file__).resolve().parents[2] / "crosscheck"
#: The homes of per-variant facts: the entries (and their lookups), and the ttnn programs they point at.
HOMES = ("crosscheck/variants/", "crosscheck/tt/")
NAMES = frozenset(registry.names())
FAMILIES = frozenset(v.family for v in registry.VARIANTS)
PROGRAMS = frozenset(registry.ttnn_programs())
#: Entry fields that identify a family or a program: comparing them is branching on a name.
IDENTITY_FIELDS = frozenset({"family", "ttnn_program", "ttnn_forward", "ttnn_sdpa", "ttnn_decode"})
_COMPARE_OPS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)


def _variant_names_in(node: ast.AST) -> list[str]:
    """The variant, family and program names ``node`` spells as a string literal or a literal tuple/list/set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value] if node.value in NAMES | FAMILIES | PROGRAMS else []
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n for elt in node.elts for n in _variant_names_in(elt)]
    return []


def _is_registry_get(call: ast.Call) -> bool:
    f = call.func
    return isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Name) and f.value.id == "registry"


def _identity_field(node: ast.AST) -> str | None:
    """``family`` for ``variant.family`` (any object's), likewise the ttnn program fields; else ``None``."""
    return node.attr if isinstance(node, ast.Attribute) and node.attr in IDENTITY_FIELDS else None


def name_branches(source: str, filename: str, allow_registry_get: bool = False) -> list[str]:
    """``file:line: what`` for every comparison with, and registry lookup of, a literal variant, family or
    program name, and every comparison of an entry's family or ttnn program."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare) and any(isinstance(op, _COMPARE_OPS) for op in node.ops):
            for side in (node.left, *node.comparators):
                for name in _variant_names_in(side):
                    found.append(f"{filename}:{node.lineno}: compares with {name!r}")
                field = _identity_field(side)
                if field:
                    found.append(f"{filename}:{node.lineno}: compares .{field}")
        if isinstance(node, ast.Call) and _is_registry_get(node) and not allow_registry_get:
            for arg in node.args[:1]:
                for name in _variant_names_in(arg):
                    found.append(f"{filename}:{node.lineno}: registry.get({name!r})")
    return found


def test_the_checker_sees_every_kind_of_name_branch():
    """Guard the guard: each form the rule forbids is caught, and ordinary code is not."""
    source = (
        'if name == "MultiHeadAttention": pass\n'
        'if "CausalAttention" != v.name: pass\n'
        'if name in ("SelfAttentionV1", "other"): pass\n'
        'if name not in ["SimplifiedSelfAttention"]: pass\n'
        'v = registry.get("TorchMultiheadAttention")\n'
        'if name == "torch-book" or backend in ("torch", "flax"): pass\n'
        'v = registry.get(name)\n'
        'if variant.family == "book": pass\n'
        'if kind in ("grouped-query", "x"): pass\n'
        'if v.ttnn_program != program: pass\n'
        'if "simplified_self_attention" == p: pass\n'
        'if v.ttnn_sdpa is None or v.ttnn_decode is not None: pass\n'
        'if v.takes_attention_impl and v.fields == ("d_in",): pass\n'
    )
    found = name_branches(source, "x.py")
    lines = [line.split(":")[1] for line in found]
    assert lines == ["1", "2", "3", "4", "5", "8", "8", "9", "10", "11", "12", "12"], found


def test_no_code_outside_the_registry_branches_on_a_variant_name():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10, PACKAGE
    found = []
    for path in files:
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if not rel.startswith(HOMES):
            found += name_branches(path.read_text(), rel)
    assert not found, "per-variant facts belong on the Variant entry in crosscheck/variants/:\n" + "\n".join(found)


def test_the_checker_scans_what_it_should():
    """The homes are real folders, every entry names a family, and the names it looks for are the registry's."""
    assert all((PACKAGE.parent / home).is_dir() for home in HOMES)
    assert {"book", "torch-mha", "grouped-query", "transformers"} == FAMILIES
    assert {"grouped_query_attention", "multi_head_attention_sdpa"} <= PROGRAMS


# --- each entry's facts, checked against the real modules ----------------------------------------


def _cfg(variant: registry.Variant) -> AttnConfig:
    """Unequal dimensions, so that a fact reading the wrong one shows (d_in=6 where d_out is d_in)."""
    cfg = AttnConfig(d_in=5, d_out=6, context_length=9, num_heads=3, qkv_bias=True, dropout=0.0)
    return variant.resolve(cfg.replace(d_in=6) if variant.splits_heads_of and "d_out" not in variant.fields else cfg)


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_output_dim_is_the_torch_modules_output_width(variant):
    cfg = _cfg(variant)
    module = variant.torch_module(cfg).eval()
    x = torch.rand((4, cfg.d_in) if variant.unbatched else (2, 4, cfg.d_in))
    with torch.no_grad():
        out = variant.torch_forward(module, x, cfg)
    assert out.shape[-1] == variant.output_dim(cfg)


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_infer_config_reads_the_torch_modules_own_state_dict(variant):
    cfg = _cfg(variant)
    inferred = port.infer_config(variant, variant.torch_module(cfg).state_dict())
    assert inferred == {k: getattr(cfg, k) for k in inferred}
    if variant.portmap(cfg).entries:  # the widths are what a state dict always pins down
        assert {"d_in", "d_out"} <= set(inferred)
    if "num_heads" in variant.fields and variant.fit_defaults:
        assert inferred["num_heads"] == cfg.num_heads


def _options(variant: registry.Variant, cfg: AttnConfig) -> dict:
    """What a module cannot carry (the book's GQA classes: the RoPE settings), as ``from_torch`` takes it."""
    return {k: getattr(cfg, k) for k in ("rope_theta", "context_length") if k in variant.options}


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_each_torch_reference_is_recognised_by_its_own_entry_only(variant):
    cfg = _cfg(variant)
    module = variant.torch_module(cfg)
    assert [v.name for v in registry.VARIANTS if v.recognises(module)] == [variant.name]
    assert port.recognise(module, **_options(variant, cfg))[0] is variant


def test_nothing_else_is_recognised():
    for module in (nn.Linear(3, 2), nn.Sequential(), nn.ModuleList()):
        assert not any(v.recognises(module) for v in registry.VARIANTS)


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_config_of_gives_back_the_config_a_flax_module_was_built_with(variant):
    cfg = _cfg(variant)
    got = variant.resolve(variant.config_of(variant.flax_module(cfg)))
    # A module without parameters holds no widths: any input width will do.
    fields = variant.fields if variant.portmap(cfg).entries else ()
    assert {k: getattr(got, k) for k in fields} == {k: getattr(cfg, k) for k in fields}


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_takes_attention_impl_matches_the_flax_modules_fields(variant):
    module = variant.flax_module(_cfg(variant))
    assert hasattr(module, "attention_impl") == variant.takes_attention_impl


def test_the_variants_that_take_an_attention_impl():
    assert [v.name for v in registry.takes_attention_impl()] == [
        "CausalAttention", "MultiHeadAttentionWrapper", "MultiHeadAttention", "MultiHeadAttentionCombinedQKV",
        "TorchMultiheadAttention", "GroupedQueryAttention", "LlamaAttention", "Qwen3Attention", "GPT2Attention",
    ]


def test_the_default_run_is_the_books_chapter_3_variants():
    assert [v.name for v in registry.default_run()] == [
        "SimplifiedSelfAttention", "SelfAttentionV1", "SelfAttentionV2", "CausalAttention",
        "MultiHeadAttentionWrapper", "MultiHeadAttention", "MultiHeadAttentionCombinedQKV", "TorchMultiheadAttention",
    ]


def test_formats_that_share_a_flax_module_name_it():
    assert [v.name for v in registry.for_flax_class("GroupedQueryAttention")] == [
        "GroupedQueryAttention", "LlamaAttention", "Qwen3Attention",
    ]
    assert [v.name for v in registry.for_flax_class("MultiHeadAttentionCombinedQKV")] == [
        "MultiHeadAttentionCombinedQKV", "GPT2Attention",
    ]


def test_bf16_roundings_and_the_ttnn_tables_derived_from_them():
    from crosscheck.tt import BF16_UNIT_ROUNDOFF
    from crosscheck.variants.registry import BF16_ROUNDINGS, TTNN_BF16_TOLERANCE

    assert BF16_ROUNDINGS == {
        "SimplifiedSelfAttention": 4, "SelfAttentionV1": 8, "SelfAttentionV2": 8, "CausalAttention": 8,
        "MultiHeadAttentionWrapper": 8, "MultiHeadAttention": 10, "MultiHeadAttentionCombinedQKV": 10,
        "TorchMultiheadAttention": 10, "GroupedQueryAttention": 15, "LlamaAttention": 15, "Qwen3Attention": 15,
        "GPT2Attention": 10,
    }
    assert TTNN_BF16_TOLERANCE == {n: (r * BF16_UNIT_ROUNDOFF, 0.999) for n, r in BF16_ROUNDINGS.items()}


@pytest.mark.parametrize(
    "name, cfg, message",
    [
        ("MultiHeadAttention", AttnConfig(d_out=2, num_heads=3), "MultiHeadAttention: d_out=2 must be divisible by num_heads=3"),
        ("MultiHeadAttentionCombinedQKV", AttnConfig(d_out=4, num_heads=3), "d_out=4 must be divisible by num_heads=3"),
        ("TorchMultiheadAttention", AttnConfig(d_in=3, num_heads=2), "embed_dim (= d_in)=3 must be divisible by num_heads=2"),
    ],
)
def test_check_heads_names_the_width_and_the_heads(name, cfg, message):
    with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        registry.get(name).check_heads(cfg)


@pytest.mark.parametrize("variant", registry.VARIANTS, ids=lambda v: v.name)
def test_check_heads_passes_what_the_module_can_split(variant):
    variant.check_heads(_cfg(variant))  # 6 split in 3 heads, or no split at all


def test_torch_forward_of_nn_multihead_attention_applies_the_causal_mask():
    variant = registry.get("TorchMultiheadAttention")
    cfg = variant.resolve(AttnConfig(d_in=4, num_heads=2, causal=True))
    torch.manual_seed(0)
    module = variant.torch_module(cfg).eval()
    x = torch.rand(1, 5, 4)
    with torch.no_grad():
        causal = variant.torch_forward(module, x, cfg)
        first = variant.torch_forward(module, x[:, :1], cfg)
    bound = torch_layer_bound(module, x[:, :1], causal=True)  # token 0 sees only itself: the layer on it alone
    np.testing.assert_allclose(causal[:, :1].numpy(), first.numpy(), atol=bound, rtol=0)


def test_users_copy_with_plain_tensor_weights_is_v1():
    class MyV1(nn.Module):
        def __init__(self):
            super().__init__()
            self.W_query = nn.Parameter(torch.rand(3, 2))
            self.W_key = nn.Parameter(torch.rand(3, 2))
            self.W_value = nn.Parameter(torch.rand(3, 2))

        def forward(self, x):
            return torch_ref.SelfAttentionV1.forward(self, x)

    variant, cfg = port.recognise(MyV1())
    assert variant.name == "SelfAttentionV1" and (cfg.d_in, cfg.d_out) == (3, 2)
    flax_module, variables = port.from_torch(MyV1())
    assert flax_module.apply(variables, jnp.ones((4, 3))).shape == (4, 2)
