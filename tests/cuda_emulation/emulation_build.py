"""Builds csrc/cuda's kernels for the CPU through the stand-in runtime of include/: the
kernels' own source, mechanically rewritten where CUDA syntax has no C++ spelling
(``k<<<grid, block>>>(args)``, ``__shared__``), registered as ``torch.ops.fastmf_emu.*`` on
CPU tensors. Only the CUB sort is replaced (sort_emulated.cpp).

    python tests/cuda_emulation/emulation_build.py      # builds, prints the library path
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\(", re.S)
DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];")


def rewrite(text: str) -> str:
    text = text.replace("TORCH_LIBRARY(fastmf, m)", "TORCH_LIBRARY(fastmf_emu, m)")
    text = text.replace("TORCH_LIBRARY_IMPL(fastmf, CUDA, m)",
                        "TORCH_LIBRARY_IMPL(fastmf_emu, CPU, m)")
    text = text.replace(
        "TORCH_LIBRARY_IMPL(fastmf, CompositeImplicitAutograd, m)",
        "TORCH_LIBRARY_IMPL(fastmf_emu, CompositeImplicitAutograd, m)",
    )
    text = LAUNCH.sub(lambda m: f"::emu::Launch({m.group(2)})({m.group(1)}, ", text)
    text = DYNAMIC_SHARED.sub(r"unsigned char* \1 = ::emu::dynamic_shared();", text)
    text = text.replace("__shared__", "static")
    # A GPU faults on a misaligned 16-byte access; the CPU would not notice.
    text = text.replace("return *reinterpret_cast<const Pack<T, V>*>(p);",
                        "::emu::check_aligned(p, sizeof(T) * V);\n"
                        "  return *reinterpret_cast<const Pack<T, V>*>(p);")
    text = text.replace("*reinterpret_cast<Pack<T, V>*>(p) = x;",
                        "::emu::check_aligned(p, sizeof(T) * V);\n"
                        "  *reinterpret_cast<Pack<T, V>*>(p) = x;")
    return text


def _write(path: Path, text: str) -> None:
    # Unchanged files keep their time stamps, so ninja rebuilds only what changed.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def prepare_sources(out: Path) -> list[str]:
    (out / "cuda").mkdir(parents=True, exist_ok=True)
    _write(out / "checks.h", (ROOT / "csrc" / "checks.h").read_text())
    sources = []
    main = out / "fastmf_emu.cpp"
    _write(main, '#define FASTMF_TORCH_VERSION "emulated"\n'
           + rewrite((ROOT / "csrc" / "fastmf.cpp").read_text()))
    sources.append(str(main))
    for path in sorted((ROOT / "csrc" / "cuda").iterdir()):
        if path.name == "sort.cu":
            continue
        text = rewrite(path.read_text())
        if path.suffix == ".cu":
            target = out / "cuda" / (path.stem + ".cpp")
            sources.append(str(target))
        else:
            target = out / "cuda" / path.name
        _write(target, text)
    _write(out / "cuda" / "sort_emulated.cpp", (HERE / "sort_emulated.cpp").read_text())
    sources.append(str(out / "cuda" / "sort_emulated.cpp"))
    return sources


def build(asan: bool | None = None, verbose: bool = False) -> str:
    """Builds (or reuses) the emulated library and returns its path."""
    import torch
    from torch.utils import cpp_extension

    if asan is None:
        asan = os.environ.get("FASTMF_EMU_ASAN", "0") == "1"
    name = "fastmf_emu_asan" if asan else "fastmf_emu"
    # One build per torch version: a library built against another torch would not load.
    build_dir = ROOT / "build" / f"{name}-torch{torch.__version__.replace('+', '-')}"
    sources = prepare_sources(build_dir / "src")
    flags = ["-std=c++20", "-O1", "-g", "-pthread",
             "-include", str(HERE / "include" / "emu_runtime.h")]
    ldflags = ["-pthread"]
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    (build_dir / "obj").mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=flags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(HERE / "include"), str(build_dir / "src" / "cuda")],
        build_directory=str(build_dir / "obj"),
        is_python_module=False,
        verbose=verbose,
    )


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
