"""Builds csrc/cuda's kernels for the CPU through the stand-in runtime of include/: the
kernels' own source, mechanically rewritten where CUDA syntax has no C++ spelling
(``k<<<grid, block>>>(args)``, ``__shared__``), registered as ``torch.ops.fastmf_emu.*`` on
CPU tensors: csrc/fastmf.cpp, the shared headers csrc/*.h and every file of csrc/cuda/.
Only the CUB sort (csrc/cuda/segments.cu) is replaced (sort_emulated.cpp).

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
# `__shared__ [__align__(n)] TYPE NAME[DIM];` or `__shared__ TYPE NAME;`
STATIC_SHARED = re.compile(
    r"__shared__ (?:__align__\(\d+\) )?([\w:]+(?: [\w:]+)*?) (\w+)((?:\[[^\]]+\])?);")


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
    # Shared memory belongs to a block: blocks that run at once (FASTMF_EMU_BLOCKS) must
    # not see each other's, as a function-local static would let them.
    text = STATIC_SHARED.sub(
        r"static char \2_emu_key;\n"
        r"  auto& \2 = ::emu::block_shared<\1\3>(&\2_emu_key);", text)
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
    # The headers csrc/cuda/ shares with the CPU kernels (codes.h, args.h, checks.h, ...).
    for header in sorted((ROOT / "csrc").glob("*.h")):
        _write(out / header.name, header.read_text())
    sources = []
    main = out / "fastmf_emu.cpp"
    _write(main, '#define FASTMF_TORCH_VERSION "emulated"\n'
           + rewrite((ROOT / "csrc" / "fastmf.cpp").read_text()))
    sources.append(str(main))
    for path in sorted((ROOT / "csrc" / "cuda").iterdir()):
        if path.name == "segments.cu":
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


SANITIZERS = {"": "fastmf_emu", "address": "fastmf_emu_asan", "thread": "fastmf_emu_tsan"}


def build(sanitizer: str | None = None, verbose: bool = False) -> str:
    """Builds (or reuses) the emulated library and returns its path.

    ``sanitizer`` (default: the FASTMF_EMU_SANITIZE environment variable): ``"address"``
    (AddressSanitizer + UndefinedBehaviorSanitizer: out-of-bounds accesses) or ``"thread"``
    (ThreadSanitizer: data races between the CUDA threads of a block, and between blocks
    when FASTMF_EMU_BLOCKS runs several at once). The Python process must load the
    sanitizer's runtime first (LD_PRELOAD); tests/test_cuda_emulated.py shows how.
    """
    import torch
    from torch.utils import cpp_extension

    if sanitizer is None:
        sanitizer = os.environ.get("FASTMF_EMU_SANITIZE", "")
    if sanitizer not in SANITIZERS:
        raise ValueError(f"FASTMF_EMU_SANITIZE={sanitizer!r}: expected one of "
                         f"{sorted(k for k in SANITIZERS if k)} or empty")
    name = SANITIZERS[sanitizer]
    # One build per torch version: a library built against another torch would not load.
    build_dir = ROOT / "build" / f"{name}-torch{torch.__version__.replace('+', '-')}"
    sources = prepare_sources(build_dir / "src")
    flags = ["-std=c++20", "-O1", "-g", "-pthread",
             "-include", str(HERE / "include" / "emu_runtime.h")]
    ldflags = ["-pthread"]
    if sanitizer:
        # The sanitizers follow OS threads, not stacks switched by hand: one OS thread per
        # CUDA thread (include/emu_runtime.h), slower but what they can check.
        flags.append("-DFASTMF_EMU_OS_THREADS")
    if sanitizer == "address":
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address,undefined"]
    elif sanitizer == "thread":
        flags += ["-fsanitize=thread"]
        ldflags += ["-fsanitize=thread"]
    (build_dir / "obj").mkdir(parents=True, exist_ok=True)
    # The compiler must not run with this process's preloaded sanitizer runtime (ThreadSanitizer
    # makes it fail); the variable only matters when a process starts, so this one keeps it.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
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
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
