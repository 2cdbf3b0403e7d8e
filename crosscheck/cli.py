"""``crosscheck``: the command line over :mod:`crosscheck.engine` (parse, run, render, exit code).

Exit codes: 0 every check passed, 1 a mismatch (the failing variants are named),
2 bad usage or bad input (one ``crosscheck: error: ...`` line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from crosscheck.errors import BadInputError, MismatchError

PROG = "crosscheck"
SUBCOMMANDS = ("bench", "bundle")

DESCRIPTION = """\
Run the same attention weights and inputs through the torch float32 reference (the book's
chapter-3 classes), jaxattn's Flax modules and the ttnn program, and compare every output
with the torch reference: max abs error, max relative error, PCC and (float32) ULP distance,
with a pass/fail verdict from one tolerance table (crosscheck/compare.py).

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
  Dropout is carried in the config only: every backend runs in inference mode.

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

verdicts (POLICY in crosscheck/compare.py; every backend vs the torch float32 reference;
abs bounds are multiplied by max(1, max|ref|)):
  torch float32 (vs float64), flax float32   max abs 1e-5, max rel 1e-4, PCC >= 0.99999
  flax float16                               max abs 5e-3, PCC >= 0.9999
  flax bfloat16                              max abs 4e-2, PCC >= 0.999
  ttnn bfloat16                              max abs n * 2^-8 (n = 4..10 bf16 roundings of
                                             the variant, crosscheck.tt), PCC >= 0.999
  max rel err = max |a - r| / max(|r|, 0.01 * max|r|); ULP (float32 outputs only) is reported,
  not gated: outputs that cancel to ~0 make honest rounding read as 10^5 ULP.

subcommands (run `crosscheck bench --help`, `crosscheck bundle --help` for their options):
  crosscheck bench ...                          forward latency of JAX vs torch (crosscheck.bench)
  crosscheck bundle export OUT [run options]    write weights + inputs + configs to a bundle
  crosscheck bundle run BUNDLE OUT [--backend ttnn|flax] [--ttnn-runtime R]
                                                run a bundle in this interpreter
  crosscheck bundle compare BUNDLE OUTPUTS... [--json PATH]
                                                torch reference from the bundle vs outputs files

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

exit codes: 0 all checks passed, 1 a mismatch (failing variants named), 2 bad usage or input.
Colour follows the terminal; --no-color or NO_COLOR turns it off.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error the rest of the CLI uses."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
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
        "--variant", action="append", metavar="NAME",
        help="jaxattn class name, case-insensitive, repeatable (default: all 8, or those --weights fits)",
    )
    g.add_argument("--weights", metavar="PATH", help="torch state dict: .pt/.pth (weights_only) or .safetensors")
    g.add_argument(
        "--prefix", default="", metavar="P",
        help="the layer to read from a whole model's --weights, e.g. model.layers.0.self_attn. or transformer.h.0.attn.",
    )
    g.add_argument(
        "--config", metavar="PATH",
        help="a transformers config.json: heads, kv heads, head_dim, hidden size, RoPE settings, attention_bias",
    )
    h = p.add_argument_group("hyperparameters a state dict cannot carry (checked against it where it can)")
    h.add_argument("--num-heads", type=_positive_int, metavar="N", help="heads (default 2; 1 for TorchMultiheadAttention)")
    h.add_argument("--context-length", type=_positive_int, metavar="N", help="mask size (default: the mask buffer, else the token count)")
    h.add_argument("--d-out", type=_positive_int, metavar="N", help="output width (default 2; TorchMultiheadAttention: d_in)")
    h.add_argument("--d-in", type=_positive_int, metavar="N", help="input width (default: the weights', else 3); also sets random inputs' width")
    h.add_argument("--dropout", type=_dropout, metavar="P", help="dropout rate, recorded only (inference mode)")
    h.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None, help="Q/K/V projections with bias")
    h.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None, help="causal mask for TorchMultiheadAttention (default on)")
    h.add_argument("--num-kv-groups", type=_positive_int, metavar="N", help="GQA: key/value heads (default: 2, or the weights' with the head dim known)")
    h.add_argument("--head-dim", type=_positive_int, metavar="N", help="GQA: per-head dim (default: d_out / num_heads)")
    h.add_argument("--rope-theta", type=_positive_float, metavar="X", help="GQA: RoPE base (default 10000)")
    h.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None, help="GroupedQueryAttention: RMSNorm on queries and keys (Qwen3)")
    i = p.add_argument_group("inputs (default: the seed sentence)")
    i.add_argument("--input", metavar="PATH", help="(tokens, d_in) or (batch, tokens, d_in) from .npy, .pt or .safetensors")
    i.add_argument("--batch", type=_positive_int, metavar="B", help="random inputs: batch size (default 1)")
    i.add_argument("--tokens", type=_positive_int, metavar="T", help="random inputs: tokens (default 6)")
    i.add_argument("--seed", type=_seed, metavar="S", help="random inputs: numpy seed (default 0)")
    a = p.add_argument_group("attention core")
    a.add_argument(
        "--attention-impl", metavar="NAME",
        help="attention core of the Flax modules that take one: auto (default: jaxattn picks by token count) "
        "or a name from jaxattn.implementations.names(), e.g. naive, blockwise, xla",
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    o.add_argument("--no-color", action="store_true", help="no colour (also: NO_COLOR set, or not a terminal)")
    o.add_argument("-q", "--quiet", action="store_true", help="only failures and a one-line summary")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_case_options(p)
    d = p.add_argument_group("decoding and padding (instead of the forward check)")
    d.add_argument(
        "--decode", type=_positive_int, metavar="PROMPT_LEN",
        help="prefill PROMPT_LEN tokens, then decode the input's other tokens one at a time through the KV cache; "
        "every step compared across backends and with each backend's full forward (causal variants)",
    )
    d.add_argument("--padding", choices=("left", "right"), help="run a padded batch with an attention mask")
    d.add_argument(
        "--pad-lengths", metavar="LIST",
        help="padding tokens per row, e.g. 0,3,5 (row i pads input row i %% batch); compared with the "
        "rows run one by one, at the real tokens",
    )
    b = p.add_argument_group("backends")
    b.add_argument("--backends", default="torch,flax,ttnn", metavar="LIST", help="comma-separated subset of torch,flax,ttnn (default: all)")
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="what Flax computes in (torch stays the float32 reference; ttnn is bfloat16)")
    b.add_argument("--ttnn-runtime", default="auto", choices=("auto", "device", "host"), help="auto: a Tenstorrent device when found, else the host model")
    b.add_argument("--ttnn-python", metavar="PATH", help="run the ttnn backend in this interpreter (e.g. .venv-ttnn/bin/python) via a bundle")
    _add_output_options(p)
    return p


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
    r = sub.add_parser("run", help="run every case of BUNDLE on one backend in this interpreter; write OUT")
    r.add_argument("bundle", metavar="BUNDLE")
    r.add_argument("out", metavar="OUT")
    r.add_argument("--backend", default="ttnn", choices=("ttnn", "flax"))
    r.add_argument("--ttnn-runtime", default="auto", choices=("auto", "device", "host"))
    c = sub.add_parser("compare", help="torch reference from BUNDLE's weights vs each OUTPUTS file")
    c.add_argument("bundle", metavar="BUNDLE")
    c.add_argument("outputs", metavar="OUTPUTS", nargs="+")
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
    out = Console(file=sys.stdout, no_color=no_color, highlight=False, width=None if out_tty else 160,
                  force_terminal=None if out_tty else False)
    err = Console(file=sys.stderr, no_color=no_color, highlight=False)
    return out, err


