#!/usr/bin/env bash
# The GPU check, in one go on a machine with a CUDA GPU: build the CUDA extension, run the
# CUDA tests, then the GPU benchmark (its table is the last thing printed). Needs python3
# with a CUDA build of torch, ninja and pytest, and nvcc of the same CUDA major version;
# no network. Every stage runs even if an earlier one failed, and says so.
#
#   bash benchmarks/gpu_check.sh            # at most 9.5 minutes (the stages' time limits)
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0),
# GPU_CHECK_BUILD_TIMEOUT / GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT (seconds;
# default 240 / 150 / 180), GPU_CHECK_BENCH_BUDGET (gpu_bench.py --budget, default 100).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# fastmf is imported from this tree, where the build puts its extension (nothing is
# installed). For the first run on a GPU, benchmarks/gpu_first.sh is the shorter script.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start ))s)"; }
failed=()

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>/dev/null \
  || echo "nvidia-smi not available"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  elif [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME=${CUDA_HOME:-}
echo "CUDA_HOME=${CUDA_HOME:-<none>}"; [ -n "$CUDA_HOME" ] && "$CUDA_HOME/bin/nvcc" --version | tail -2

step "build (FASTMF_CUDA=1, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
export FASTMF_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
. benchmarks/system_compiler.sh
echo "compilers: CC=${CC:-unset} CXX=${CXX:-unset}"
"$PY" -c "import setuptools" 2>/dev/null || echo "warning: setuptools missing; the build will fail"
command -v ninja >/dev/null || echo "warning: ninja not on PATH; the build will fail"
mkdir -p build
if timeout "${GPU_CHECK_BUILD_TIMEOUT:-240}" "$PY" setup.py build_ext --inplace \
    > build/gpu_check_build.log 2>&1; then
  tail -n 2 build/gpu_check_build.log
else
  failed+=(build)
  echo "BUILD FAILED; from build/gpu_check_build.log:"
  grep -E "error|Error" build/gpu_check_build.log | head -n 30
  tail -n 15 build/gpu_check_build.log
fi
"$PY" -c "import json, torch, fastmf._C as C; print(json.dumps(C.build_info()))" || failed+=(import)

step "CUDA tests"
# The expectations are computed by the reference on the CPU: spread them over 4 processes
# when pytest-xdist is there (each has its own CUDA context and device error record).
parallel=()
"$PY" -c "import xdist" 2>/dev/null && parallel=(-n 4)
timeout "${GPU_CHECK_TEST_TIMEOUT:-150}" "$PY" -m pytest tests/test_cuda_ops.py -q -ra \
  "${parallel[@]}" -p no:cacheprovider --durations=5 || failed+=(tests)

step "benchmark"
timeout "${GPU_CHECK_BENCH_TIMEOUT:-180}" "$PY" benchmarks/gpu_bench.py \
  --budget "${GPU_CHECK_BENCH_BUDGET:-100}" \
  || failed+=(benchmark)

step "done in $(( $(date +%s) - start ))s; failed stages: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
