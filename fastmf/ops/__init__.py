"""The kernel layer. :func:`kernels` is the one place that turns a backend name
(``"auto"``, ``"native"``, ``"numba"``, ``"reference"``) and a device into the kernels that
run: a backend is a module with the same functions and arguments as the others —

- :mod:`fastmf.ops.reference` — the spec in plain PyTorch (any device);
- :mod:`fastmf.ops.numba` — Numba kernels (CPU tensors), imported on first use;
- :mod:`fastmf.ops.native` — the C++/CUDA ops of ``csrc/`` through ``torch.ops.fastmf``
  (PyTorch's dispatcher picks the CPU or CUDA kernel by the tensors' device).

Each backend module has one file per op family (``pointwise``: forward/backward, sparse
updates, ``train_step``; ``pairwise``: ``train_step_pairwise``; ``topk``: ``topk_scores``;
``embedding_bag``: the bag lookups and fused updates; ``sampling``: negatives and an epoch's
order; ``pooled``: ``pooled_rank_steps``, an epoch of ranking steps over pooled bags, a loop
over the other families' ops).
Loss and optimizer codes are in :mod:`fastmf.ops.codes`, the argument bundles in
:mod:`fastmf.ops.args`, every Python-side input check in :mod:`fastmf.ops.checks`.

>>> import torch, fastmf
>>> k = fastmf.ops.kernels("reference", torch.device("cpu"))
>>> k.mf_forward(torch.tensor([0]), torch.tensor([1]), torch.ones(2, 3), torch.ones(2, 3),
...              None, None, 0.5)
tensor([3.5000])
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch

from fastmf import _extension
from fastmf.ops import native, reference
from fastmf.ops.args import MFTables, OptimizerArgs
from fastmf.ops.codes import Loss, Optimizer, PairwiseLoss
from fastmf.ops.native import check_device_errors

BACKENDS = ("reference", "numba", "native")

__all__ = ["BACKENDS", "Loss", "MFTables", "Optimizer", "OptimizerArgs", "PairwiseLoss",
           "available_backends", "check_device_errors", "kernels", "numba_available",
           "resolve_backend"]


def numba_available() -> bool:
    """numba is a dependency, but a broken install (llvmlite missing) should only cost the
    Numba backend, not the package."""
    return importlib.util.find_spec("numba") is not None


def native_device(device: torch.device, kernel: str = "mf_forward") -> bool:
    """Whether the native extension has the kernel ``kernel`` for tensors on ``device``
    (an extension built before a family had kernels for a device lacks them)."""
    return native.has_kernel(device, kernel)


def available_backends() -> list[str]:
    """The backends this installation can run on CPU tensors, best last."""
    names = ["reference"]
    if numba_available():
        names.append("numba")
    if _extension.native_available():
        names.append("native")
    return names


def resolve_backend(backend: str, device: torch.device | str | None = None,
                    op: str = "fastmf", kernel: str = "mf_forward") -> str:
    """The backend ``backend`` names for tensors on ``device``.

    ``"auto"`` is the native kernels where built for the device, else Numba (CPU), else the
    reference; without a device, the best backend this installation has. ``kernel`` is
    the op the caller will run (any op of its family): "auto" picks native only where that
    op has a kernel for the device. A named backend that is not available raises a
    RuntimeError that says why and how to fix it.
    """
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected 'auto' or one of "
                         f"{BACKENDS}")
    if device is None:
        if backend == "auto":
            return available_backends()[-1]
    else:
        device = torch.device(device)
        if backend == "auto":
            if native_device(device, kernel):
                return "native"
            return "numba" if device.type == "cpu" and numba_available() else "reference"
    if backend == "native":
        if not _extension.native_available():
            raise RuntimeError(f"{op}: backend 'native' is unavailable: "
                               f"{_extension.LOAD_ERROR}")
        if device is not None and not native_device(device, kernel):
            raise RuntimeError(
                f"{op}: backend 'native' is unavailable: this build of fastmf has no {kernel} "
                f"kernel for {device.type} tensors (build info: "
                f"{_extension.native_build_info()}); for CUDA, rebuild with FASTMF_CUDA=1 "
                "against a CUDA torch")
    if backend == "numba" and not numba_available():
        raise RuntimeError(f"{op}: backend 'numba' needs numba: `pip install numba`")
    return backend


def kernels(backend: str = "auto", device: torch.device | str | None = None,
            kernel: str = "mf_forward") -> ModuleType:
    """The backend module (see the module docstring) that runs ops on ``device``'s tensors:
    every module returned has the functions ``mf_forward``, ``mf_backward``,
    ``sparse_adagrad_update``, ``sparse_sgd_update``, ``train_step``,
    ``train_step_pairwise`` and ``topk_scores`` with the same arguments."""
    name = resolve_backend(backend, device, kernel=kernel)
    if name == "native":
        return native
    if name == "numba":
        from fastmf.ops import numba as numba_backend

        return numba_backend
    return reference
