"""fastmf: fast matrix-factorization recommenders for PyTorch.

>>> import fastmf
>>> model = fastmf.MF(1000, 500, dim=32, global_mean=3.5)
>>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
"""

import os as _os

# torch ships its own OpenMP runtime; the native kernels and Numba's parallel layer use the
# system one. With two runtimes on the same cores, the idle threads of one spin-wait and
# starve the other (measured: a plain-PyTorch step 100x slower right after a Numba parallel
# call). Passive waiting in the runtime loaded here removes that; set OMP_WAIT_POLICY
# yourself to override.
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
