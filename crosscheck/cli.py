"""``crosscheck``: the command line over :mod:`crosscheck.pipeline.engine` (parse, run, render, exit code).

Exit codes: 0 every check passed, 1 a mismatch (the failing variants are named),
2 bad usage or bad input (one ``crosscheck: error: ...`` line on stderr, no traceback),
130 interrupted by Ctrl-C (one ``crosscheck: interrupted`` line, nothing written).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from crosscheck.errors import BadInputError, MismatchError

PROG = "crosscheck"
SUBCOMMANDS = ("bench", "bundle", "convert")

DESCRIPTION = """\
Run the same attention weights and inputs through the torch float32 reference (the book's
chapter-3 classes), jaxattn's Flax modules and the ttnn program, and compare every output
with the torch reference: max abs error, max relative error, PCC and (float32) ULP distance,
with a pass/fail verdict from one tolerance table (crosscheck/pipeline/compare.py).

With no arguments: the seed sentence "Your journey starts with one step" (6 tokens x 3)
through all 8 variants on torch, Flax and ttnn, with weights from torch.manual_seed(123).
"""

EPILOG = """\
weights and config:
  --weights takes a torch state dict (.pt/.pth loaded with weights_only=True, or .safetensors).
  Shapes (and the causal mask buffer) pin down d_in, d_out, qkv_bias, context_length and,
  for MultiHeadAttentionWrapper, num_heads; a flag that contradicts them is an error (exit 2).
  Without --variant, the variants whose keys and shapes the file fits are run. Hyperparameters
  the file cannot carry default to the seed config (d_out=2, num_heads=2; 1 for
  TorchMultiheadAttention), context_length to the input's token count.
  Dropout is carried in the config only: every backend runs in inference mode (but see --train).

grouped-query attention and transformers' layers (run only when named or when --weights fit them):
  GroupedQueryAttention (the book's Llama 3 / Qwen3 classes), LlamaAttention, Qwen3Attention and
  GPT2Attention (transformers' keys; those three need the [hf] extra: transformers). A whole
  model's weights take --prefix (model.layers.0.self_attn., transformer.h.0.attn., trf_blocks.0.att.);
  --config config.json supplies heads, kv heads, head_dim and RoPE (rope_parameters or
  rope_theta/rope_scaling). Random weights: --num-kv-groups, --head-dim, --rope-theta, --qk-norm.
  A flag that contradicts the config file or the weights' shapes is an error (exit 2).

inputs:
  default: the seed sentence, (6, 3); v1/v2/simplified variants take it unbatched, the
  others as a batch of one. --input reads (tokens, d_in) or (batch, tokens, d_in) from
  .npy, .pt or .safetensors (one tensor, or one named inputs/x). Any of --batch, --tokens,
  --seed, --d-in without --input: uniform [0, 1) values (numpy default_rng(seed)).

verdicts (POLICY in crosscheck/pipeline/compare.py; every backend vs the torch float32 reference;
abs bounds are multiplied by max(1, max|ref|)):
  torch float32 (vs float64), flax float32   max abs 1e-5, max rel 1e-4, PCC >= 0.99999
  flax float16                               max abs 5e-3, PCC >= 0.9999
  flax bfloat16                              max abs 4e-2, PCC >= 0.999
  flax float32 --shard vs 1 device           max abs 1e-6, PCC >= 0.99999 (same program split: sum order only)
  flax float32 at --matmul-precision
    default/high (TF32 on a GPU)             max abs 5e-3, PCC >= 0.9999 (10-bit mantissa: ~10 x 2^-11)
  ttnn bfloat16                              max abs n * 2^-8 (n = 4..10 bf16 roundings of
                                             the variant, crosscheck.tt), PCC >= 0.999
  max rel err = max |a - r| / max(|r|, 0.01 * max|r|); ULP (float32 outputs only) is reported,
  not gated: outputs that cancel to ~0 make honest rounding read as 10^5 ULP.

subcommands (run `crosscheck bench --help`, `crosscheck bundle --help` for their options):
  crosscheck bench ...                          forward latency of JAX vs torch (crosscheck.benchmarks.bench)
  crosscheck bundle export OUT [run options]    write weights + inputs + configs to a bundle
  crosscheck bundle run BUNDLE OUT [--backend ttnn|flax] [--ttnn-runtime R]
                                                run a bundle in this interpreter
  crosscheck bundle compare BUNDLE OUTPUTS... [--json PATH]
                                                torch reference from the bundle vs outputs files
  crosscheck convert IN OUT [--variant V] [--prefix P] [--no-check] [--force]
                                                torch state dict <-> Flax params (.safetensors,
                                                .msgpack), checked on one input before writing

Flax NNX:
  --api nnx runs the jaxattn.nnx modules (same math, nnx.Param at the Linen paths) as the flax
  backend, rows "flax-nnx"; --api both adds them next to the Linen rows (forward check only).

decoding and padding:
  --decode PROMPT_LEN prefills PROMPT_LEN tokens and decodes the rest of the input (--tokens N
  for random inputs) one token at a time: torch with the book's kv_cache API, Flax with
  decode=True and its 'cache' collection, ttnn with device-side caches. Rows: torch decode vs
  torch full forward; flax and ttnn decode vs torch decode and vs their own full forward
  (same tolerances as the forward check); JSON "detail" names the worst token.
  --padding left|right --pad-lengths 0,3,... runs a padded batch with an attention mask and
  compares its real tokens with each sequence run alone (torch float32); NaN anywhere fails.

attention core:
  --attention-impl NAME runs the Flax modules with that core (CausalAttention, the wrapper,
  MultiHeadAttention, ...CombinedQKV, TorchMultiheadAttention); without --variant the
  other variants run as usual, a named variant without a choice of core is an error (exit 2).
  The report records the core (terminal header, JSON "attention_impl").

explaining a mismatch:
  --stages compares each intermediate of flax and ttnn with torch's (queries, keys, values; after
  RMSNorm and RoPE where present; scores q @ k.T; weights; context; output), a row per stage, and
  names each backend's first stage over its bound (the same table's bounds; PCC gated at the output).
  --plot DIR writes each variant's attention weights per head and backend (tokens on the axes) beside
  |difference to torch|, and summary.png: each variant's error over its bound (needs .[plot]).
  --json - prints the JSON report alone on stdout (the table goes to stderr, no progress bar).

