#!/usr/bin/env bash
# The GPU target "the whole test suite passes unchanged on a CUDA machine, in under 10 minutes there", from the
# repo root of a machine with one NVIDIA GPU (H100/H200), JAX with CUDA, a CUDA build of torch and the
# project's `test` extra (pytest-xdist included):
#
#   OUT=/some/dir PYTHONPATH=. bash tools/gpu_suite.sh          # SUITE_SECONDS=560 by default
#
# Runs exactly `make test`'s main command (README) with JAX on the GPU, under a wall-clock limit, and
# writes under $OUT: env.txt, suite.txt (pytest's output, the 40 slowest tests), junit.xml, compiles/ (one
# JSON per worker: programs compiled and XLA compile seconds per test, tests/conftest.py) and
# compile_report.txt (tools/compile_report.py: where the compile time went). Run tools/gpu_check.sh for
# the GPU-only tests and the bench.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
. tools/gpu_env.sh   # PY, PYTHONPATH, beartype from ./.whl where the machine lacks it
export JAXATTN_COMPILE_REPORT="$OUT/compiles"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import jax, flax, torch; print('jax', jax.__version__, jax.default_backend(), jax.devices()); print('flax', flax.__version__); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" 2>&1
  git rev-parse HEAD 2>/dev/null
} > "$OUT/env.txt"
start=$SECONDS
timeout "${SUITE_SECONDS:-560}" $PY -m pytest --ignore=tests/conformance -q -p no:cacheprovider \
  -n "${TEST_WORKERS:-2}" --durations=40 -rs --junitxml="$OUT/junit.xml" > "$OUT/suite.txt" 2>&1
rc=$?
echo "suite: exit $rc in $((SECONDS - start)) s (124: stopped at the limit)" | tee -a "$OUT/suite.txt"
$PY tools/compile_report.py "$OUT/compiles" --top 30 > "$OUT/compile_report.txt" 2>&1
tail -n 3 "$OUT/suite.txt"
head -n 1 "$OUT/compile_report.txt"
