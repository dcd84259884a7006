"""The sampling family: ``sample_negatives``, the uniform negatives of the sampled steps on
their own (what :meth:`fastmf.data.NegativeSampler.sample_step` returns), on every backend
against the reference (fastmf/ops/reference/sampling.py): the same items to the bit, on
Zipf users with repeats, int32/int64 ids, empty and small batches, rows of every shape
(sorted, one run of items, all but a few items, unsorted, repeated items, empty), for any
thread count; and the same errors for bad input. The sampled steps' own draws are tested
with them in test_pairwise_sampled.py and test_pointwise_sampled.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pairwise_sampled import ROW_KINDS, make_csr, make_rows

from fastmf import ops
from fastmf.data import Interactions, NegativeSampler
from fastmf.ops import reference as spec
from fastmf.testing import (
    assert_bit_identical,
    idfn,
    kernel_params,
    num_threads,
    to_device,
    zipf_ids,
)

ID_DTYPES = [torch.int32, torch.int64]
BACKENDS = kernel_params()
THREADED = kernel_params(("numba", "native"), ("cpu",))
NATIVE = kernel_params(("native",), ("cpu",))
NUM_USERS, NUM_ITEMS = 97, 3_000


def draw(backend, device, users, csr, num_items, k, seed=11, step=4, op="sample_negatives"):
    kernels = ops.kernels(backend, device, kernel="sample_negatives")
    got = kernels.sample_negatives(*to_device((users, *csr), device), num_items, k, seed, step,
                                   op)
    return got.cpu()


@pytest.mark.parametrize("kind", ["sorted"] + ROW_KINDS)
@pytest.mark.parametrize("batch, k", [(0, 1), (1, 1), (7, 3), (4096, 1), (1000, 4)])
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_matches_reference(backend, device, id_dtype, batch, k, kind):
    csr = (make_csr(NUM_USERS, NUM_ITEMS, seed=batch + k, id_dtype=id_dtype) if kind == "sorted"
           else make_rows(kind, NUM_USERS, NUM_ITEMS, seed=batch + k, id_dtype=id_dtype))
    users = zipf_ids(NUM_USERS, batch, generator=np.random.default_rng(batch), dtype=id_dtype)
    got = draw(backend, device, users, csr, NUM_ITEMS, k)
    want = spec.sample_negatives(users, *csr, NUM_ITEMS, k, 11, 4)
    assert got.shape == (batch, k) and got.dtype == torch.int64
    assert_bit_identical(got, want)
    if batch and kind in ("sorted", "clustered", "long"):  # rows that are sets: never drawn
        indptr, indices = (t.long() for t in csr)
        for b in range(0, batch, max(1, batch // 64)):
            u = int(users[b])
            row = set(indices[int(indptr[u]):int(indptr[u + 1])].tolist())
            assert not row & set(got[b].tolist()), (b, u)
            assert 0 <= int(got[b].min()) and int(got[b].max()) < NUM_ITEMS


@pytest.mark.parametrize("backend, device", THREADED)
def test_bit_identical_across_thread_counts(backend, device):
    csr = make_rows("mixed", NUM_USERS, NUM_ITEMS, seed=5)
    users = zipf_ids(NUM_USERS, 20_000, generator=np.random.default_rng(6))
    with num_threads(backend, 1):
        one = draw(backend, device, users, csr, NUM_ITEMS, 2)
    for threads in (2, 5):
        with num_threads(backend, threads):
            assert_bit_identical(one, draw(backend, device, users, csr, NUM_ITEMS, 2))


def test_seed_and_step_move_the_draws():
    csr = make_csr(NUM_USERS, NUM_ITEMS, seed=7)
    users = zipf_ids(NUM_USERS, 500, generator=np.random.default_rng(8))
    base = spec.sample_negatives(users, *csr, NUM_ITEMS, 2, 11, 4)
    assert not torch.equal(base, spec.sample_negatives(users, *csr, NUM_ITEMS, 2, 12, 4))
    assert not torch.equal(base, spec.sample_negatives(users, *csr, NUM_ITEMS, 2, 11, 5))


def bad_rows_cases():
    """(users, indptr, indices, num_items, the error's type and message) of data the draws
    reject: a row pointer outside the CSR, a decreasing one, and a user with every item."""
    indices = torch.tensor([0, 1, 2, 0, 2], dtype=torch.int64)
    return {
        "row_past_end": (torch.tensor([0, 1]), torch.tensor([0, 3, 9]), indices, 4,
                         ValueError, r"pos_indptr gives user 1 the row \[3, 9\), not an "
                                     r"ordered range within \[0, 5\]"),
        "row_decreasing": (torch.tensor([1, 1, 0]), torch.tensor([0, 3, 2]), indices, 4,
                           ValueError, r"pos_indptr gives user 1 the row \[3, 2\)"),
        "full_user": (torch.tensor([1, 0]), torch.tensor([0, 3, 5]), indices, 3,
                      ValueError, r"user 0 has 3 positives of 3 items; no item is left"),
    }


@pytest.mark.parametrize("case", list(bad_rows_cases()))
@pytest.mark.parametrize("backend, device", kernel_params(spec_on_cpu=True))
def test_bad_rows_raise_the_same_errors(backend, device, case):
    users, indptr, indices, num_items, error, message = bad_rows_cases()[case]
    if backend == "native" and device == "cuda":
        # The CUDA draws never synchronise to raise: the fault is recorded on the device
        # under the op's own name (csrc/cuda/errors.cu, whose record has no room for
        # len(pos_indices)) and check_device_errors raises it.
        try:
            ops.check_device_errors()  # nothing left over from an earlier test
        except (IndexError, ValueError):
            pass
        draw(backend, device, users, (indptr, indices), num_items, 2,
             op="NegativeSampler.sample_step")
        recorded = message.replace(r"\[0, 5\]", r"\[0, len\(pos_indices\)\]")
        with pytest.raises(error, match=f"fastmf.sample_negatives: {recorded}"):
            ops.check_device_errors()
        return
    with pytest.raises(error, match=f"fastmf.NegativeSampler.sample_step: {message}"):
        draw(backend, device, users, (indptr, indices), num_items, 2,
             op="NegativeSampler.sample_step")


@pytest.mark.parametrize("backend, device", NATIVE)
def test_native_bad_arguments(backend, device):
    indptr, indices = make_csr(5, 20, seed=9)
    users = torch.tensor([0, 4, 2])
    call = torch.ops.fastmf.sample_negatives.default
    for args, error, message in [
        ((users, indptr, indices, 20, 0, 1, 2), ValueError, "num_negatives must be >= 1"),
        ((users, indptr, indices, 0, 1, 1, 2), ValueError, r"num_items must be in \[1, "),
        ((users, indptr, indices, 2**31, 1, 1, 2), ValueError, r"num_items must be in \[1, "),
        ((users.float(), indptr, indices, 20, 1, 1, 2), TypeError, "users must be int32"),
        ((users.view(3, 1), indptr, indices, 20, 1, 1, 2), ValueError, "users must be 1-D"),
        ((users, indptr[:0], indices, 20, 1, 1, 2), ValueError,
         "pos_indptr must have num_users \\+ 1 >= 1 entries"),
        ((users, indptr, indices.view(-1, 1), 20, 1, 1, 2), ValueError,
         "pos_indices must be 1-D"),
        ((torch.tensor([0, 5]), indptr, indices, 20, 1, 1, 2), IndexError,
         r"users id 5 out of range \[0, 5\)"),
        ((torch.tensor([-1, 2]), indptr, indices, 20, 1, 1, 2), IndexError,
         r"users id -1 out of range \[0, 5\)"),
        ((users, indptr, indices, 20, 2**30, 1, 2), ValueError,
         "3 users x 1073741824 negatives = 3221225472 draws; at most 2147483647"),
    ]:
        with pytest.raises(error, match=f"fastmf.the_caller: {message}"):
            call(*args, "the_caller")


@pytest.mark.parametrize("backend, device", NATIVE)
def test_opcheck(backend, device):
    indptr, indices = make_csr(NUM_USERS, NUM_ITEMS, seed=10)
    users = zipf_ids(NUM_USERS, 300, generator=np.random.default_rng(11))
    op = torch.ops.fastmf.sample_negatives.default
    torch.library.opcheck(op, (users, indptr, indices, NUM_ITEMS, 3, 1, 2, "op"))
    torch.library.opcheck(op, (users[:0].int(), indptr.int(), indices.int(), NUM_ITEMS, 1, 1,
                               2, "op"))


def test_sample_step_is_the_resolved_kernel():
    """NegativeSampler.sample_step returns the reference's items through whichever kernel
    the resolver picks, and checks its own arguments first."""
    rng = np.random.default_rng(12)
    users = rng.integers(0, 50, 2_000)
    items = rng.integers(0, 400, 2_000)
    sampler = NegativeSampler(Interactions.from_arrays(users, items, num_users=50,
                                                       num_items=400))
    batch = zipf_ids(50, 1_000, generator=rng)
    got = sampler.sample_step(batch, 3, seed=21, step=2)
    want = spec.sample_negatives(batch, *sampler.csr("cpu"), 400, 3, 21, 2)
    assert_bit_identical(got, want)
    for kwargs, error, message in [
        (dict(num_negatives=0, seed=1, step=0), ValueError, "num_negatives must be >= 1"),
        (dict(num_negatives=2, seed=True, step=0), TypeError, "seed must be an int"),
        (dict(num_negatives=2, seed=1, step=2**64), ValueError, "step must fit in int64"),
    ]:
        with pytest.raises(error, match=f"NegativeSampler.sample_step: {message}"):
            sampler.sample_step(batch, **kwargs)
    with pytest.raises(TypeError, match="users must be int32 or int64"):
        sampler.sample_step(batch.float(), 1, seed=1, step=0)


# ---------------------------------------------------------------------------------------
# permutation: an epoch's order, a CPU op (a serial Fisher-Yates pass)

CPU_KERNELS = kernel_params(devices=("cpu",))
CPU_ALL = kernel_params(devices=("cpu",), spec_on_cpu=True)


def permute(backend, n, seed, dtype=torch.int64):
    out = torch.full((n,), -7, dtype=dtype)
    ops.kernels(backend, "cpu", kernel="permutation").permutation(out, seed)
    return out


@pytest.mark.parametrize("seed", [0, 5, -3, 2**63 - 1])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 1000, 100_003])
@pytest.mark.parametrize("dtype", ID_DTYPES, ids=idfn)
@pytest.mark.parametrize("backend, device", CPU_KERNELS)
def test_permutation_matches_reference(backend, device, dtype, n, seed):
    got = permute(backend, n, seed, dtype)
    expected = permute("reference", n, seed, torch.int64)
    assert got.dtype == dtype
    assert_bit_identical(got.long(), expected)


@pytest.mark.parametrize("n", [0, 1, 2, 9, 4097])
@pytest.mark.parametrize("backend, device", CPU_ALL)
def test_permutation_is_a_permutation_and_moves_with_the_seed(backend, device, n):
    orders = [permute(backend, n, seed) for seed in range(6)]
    for order in orders:
        assert torch.equal(order.sort().values, torch.arange(n))
    if n >= 9:
        assert len({tuple(o.tolist()) for o in orders}) == len(orders)
    if n >= 1000:
        # Not the identity, nor a rotation of it: neighbours are split up (about one of
        # the n - 1 pairs stays adjacent in a random order).
        assert all(int((o[1:] - o[:-1] == 1).sum()) < 10 for o in orders)


def test_permutation_is_uniform():
    """Every one of the 24 orders of 4 positions about equally often over 24,000 seeds (a
    chi-square test at p = 0.001: 23 degrees of freedom, critical value 49.7), and each
    position of 10 lands everywhere about equally often (per cell 400 expected)."""
    kernels = ops.kernels("auto", "cpu", kernel="permutation")
    out = torch.empty(4, dtype=torch.int64)
    counts = {}
    for seed in range(24_000):
        kernels.permutation(out, seed)
        key = tuple(out.tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 24
    observed = np.array(list(counts.values()), dtype=np.float64)
    assert float(((observed - 1000.0) ** 2 / 1000.0).sum()) < 49.7
    where = np.zeros((10, 10))
    out = torch.empty(10, dtype=torch.int64)
    for seed in range(4_000):
        kernels.permutation(out, 10**6 + seed)
        where[np.arange(10), out.numpy()] += 1
    assert np.abs(where - 400.0).max() < 100.0  # 5 sigma of a binomial(4000, 0.1)


@pytest.mark.parametrize("backend, device", CPU_ALL)
def test_permutation_bad_out(backend, device):
    kernels = ops.kernels(backend, "cpu", kernel="permutation")
    for out, error, message in [
        (torch.zeros(5, dtype=torch.float32), TypeError, "out must be int32 or int64"),
        (torch.zeros(2, 3, dtype=torch.int64), ValueError, "out must be 1-D"),
        (torch.zeros(10, dtype=torch.int64)[::2], ValueError, "out must be contiguous"),
    ]:
        before = out.clone()
        with pytest.raises(error, match=f"fastmf.permutation: {message}"):
            kernels.permutation(out, 3)
        assert torch.equal(out, before)


@pytest.mark.parametrize("backend, device", NATIVE)
def test_permutation_opcheck(backend, device):
    op = torch.ops.fastmf.permutation.default
    torch.library.opcheck(op, (torch.empty(100, dtype=torch.int64), 4))
    torch.library.opcheck(op, (torch.empty(0, dtype=torch.int32), 4))


def test_fit_epoch_order_is_the_permutation():
    """fit's batches come in the order of the permutation op at the epoch generator's
    seed, on every backend (the models' shared shuffle)."""
    import fastmf

    rng = np.random.default_rng(3)
    data = Interactions(rng.integers(0, 40, 500), rng.integers(0, 25, 500),
                        rng.uniform(1, 5, 500), user_map=40, item_map=25)
    for backend in ops.available_backends():
        model = fastmf.MF(40, 25, dim=4, backend=backend)
        gen = torch.Generator().manual_seed(77)
        batch = next(iter(model.batches(data, batch_size=500, loss="mse", num_negatives=0,
                                        sampler=None, generator=gen)))
        order = permute("reference", 500, 77)
        assert torch.equal(batch.users.long(), torch.from_numpy(data.users)[order]), backend
        assert torch.equal(batch.items.long(), torch.from_numpy(data.items)[order]), backend


def test_zipf_ids_with_one_permutation_keep_their_hot_rows():
    """fastmf.testing.zipf_ids(permutation=...): rank r is id permutation[r], so batches
    drawn with one permutation share their hot rows (the benchmarks' streams); a
    permutation of the wrong length is refused."""
    n = 5_000
    perm = np.random.default_rng(0).permutation(n)
    ranks = zipf_ids(n, 4_096, generator=np.random.default_rng(1), permutation=np.arange(n))
    ids = zipf_ids(n, 4_096, generator=np.random.default_rng(1), permutation=perm)
    assert torch.equal(ids, torch.from_numpy(perm)[ranks])
    hottest = [int(torch.mode(zipf_ids(n, 4_096, generator=np.random.default_rng(s),
                                       permutation=perm)).values) for s in (2, 3)]
    assert hottest == [int(perm[0])] * 2
    with pytest.raises(ValueError, match=r"permutation must have shape \(5000,\)"):
        zipf_ids(n, 10, permutation=perm[:-1])
