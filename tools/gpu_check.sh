#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with one NVIDIA GPU (H100/H200), from the repo root:
#
#   OUT=/some/dir PYTHONPATH=. bash tools/gpu_check.sh
#
# Needs JAX with CUDA (jax[cuda12]), a CUDA build of torch, flax, pytest, hypothesis (the project's
# `test` extra). Writes under $OUT (default ./gpu_out): env.txt (GPU, driver, versions), pytest_gpu.txt
# (the `gpu`-marked tests), bench_*.json/txt (crosscheck bench --device cuda at the target
# shapes), summary.txt. Sized to finish in about 8 minutes: every step has its own timeout, and a step
# that fails or times out is recorded and the next one runs.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
. tools/gpu_env.sh   # PY, PYTHONPATH, beartype from ./.whl where the machine lacks it
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and torch share the GPU in one process
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: run, keep stdout+stderr in $OUT/NAME.txt, note the exit status
  local name=$1 secs=$2; shift 2
  local start=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$summary"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import jax, jaxlib, flax, torch; print('jax', jax.__version__, 'backend', jax.default_backend(), jax.devices()); print('flax', flax.__version__); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" 2>&1
  git rev-parse HEAD 2>/dev/null
} > "$OUT/env.txt"

# 1. What only a GPU can show: cuDNN and the compiled Pallas kernel against naive, forward and
#    gradients; the cross-check with torch on CUDA; one small real bench run. With them, the kernel's
#    Triton lowering for every case (tests/jaxattn/test_flash_lowering.py), now also compiled by XLA.
step pytest_gpu 100 $PY -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/jaxattn/test_flash.py tests/jaxattn/test_cudnn_and_auto.py \
  tests/crosscheck/test_device_and_precision.py tests/crosscheck/test_device_bench.py
step pytest_lowering 25 $PY -m pytest -q -p no:cacheprovider tests/jaxattn/test_flash_lowering.py

# 2. The float32 cross-check that failed on a GPU before (flax at TF32), at highest and at default precision.
step crosscheck_f32 30 $PY -m crosscheck --variant MultiHeadAttention --batch 2 --tokens 256 --d-in 768 \
  --d-out 768 --num-heads 12 --backends torch,flax --torch-device cuda --json "$OUT/crosscheck_f32.json"
step crosscheck_tf32 30 $PY -m crosscheck --variant MultiHeadAttention --batch 2 --tokens 256 --d-in 768 \
  --d-out 768 --num-heads 12 --backends torch,flax --torch-device cuda --matmul-precision default \
  --json "$OUT/crosscheck_tf32.json"

# 3. The bench at the target shapes: bf16, d=768, 12 heads, causal; forward, then forward+backward.
#    torch-book holds T x T scores: only at the two shorter shapes; torch-compile (slow to compile) at the first.
#    The bench timeouts add up to 310 s, all steps to 495 s (a device call may run 600 s).
bench() {  # bench NAME SECONDS ARGS...
  local name=$1 secs=$2; shift 2
  step "bench_$name" "$secs" $PY -m crosscheck bench --device cuda --d-model 768 --heads 12 --repeats 5 \
    --pipeline 10 --json "$OUT/bench_$name.json" "$@"
}
ALL="torch-sdpa torch-book torch-compile jax-cudnn jax-flash jax-auto"
LONG="torch-sdpa jax-cudnn jax-flash jax-auto"
bench bf16_b8_t1024 45 --dtype bfloat16 --batch 8 --tokens 1024 --impls $ALL
bench bf16_b4_t4096 35 --dtype bfloat16 --batch 4 --tokens 4096 --impls torch-sdpa torch-book jax-cudnn jax-flash jax-auto
bench bf16_b1_t16384 30 --dtype bfloat16 --batch 1 --tokens 16384 --impls $LONG
bench bf16_b1_t65536 40 --dtype bfloat16 --batch 1 --tokens 65536 --impls $LONG --repeats 3 --pipeline 3
bench bf16_b8_t1024_bwd 30 --dtype bfloat16 --batch 8 --tokens 1024 --impls $LONG --backward
bench bf16_b4_t4096_bwd 30 --dtype bfloat16 --batch 4 --tokens 4096 --impls $LONG --backward
bench bf16_b1_t16384_bwd 30 --dtype bfloat16 --batch 1 --tokens 16384 --impls $LONG --backward
bench bf16_b1_t65536_bwd 40 --dtype bfloat16 --batch 1 --tokens 65536 --impls $LONG --backward --repeats 2 --pipeline 2
# float32 at highest precision (TF32 off in torch), b=1, T=16384: the flash kernel against torch's SDPA.
bench f32_b1_t16384 30 --dtype float32 --batch 1 --tokens 16384 --impls torch-sdpa jax-flash jax-auto

echo "done: $(date -u)" >> "$summary"
cat "$summary"
