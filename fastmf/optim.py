"""Optimizers whose sparse step is one fused kernel: duplicate rows summed, then one
update per unique row — never a dense pass over the table.

``SparseAdagrad(rowwise=False)`` gives the numbers of ``torch.optim.Adagrad`` (lr_decay=0,
weight_decay=0) for sparse and dense gradients; ``rowwise=True`` is FBGEMM's exact
row-wise Adagrad (one accumulator per row: K× less optimizer memory)::

    element-wise:  G += g²;          w -= lr·g / (√G + eps)
    row-wise:      G += mean_k(g²);  w -= lr·g / (√G_row + eps)
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmf import ops
from fastmf.ops import checks

__all__ = ["SparseAdagrad", "SparseSGD"]


def _sparse_parts(grad: Tensor) -> tuple[Tensor, Tensor]:
    """(ids (nnz,), rows (nnz, ...)) of a COO gradient, coalesced or not."""
    return grad._indices()[0], grad._values()


class _SparseOptimizer(torch.optim.Optimizer):
    def __init__(self, params, defaults, backend: str):
        super().__init__(params, defaults)
        if backend != "auto":
            ops.resolve_backend(backend)
        self.backend = backend

    SETTINGS = ("lr",)

    def check_groups(self) -> None:
        """Every group's settings are finite and >= 0 (they can be edited between steps,
        e.g. by a scheduler); checked for all groups before any weight is written."""
        op = f"{type(self).__name__}.step"
        for group in self.param_groups:
            checks.check_settings(op, **{k: group[k] for k in self.SETTINGS})

    def hyperparameters(self, param: Tensor) -> dict:
        """The group settings that apply to ``param`` (KeyError if it is not optimised)."""
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise KeyError("fastmf: this parameter is not in the optimizer")


class SparseAdagrad(_SparseOptimizer):
    """Adagrad with an exact fused sparse step (see the module docstring).

    Args: ``lr``, ``eps``, ``initial_accumulator_value`` as in ``torch.optim.Adagrad``;
    ``rowwise``: one accumulator per row; ``backend``: which kernels apply sparse steps.

    >>> import fastmf
    >>> model = fastmf.MF(100, 50, dim=8, sparse=True)
    >>> opt = fastmf.optim.SparseAdagrad(model.parameters(), lr=0.05)
    """

    SETTINGS = ("lr", "eps")

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-10,
                 initial_accumulator_value: float = 0.0, rowwise: bool = False,
                 backend: str = "auto"):
        checks.check_settings("SparseAdagrad", lr=lr, eps=eps,
                              initial_accumulator_value=initial_accumulator_value)
        defaults = dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value,
                        rowwise=bool(rowwise))
        super().__init__(params, defaults, backend)
        for group in self.param_groups:
            for p in group["params"]:
                self.state_for(p)

    def state_for(self, param: Tensor) -> Tensor:
        """The accumulator of ``param``: shaped like it, or (N,) when row-wise."""
        state = self.state[param]
        if "sum" not in state:
            group = self.hyperparameters(param)
            shape = param.shape[:1] if group["rowwise"] else param.shape
            state["sum"] = torch.full(shape, group["initial_accumulator_value"],
                                      dtype=param.dtype, device=param.device)
        return state["sum"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check_groups()
        for group in self.param_groups:
            lr, eps, rowwise = group["lr"], group["eps"], group["rowwise"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state_for(p)
                if grad.is_sparse:
                    ids, rows = _sparse_parts(grad)
                    ops.kernels(self.backend, p.device).sparse_adagrad_update(
                        p.detach(), state, ids, rows.contiguous(), lr, eps, rowwise)
                elif rowwise and p.dim() == 2:
                    state.add_(grad.pow(2).mean(1))
                    p.sub_(lr * grad / state.sqrt().add_(eps).unsqueeze(1))
                else:
                    state.addcmul_(grad, grad, value=1.0)
                    p.addcdiv_(grad, state.sqrt().add_(eps), value=-lr)
        return loss


class SparseSGD(_SparseOptimizer):
    """Plain SGD (``w -= lr·g``) with a fused sparse step for sparse gradients.

    >>> import fastmf
    >>> model = fastmf.MF(100, 50, dim=8, sparse=True)
    >>> opt = fastmf.optim.SparseSGD(model.parameters(), lr=0.1)
    """

    def __init__(self, params, lr: float = 1e-2, backend: str = "auto"):
        checks.check_settings("SparseSGD", lr=lr)
        super().__init__(params, dict(lr=lr), backend)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check_groups()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    ids, rows = _sparse_parts(p.grad)
                    ops.kernels(self.backend, p.device).sparse_sgd_update(
                        p.detach(), ids, rows.contiguous(), group["lr"])
                else:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss
