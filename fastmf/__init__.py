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

from fastmf import nn, ops, optim  # noqa: E402  (registers the ops' fake kernels and autograd)
from fastmf._version import __version__  # noqa: E402
from fastmf.build import build_info  # noqa: E402
from fastmf.evaluate import evaluate  # noqa: E402  (light: metrics load on first call)
from fastmf.layers import MF  # noqa: E402
from fastmf.step import train_step, train_step_pairwise  # noqa: E402

# The workflow (data, training loop, metrics, checkpoints, retrieval) needs pandas, scipy
# and numba, ~1 s of imports that a user of the layer and the fused step never needs: its
# names load on first use (PEP 562).


def __getattr__(name: str):
    # Each branch imports its module statically; the result is bound as a global so the
    # next access is a plain attribute (and a function such as ``evaluate`` is not shadowed
    # by the submodule of the same name that the import binds on the package).
    if name in ("data", "datasets", "metrics", "retrieval"):
        import fastmf.data
        import fastmf.datasets
        import fastmf.metrics
        import fastmf.retrieval

        value = {"data": fastmf.data, "datasets": fastmf.datasets, "metrics": fastmf.metrics,
                 "retrieval": fastmf.retrieval}[name]
    elif name in ("fit", "History", "suggest_dim"):
        from fastmf import train

        value = getattr(train, name)
    elif name in ("tune", "TuneResult"):
        # Optuna itself loads when tune() runs. The module is callable too (fastmf/tune.py),
        # since importing it first binds the module, not the function, as fastmf.tune.
        import fastmf.tune as tune_module

        value = getattr(tune_module, name)
    elif name in ("load", "load_checkpoint", "save"):
        from fastmf import checkpoint

        value = getattr(checkpoint, name)
    elif name == "models":
        # The model files (fastmf.models.*); the base class they share is already loaded,
        # since fastmf.MF is a Recommender (fastmf/recommender.py).
        import fastmf.models

        value = fastmf.models
    elif name == "plot":
        # matplotlib and scikit-learn load only when a plot is drawn.
        import fastmf.plot

        value = fastmf.plot
    else:
        raise AttributeError(f"module 'fastmf' has no attribute {name!r}")
    globals()[name] = value
    return value


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
    "models",
    "nn",
    "ops",
    "optim",
    "plot",
    "retrieval",
    "save",
    "suggest_dim",
    "train_step",
    "train_step_pairwise",
    "tune",
    "TuneResult",
]
