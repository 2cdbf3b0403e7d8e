"""The subcommands: ``crosscheck bundle export|run|compare``, ``crosscheck bench`` and ``crosscheck convert``."""

from __future__ import annotations

from collections.abc import Sequence

from crosscheck.cli.parser import PROG, Parser, build_bundle_parser, build_convert_parser
from crosscheck.cli.runner import check_json_path, consoles, finish, inputs
from crosscheck.cli.runner import overrides as overrides_of
from crosscheck.errors import BadInputError


def bundle(argv: Sequence[str]) -> int:
    """``crosscheck bundle export|run|compare``."""
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
            inputs=inputs(args),
            attention_impl=args.attention_impl,
            **overrides_of(args),
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
    check_json_path(args.json, [("BUNDLE", args.bundle), *(("OUTPUTS", o) for o in args.outputs)])
    out, _ = consoles(args)
    report = engine.compare_outputs(args.bundle, args.outputs)
    return finish(report, args, out)


def bench(argv: Sequence[str]) -> int:
    """``crosscheck bench``: the options are :mod:`crosscheck.benchmarks.bench`'s."""
    try:
        from crosscheck.benchmarks import bench as benchmark
    except ImportError as e:
        raise BadInputError(f"bench is unavailable: crosscheck.benchmarks.bench cannot be imported ({e})") from None
    summary = (benchmark.__doc__ or "Benchmark the attention implementations.").strip().splitlines()[0]
    parser = Parser(prog=f"{PROG} bench", description=summary)
    benchmark.add_arguments(parser)
    return int(benchmark.main(parser.parse_args(argv)) or 0)


def convert(argv: Sequence[str]) -> int:
    """``crosscheck convert IN OUT``: torch state dict <-> Flax parameters (:mod:`crosscheck.porting.convert`)."""
    from crosscheck.porting import convert

    args = build_convert_parser().parse_args(argv)
    if args.weights is not None:
        raise BadInputError("convert reads the weights from IN; drop --weights")
    if args.variant and len(args.variant) > 1:
        raise BadInputError(f"convert writes one layer; --variant given {len(args.variant)} times")
    overrides = overrides_of(args)
    prefix, model_config = overrides.pop("prefix"), overrides.pop("model_config")
    done = convert.convert(
        args.src,
        args.dst,
        variant=args.variant[0] if args.variant else None,
        prefix=prefix,
        model_config=model_config,
        overrides=overrides,
        inputs=inputs(args),
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
