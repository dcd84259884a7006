"""fastmf: fast matrix-factorization recommenders for PyTorch.

>>> import fastmf
>>> model = fastmf.MF(1000, 500, dim=32, global_mean=3.5)
>>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
"""

import os as _os

import torch as _torch  # noqa: F401  (first: torch's OpenMP runtime keeps the caller's settings)

# Two OpenMP runtimes share the cores: torch's own (which the native kernels use too) and
# the system libgomp of Numba's parallel layer, loaded at its first parallel call. A
# runtime whose idle threads spin-wait starves the other one (measured: a plain-PyTorch
# step up to 100x slower right after a Numba parallel call), so the second runtime waits
# passively. torch's runtime, already loaded, keeps its default (spin briefly, then sleep),
# which measured ~25% faster on idle cores; on oversubscribed machines set
# OMP_WAIT_POLICY=PASSIVE before Python starts. The variable is inherited by child
# processes; set it yourself to choose.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fastmf import data, datasets, metrics, optim  # noqa: E402
from fastmf._version import __version__
from fastmf.build import build_info
from fastmf.checkpoint import load, load_checkpoint
from fastmf.evaluate import evaluate
from fastmf.layers import MF
from fastmf.step import train_step, train_step_pairwise
from fastmf.train import History, fit, suggest_dim

__all__ = [
    "MF",
    "History",
    "__version__",
    "build_info",
    "data",
    "datasets",
    "evaluate",
    "fit",
    "load",
    "load_checkpoint",
    "metrics",
    "optim",
    "suggest_dim",
    "train_step",
    "train_step_pairwise",
]
