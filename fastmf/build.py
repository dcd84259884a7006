"""What this installation of fastmf was built with."""

from __future__ import annotations

import torch

from fastmf._extension import LOAD_ERROR, native_available, native_build_info
from fastmf._version import __version__
from fastmf.ops import available_backends, numba_available


def build_info() -> dict:
    """version, the torch version the native kernels were built against, whether the CPU
    and CUDA kernels were built (and why not), which build of the CPU kernels runs
    (``cpu_isa``: "avx2", or "baseline" on CPUs without AVX2 or with the environment
    variable ``FASTMF_CPU_ISA=baseline``; both give the same numbers), OpenMP threads,
    Numba availability.

    >>> import fastmf
    >>> sorted(fastmf.build_info())[:3]
    ['backends', 'cpu_kernels', 'cuda_kernels']
    """
    native = native_build_info()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_built_against": native.get("torch_version"),
        "cpu_kernels": bool(native.get("cpu")),
        "cuda_kernels": bool(native.get("cuda")),
        "cuda_version": native.get("cuda_version") or None,
        "cpu_isa": native.get("cpu_isa"),
        "native_error": None if native_available() else LOAD_ERROR,
        "openmp": bool(native.get("openmp")),
        "num_threads": torch.get_num_threads(),
        "numba": numba_available(),
        "backends": available_backends(),
    }