training mode and gradients (torch vs Flax only, float32; ttnn in --backends is skipped, the report says why):
  --train runs every variant with dropout active (--dropout, default 0.1) on identical masks: each
  dropout site gets one mask (jax.random from --seed, default 0), applied by jaxattn's naive kernel in
  Flax and by the torch module in place of its nn.Dropout (nn.MultiheadAttention: its steps with the
  mask). Rows: torch float32 vs float64 and flax vs torch, same masks; variants without dropout say so.
  --grad compares d sum(output * R) / d(input and every parameter), R ~ N(0,1) from --seed, torch
  autograd vs jax.grad, one row per torch parameter name; bound: max abs 2e-5 x max(1, max|ref|), at
  least 4 x torch's own float32 error vs float64 (compare.py row "flax grad", GRAD_REFERENCE_FACTOR);
  rel and PCC reported. --train --grad: gradients in training mode on the masks.

resource budget (crosscheck/pipeline/budget.py):
  before anything is allocated, the memory a run needs is estimated from shapes (weights, mask buffers
  context_length^2, inputs, attention scores batch x heads x tokens^2, every copy counted) and a run over
  --max-memory (default: half of the physical memory, or the address-space limit RLIMIT_AS if lower) is
  exit 2 naming the flag, the estimate and the limit; tensors in files are sized from their headers (an
  expanded .pt view by its dense shape).

