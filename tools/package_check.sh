#!/usr/bin/env bash
# The two audiences' installs, from the built artefacts (not the checkout), in a clean virtual environment:
#   1. `python -m build` makes the wheel and the sdist;
#   2. the wheel alone (no extra) in a fresh venv: no torch; jaxattn's smoke test; `import crosscheck` and the
#      `crosscheck` command refuse with the one line that names `pip install 'jaxattn[crosscheck]'` (exit 2);
#   3. the wheel with the [crosscheck] extra (not editable, torch pinned by constraints.txt): `crosscheck` on its
#      default input passes.
# Usage: tools/package_check.sh PYTHON WORKDIR   (make test-package passes .venv's python and .package-check)
set -euo pipefail
PYTHON=${1:?python with the build package}
WORK=${2:?work folder}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PIP="-q --disable-pip-version-check"
rm -rf "$WORK"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "build wheel and sdist"
"$PYTHON" -m build --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; exit 1; }
ls "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/jaxattn-*.whl)
tar -tzf "$WORK"/dist/jaxattn-*.tar.gz >"$WORK/sdist.txt"  # listed first: `grep -q` in a pipe would end tar early
for f in jaxattn/tolerance.py crosscheck/extra.py crosscheck/tt/host_model.py; do
  grep -q "/$f\$" "$WORK/sdist.txt" || { echo "the sdist lacks $f"; exit 1; }
done

step "environment: the wheel alone (environment build, not a test)"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install $PIP "$WHEEL"

# Every check runs from $WORK, so the checkout's packages are not on sys.path.
cd "$WORK"
step "test: no torch, jaxattn smoke test"
if "$WORK/venv/bin/python" -c 'import torch' 2>/dev/null; then echo "torch was installed without the extra"; exit 1; fi
"$WORK/venv/bin/python" "$ROOT/tools/smoke_jaxattn.py"

step "test: crosscheck without its extra"
status=0
"$WORK/venv/bin/crosscheck" >"$WORK/out.txt" 2>"$WORK/err.txt" || status=$?
cat "$WORK/err.txt"
[ "$status" -eq 2 ] || { echo "crosscheck exited $status, want 2"; exit 1; }
[ "$(wc -l <"$WORK/err.txt")" -eq 1 ] || { echo "want one line on stderr"; exit 1; }
grep -qF "pip install 'jaxattn[crosscheck]'" "$WORK/err.txt" || { echo "the line does not name the extra"; exit 1; }
! grep -q Traceback "$WORK/err.txt"
status=0
"$WORK/venv/bin/python" -m crosscheck 2>"$WORK/err.txt" || status=$?
[ "$status" -eq 2 ] && [ "$(wc -l <"$WORK/err.txt")" -eq 1 ] || { echo "python -m crosscheck: exit $status"; cat "$WORK/err.txt"; exit 1; }
"$WORK/venv/bin/python" - <<'PY'
try:
    import crosscheck  # noqa: F401
except ModuleNotFoundError as err:
    assert type(err).__name__ == "MissingExtraError", type(err)
    assert "pip install 'jaxattn[crosscheck]'" in str(err) and "\n" not in str(err), str(err)
    print(f"import crosscheck: {type(err).__name__}: {err}")
else:
    raise SystemExit("import crosscheck succeeded without torch")
PY

step "environment: add the [crosscheck] extra, not editable (environment build, not a test)"
"$WORK/venv/bin/pip" install $PIP -c "$ROOT/constraints.txt" "${WHEEL}[crosscheck]"

step "test: crosscheck on its default input, from the installed wheel"
"$WORK/venv/bin/python" -c 'import crosscheck, jaxattn; assert "site-packages" in crosscheck.__file__; assert crosscheck.__version__ == jaxattn.__version__'
"$WORK/venv/bin/crosscheck"
echo "package check passed"
