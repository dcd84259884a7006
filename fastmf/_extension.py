"""Loads the native extension (fastmf._C) and checks it matches the installed torch."""

from __future__ import annotations

import importlib
import os
import warnings

import torch

_C = None
LOAD_ERROR: str | None = None
# Every op fastmf.ops wraps; a build that lacks one is older than this Python code.
OPS = ("mf_forward", "mf_backward", "sparse_adagrad_update", "sparse_sgd_update",
       "train_step", "train_step_pairwise", "topk_scores")


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _load():
    global _C, LOAD_ERROR
    try:
        # Importing the module registers the torch.ops.fastmf.* kernels.
        module = importlib.import_module("fastmf._C")
    except ImportError as exc:
        LOAD_ERROR = (
            f"the native extension fastmf._C is not built ({exc}). Build it with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)"
        )
        return
    info = module.build_info()
    _check_formatting(info)
    built, installed = info["torch_version"], torch.__version__
    if _major_minor(built) != _major_minor(installed):
        raise ImportError(
            f"fastmf._C was built against torch {built} but torch {installed} is installed; "
            "rebuild it: `pip install --no-build-isolation --force-reinstall --no-deps .`"
        )
    if info["cuda"] and torch.version.cuda and (
        _major_minor(info["cuda_version"]) != _major_minor(torch.version.cuda)
    ):
        raise ImportError(
            f"fastmf._C was built with CUDA {info['cuda_version']} but torch uses CUDA "
            f"{torch.version.cuda}; rebuild fastmf against the installed torch"
        )
    missing = [op for op in OPS if not hasattr(torch.ops.fastmf, op)]
    if missing:
        LOAD_ERROR = (
            f"fastmf._C is older than the Python package (no op {', '.join(missing)}); "
            "rebuild it: `pip install --no-build-isolation -e .`"
        )
        return
    _C = module
    _check_cpu_isa(info.get("cpu_isa"))


# csrc/fastmf.cpp kFormatProbe, as every C++ error message formats its numbers.
FORMAT_PROBE = "-1234567890123"


def _check_formatting(info: dict) -> None:
    """Refuses a build whose C++ streams cannot format numbers.

    A compiler whose libstdc++ is newer than the one this process loads (a toolset GCC that
    links the newer parts into the library statically) can produce an extension whose
    error messages print integers as nothing ("users id  out of range [0, )") and that
    crashes formatting a float. The build then looks healthy until the first bad input."""
    for key, where in (("format_probe", "C++"), ("format_probe_cuda", "CUDA host")):
        got = info.get(key, FORMAT_PROBE)  # a build older than the probes has none
        if got != FORMAT_PROBE:
            raise ImportError(
                f"fastmf._C's {where} code formats {FORMAT_PROBE} as {got!r}: it was built by "
                "a compiler whose C++ standard library does not match the libstdc++ loaded "
                "here, so its error messages would lose their numbers and formatting a float "
                "could crash. Rebuild it with the system compiler, e.g. `CC=/usr/bin/gcc "
                "CXX=/usr/bin/g++ pip install --no-build-isolation -e .`"
            )


def _check_cpu_isa(chosen: str | None) -> None:
    """Warns when FASTMF_CPU_ISA asks for something the library did not do (csrc/cpu/isa.h:
    only "baseline" changes the choice; "auto", "avx2" or unset take AVX2 where the CPU has
    it)."""
    wanted = os.environ.get("FASTMF_CPU_ISA")
    if wanted is None or chosen is None:
        return
    if wanted not in ("", "auto", "avx2", "baseline"):
        warnings.warn(f"FASTMF_CPU_ISA={wanted!r} is not one of 'auto', 'avx2', 'baseline'; "
                      f"ignored: the {chosen} CPU kernels run", RuntimeWarning, stacklevel=2)
    elif wanted == "avx2" and chosen != "avx2":
        warnings.warn("FASTMF_CPU_ISA='avx2', but this CPU (or this build) has no AVX2 "
                      "kernels: the baseline CPU kernels run", RuntimeWarning, stacklevel=2)


_load()


def native_available() -> bool:
    return _C is not None


def native_build_info() -> dict:
    return dict(_C.build_info()) if _C is not None else {"cpu": False, "cuda": False}
