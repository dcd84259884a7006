"""Test axes and data makers shared by the tests and the benchmarks.

Every op-family suite is parametrised over backend × device × dtype from here; CUDA cases
carry ``requires_cuda`` so a machine without a GPU shows them as skipped rather than hiding
them.

The data makers and the plain axes (dtypes, batch sizes, tolerances) need only torch and
numpy. The pytest-marked axes (``BACKENDS``, ``DEVICES``, ``KERNELS``, ``requires_*``, …)
are built on first access (PEP 562, as ``fastmf/__init__.py`` does for the workflow), so
``import fastmf.testing`` works where pytest is not installed, and the tests and
benchmarks still import every axis from this one module.
"""

from __future__ import annotations

import contextlib
import functools
from enum import IntEnum

import numpy as np
import torch

from fastmf import ops
from fastmf._extension import LOAD_ERROR as _LOAD_ERROR
from fastmf._extension import native_available as _native_available
from fastmf.ops import MFTables, Optimizer, numba_available
from fastmf.ops.codes import parse

BACKEND_NAMES = ops.BACKENDS  # ("reference", "numba", "native")
DEVICE_NAMES = ("cpu", "cuda")
ID_DTYPES = [torch.int32, torch.int64]
# (users dtype, items dtype): the ops accept the two differing.
ID_PAIRS = [(torch.int32, torch.int32), (torch.int64, torch.int64), (torch.int32, torch.int64)]
WEIGHT_DTYPES = [torch.float32, torch.float64]
BATCH_SIZES = [0, 1, 7, 4096]

# fp32: a few ulps of accumulated rounding over K-term dot products and 20 optimizer steps.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}


