#!/usr/bin/env bash
# The first run on a GPU machine: the numbers that matter, in priority order, each stage
# under its own time limit and all of them within GPU_FIRST_BUDGET seconds (default 520),
# so that a run cut short still leaves what it had measured. Needs python3 with a CUDA
# build of torch, nvcc of the same CUDA major version, ninja, setuptools and pytest
# (pytest-xdist and pytest-timeout used when present); ncu for stage 4. No network.
#
#   bash benchmarks/gpu_first.sh             # logs in $OUT when set, else /tmp/gpu_first
#   bash benchmarks/gpu_first.sh --dry-run   # print the stages and commands, run nothing
#
# Stages (limit in seconds; each limit is also cut to what is left of the budget):
#   0 machine  GPU, driver, torch, nvcc, compiler and ncu versions                      60
#   1 build    FASTMF_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=all cores, with       270
#              -Xptxas -v: registers, stack and spills per kernel, summarised; the
#              system gcc/g++ where there is one (GPU_FIRST_KEEP_COMPILER=1 keeps
#              CC/CXX). Nothing else runs when the build or the import fails.
#   2 tests    tests/test_cuda_ops.py, the train_step pipeline: train_step (all        150
#              losses/optimizers, shapes, bit-identical reruns, bad samples), CUDA-graph
#              replay, hot rows, CPU/CUDA agreement; over several processes, --maxfail=3
#   3 timing   gpu_bench.py --step: K=64, batches 8192/65536/262144, event-timed       150
#              medians of eager steps and CUDA-graph replays, host submit time, copy
#              bandwidth (device, pinned host <-> device), one step's kernels under
#              torch.profiler beside the byte model; train_step, then the BPR step and
#              the BPR step drawing its 4 negatives per positive (fit's)
#   4 ncu      when ncu is there and 120 s are left: Nsight Compute over one step      150
#              (B=262144) marked by the NVTX range "fastmf_step": DRAM and L2 bytes per
#              kernel against the byte model, L2 hit rate, achieved occupancy; L2 kept
#              warm (--cache-control none), clocks left alone (--clock-control none)
#   5 tests    the rest of tests/test_cuda_ops.py: pairwise (BPR), top-k, mf_forward /  150
#              mf_backward, sparse updates, the embedding_bag family
#   6 tests    the op families' own suites, every case whose id names CUDA (the         rest
#              reference and the native kernels on the GPU), the fastmf.nn layers and
#              fit on the device: 2,754 cases, 40 s on an H200 machine's 16 cores
# Then a summary, printed last. The textbook and compiled-dense PyTorch baselines are not
# re-measured here (gpu_bench.py without --step does that).
#
# Files in the log folder, eight at most (some runners fetch no more): run.log (the whole
# console), build.log (machine + build), tests.log, step.log, step.jsonl, ncu.ncu-rep,
# ncu.csv, ncu.log.
#
# Environment: PYTHON (default python3), GPU_FIRST_BUDGET (seconds, default 520),
# GPU_FIRST_LOG (log folder; default $OUT, else /tmp/gpu_first), GPU_FIRST_NCU_BATCHES
# (default 262144), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: all cores),
# GPU_FIRST_KEEP_COMPILER (set: build with CC/CXX as they are).
#
# A Python package missing on a machine without network travels as wheels: where pip
# works, `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
# -d .whl NAME==VERSION` (one per package, its own dependencies named too), copy .whl/
# along, and before this script: `python3 -m pip install -q --no-index --no-deps
# --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`. (pytest-xdist and
# pytest-timeout only speed up and guard stages 2 and 5; they are optional.)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "gpu_first.sh: unknown argument '$1' (the only option is --dry-run)" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
LOG=${GPU_FIRST_LOG:-${OUT:-/tmp/gpu_first}}
BUDGET=${GPU_FIRST_BUDGET:-520}
NCU_BATCHES=${GPU_FIRST_NCU_BATCHES:-262144}
case $BUDGET in
  ''|*[!0-9]*) echo "gpu_first.sh: GPU_FIRST_BUDGET must be whole seconds, not '$BUDGET'" >&2
               exit 2 ;;
