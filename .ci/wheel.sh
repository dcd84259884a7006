#!/usr/bin/env bash
# Builds a fastmf wheel into dist/, installs it into a fresh venv and smoke-tests it from
# outside the repository.
#
#   VENV=.venv .ci/wheel.sh               # CPU wheel: fastmf-<version>+cpu-...whl
#   FASTMF_CUDA=1 VENV=.venv .ci/wheel.sh # CUDA wheel (CUDA torch + nvcc): +cu<ver>
#
# Environment: VENV (default .venv; torch, setuptools, wheel, numpy), FASTMF_CUDA (default 0
# here), TORCH_PIP_ARGS (extra pip arguments for torch in the test venv, e.g.
# "--index-url https://download.pytorch.org/whl/cpu"), KEEP_TEST_VENV=1 to keep the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "wheel.sh: no python at $PY (set VENV)" >&2; exit 2; }
export FASTMF_CUDA=${FASTMF_CUDA:-0}
export MAX_JOBS=${MAX_JOBS:-2}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

start=$(date +%s)
# --no-isolation builds with the venv's own torch, so the build requirements of
# pyproject.toml (setuptools, wheel, torch, numpy) must be there; add the missing tools.
for tool in build wheel; do
  if ! "$PY" -c "import importlib.metadata as m; m.version('$tool')" 2>/dev/null; then
    "$PY" -m pip install --quiet "$tool"
  fi
done

# Expected local version tag: the one setup.py sets (+cpu, or +cu<torch's CUDA version>).
expected=$("$PY" - <<'PYEOF'
import os, torch
if os.environ["FASTMF_CUDA"] == "1":
    print("+cu" + (torch.version.cuda or "?").replace(".", ""))
elif os.environ["FASTMF_CUDA"] == "0" or torch.version.cuda is None:
    print("+cpu")
else:
    print("")  # auto with a CUDA torch: +cpu or +cu<ver>, whichever setup.py chose
PYEOF
)

outdir=$(mktemp -d)
work=$(mktemp -d)
cleanup() {
  rm -rf "$outdir"
  if [ "${KEEP_TEST_VENV:-0}" = 1 ]; then echo "wheel.sh: test venv kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

"$PY" -m build --wheel --no-isolation --outdir "$outdir" .
built=$(date +%s)

shopt -s nullglob
wheels=("$outdir"/fastmf-*.whl)
[ ${#wheels[@]} -eq 1 ] || { echo "wheel.sh: expected one wheel, got ${#wheels[@]}" >&2; exit 1; }
wheel=$(basename "${wheels[0]}")
version=${wheel#fastmf-}; version=${version%%-*}
case "$version" in
  *+cpu|*+cu[0-9]*) ;;
  *) echo "wheel.sh: $wheel has no local version tag (+cpu / +cuXYZ)" >&2; exit 1 ;;
esac
if [ -n "$expected" ] && [[ "$version" != *"$expected" ]]; then
  echo "wheel.sh: $wheel: expected local tag $expected" >&2
  exit 1
fi
mkdir -p dist
cp "${wheels[0]}" dist/

# A fresh venv: torch first, then fastmf without dependency resolution, then its runtime
# dependencies, so the test runs against exactly this torch.
"$PY" -m venv "$work/venv"
TPY="$work/venv/bin/python"
# shellcheck disable=SC2086
"$TPY" -m pip install --quiet ${TORCH_PIP_ARGS:-} "$TORCH_SPEC"
"$TPY" -m pip install --quiet --no-deps "dist/$wheel"
"$TPY" -m pip install --quiet numpy numba scipy pandas tqdm safetensors
installed=$(date +%s)

cd "$work"  # outside the repository: import the installed package, not the source tree
"$TPY" - "$ROOT" <<'PYEOF'
import os
import sys

import torch

import fastmf
from fastmf.ops import MFTables, Optimizer, OptimizerArgs, reference

root = os.path.realpath(sys.argv[1])
where = os.path.realpath(fastmf.__file__)
assert not where.startswith(root + os.sep), f"imported fastmf from the source tree: {where}"
info = fastmf.build_info()
print("build_info:", info)
assert info["cpu_kernels"] is True, info

torch.manual_seed(0)
model = fastmf.MF(20, 15, dim=8, global_mean=3.0)
opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
tables = model.tables()
states = [opt.state_for(t) for t in tables]
ref_tables = [t.detach().clone() for t in tables]
ref_states = [s.clone() for s in states]
for step in range(5):
    users = torch.randint(0, 20, (64,))
    items = torch.randint(0, 15, (64,))
    targets = torch.rand(64) * 4 + 1
    loss = fastmf.train_step(model, opt, users, items, targets, loss="mse", reg=0.01)
    ref_loss = reference.train_step(MFTables(*ref_tables), MFTables(*ref_states), users,
                                    items, targets, 3.0, "mse", 0.01,
                                    OptimizerArgs(Optimizer.ADAGRAD, 0.05, opt.defaults["eps"]))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(list(tables) + states, ref_tables + ref_states):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
print(f"smoke test OK: fastmf {fastmf.__version__} from {where}, backend {model.backend}")
PYEOF
done_=$(date +%s)
cd "$ROOT"
echo "wheel.sh: build $((built - start))s, install $((installed - built))s," \
  "smoke $((done_ - installed))s, total $((done_ - start))s"
echo "wheel: dist/$wheel"
