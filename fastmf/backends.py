"""Backend selection. A backend is a namespace with the five kernel functions of
:mod:`fastmf.reference` (same signatures, same numbers):

- ``"reference"``: :mod:`fastmf.reference` behind the Python input checks (the spec);
- ``"numba"``: :mod:`fastmf.numba_kernels` (CPU tensors), imported on first use;
- ``"native"``: :mod:`fastmf.ops`, the C++/CUDA ops (PyTorch dispatches by device);
- ``"auto"``: native if the extension is built, else numba if importable, else reference.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import SimpleNamespace

from fastmf import _checks, reference
from fastmf._extension import LOAD_ERROR, native_available

BACKENDS = ("reference", "numba", "native")
# Where each compiled backend's kernels live (the first module that has a kernel wins).
MODULES = {
    "numba": ("fastmf.numba_kernels", "fastmf.numba_pairwise"),
    "native": ("fastmf.ops",),
}
KERNELS = ("mf_forward", "mf_backward", "sparse_adagrad_update", "sparse_sgd_update",
           "train_step", "train_step_pairwise")


def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def available_backends() -> list[str]:
    """The backends this installation can run, best last."""
    names = ["reference"]
    if numba_available():
        names.append("numba")
    if native_available():
        names.append("native")
    return names


def resolve(name: str) -> str:
    """``"auto"`` -> the best available backend; other names are checked and returned."""
    if name == "auto":
        return available_backends()[-1]
    if name not in BACKENDS:
        raise ValueError(f"fastmf: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    if name == "native" and not native_available():
        raise RuntimeError(f"fastmf: backend 'native' is unavailable: {LOAD_ERROR}")
    if name == "numba" and not numba_available():
        raise RuntimeError("fastmf: backend 'numba' needs numba: `pip install numba`")
    return name


def _checked_reference() -> SimpleNamespace:
    """The reference functions behind the same input checks the native ops make."""

    def mf_forward(users, items, user_factors, item_factors, user_bias, item_bias, global_mean):
        _checks.check_mf_inputs(
            "mf_forward", users, items, user_factors, item_factors, user_bias, item_bias
        )
        return reference.mf_forward(
            users, items, user_factors, item_factors, user_bias, item_bias, global_mean
        )

    def mf_backward(grad_out, users, items, user_factors, item_factors):
        _checks.check_mf_inputs("mf_backward", users, items, user_factors, item_factors,
                                None, None)
        _checks.check_same_length("mf_backward", grad_out=grad_out, users=users)
        return reference.mf_backward(grad_out, users, items, user_factors, item_factors)

    def sparse_adagrad_update(weight, state, ids, grad_rows, lr, eps, rowwise):
        _checks.check_sparse_update("sparse_adagrad_update", weight, state, ids, grad_rows,
                                    rowwise)
        reference.sparse_adagrad_update(weight, state, ids, grad_rows, lr, eps, rowwise)

    def sparse_sgd_update(weight, ids, grad_rows, lr):
        _checks.check_sparse_update("sparse_sgd_update", weight, None, ids, grad_rows)
        reference.sparse_sgd_update(weight, ids, grad_rows, lr)

    def train_step(user_factors, item_factors, user_bias, item_bias, user_factors_state,
                   item_factors_state, user_bias_state, item_bias_state, users, items, targets,
                   global_mean, loss, reg, optimizer, lr, eps):
        tables = (user_factors, item_factors, user_bias, item_bias)
        states = (user_factors_state, item_factors_state, user_bias_state, item_bias_state)
        _checks.check_train_step("train_step", tables, states, users, items, targets, loss,
                                 optimizer)
        return reference.train_step(*tables, *states, users, items, targets, global_mean,
                                    loss, reg, optimizer, lr, eps)

    def train_step_pairwise(user_factors, item_factors, user_bias, item_bias,
                            user_factors_state, item_factors_state, user_bias_state,
                            item_bias_state, users, pos_items, neg_items, loss, reg, optimizer,
                            lr, eps):
        tables = (user_factors, item_factors, user_bias, item_bias)
        states = (user_factors_state, item_factors_state, user_bias_state, item_bias_state)
        _checks.check_train_step_pairwise("train_step_pairwise", tables, states, users,
                                          pos_items, neg_items, loss, optimizer)
        return reference.train_step_pairwise(*tables, *states, users, pos_items, neg_items,
                                             loss, reg, optimizer, lr, eps)

    return SimpleNamespace(name="reference", mf_forward=mf_forward, mf_backward=mf_backward,
                           sparse_adagrad_update=sparse_adagrad_update,
                           sparse_sgd_update=sparse_sgd_update, train_step=train_step,
                           train_step_pairwise=train_step_pairwise)


_CACHE: dict[str, SimpleNamespace] = {}


def get(name: str = "auto") -> SimpleNamespace:
    """The kernel namespace of backend ``name`` (see the module docstring)."""
    name = resolve(name)
    if name not in _CACHE:
        if name == "reference":
            _CACHE[name] = _checked_reference()
        else:
            kernels = {}
            for module_name in reversed(MODULES[name]):
                module = importlib.import_module(module_name)
                kernels.update({k: getattr(module, k) for k in KERNELS if hasattr(module, k)})
            _CACHE[name] = SimpleNamespace(name=name, **kernels)
    return _CACHE[name]
