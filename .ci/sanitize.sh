#!/usr/bin/env bash
# Builds the CPU kernels and csrc/tests/cpp_test.cpp with AddressSanitizer and
# UndefinedBehaviorSanitizer (CMakeLists.txt, FASTMF_SANITIZE=ON) and runs the C++ test.
#
#   VENV=.venv .ci/sanitize.sh        # a venv with torch; needs cmake >= 3.25 and ninja
#
# Environment: VENV (default .venv), BUILD_DIR (default build/cmake-sanitize), JOBS (2).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
BUILD_DIR=${BUILD_DIR:-build/cmake-sanitize}
JOBS=${JOBS:-2}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "sanitize.sh: no python at $PY (set VENV)" >&2; exit 2; }
command -v cmake >/dev/null || { echo "sanitize.sh: cmake not found" >&2; exit 2; }
command -v ninja >/dev/null || { echo "sanitize.sh: ninja not found" >&2; exit 2; }

start=$(date +%s)
prefix=$("$PY" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")

cmake -S . -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DFASTMF_SANITIZE=ON \
  -DCMAKE_PREFIX_PATH="$prefix" \
  -DFASTMF_TORCH_VERSION="$torch_version"
configured=$(date +%s)

cmake --build "$BUILD_DIR" -j "$JOBS"
built=$(date +%s)

# libtorch is not instrumented: its allocations at exit look like leaks, so leak checking
# is off. The test binary links the ASan runtime first, so no LD_PRELOAD is needed.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$BUILD_DIR/fastmf_cpp_test"
done_=$(date +%s)

echo "sanitize.sh: configure $((configured - start))s, build $((built - configured))s," \
  "test $((done_ - built))s, total $((done_ - start))s"