exit codes: 0 all checks passed, 1 a mismatch (failing variants named), 2 bad usage or input,
130 interrupted (Ctrl-C: nothing written).
Colour follows the terminal; --no-color or NO_COLOR turns it off.
"""


class _Parser(argparse.ArgumentParser):
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


def _add_case_options(p: argparse.ArgumentParser) -> None:
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
    p = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_case_options(p)
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
    p = _Parser(
        prog=f"{PROG} bundle",
        description="The separate-environment workflow: export a bundle here, run it where ttnn lives, compare here.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", metavar="{export,run,compare}", parser_class=_Parser)
    sub.required = True
    e = sub.add_parser("export", help="write variants, weights, configs and inputs to OUT (.safetensors)")
    e.add_argument("out", metavar="OUT")
    _add_case_options(e)
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


# --- helpers ------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """Multi-line errors (a port error lists one key a line) joined into the single stderr line."""
    text = ""
    for line in (part.strip() for part in str(err).splitlines()):
        if line:
            text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text or type(err).__name__


def _consoles(args):
    from rich.console import Console

    no_color = bool(getattr(args, "no_color", False)) or "NO_COLOR" in os.environ
    out_tty = sys.stdout.isatty()
    out = Console(
        file=sys.stdout,
        no_color=no_color,
        highlight=False,
        width=None if out_tty else 160,
        force_terminal=None if out_tty else False,
    )
    err = Console(file=sys.stderr, no_color=no_color, highlight=False)
    return out, err


def _inputs(args):
    from crosscheck.pipeline.inputs import RandomInputs

    random_opts = {k: getattr(args, k) for k in ("batch", "tokens", "seed")}
    if args.input is not None:
        given = [f"--{k}" for k, v in random_opts.items() if v is not None]
        if given:
            raise BadInputError(f"--input cannot be combined with {', '.join(given)} (those shape random inputs)")
        return args.input
    if any(v is not None for v in random_opts.values()) or args.d_in is not None:
        return RandomInputs(batch=args.batch, tokens=args.tokens, d_in=args.d_in, seed=args.seed)
    return None


def _overrides(args) -> dict:
    return dict(
        d_in=args.d_in,
        d_out=args.d_out,
        context_length=args.context_length,
        dropout=args.dropout,
        num_heads=args.num_heads,
        qkv_bias=args.qkv_bias,
        causal=args.causal,
        num_kv_groups=args.num_kv_groups,
        head_dim=args.head_dim,
        qk_norm=args.qk_norm,
        rope_theta=args.rope_theta,
        prefix=args.prefix,
        model_config=args.config,
    )


def _ProgressBar(console):
    """A rich progress bar on stderr, started on the first step (:class:`crosscheck.pipeline.progress.Bar`)."""
    from crosscheck.pipeline.progress import Bar

    return Bar(console)


def _finish(report, args, out, render=None) -> int:
    from crosscheck.pipeline import report as rp
    from crosscheck.porting.outputs import interrupted

    if interrupted():  # the run went on past a swallowed Ctrl-C: no verdict, no report
        raise KeyboardInterrupt

    if args.json == "-":  # stdout carries the JSON alone
        out = _consoles(args)[1]
    (render or rp.render)(report, out, quiet=args.quiet)
    if args.json == "-":
        sys.stdout.write(rp.json_text(report))
        sys.stdout.flush()
    elif args.json is not None:
        rp.write_json(report, args.json)
    if report.passed:
        return 0
    print(f"{PROG}: mismatch in {', '.join(report.failing_variants)}", file=sys.stderr)
    return 1


# --- commands -----------------------------------------------------------------------------------


def _check_json_path(path: str | None, inputs) -> None:
    """Fail before the run, not after it, when the JSON report cannot be written or would replace an input."""
    if path is not None and path != "-":  # "-": stdout
        from crosscheck.porting.outputs import check_output_path

        check_output_path(path, "--json", inputs, what="JSON report")


def _run(args) -> int:
    if getattr(args, "devices", None) is not None:  # before anything imports JAX: XLA reads it once
        from crosscheck.pipeline.devices import force_host_devices

        force_host_devices(args.devices)
    from crosscheck.checks.padding_check import parse_pad_lengths
    from crosscheck.pipeline import engine, placement

    _check_json_path(
        args.json,
        [
            ("--weights", args.weights),
            ("--input", args.input),
            ("--config", args.config),
            ("--ttnn-python", args.ttnn_python),
        ],
    )
    if getattr(args, "stages", False) or getattr(args, "plot", None) is not None:
        return _stages(args)

    out, err = _consoles(args)
    n_variants = len(args.variant) if args.variant else 8  # the default run's variants
    show_progress = _progress_wanted(args) and (n_variants > 1 or args.tokens or args.batch)
    bar = _ProgressBar(err) if show_progress else None
    try:
        with placement.choices(args.torch_device, args.matmul_precision):  # cuda without CUDA: exit 2
            report = engine.run(
                args.variant,
                weights=args.weights,
                inputs=_inputs(args),
                backends=list(args.backends.split(",")),
                ttnn_runtime=args.ttnn_runtime,
                ttnn_python=args.ttnn_python,
                dtype=args.dtype,
                attention_impl=args.attention_impl,
                decode=args.decode,
                padding=args.padding,
                pad_lengths=None if args.pad_lengths is None else parse_pad_lengths(args.pad_lengths),
                train=args.train,
                grad=args.grad,
                train_seed=args.seed,
                progress=bar,
                max_memory=args.max_memory,
                api=args.api,
                devices=args.devices,
                shard=args.shard,
                **_overrides(args),
            )
    finally:
        if bar is not None:
            bar.close()
    return _finish(report, args, out)


def _progress_wanted(args) -> bool:
    """A progress bar only on a terminal, never with -q or with the JSON report on stdout (``--json -``)."""
    from crosscheck.pipeline import progress

    return progress.wanted(quiet=args.quiet, json_path=getattr(args, "json", None))


def _stages(args) -> int:
    """``--stages`` (the stage report) and/or ``--plot DIR`` (pictures from the same stages)."""
    from crosscheck.checks import stages

    for flag, value in (
        ("--decode", args.decode),
        ("--padding", args.padding),
        ("--ttnn-python", args.ttnn_python),
        ("--attention-impl", args.attention_impl),
    ):
        if value is not None:
            raise BadInputError(
                f"--stages/--plot run the forward pass on the naive core in this interpreter; drop {flag}"
            )
    if args.stages and (args.devices is not None or args.shard is not None):
        raise BadInputError("--stages compares each intermediate on one device; drop --devices/--shard")
    plan = None
    if args.plot is not None:
        from crosscheck.checks import plots

        plan = plots.plan(args.plot, args.variant, from_weights=args.weights is not None, overwrite=args.plot_overwrite)
    code = None
    if not args.stages:  # the forward check's report, and pictures from the stages
        code = _run(argparse.Namespace(**{**vars(args), "plot": None}))
    out, err = _consoles(args)
    bar = _ProgressBar(err) if _progress_wanted(args) else None
    try:
        report = stages.run(
            args.variant,
            weights=args.weights,
            inputs=_inputs(args),
            backends=args.backends.split(","),
            ttnn_runtime=args.ttnn_runtime,
            dtype=args.dtype,
            progress=bar,
            **_overrides(args),
        )
    finally:
        if bar is not None:
            bar.close()
    if code is None:
        code = _finish(report, args, out, render=stages.render)
    if plan is not None:  # also after a mismatch: the pictures show where
        written = plots.write(report, plan)
        sys.stdout.flush()
        print(f"{PROG}: wrote {len(written)} PNG(s) to {args.plot}", file=sys.stderr)
    return code


def _bundle(argv: Sequence[str]) -> int:
    args = build_bundle_parser().parse_args(argv)
    from crosscheck.pipeline import budget

    with budget.limited(args.max_memory):  # every read and build of the bundle's cases is checked under it
        return _bundle_action(args)


def _bundle_action(args) -> int:
    from crosscheck.pipeline import engine

    if args.action == "export":
        cases = engine.export_bundle(
            args.out,
            args.variant,
            weights=args.weights,
            inputs=_inputs(args),
            attention_impl=args.attention_impl,
            **_overrides(args),
        )
        print(f"wrote {args.out}: {', '.join(c.variant.name for c in cases)}")
        return 0
    if args.action == "run":
        try:
            from crosscheck.tt.worker import run_bundle
        except ImportError as e:
            raise BadInputError(f"bundle run is unavailable: crosscheck.tt.worker cannot be imported ({e})") from None
        meta = run_bundle(args.bundle, args.out, backend=args.backend, runtime=args.ttnn_runtime)
        print(f"wrote {args.out} ({meta.get('backend')}, {meta.get('runtime')}: {meta.get('runtime_description')})")
        return 0
    _check_json_path(args.json, [("BUNDLE", args.bundle), *(("OUTPUTS", o) for o in args.outputs)])
    out, _ = _consoles(args)
    report = engine.compare_outputs(args.bundle, args.outputs)
    return _finish(report, args, out)


def _bench(argv: Sequence[str]) -> int:
    try:
        from crosscheck.benchmarks import bench
    except ImportError as e:
        raise BadInputError(f"bench is unavailable: crosscheck.benchmarks.bench cannot be imported ({e})") from None
    summary = (bench.__doc__ or "Benchmark the attention implementations.").strip().splitlines()[0]
    parser = _Parser(prog=f"{PROG} bench", description=summary)
    bench.add_arguments(parser)
    return int(bench.main(parser.parse_args(argv)) or 0)


# --- convert (crosscheck.porting.convert) -------------------------------------------------------------------


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
    _add_case_options(p)
    c = p.add_argument_group("convert")
    c.add_argument("--no-check", action="store_true", help="skip running torch and Flax on one input before writing")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p


def _convert(argv: Sequence[str]) -> int:
    from crosscheck.porting import convert

    args = build_convert_parser().parse_args(argv)
    if args.weights is not None:
        raise BadInputError("convert reads the weights from IN; drop --weights")
    if args.variant and len(args.variant) > 1:
        raise BadInputError(f"convert writes one layer; --variant given {len(args.variant)} times")
    overrides = _overrides(args)
    prefix, model_config = overrides.pop("prefix"), overrides.pop("model_config")
    done = convert.convert(
        args.src,
        args.dst,
        variant=args.variant[0] if args.variant else None,
        prefix=prefix,
        model_config=model_config,
        overrides=overrides,
        inputs=_inputs(args),
        check=not args.no_check,
        force=args.force,
    )
    checked = (
        "not checked (--no-check)"
        if done.max_abs_err is None
        else f"checked: max abs err {done.max_abs_err:.2e} <= {done.bound:.0e}"
    )
    print(f"{PROG} convert: {done.direction} {done.variant}, {done.tensors} tensors -> {done.out}; {checked}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit code.

    Ctrl-C (SIGINT) ends any command with exit 130, one ``crosscheck: interrupted`` line and nothing
    written (:func:`crosscheck.porting.outputs.sigint_guard`), also when a callback swallowed the
    ``KeyboardInterrupt`` and the run went on: the guard's record decides, not the exception.
    """
    from crosscheck.porting.outputs import sigint_guard

    argv = list(sys.argv[1:] if argv is None else argv)
    with sigint_guard() as guard:
        try:
            code = _main(argv)
        except KeyboardInterrupt:
            guard.interrupted = True  # one that bypassed the handler (main() off the main thread): same rule
            code = 130
        except BaseException:  # argparse's SystemExit, or whatever a swallowed interrupt led to
            if not guard.interrupted:
                raise
            code = 130
        if guard.interrupted:
            code = 130
    if code == 130:
        print(f"{PROG}: interrupted", file=sys.stderr)
    return code


def _main(argv: list[str]) -> int:
    from crosscheck.porting.outputs import interrupted

    try:
        if argv and argv[0] == "bench":
            return _bench(argv[1:])
        if argv and argv[0] == "bundle":
            return _bundle(argv[1:])
        if argv and argv[0] == "convert":
            return _convert(argv[1:])
        return _run(build_parser().parse_args(argv))
    except (BadInputError, ValueError) as err:
        if interrupted():  # an error the interrupt caused: reported as the interrupt, once
            return 130
        # ValueError: jaxattn's own input checks (shapes, context_length) raised during a run.
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except MismatchError as err:
        if interrupted():
            return 130
        print(f"{PROG}: mismatch: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
