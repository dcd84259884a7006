"""Builds fastmf._C, the native kernels.

Environment:
  FASTMF_CUDA=auto|0|1   auto (default): build the CUDA kernels when torch is a CUDA build
                         and nvcc is found; 1: require them; 0: CPU only.
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default "8.0;9.0+PTX").
  FASTMF_DEBUG=1         -O0 -g, for debuggers and sanitizers.

C++20: torch's own headers need it (torch >= 2.13 uses operator<=> in c10).
"""

import glob
import os
import re

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("FASTMF_DEBUG", "0") == "1"


def _want_cuda() -> bool:
    mode = os.environ.get("FASTMF_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTMF_CUDA must be auto, 0 or 1, not {mode!r}")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not available:
        raise SystemExit(
            "FASTMF_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch {torch.__version__} is {'a CPU' if torch.version.cuda is None else 'a CUDA'} "
            f"build and CUDA_HOME is {cpp_extension.CUDA_HOME!r}. Install a CUDA torch and nvcc."
        )
    return mode != "0" and available


def _pip_cuda_include_dirs() -> list[str]:
    """Header folders of the CUDA libraries that pip installs beside torch (cuBLAS,
    cuSPARSE, ...), for a toolkit that ships only nvcc and the runtime. Searched after the
    toolkit's own headers (-isystem), so a full toolkit still wins."""
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia  # namespace package of the pip CUDA wheels
    except ImportError:
        return []
    found = []
    for root in list(getattr(nvidia, "__path__", [])):
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cublas_v2.h")) or os.path.exists(
                os.path.join(inc, "cusparse.h")
            ):
                found.append(inc)
    return found


def _version() -> str:
    text = open(os.path.join(ROOT, "fastmf", "_version.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def extension():
    with_cuda = _want_cuda()
    # csrc/fastmf.cpp (the schemas) and one translation unit per op family and device:
    # csrc/cpu/<family>.cpp, csrc/cuda/<family>.cu (plus the CUDA helpers' own .cu files).
    # csrc/cpu/avx2/<family>.cpp build the same families again for AVX2 (csrc/cpu/isa.h).
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")
                     + glob.glob("csrc/cpu/avx2/*.cpp"))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    torch_version = torch.__version__.split("+")[0]
    macros = [("FASTMF_TORCH_VERSION", f'"{torch_version}"')]
    # -ffp-contract=off: no fused multiply-adds the source does not write (GCC fuses by
    # default where the target has them, e.g. aarch64), so the kernels round each product and
    # sum as the reference does.
    cxx = opt + ["-fopenmp", "-std=c++20", "-fvisibility=hidden", "-ffp-contract=off"]
    # cpp_extension does not add -fopenmp; without it at::parallel_for runs on one thread.
    link = ["-fopenmp"]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "fastmf._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    macros += [("FASTMF_WITH_CUDA", None), ("FASTMF_CUDA_VERSION", f'"{torch.version.cuda}"')]
    # Hidden visibility keeps the CUB kernels we instantiate out of the global symbol table,
    # where they could clash with another library's CUB of a different version.
    # --fmad=false is -ffp-contract=off for the device code: nvcc fuses a * b + c into one
    # FMA by default, which rounds once where the reference and the CPU kernels round twice,
    # so the GPU would agree with neither bit for bit, nor with its own CPU emulation
    # (tests/cuda_emulation). The kernels are memory-bound: the extra instruction is hidden.
    nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false",
                  "-Xcompiler", "-fvisibility=hidden"]
    for inc in _pip_cuda_include_dirs():
        nvcc += ["-isystem", inc]
        cxx += ["-isystem", inc]
    return cpp_extension.CUDAExtension(
        "fastmf._C", sources, define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
    )


def local_version_tag() -> str:
    if os.environ.get("FASTMF_LOCAL_VERSION", "1") == "0":
        return ""
    if torch.version.cuda is not None and _want_cuda():
        return "+cu" + torch.version.cuda.replace(".", "")
    return "+cpu"


setup(
    version=_version() + local_version_tag(),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
