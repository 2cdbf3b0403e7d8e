"""The argument parsers of ``crosscheck``, ``crosscheck bundle`` and ``crosscheck convert``.

Imports stay light: ``crosscheck --help`` and an argument error import neither torch nor JAX.
"""

from __future__ import annotations

import argparse
import math

from crosscheck.cli.help import DESCRIPTION, EPILOG

PROG = "crosscheck"
SUBCOMMANDS = ("bench", "bundle", "convert")


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error the rest of the CLI uses."""

    def error(self, message: str):  # argparse's API
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


#: The largest size a flag may give: torch, numpy and XLA hold every size in a signed 64-bit integer
#: (a larger one would only overflow later, in the memory estimate or a shape).
MAX_INT = 2**63 - 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    if value > MAX_INT:
        raise argparse.ArgumentTypeError(f"must be at most 2^63 - 1 (sizes are 64-bit integers), got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    if value > MAX_INT:  # jax.random.key (--train, --grad) takes a signed 64-bit seed
        raise argparse.ArgumentTypeError(f"must be at most 2^63 - 1 (a 64-bit seed), got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):  # nan, inf and 1e400 (inf) too
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_case_options(p: argparse.ArgumentParser) -> None:
    """What to run: variants, weights, hyperparameters, inputs (shared by the run and `bundle export`)."""
    g = p.add_argument_group("variants and weights")
    g.add_argument(
        "--variant",
        action="append",
        metavar="NAME",
        help="jaxattn class name, case-insensitive, repeatable (default: all 8, or those --weights fits)",
    )
    g.add_argument("--weights", metavar="PATH", help="torch state dict: .pt/.pth (weights_only) or .safetensors")
    g.add_argument(
        "--prefix",
        default="",
        metavar="P",
        help="the layer to read from a whole model's --weights, "
        "e.g. model.layers.0.self_attn. or transformer.h.0.attn.",
    )
    g.add_argument(
        "--config",
        metavar="PATH",
        help="a transformers config.json: heads, kv heads, head_dim, hidden size, RoPE settings, attention_bias",
    )
    _add_hyperparameter_options(p)
    i = p.add_argument_group("inputs (default: the seed sentence)")
    i.add_argument(
        "--input", metavar="PATH", help="(tokens, d_in) or (batch, tokens, d_in) from .npy, .pt or .safetensors"
    )
    i.add_argument("--batch", type=_positive_int, metavar="B", help="random inputs: batch size (default 1)")
    i.add_argument("--tokens", type=_positive_int, metavar="T", help="random inputs: tokens (default 6)")
    i.add_argument("--seed", type=_seed, metavar="S", help="random inputs: numpy seed (default 0)")
    a = p.add_argument_group("attention core")
    a.add_argument(
        "--attention-impl",
        metavar="NAME",
        help="attention core of the Flax modules that take one: auto (default: jaxattn picks by token count) "
        "or a name from jaxattn.implementations.names(), e.g. naive, blockwise, xla",
    )


def _add_hyperparameter_options(p: argparse.ArgumentParser) -> None:
    """The config flags (checked against the weights and ``--config`` where they can be)."""
    h = p.add_argument_group("hyperparameters a state dict cannot carry (checked against it where it can)")
    h.add_argument(
        "--num-heads", type=_positive_int, metavar="N", help="heads (default 2; 1 for TorchMultiheadAttention)"
    )
    h.add_argument(
        "--context-length",
        type=_positive_int,
        metavar="N",
        help="mask size (default: the mask buffer, else the token count)",
    )
    h.add_argument(
        "--d-out", type=_positive_int, metavar="N", help="output width (default 2; TorchMultiheadAttention: d_in)"
    )
    h.add_argument(
        "--d-in",
        type=_positive_int,
        metavar="N",
        help="input width (default: the weights', else 3); also sets random inputs' width",
    )
    h.add_argument(
        "--dropout",
        type=_dropout,
        metavar="P",
        help="dropout rate: recorded only in inference mode; applied with --train (default there 0.1)",
    )
    h.add_argument(
        "--qkv-bias", action=argparse.BooleanOptionalAction, default=None, help="Q/K/V projections with bias"
    )
    h.add_argument(
        "--causal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="causal mask for TorchMultiheadAttention (default on)",
    )
    h.add_argument(
        "--num-kv-groups",
        type=_positive_int,
        metavar="N",
        help="GQA: key/value heads (default: 2, or the weights' with the head dim known)",
    )
    h.add_argument("--head-dim", type=_positive_int, metavar="N", help="GQA: per-head dim (default: d_out / num_heads)")
    h.add_argument("--rope-theta", type=_positive_float, metavar="X", help="GQA: RoPE base (default 10000)")
    h.add_argument(
        "--qk-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GroupedQueryAttention: RMSNorm on queries and keys (Qwen3)",
    )


def _add_device_options(p: argparse.ArgumentParser) -> None:
    """Where torch runs and at which precision JAX multiplies float32 (crosscheck.pipeline.placement)."""
    from crosscheck.pipeline.placement import PRECISIONS, TORCH_DEVICES

    g = p.add_argument_group("devices and matmul precision (recorded on every result)")
    g.add_argument(
        "--torch-device",
        default="cpu",
        choices=TORCH_DEVICES,
        help="where the torch reference runs (default cpu; cuda needs a CUDA build of torch and a GPU)",
    )
    g.add_argument(
        "--matmul-precision",
        default="highest",
        choices=PRECISIONS,
        help="JAX's float32 matmul precision (default highest; default/high = TF32 on a GPU, judged "
        "against the TF32 row of the tolerance table)",
    )


def _add_budget_option(p: argparse.ArgumentParser) -> None:
    from crosscheck.pipeline.budget import add_budget_option

    add_budget_option(p)


def _add_stages_options(p: argparse.ArgumentParser) -> None:
    """``--stages`` and ``--plot`` (crosscheck.checks.stages, crosscheck.checks.plots)."""
    s = p.add_argument_group("explaining a mismatch (instead of, or next to, the forward check)")
    s.add_argument(
        "--stages",
        action="store_true",
        help="compare every intermediate (projections, RoPE/norm, scores, weights, context, output) of flax and "
        "ttnn with torch's; a row per stage and each backend's first stage over its bound",
    )
    s.add_argument(
        "--plot",
        metavar="DIR",
        help="write DIR/<variant>.png (each head's attention weights per backend, labelled with the tokens, "
        "beside |difference to torch|) and DIR/summary.png (every variant's error against its bound); needs .[plot]",
    )
    s.add_argument("--plot-overwrite", action="store_true", help="let --plot replace PNGs already in DIR")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("training mode and gradients (torch vs Flax, float32)")
    t.add_argument(
        "--train",
        action="store_true",
        help="dropout active in torch and Flax on identical masks (rate: --dropout, default 0.1; masks from --seed)",
    )
    t.add_argument(
        "--grad",
        action="store_true",
        help="compare gradients of sum(output * R) w.r.t. the input and every parameter (per torch name); "
        "with --train, in training mode on the same masks",
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="also write the report as JSON (- : on stdout, the table on stderr)")
    o.add_argument("--no-color", action="store_true", help="no colour (also: NO_COLOR set, or not a terminal)")
    o.add_argument("-q", "--quiet", action="store_true", help="only failures and a one-line summary")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_options(p)
    p.add_argument(
        "--plugin",
        action="append",
        metavar="FILE.py|MODULE",
        help="import a plugin that registers attention layers of your own (crosscheck.register_variant), "
        "before --variant is read; repeatable (installed packages: the crosscheck.variants entry points)",
    )
    d = p.add_argument_group("decoding and padding (instead of the forward check)")
    d.add_argument(
        "--decode",
        type=_positive_int,
        metavar="PROMPT_LEN",
        help="prefill PROMPT_LEN tokens, then decode the input's other tokens one at a time through the KV cache; "
        "every step compared across backends and with each backend's full forward (causal variants)",
    )
    d.add_argument("--padding", choices=("left", "right"), help="run a padded batch with an attention mask")
    d.add_argument(
        "--pad-lengths",
        metavar="LIST",
        help="padding tokens per row, e.g. 0,3,5 (row i pads input row i %% batch); compared with the "
        "rows run one by one, at the real tokens",
    )
    _add_train_options(p)
    b = p.add_argument_group("backends")
    b.add_argument(
        "--backends",
        default="torch,flax,ttnn",
        metavar="LIST",
        help="comma-separated subset of torch,flax,ttnn (default: all)",
    )
    b.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="what Flax computes in (torch stays the float32 reference; ttnn is bfloat16)",
    )
    b.add_argument(
        "--ttnn-runtime",
        default="auto",
        choices=("auto", "device", "host"),
        help="auto: a Tenstorrent device when found, else the host model",
    )
    b.add_argument(
        "--ttnn-python",
        metavar="PATH",
        help="run the ttnn backend in this interpreter (e.g. .venv-ttnn/bin/python) via a bundle",
    )
    b.add_argument(
        "--api",
        default="linen",
        choices=("linen", "nnx", "both"),
        help="the Flax modules of the flax backend: Linen (rows 'flax'), the jaxattn.nnx twins (rows 'flax-nnx') "
        "or both; NNX runs the forward check only",
    )
    b.add_argument(
        "--jax-layers",
        metavar="NAMES",
        help="also run other JAX libraries' attention layers, ported from TorchMultiheadAttention's weights, as rows "
        "against torch: a comma list of jaxattn (the flax row), flax.linen, flax.nnx, equinox "
        "(pip install 'jaxattn[equinox]'); in the forward, --padding and --decode checks",
    )
    _add_device_options(p)
    _add_shard_options(p)
    _add_budget_option(p)
    _add_stages_options(p)
    _add_output_options(p)
    return p


def _add_shard_options(p: argparse.ArgumentParser) -> None:
    """``--devices N --shard MODE``: the Flax backend split over N devices (crosscheck.checks.sharding_check)."""
    g = p.add_argument_group(
        "several devices (jaxattn.sharding; rows: flax vs torch, and flax vs the same module on 1 device)"
    )
    g.add_argument(
        "--devices",
        type=_positive_int,
        metavar="N",
        help="split the Flax run over N devices. On a CPU, crosscheck makes N host devices itself: it sets "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N right after parsing the arguments, before "
        "anything imports JAX (JAX reads it once, when it starts); on a GPU, N must not exceed the GPUs present. "
        "N is at most 2048 (crosscheck.pipeline.devices.MAX_DEVICES) and at most the rows (--shard batch) or tokens "
        "(--shard sequence) there are to split",
    )
    g.add_argument(
        "--shard",
        choices=("batch", "heads", "sequence"),
        help="batch: split the batch; heads: split the projections by heads (num_heads divisible by N); "
        "sequence: split the tokens, attention as ring attention (any token count: padded and masked)",
    )


def build_bundle_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=f"{PROG} bundle",
        description="The separate-environment workflow: export a bundle here, run it where ttnn lives, compare here.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", metavar="{export,run,compare}", parser_class=Parser)
    sub.required = True
    e = sub.add_parser("export", help="write variants, weights, configs and inputs to OUT (.safetensors)")
    e.add_argument("out", metavar="OUT")
    add_case_options(e)
    _add_budget_option(e)
    r = sub.add_parser("run", help="run every case of BUNDLE on one backend in this interpreter; write OUT")
    r.add_argument("bundle", metavar="BUNDLE")
    r.add_argument("out", metavar="OUT")
    r.add_argument("--backend", default="ttnn", choices=("ttnn", "flax"))
    r.add_argument("--ttnn-runtime", default="auto", choices=("auto", "device", "host"))
    _add_budget_option(r)
    c = sub.add_parser("compare", help="torch reference from BUNDLE's weights vs each OUTPUTS file")
    c.add_argument("bundle", metavar="BUNDLE")
    c.add_argument("outputs", metavar="OUTPUTS", nargs="+")
    _add_budget_option(c)
    _add_output_options(c)
    return p


def build_convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} convert",
        description="Convert one attention layer's weights: a torch state dict (.pt/.pth weights_only, .safetensors; "
        "a whole model's with --prefix) to Flax parameters (OUT .safetensors: flat params/... paths, or .msgpack: "
        "flax.serialization), or such a Flax file back to torch (.pt/.pth, .safetensors). Variant and config are "
        "inferred as --weights infers them and recorded in the file's metadata; both sides run on one input "
        "before anything is written (a failed check: exit 1, nothing written).",
    )
    p.add_argument("src", metavar="IN")
    p.add_argument("dst", metavar="OUT")
    add_case_options(p)
    c = p.add_argument_group("convert")
    c.add_argument("--no-check", action="store_true", help="skip running torch and Flax on one input before writing")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p
