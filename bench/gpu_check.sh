#!/usr/bin/env bash
# The GPU check in one command: build with the CUDA kernels, run the GPU tests, measure the GPU
# targets. Every phase has a time limit, so the whole run fits about 9 minutes on a 16-core
# H100/H200 machine, and leaves at most nine files in OUT (default bench/results/gpu-check):
#
#   env.txt              GPU, driver, torch / CUDA / cuDNN / triton versions, date, commit
#   build.log            the build (TORCH_CUDA_ARCH_LIST=9.0 unless set)
#   tests.log            every GPU case of the suite, `pytest -m cuda tests/` (pytest-xdist):
#                        the `cuda` and `triton-cuda` entries of the per-op files (each op on
#                        the GPU grids, float16/bfloat16 included, side by side), the tests of
#                        CUDA-only behaviour (cuDNN paths, autocast, streams, opcheck, compile),
#                        the C++ bad-argument cases on CUDA (each in a child process) and the
#                        synchronised BN on CUDA tensors (test_distributed.py: gloo on one GPU,
#                        nccl with two); then the timm fusion check (timm is on the GPU image)
#   bench-ops.json       conv2d / conv_bn_relu layer targets: ResNet-50 layers, float16,
#                        channels_last, batch 32, eager cuDNN vs the cnnops backends
#   bench-models.json    ResNet-50 under autocast float16, batch 32, 224x224: eager, cnnops
#                        model, cnnops.fuse (inference and training step, peak memory)
#   bench-compile.json   the same model under torch.compile (default mode)
#   bench-memory.json    the memory group (ResNet-50 training step, autocast float16, batch 32,
#                        224x224: eager, cnnops.fuse, memory="lean", eager + checkpoint):
#                        bytes saved for backward, peak memory (torch.cuda), time
#   bench.log            the benchmarks' console output
#   summary.txt          one line per phase: exit status, seconds, pytest's summary line
#
# Usage: bash bench/gpu_check.sh            (from the repository root)
# Then:  python bench/report.py OUT/bench-ops.json OUT/bench-models.json OUT/bench-compile.json \
#          OUT/bench-memory.json --name <gpu>   (-> bench/results/<gpu>.md, .png)
# Phase limits (seconds): BUILD_S, TESTS_S, TIMM_S, OPS_S, MODELS_S, COMPILE_S, MEMORY_S.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
unset TRITON_INTERPRET CNNOPS_BACKEND
PY=${PYTHON:-python3}
: > "$OUT/summary.txt"
: > "$OUT/bench.log"

phase() {  # phase NAME LIMIT LOG COMMAND...: run with a time limit, record status and summary
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS
  echo "== $name: $*" >> "$log"
  timeout --signal=INT --kill-after=20 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local last
  last=$(grep -E "(passed|failed|error|no tests ran)" "$log" | tail -n 1)
  printf '%-8s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$last" >> "$OUT/summary.txt"
  return $rc
}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm_%d%d" % (p.major, p.minor), p.multi_processor_count, "SMs")
EOF
} > "$OUT/env.txt" 2>&1

: > "$OUT/build.log"
phase build "${BUILD_S:-240}" "$OUT/build.log" \
  env CNNOPS_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace || {
    echo "build failed: see $OUT/build.log" >&2; cat "$OUT/summary.txt"; exit 1; }
"$PY" -c "import cnnops; print('backends:', cnnops.available_backends())" >> "$OUT/env.txt" 2>&1

: > "$OUT/tests.log"
# -m cuda: exactly the GPU cases (tests/conftest.py marks each GPU entry's case `cuda`); the
# CPU entries are left to the CPU runs.
phase tests "${TESTS_S:-210}" "$OUT/tests.log" \
  "$PY" -m pytest -q -p no:cacheprovider -rf -n 16 -m cuda tests/
phase timm "${TIMM_S:-60}" "$OUT/tests.log" \
  "$PY" -m pytest -q -p no:cacheprovider -rf -n 3 tests/test_fuse.py -k real_timm

BENCH=("$PY" -m pytest -q -p no:cacheprovider --benchmark-only --bench-devices cuda
       --bench-dtype float16 --bench-channels-last --bench-cudnn-benchmark)
phase ops "${OPS_S:-100}" "$OUT/bench.log" \
  "${BENCH[@]}" bench/test_bench_ops.py --bench-nets resnet50 --bench-batch 32 \
  --bench-compile none -k "conv2d_eval or conv_bn_relu" --benchmark-json="$OUT/bench-ops.json"
MODEL=(bench/test_bench_models.py --bench-amp --bench-models resnet50 --bench-model-batch 32
       --bench-model-size 224)
phase models "${MODELS_S:-100}" "$OUT/bench.log" \
  "${BENCH[@]}" "${MODEL[@]}" --bench-backends cuda --bench-compile none -k "not memory" \
  --benchmark-json="$OUT/bench-models.json"
phase compile "${COMPILE_S:-120}" "$OUT/bench.log" \
  "${BENCH[@]}" "${MODEL[@]}" --bench-backends cuda --bench-compile all \
  -k "(eager or compile) and not cnnops and not memory" \
  --benchmark-json="$OUT/bench-compile.json"
phase memory "${MEMORY_S:-90}" "$OUT/bench.log" \
  "${BENCH[@]}" "${MODEL[@]}" -k memory --benchmark-json="$OUT/bench-memory.json"

cat "$OUT/summary.txt"
