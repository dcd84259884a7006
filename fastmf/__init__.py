"""fastmf: fast matrix-factorization recommenders for PyTorch.

>>> import fastmf
>>> model = fastmf.MF(1000, 500, dim=32, global_mean=3.5)
>>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
"""

from fastmf import optim
from fastmf._version import __version__
from fastmf.build import build_info
from fastmf.layers import MF
from fastmf.step import train_step

__all__ = ["MF", "__version__", "build_info", "optim", "train_step"]