esac
mkdir -p "$LOG" || { echo "gpu_first.sh: cannot create the log folder '$LOG'" >&2; exit 2; }
export PYTHONUNBUFFERED=1
# fastmf is imported from this tree, where the build puts its extension (nothing is
# installed): the scripts and the tests' processes all find it through PYTHONPATH.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The same list as NCU_METRICS in benchmarks/gpu_bench.py (a test keeps them equal).
NCU_METRICS="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,\
lts__t_sector_hit_rate.pct,sm__warps_active.avg.pct_of_peak_sustained_active,\
launch__registers_per_thread,launch__grid_size"
# Stage 2 takes the train_step pipeline; stage 5 everything else in the file (the
# embedding_bag family's tests included, whose hot-row and graph tests would otherwise
# match here).
TRAIN_K="(train_step or cuda_graph or hot_rows or cpu_and_cuda or host_side or refuses \
or wide_rows) and not pairwise and not embedding_bag"

start=$(date +%s)
deadline=$(( start + BUDGET ))
results=()
failed=0
STAGE_FROM=1

now() { date +%s; }
# Printed and kept in run.log (no `exec > >(tee)`: its output could outlive the script).
say() { printf '%s\n' "$*" | tee -a "$LOG/run.log"; }
# limit CAP [RESERVE]: CAP seconds, cut to what is left of the budget after RESERVE.
limit() {
  local l=$(( deadline - $(now) - ${2:-0} ))
  if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi
}
left() { echo $(( deadline - $(now) )); }
note() { results+=("$1|$2|${3:-0}"); }

# stage NAME SECONDS FILE CMD...: CMD under `timeout` (its whole process group), output
# appended to $LOG/FILE and the last TAIL lines printed; FILE "-" prints everything.
# Returns CMD's status (124: out of time, 125: not run).
stage() {
  local name=$1 secs=$2 file=$3 rc t0 dt st
  shift 3
  t0=$(now)
  say ""
  say "== $name (limit ${secs}s, at $(( t0 - start ))s of ${BUDGET}s)"
  say "\$ $*"
  if [ "$DRY" = 1 ]; then
    note "$name" "dry run"
    return 0
  fi
  if [ "$secs" -lt 10 ]; then
    say "-- $name: skipped, out of time"
    note "$name" "skipped: out of time"
    return 125
  fi
  if [ "$file" = - ]; then
    timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$LOG/run.log"
    rc=${PIPESTATUS[0]}
  else
    echo "== $name: $*" >> "$LOG/$file"
    STAGE_FROM=$(( $(wc -l < "$LOG/$file") + 1 ))  # this stage's first line in FILE
    timeout -k 10 "$secs" "$@" >> "$LOG/$file" 2>&1
    rc=$?
    tail -n "+$STAGE_FROM" "$LOG/$file" | tail -n "${TAIL:-12}" | tee -a "$LOG/run.log"
  fi
  dt=$(( $(now) - t0 ))
  case $rc in
    0) st=ok ;;
    124|137) st="TIMED OUT at ${secs}s" ;;
    *) st="FAILED (exit $rc)" ;;
  esac
  [ "$rc" -ne 0 ] && failed=1
  note "$name" "$st" "$dt"
  say "-- $name: $st in ${dt}s"
  return "$rc"
}

summary() {
  say ""
  say "== summary: $(( $(now) - start ))s of ${BUDGET}s; logs in $LOG"
  local r
  for r in "${results[@]}"; do
    IFS='|' read -r name st dt <<< "$r"
    say "$(printf '%-26s %-34s %5ss' "$name" "$st" "$dt")"
  done
  [ "$DRY" = 1 ] && return
  if [ -s "$LOG/tests.log" ]; then
    say ""
    say "-- tests (failures, then the totals of each pytest run):"
    grep -E "^(FAILED|ERROR) " "$LOG/tests.log" | cut -c1-220 | head -n 20 | tee -a "$LOG/run.log"
    grep -E "[0-9]+ (passed|failed|error)" "$LOG/tests.log" | tail -n 4 | tee -a "$LOG/run.log"
  fi
  if [ -s "$LOG/step.log" ]; then
    say ""
    sed -n '/^### train_step, batch 262144/,/first start to last end/p' "$LOG/step.log" \
      | tee -a "$LOG/run.log"
    say ""
    sed -n '/^## step summary/,$p' "$LOG/step.log" | tee -a "$LOG/run.log"
  fi
  if [ -s "$LOG/ncu.log" ]; then
    say ""
    sed -n '/^ncu: step/,$p' "$LOG/ncu.log" | tee -a "$LOG/run.log"
  fi
}

