#!/usr/bin/env bash
# The GPU check in one command: build with the CUDA kernels, run tests/test_gpu.py (cuda, then
# triton), the C++ bad-argument cases on CUDA, and the GPU benchmark targets. Every phase has a
# time limit, so the whole run fits a ~9-minute slot on a 16-core H100/H200 machine, and writes
# its log to OUT (default bench/results/gpu-check), at most eight files:
#
#   env.txt          GPU, driver, torch / CUDA / cuDNN / triton versions, date, commit
#   build.log        the build (TORCH_CUDA_ARCH_LIST=9.0 unless set)
#   tests-cuda.log   tests/test_gpu.py -k "not triton"
#   tests-triton.log tests/test_gpu.py -k triton (first run: every Triton kernel compiles)
#   tests-other.log  tests/test_errors.py on CUDA (each bad call in a child process) and the
#                    timm fusion check (timm is installed on the GPU image)
#   bench.json       pytest-benchmark JSON of the GPU targets (float16, channels_last, batch 32)
#   bench.log        its console output
#   summary.txt      one line per phase: exit status and the pytest summary line
#
# Usage: bash bench/gpu_check.sh            (from the repository root)
# Limits (seconds) can be changed with BUILD_S, CUDA_S, TRITON_S, OTHER_S, BENCH_S.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
unset TRITON_INTERPRET CNNOPS_BACKEND
PY=${PYTHON:-python3}
: > "$OUT/summary.txt"

phase() {  # phase NAME LIMIT LOG COMMAND...: run with a time limit, record status and summary
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$log" 2>&1
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

phase build "${BUILD_S:-240}" "$OUT/build.log" \
  env CNNOPS_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace || {
    echo "build failed: see $OUT/build.log" >&2; cat "$OUT/summary.txt"; exit 1; }
"$PY" -c "import cnnops; print('backends:', cnnops.available_backends())" >> "$OUT/env.txt" 2>&1

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rf)
phase cuda "${CUDA_S:-150}" "$OUT/tests-cuda.log" \
  "${PYTEST[@]}" -n 8 tests/test_gpu.py -k "not triton"
phase triton "${TRITON_S:-180}" "$OUT/tests-triton.log" \
  "${PYTEST[@]}" -n 8 tests/test_gpu.py -k triton
phase other "${OTHER_S:-90}" "$OUT/tests-other.log" \
  "${PYTEST[@]}" tests/test_errors.py tests/test_fuse.py -k "cuda or real_timm"
phase bench "${BENCH_S:-150}" "$OUT/bench.log" \
  "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_ops.py --benchmark-only \
  --bench-devices cuda --bench-dtype float16 --bench-channels-last --bench-nets resnet50 \
  --bench-batch 32 --bench-cudnn-benchmark --bench-compile none \
  -k "conv2d_eval or conv_bn_relu" --benchmark-json="$OUT/bench.json"

cat "$OUT/summary.txt"