def _inputs(args):
    from crosscheck.inputs import RandomInputs

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
        d_in=args.d_in, d_out=args.d_out, context_length=args.context_length, dropout=args.dropout,
        num_heads=args.num_heads, qkv_bias=args.qkv_bias, causal=args.causal, num_kv_groups=args.num_kv_groups,
        head_dim=args.head_dim, qk_norm=args.qk_norm, rope_theta=args.rope_theta, prefix=args.prefix,
        model_config=args.config,
    )


class _ProgressBar:
    """A rich progress bar on stderr, started on the first step."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True,
        )
        self._task = None

    def __call__(self, done: int, total: int, description: str) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(description, total=total)
        self._progress.update(self._task, completed=done, description=description)

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()


def _finish(report, args, out) -> int:
    from crosscheck import report as rp

    rp.render(report, out, quiet=args.quiet)
    if args.json is not None:
        rp.write_json(report, args.json)
    if report.passed:
        return 0
    print(f"{PROG}: mismatch in {', '.join(report.failing_variants)}", file=sys.stderr)
    return 1


# --- commands -----------------------------------------------------------------------------------


def _check_json_path(path: Optional[str], inputs) -> None:
    """Fail before the run, not after it, when the JSON report cannot be written or would replace an input."""
    if path is not None:
        from crosscheck.outputs import check_output_path

        check_output_path(path, "--json", inputs, what="JSON report")


def _run(args) -> int:
    from crosscheck import engine
    from crosscheck.padding_check import parse_pad_lengths

    _check_json_path(args.json, [("--weights", args.weights), ("--input", args.input), ("--config", args.config),
                                 ("--ttnn-python", args.ttnn_python)])

    out, err = _consoles(args)
    n_variants = len(args.variant) if args.variant else 8  # the default run's variants
    show_progress = not args.quiet and sys.stderr.isatty() and (n_variants > 1 or args.tokens or args.batch)
    bar = _ProgressBar(err) if show_progress else None
    try:
        report = engine.run(
            args.variant,
            weights=args.weights,
            inputs=_inputs(args),
            backends=[b for b in args.backends.split(",")],
            ttnn_runtime=args.ttnn_runtime,
            ttnn_python=args.ttnn_python,
            dtype=args.dtype,
            attention_impl=args.attention_impl,
            decode=args.decode,
            padding=args.padding,
            pad_lengths=None if args.pad_lengths is None else parse_pad_lengths(args.pad_lengths),
            progress=bar,
            **_overrides(args),
        )
    finally:
        if bar is not None:
            bar.close()
    return _finish(report, args, out)


def _bundle(argv: Sequence[str]) -> int:
    args = build_bundle_parser().parse_args(argv)
    from crosscheck import engine

    if args.action == "export":
        cases = engine.export_bundle(
            args.out, args.variant, weights=args.weights, inputs=_inputs(args), attention_impl=args.attention_impl,
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
        from crosscheck import bench
    except ImportError as e:
        raise BadInputError(f"bench is unavailable: crosscheck.bench cannot be imported ({e})") from None
    summary = (bench.__doc__ or "Benchmark the attention implementations.").strip().splitlines()[0]
    parser = _Parser(prog=f"{PROG} bench", description=summary)
    bench.add_arguments(parser)
    return int(bench.main(parser.parse_args(argv)) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return _bench(argv[1:])
        if argv and argv[0] == "bundle":
            return _bundle(argv[1:])
        return _run(build_parser().parse_args(argv))
    except (BadInputError, ValueError) as err:
        # ValueError: jaxattn's own input checks (shapes, context_length) raised during a run.
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except MismatchError as err:
        print(f"{PROG}: mismatch: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