# ---------------------------------------------------------------------------------------
# A fresh set of logs (a dry run leaves an earlier run's logs alone).
: > "$LOG/run.log"
if [ "$DRY" = 0 ]; then
  for f in build.log tests.log step.log step.jsonl ncu.csv ncu.log ncu.ncu-rep; do
    rm -f "$LOG/$f"
  done
fi
say "gpu_first.sh: budget ${BUDGET}s, logs in $LOG$([ "$DRY" = 1 ] && echo ', dry run')"

# The toolkit folder (bin/nvcc, include/): /usr/local/cuda first, since an nvcc on the PATH
# may be a wrapper script outside it.
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
fi
export CUDA_HOME=${CUDA_HOME:-}
# The compiler the build will use, chosen before stage 0 reports it.
. benchmarks/system_compiler.sh
NCU=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu "${CUDA_HOME:-/nonexistent}/bin/ncu" \
  2>/dev/null | tail -n 1)
MACHINE="nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,\
clocks.mem --format=csv; nproc; free -g | head -n 2; \
'$PY' -c \"import sys, torch; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and \
torch.cuda.get_device_name())\"; echo CUDA_HOME=$CUDA_HOME; echo CC=${CC:-unset} CXX=${CXX:-unset}; \
'${CXX:-c++}' --version | head -n 1; \
'${CUDA_HOME:-/usr/local/cuda}/bin/nvcc' --version | tail -n 2; \
echo ncu: ${NCU:-none}; ${NCU:+'$NCU' --version | tail -n 1;} \
'$PY' -c 'import numpy, numba; print(\"numpy\", numpy.__version__, \"numba\", numba.__version__)'; \
'$PY' -c 'import xdist, pytest_timeout' && echo 'pytest-xdist, pytest-timeout: yes' \
|| echo 'pytest-xdist or pytest-timeout: missing'"
TAIL=20 stage "0 machine" "$(limit 60)" build.log bash -c "$MACHINE"

# 1. Build, with the compiler chosen above. NVCC_APPEND_FLAGS reaches every nvcc call that
# torch's build makes.
say "compilers: CC=${CC:-unset} CXX=${CXX:-unset}"
TAIL=6 stage "1 build" "$(limit 270)" build.log env FASTMF_CUDA=1 \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas -v" \
  "$PY" setup.py build_ext --inplace
built=$?
build_from=${STAGE_FROM:-1}
stage "1 registers and spills" "$(limit 60)" - "$PY" benchmarks/gpu_bench.py \
  --ptxas-summary "$LOG/build.log"
if [ "$built" -eq 0 ]; then
  stage "1 import" "$(limit 60)" - "$PY" -c "import sys, fastmf._C as C; i = C.build_info(); \
print(i); sys.exit(0 if i.get('cuda') else 'built without CUDA kernels')"
  built=$?
fi
if [ "$built" -ne 0 ] && [ "$DRY" = 0 ]; then
  say "build or import failed: nothing else can run; the build's errors, then its end:"
  tail -n "+$build_from" "$LOG/build.log" | grep -E "error|Error" | head -n 25 \
    | tee -a "$LOG/run.log"
  tail -n "+$build_from" "$LOG/build.log" | tail -n 10 | tee -a "$LOG/run.log"
  summary
  exit 1
fi

