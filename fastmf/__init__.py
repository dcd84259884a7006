"""fastmf: fast matrix-factorization recommenders for PyTorch."""

from fastmf._version import __version__

__all__ = ["__version__"]