def tolerance(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def idfn(value):
    """Readable test ids (``ids=idfn``): ``float32``, ``int32+int64`` for an id pair,
    ``rowwise_adagrad`` for a code; None (pytest's default) for anything else."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, IntEnum):
        return value.name.lower()
    if isinstance(value, tuple) and value and all(isinstance(v, torch.dtype) for v in value):
        return "+".join(dict.fromkeys(idfn(v) for v in value))
    return None


def native_cuda_available() -> bool:
    """Whether this build of the native extension has CUDA kernels and a GPU to run them."""
    return torch.cuda.is_available() and ops.native.has_kernel("cuda")


# ---------------------------------------------------------------------------------------
# pytest-marked axes


def kernel_params(backends=BACKEND_NAMES, devices=DEVICE_NAMES, *, spec_on_cpu=False):
    """``pytest.param(backend, device)`` for every backend that has kernels for the device
    (Numba runs on CPU tensors only), each marked to skip visibly where it cannot run.

    The reference on CPU is the spec the others are compared with: it is left out unless
    ``spec_on_cpu`` (tests that check it against something else, such as textbook PyTorch
    or a hand-computed value, or that check its input errors)."""
    import pytest

    marks = _marks()
    params = []
    for backend in backends:
        for device in devices:
            if backend == "numba" and device != "cpu":
                continue
            if backend == "reference" and device == "cpu" and not spec_on_cpu:
                continue
            needs = []
            if backend == "numba":
                needs.append(marks["requires_numba"])
            if backend == "native":
                needs.append(marks["requires_native"])
            if device == "cuda":
                needs.append(marks["requires_cuda"])
            if backend == "native" and device == "cuda":
                needs.append(marks["requires_native_cuda"])
            params.append(pytest.param(backend, device, marks=needs, id=f"{backend}-{device}"))
    return params


@functools.cache
def _marks() -> dict:
    import pytest

    return {
        "requires_cuda": pytest.mark.skipif(not torch.cuda.is_available(),
                                            reason="needs a CUDA GPU (none on this machine)"),
        "requires_native": pytest.mark.skipif(
            not _native_available(), reason=f"native extension not built: {_LOAD_ERROR}"),
        "requires_numba": pytest.mark.skipif(not numba_available(),
                                             reason="numba is not installed"),
        "requires_native_cuda": pytest.mark.skipif(
            not native_cuda_available(),
            reason="the native extension has no CUDA kernels here (build with FASTMF_CUDA=1 "
                   "on a machine with a GPU)"),
    }


@functools.cache
def _marked_axes() -> dict:
    import pytest

    marks = _marks()
    backends = [
        "reference",
        pytest.param("numba", marks=marks["requires_numba"]),
        pytest.param("native", marks=marks["requires_native"]),
    ]
    return {
        **marks,
        "DEVICES": ["cpu", pytest.param("cuda", marks=marks["requires_cuda"])],
        "BACKENDS": backends,
        "FAST_BACKENDS": backends[1:],
        # Each backend and device against the spec (the reference on CPU).
        "KERNELS": kernel_params(),
        # The same plus the spec itself, for checks against something other than the spec.
        "ALL_KERNELS": kernel_params(spec_on_cpu=True),
        # Where a bad input raises at the call: the CUDA kernels never synchronise, so they
        # report bad ids through check_device_errors instead (tests/test_cuda_ops.py).
        "CHECKED_KERNELS": kernel_params(devices=("cpu",), spec_on_cpu=True)
        + kernel_params(("reference",), ("cuda",)),
    }


def __getattr__(name: str):
    axes = _marked_axes()
    if name in axes:
        return axes[name]
    raise AttributeError(f"module 'fastmf.testing' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"requires_cuda", "requires_native", "requires_numba",
                                    "requires_native_cuda", "DEVICES", "BACKENDS",
                                    "FAST_BACKENDS", "KERNELS", "ALL_KERNELS",
                                    "CHECKED_KERNELS"})


# ---------------------------------------------------------------------------------------
# Data makers: random, never zero, reproducible from a seed


def zipf_ids(
    num_rows: int,
    size: int,
    *,
    exponent: float = 1.0,
    generator: np.random.Generator | None = None,
    dtype: torch.dtype = torch.int64,
    device="cpu",
    permutation: np.ndarray | None = None,
) -> torch.Tensor:
    """``size`` ids in [0, num_rows) with P(rank r) ∝ 1/r**exponent, ranks shuffled over
    the ids so hot rows are spread across the table. Many duplicates by design.

    ``permutation`` (a permutation of range(num_rows)) maps rank r to id permutation[r];
    None draws one from the generator, so every call has its own hot rows. Pass one
    permutation to every batch of a stream whose hot rows stay the same, as a training
    set's popular items do."""
    rng = generator if generator is not None else np.random.default_rng()
    weights = 1.0 / np.arange(1, num_rows + 1, dtype=np.float64) ** exponent
    weights /= weights.sum()
    ranks = rng.choice(num_rows, size=size, p=weights)
    if permutation is None:
        perm = rng.permutation(num_rows)
    else:
        perm = np.asarray(permutation)
        if perm.shape != (num_rows,):
            raise ValueError(f"zipf_ids: permutation must have shape ({num_rows},), got "
                             f"{perm.shape}")
    return torch.from_numpy(perm[ranks]).to(dtype=dtype, device=device)


def make_tables(
    num_users: int,
    num_items: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    bias: bool = True,
    seed: int | None = None,
) -> MFTables:
    """Random (never zero) tables in [-0.1, 0.1): ``MFTables(P, Q, b_u, b_i)``, the biases
    None without ``bias``."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def rand(*shape):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.2 - 0.1).to(
            dtype=dtype, device=device
        )

    p, q = rand(num_users, dim), rand(num_items, dim)
    if not bias:
        return MFTables(p, q, None, None)
    return MFTables(p, q, rand(num_users), rand(num_items))


def make_state(table: torch.Tensor, optimizer, *, seed: int | None = None):
    """One table's optimizer state (see :func:`make_states`); None for SGD."""
    states = make_states(MFTables(table, None), optimizer, seed=seed)
    return None if states is None else states.user_factors


def make_states(tables: MFTables, optimizer, *, seed: int | None = None) -> MFTables | None:
    """Optimizer states for ``tables`` under ``optimizer`` (an :class:`~fastmf.ops.Optimizer`,
    its code or name): None for SGD; random positive accumulators in [0.01, 0.11) shaped
    like each table for Adagrad, one per row of a 2-D table for row-wise Adagrad."""
    optimizer = parse(Optimizer, optimizer, "make_states", "optimizer")
    if optimizer == Optimizer.SGD:
        return None
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    rowwise = optimizer == Optimizer.ROWWISE_ADAGRAD

    def state(t):
        if t is None:
            return None
        shape = t.shape[:1] if rowwise else t.shape
        values = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.1 + 0.01
        return values.to(dtype=t.dtype, device=t.device)

    return MFTables(*(state(t) for t in tables))


def make_batch(
    num_users: int,
    num_items: int,
    batch: int,
    *,
    id_dtype: torch.dtype = torch.int64,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int | None = None,
    implicit: bool = False,
):
    """(users, items, targets): Zipf users and items, ratings in [1, 5] (or 0/1 labels)."""
    rng = np.random.default_rng(seed)
    users = zipf_ids(num_users, batch, generator=rng, dtype=id_dtype, device=device)
    items = zipf_ids(num_items, batch, generator=rng, dtype=id_dtype, device=device)
    if implicit:
        targets = rng.integers(0, 2, size=batch).astype(np.float64)
    else:
        targets = rng.uniform(1.0, 5.0, size=batch)
    return users, items, torch.from_numpy(targets).to(dtype=dtype, device=device)


def make_triples(num_users: int, num_items: int, batch: int, *, seed: int | None = None,
                 id_dtype: torch.dtype = torch.int64, device="cpu"):
    """(users, pos_items, neg_items), Zipf; a third of the negatives are the positives of
    other samples and every seventh the sample's own positive, so hot items are updated
    from both sides."""
    rng = np.random.default_rng(seed)
    users = zipf_ids(num_users, batch, generator=rng)
    pos = zipf_ids(num_items, batch, generator=rng)
    neg = zipf_ids(num_items, batch, generator=rng)
    if batch > 1:
        neg[::3] = pos.roll(1)[::3]
        neg[::7] = pos[::7]
    return tuple(t.to(dtype=id_dtype, device=device) for t in (users, pos, neg))


def make_grad_rows(n: int, width: int | None, dtype: torch.dtype, *, seed: int | None = None,
                   device="cpu") -> torch.Tensor:
    """Gradient rows in [-1, 1): (n, width), or (n,) for a bias table (``width`` None)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (n,) if width is None else (n, width)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype=dtype,
                                                                             device=device)


def clone_all(*tensors):
    return tuple(None if t is None else t.clone() for t in tensors)


def textbook_optimizer(params, tables: MFTables, optimizer, lr: float, eps: float,
                       init: float):
    """``(torch optimizer, states)``: ``torch.optim.SGD`` or ``torch.optim.Adagrad`` (its
    accumulators from ``init``) over the textbook model's ``params``, and the fused step's
    optimizer states of ``tables`` that match it (None for SGD)."""
    import torch

    if parse(Optimizer, optimizer, "textbook_optimizer", "optimizer") == Optimizer.SGD:
        return torch.optim.SGD(params, lr=lr), None
    return (torch.optim.Adagrad(params, lr=lr, eps=eps, initial_accumulator_value=init),
            MFTables(*(torch.full_like(t, init) for t in tables)))


def clone_bundle(bundle: MFTables | None) -> MFTables | None:
    """A copy of a table (or state) bundle; None stays None (SGD has no states)."""
    return None if bundle is None else MFTables(*clone_all(*bundle))


def to_device(bundle, device):
    """``bundle`` (a tensor, None, an MFTables or a tuple of them) on ``device``."""
    if bundle is None:
        return None
    if isinstance(bundle, torch.Tensor):
        return bundle.to(device)
    moved = [to_device(t, device) for t in bundle]
    return MFTables(*moved) if isinstance(bundle, MFTables) else tuple(moved)


def _flatten(values):
    for v in values:
        if isinstance(v, (tuple, list)):  # MFTables, or a tuple or list of tensors
            yield from _flatten(v)
        else:
            yield v


def assert_close_all(actual, expected, dtype: torch.dtype, **kwargs) -> None:
    """Every tensor of ``actual`` (on any device) close to its counterpart in ``expected``
    at ``dtype``'s tolerance; None where ``expected`` has None."""
    actual, expected = list(_flatten([actual])), list(_flatten([expected]))
    assert len(actual) == len(expected), (len(actual), len(expected))
    for k, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"entry {k}: expected None"
        else:
            torch.testing.assert_close(a.cpu(), e.cpu(), **tolerance(dtype), **kwargs)


def refuses_strided_tables(backend: str, device) -> bool:
    """Whether the backend's updates refuse a table or state that is not contiguous: the
    native CUDA kernels update a table in place through its own storage (csrc/checks.h
    check_contiguous: a clear ValueError, nothing written); the CPU kernels and the
    reference take any strides."""
    return backend == "native" and torch.device(device).type == "cuda"


def assert_bit_identical(first, second) -> None:
    """The same tensors, bit for bit (NaN equal to NaN), None where the other has None."""
    first, second = list(_flatten([first])), list(_flatten([second]))
    assert len(first) == len(second), (len(first), len(second))
    for a, b in zip(first, second):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def single_threaded(fn, *args, **kwargs):
    """``fn(*args)`` on one torch thread: the reference's many small torch ops gain nothing
    from a second thread, and on a busy machine OpenMP's waits made them many times
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def num_threads(backend: str, n: int):
    """Run ``backend``'s CPU kernels on ``n`` threads (torch's pool for the native kernels,
    numba's for the Numba ones; capped at what numba was started with)."""
    if backend == "numba":
        import numba

        saved = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        try:
            yield
        finally:
            numba.set_num_threads(saved)
    else:
        saved = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------------
# Top-k data: quantised factors (multiples of 1/4) make every score exact in any summation
# order, and every 7th item row (and bias) is a copy of row 0, so there are exact ties and
# every kernel must agree with fastmf.ops.reference.topk bit for bit, tie order included.


def quantised(gen: torch.Generator, *shape, dtype: torch.dtype = torch.float32):
    return (torch.randint(-4, 5, shape, generator=gen) / 4).to(dtype)


def make_topk_items(num_items, dim=8, *, dtype=torch.float32, seed=0, bias=True):
    """(items, bias): quantised item tables with every 7th row (and bias) a copy of row 0."""
    gen = torch.Generator().manual_seed(seed)
    items = quantised(gen, num_items, dim, dtype=dtype)
    b = quantised(gen, num_items, dtype=dtype) if bias else None
    items[1::7] = items[0]
    if bias:
        b[1::7] = b[0]
    return items, b


def make_topk_queries(batch, dim=8, *, dtype=torch.float32, seed=1):
    return quantised(torch.Generator().manual_seed(seed), batch, dim, dtype=dtype)


def make_topk_exclude(batch, num_items, *, seed=2, id_dtype=torch.int64, max_len=40,
                      sort_rows=False):
    """(indptr, indices): a CSR with empty rows, unsorted (or sorted) rows, repeated ids, and
    (if batch > 1) a row that excludes every item."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(batch):
        if b == 1:
            rows.append(rng.permutation(num_items))
        elif b % 5 == 0:
            rows.append(np.zeros(0, np.int64))
        else:
            rows.append(rng.integers(0, num_items, size=rng.integers(1, max_len)))
    if sort_rows:
        rows = [np.sort(r) for r in rows]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return torch.from_numpy(indptr).to(id_dtype), torch.from_numpy(indices).to(id_dtype)


def make_topk_candidates(num_items, size, *, seed=3, id_dtype=torch.int64):
    """Candidate ids drawn with repeats."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, max(num_items, 1), size=size)).to(id_dtype)