# 2. Tests of the train_step pipeline. The expectations are computed on the CPU, so the
# processes split the cores between them.
cores=$(nproc)
workers=$(( cores > 12 ? 12 : cores ))
parallel=()
"$PY" -c "import xdist" 2>/dev/null && [ "$workers" -gt 1 ] && parallel=(-n "$workers")
[ ${#parallel[@]} -eq 0 ] && workers=1
# A test stuck in a kernel or a sync: with workers, the thread method ends just that worker
# (xdist reports it and starts another); a signal could not interrupt the wait.
guard=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  guard=(--timeout=120)
  [ ${#parallel[@]} -gt 0 ] && guard+=(--timeout-method=thread)
fi
PYTEST=(env OMP_NUM_THREADS=$(( cores / workers > 0 ? cores / workers : 1 )) "$PY" -m pytest
        tests/test_cuda_ops.py -q -p no:cacheprovider -rfE --durations=8
        "${parallel[@]}" "${guard[@]}")
stage "2 tests: train_step" "$(limit 150 100)" tests.log "${PYTEST[@]}" --maxfail=3 \
  -k "$TRAIN_K"

# 3. Timing.
TAIL=14 stage "3 timing" "$(limit 150 20)" step.log "$PY" benchmarks/gpu_bench.py --step \
  --batches 8192,65536,262144 --dim 64 \
  --ops train_step,train_step_pairwise,train_step_pairwise_sampled --iters 50 \
  --json "$LOG/step.jsonl"

# 4. Nsight Compute over the marked step.
if [ -z "$NCU" ] && [ "$DRY" = 0 ]; then
  say ""; say "== 4 ncu: skipped, ncu not found"; note "4 ncu" "skipped: no ncu"
elif [ "$(left)" -lt 120 ] && [ "$DRY" = 0 ]; then
  say ""; say "== 4 ncu: skipped, $(left)s left"; note "4 ncu" "skipped: out of time"
else
  NCU=${NCU:-ncu}
  APP=("$PY" benchmarks/gpu_bench.py --ncu-step --batches "$NCU_BATCHES" --dim 64)
  COMMON=(--target-processes all --cache-control none --clock-control none -f -o "$LOG/ncu")
  rm -f "$LOG/ncu.ncu-rep"
  stage "4 ncu" "$(limit 150 40)" ncu.log "$NCU" "${COMMON[@]}" --nvtx \
    --nvtx-include "fastmf_step/" --metrics "$NCU_METRICS" "${APP[@]}"
  ncu_rc=$?
  profiled=0
  if [ -s "$LOG/ncu.ncu-rep" ] && ! awk -v from="$STAGE_FROM" \
      'NR >= from && /No kernels were profiled/ { found = 1 } END { exit !found }' \
      "$LOG/ncu.log"; then
    profiled=1
  fi
  # Nothing profiled but time left (a metric this ncu lacks, or no kernel matched the
  # range): once more with its standard sections, the step picked by cudaProfilerStart/Stop.
  if [ "$DRY" = 0 ] && [ "$profiled" = 0 ] && [ "$ncu_rc" -ne 124 ] \
      && [ "$(left)" -ge 100 ]; then
    stage "4 ncu (sections)" "$(limit 150 40)" ncu.log "$NCU" "${COMMON[@]}" \
      --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section MemoryWorkloadAnalysis_Chart --section Occupancy --section LaunchStats \
      "${APP[@]}"
  fi
  if [ -s "$LOG/ncu.ncu-rep" ] || [ "$DRY" = 1 ]; then
    TAIL=0 stage "4 ncu export" "$(limit 60)" ncu.csv "$NCU" --import "$LOG/ncu.ncu-rep" --csv \
      --page raw --print-units base
    TAIL=30 stage "4 ncu table" "$(limit 60)" ncu.log "$PY" benchmarks/gpu_bench.py \
      --ncu-table "$LOG/ncu.csv" --batches "$NCU_BATCHES" --dim 64
  fi
fi

# 5. The rest of the CUDA tests.
stage "5 tests: rest" "$(limit 150 60)" tests.log "${PYTEST[@]}" --maxfail=10 -k "not ($TRAIN_K)"

# 6. The op families' suites on the GPU (test_cuda_ops.py and the CPU emulation left out).
stage "6 tests: families on CUDA" "$(limit 600 8)" tests.log env \
  OMP_NUM_THREADS=$(( cores / workers > 0 ? cores / workers : 1 )) "$PY" -m pytest tests/ -q \
  -p no:cacheprovider -rfE "${parallel[@]}" "${guard[@]}" --ignore=tests/test_cuda_ops.py \
  --ignore=tests/test_cuda_emulated.py --ignore=tests/test_cuda_emulation_runtime.py \
  --maxfail=20 -k cuda

summary
exit "$failed"
