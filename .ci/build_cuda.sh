#!/usr/bin/env bash
# CI: the CUDA build, on a machine with nvcc 13 and pip but no GPU, so that a CUDA compile
# or link error fails CI. From scratch: a venv with the CUDA 13.0 build of torch, the
# extension built with FASTMF_CUDA=1, then imported on this GPU-less machine to show that
# it loads, that every op has its CUDA kernel, and that CPU tensors still dispatch to the
# CPU kernels.
#
# The extension is built out of tree (build/cuda-lib) and imported from a staging copy of
# the package, so the in-place CPU build that the rest of CI uses is never replaced.
#
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default
# "8.0;9.0+PTX"), FASTMF_CUDA_VENV (default build/venv-cuda, reused when present),
# FASTMF_CUDA_TORCH (the torch version to build against, a CUDA 13.0 build; default 2.14.1).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start ))s)"; }

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
VENV=${FASTMF_CUDA_VENV:-build/venv-cuda}
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac  # the import step runs from another folder
PY=$VENV/bin/python

TORCH_VERSION=${FASTMF_CUDA_TORCH:-2.14.1}
step "venv with torch $TORCH_VERSION (CUDA 13.0)"
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' \
    or torch.version.cuda is None)" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q "torch==$TORCH_VERSION" numpy ninja setuptools wheel
fi
# fastmf's own runtime dependencies, for the import check below.
"$PY" -m pip install -q numba scipy pandas tqdm safetensors
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
"$CUDA_HOME/bin/nvcc" --version | tail -n 2

step "build (FASTMF_CUDA=1, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX})"
build_start=$(date +%s)
FASTMF_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX} \
  "$PY" setup.py -q build_ext --build-lib build/cuda-lib --build-temp build/cuda-temp
echo "build took $(( $(date +%s) - build_start ))s"

step "import on this machine (no GPU)"
rm -rf build/cuda-stage && mkdir -p build/cuda-stage
cp -r fastmf build/cuda-stage/
find build/cuda-stage/fastmf -name '_C*.so' -delete
cp build/cuda-lib/fastmf/_C*.so build/cuda-stage/fastmf/
(cd build/cuda-stage && "$PY" - <<'PY'
import torch

import fastmf._C as C
import fastmf.ops  # noqa: F401  (registers fake kernels and autograd)

info = C.build_info()
print("build_info:", info)
assert info["cuda"], "extension built without CUDA"
# Every op the schemas define (csrc/fastmf.cpp), so a new op without its CUDA kernel fails
# here; check_device_errors is the one composite op, and permutation the one host op (a
# serial pass: a model on the GPU draws its epoch's order on the host and copies it).
HOST_OPS = {"permutation"}
ops = sorted(name.removeprefix("fastmf::") for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("fastmf::") and name != "fastmf::check_device_errors")
assert len(ops) >= 12, ops
assert HOST_OPS <= set(ops), ops
for op in sorted(HOST_OPS):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmf::{op}", "CPU"), op
    assert not fastmf.ops.native.has_kernel("cuda", op), op
ops = [op for op in ops if op not in HOST_OPS]
for op in ops:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmf::{op}", "CUDA"), op
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmf::{op}", "CPU"), op
    assert fastmf.ops.native.has_kernel("cuda", op), op
assert torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastmf::check_device_errors", "CompositeImplicitAutograd")
print("CUDA kernels registered:", ", ".join(ops), "+ check_device_errors")
fastmf.ops.check_device_errors()  # no GPU: nothing to check, must not fail

# CPU tensors go to the CPU kernels, never to the CUDA ones.
p, q = torch.rand(5, 4), torch.rand(3, 4)
users, items = torch.tensor([0, 4, 2]), torch.tensor([1, 2, 0])
got = fastmf.ops.native.mf_forward(users, items, p, q, None, None, 0.5)
torch.testing.assert_close(got, (p[users] * q[items]).sum(1) + 0.5)
print("CPU dispatch: mf_forward on CPU tensors ok")
PY
)
step "done"
