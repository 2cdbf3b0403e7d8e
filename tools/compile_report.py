"""Where the test suite's compile time goes: the heaviest tests and files from JAXATTN_COMPILE_REPORT files.

    JAXATTN_COMPILE_REPORT=out/compiles make test    # tests/conftest.py: one JSON line per test and worker
    python tools/compile_report.py out/compiles [--top 25]

Compile time is what grows most on a GPU (XLA's GPU compiler is slower per program than XLA:CPU),
so this is the list to shorten when the suite is slow there.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys


def load(folder: str) -> tuple[str, dict[str, dict]]:
    """``(backend, {test id: {"programs", "compile_s"}})`` from the workers' ``compiles-*.jsonl`` in ``folder``."""
    files = sorted(glob.glob(os.path.join(folder, "compiles-*.jsonl")))
    if not files:
        raise SystemExit(f"compile_report: no compiles-*.jsonl in {folder}")
    backends, tests = set(), {}
    for path in files:
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                backends.add(row.pop("backend"))
                tests[row.pop("test")] = row
    return ",".join(sorted(backends)), tests


def by_file(tests: dict[str, dict]) -> dict[str, list[float]]:
    files = collections.defaultdict(lambda: [0, 0.0])
    for test, row in tests.items():
        totals = files[test.split("::")[0]]
        totals[0] += row["programs"]
        totals[1] += row["compile_s"]
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    backend, tests = load(args.folder)
    programs = sum(row["programs"] for row in tests.values())
    seconds = sum(row["compile_s"] for row in tests.values())
    print(f"{backend}: {len(tests)} tests compiled {programs} programs in {seconds:.1f} s of XLA compile time")
    print("\nheaviest files (compile s, programs):")
    for name, (count, secs) in sorted(by_file(tests).items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"  {secs:8.1f} s {count:6d}  {name}")
    print("\nheaviest tests (compile s, programs):")
    for name, row in sorted(tests.items(), key=lambda kv: -kv[1]["compile_s"])[: args.top]:
        print(f"  {row['compile_s']:8.1f} s {row['programs']:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
