"""``crosscheck [options]``: argv -> :class:`~crosscheck.pipeline.request.RunRequest` -> engine -> report.

Also ``--stages`` and ``--plot`` (:mod:`crosscheck.checks.stages`, :mod:`crosscheck.checks.plots`), and the
helpers the subcommands share: consoles, inputs and config flags from argv, the report's rendering
and exit code. Heavy modules are imported inside the functions, after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import os
import sys

from crosscheck.cli.parser import PROG
from crosscheck.errors import BadInputError


def one_line(err: BaseException) -> str:
    """Multi-line errors (a port error lists one key a line) joined into the single stderr line."""
    text = ""
    for line in (part.strip() for part in str(err).splitlines()):
        if line:
            text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text or type(err).__name__


def consoles(args):
    """``(stdout console, stderr console)``: colour as the terminal and ``--no-color``/``NO_COLOR`` say."""
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


def inputs(args):
    """The inputs the flags ask: ``--input``'s path, random inputs, or ``None`` (the seed sentence)."""
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


def overrides(args) -> dict:
    """The config flags of the run, ``bundle export`` and ``convert`` (every overridable config field that has a
    flag: ``rope_scaling`` comes from ``--config`` only), ``prefix`` and ``model_config`` as keywords."""
    from crosscheck.pipeline.cases import OVERRIDABLE

    flags = {k: getattr(args, k) for k in OVERRIDABLE if hasattr(args, k)}
    return {**flags, "prefix": args.prefix, "model_config": args.config}


def progress_bar(console):
    """A rich progress bar on stderr, started on the first step (:class:`crosscheck.pipeline.progress.Bar`)."""
    from crosscheck.pipeline.progress import Bar

    return Bar(console)


def progress_wanted(args) -> bool:
    """A progress bar only on a terminal, never with -q or with the JSON report on stdout (``--json -``)."""
    from crosscheck.pipeline import progress

    return progress.wanted(quiet=args.quiet, json_path=getattr(args, "json", None))


def finish(report, args, out, render=None) -> int:
    """Render ``report`` (and its JSON where asked); the exit code of its verdict."""
    from crosscheck.pipeline import report as rp
    from crosscheck.porting.outputs import interrupted

    if interrupted():  # the run went on past a swallowed Ctrl-C: no verdict, no report
        raise KeyboardInterrupt

    if args.json == "-":  # stdout carries the JSON alone
        out = consoles(args)[1]
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


def check_json_path(path: str | None, read) -> None:
    """Fail before the run, not after it, when the JSON report cannot be written or would replace an input."""
    if path is not None and path != "-":  # "-": stdout
        from crosscheck.porting.outputs import check_output_path

        check_output_path(path, "--json", read, what="JSON report")


def load_plugins(specs) -> None:
    """The installed packages' variants (entry points), then each ``--plugin`` (a file or a module), before
    any variant name is read; a plugin that is missing or fails to import is an error naming it."""
    from crosscheck.variants import plugins

    plugins.load_entry_points()
    for spec in specs or ():
        plugins.load_plugin(spec)


def request_of(args):
    """The :class:`~crosscheck.pipeline.request.RunRequest` of the parsed ``args`` (validated: exit 2 on a refusal)."""
    from crosscheck.checks.padding_check import parse_pad_lengths
    from crosscheck.pipeline.request import RunRequest

    return RunRequest.create(
        args.variant,
        weights=args.weights,
        inputs=inputs(args),
        backends=tuple(args.backends.split(",")),
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
        max_memory=args.max_memory,
        api=args.api,
        devices=args.devices,
        shard=args.shard,
        jax_layers=getattr(args, "jax_layers", None),
        **overrides(args),
    )


def run(args) -> int:
    """The run the parsed ``args`` ask: the forward check or another one, or ``--stages``/``--plot``."""
    if getattr(args, "devices", None) is not None:  # before anything imports JAX: XLA reads it once
        from crosscheck.pipeline.devices import force_host_devices

        force_host_devices(args.devices)
    from crosscheck.pipeline import engine, placement

    load_plugins(getattr(args, "plugin", None))
    check_json_path(
        args.json,
        [
            ("--weights", args.weights),
            ("--input", args.input),
            ("--config", args.config),
            ("--ttnn-python", args.ttnn_python),
        ],
    )
    if getattr(args, "stages", False) or getattr(args, "plot", None) is not None:
        return run_stages(args)

    out, err = consoles(args)
    n_variants = len(args.variant) if args.variant else 8  # the default run's variants
    show_progress = progress_wanted(args) and (n_variants > 1 or args.tokens or args.batch)
    bar = progress_bar(err) if show_progress else None
    try:
        with placement.choices(args.torch_device, args.matmul_precision):  # cuda without CUDA: exit 2
            report = engine.run(request_of(args), progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return finish(report, args, out)


def run_stages(args) -> int:
    """``--stages`` (the stage report) and/or ``--plot DIR`` (pictures from the same stages)."""
    from crosscheck.checks import stages

    for flag, value in (
        ("--decode", args.decode),
        ("--padding", args.padding),
        ("--ttnn-python", args.ttnn_python),
        ("--attention-impl", args.attention_impl),
        ("--jax-layers", getattr(args, "jax_layers", None)),
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
        code = run(argparse.Namespace(**{**vars(args), "plot": None}))
    out, err = consoles(args)
    bar = progress_bar(err) if progress_wanted(args) else None
    try:
        report = stages.run(
            args.variant,
            weights=args.weights,
            inputs=inputs(args),
            backends=args.backends.split(","),
            ttnn_runtime=args.ttnn_runtime,
            dtype=args.dtype,
            progress=bar,
            **overrides(args),
        )
    finally:
        if bar is not None:
            bar.close()
    if code is None:
        code = finish(report, args, out, render=stages.render)
    if plan is not None:  # also after a mismatch: the pictures show where
        written = plots.write(report, plan)
        sys.stdout.flush()
        print(f"{PROG}: wrote {len(written)} PNG(s) to {args.plot}", file=sys.stderr)
    return code
