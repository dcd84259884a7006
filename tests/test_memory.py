"""fastmf.memory: large tables and optimizer states are advised onto huge pages (Linux), and
nothing about their values changes."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import fastmf
from fastmf import memory
from fastmf.testing import zipf_ids

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="madvise(MADV_HUGEPAGE) is Linux's")
# The kernel refuses MADV_HUGEPAGE when built without transparent huge pages.
thp_kernel = pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
    reason="this kernel has no transparent huge pages")

# Just above the threshold, so several whole huge pages lie inside the table.
BIG_ROWS = (memory.MIN_BYTES + 4 * memory.HUGE_PAGE_BYTES) // (64 * 4)


def vm_flags(tensor: torch.Tensor) -> set[str]:
    """The VmFlags of the mapping holding the middle of ``tensor`` (/proc/self/smaps)."""
    address = tensor.data_ptr() + tensor.nbytes // 2
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError("no mapping holds the tensor")


@linux_only
@thp_kernel
def test_large_table_is_advised(monkeypatch):
    monkeypatch.delenv("FASTMF_HUGE_PAGES", raising=False)
    table = memory.empty_table((BIG_ROWS, 64), dtype=torch.float32)
    assert table.shape == (BIG_ROWS, 64) and table.dtype == torch.float32
    # "hg": the mapping carries MADV_HUGEPAGE (whatever the kernel's THP mode).
    assert "hg" in vm_flags(table)
    assert memory.advise_huge_pages(table)


@linux_only
@pytest.mark.parametrize("case", ["small", "disabled", "meta", "expanded"])
def test_not_advised(monkeypatch, case):
    # No madvise call at all. (A mapping's flags cannot show this: the allocator may hand
    # out memory an earlier, advised table left behind.)
    calls = []
    monkeypatch.setattr(memory, "_madvise", lambda: lambda *args: calls.append(args) or 0)
    monkeypatch.delenv("FASTMF_HUGE_PAGES", raising=False)
    if case == "small":
        table = memory.empty_table((1000, 64), dtype=torch.float32)
    elif case == "disabled":
        monkeypatch.setenv("FASTMF_HUGE_PAGES", "0")
        table = memory.empty_table((BIG_ROWS, 64), dtype=torch.float32)
    elif case == "expanded":
        # Large by nbytes, but it owns 256 bytes: nothing beyond them may be advised.
        table = torch.zeros(64).expand(BIG_ROWS, 64)
        assert table.nbytes >= memory.MIN_BYTES
    else:
        table = memory.empty_table((BIG_ROWS, 64), dtype=torch.float32, device="meta")
        assert table.is_meta
    assert not memory.advise_huge_pages(table)
    assert calls == []
    # The same table is advised once allowed (the range: its whole huge pages).
    if case == "disabled":
        monkeypatch.setenv("FASTMF_HUGE_PAGES", "1")
        assert memory.advise_huge_pages(table)
        (start, length, advice), = calls
        assert start % memory.HUGE_PAGE_BYTES == 0 and length % memory.HUGE_PAGE_BYTES == 0
        assert table.data_ptr() <= start
        assert start + length <= table.data_ptr() + table.nbytes
        assert length >= table.nbytes - 2 * memory.HUGE_PAGE_BYTES


def test_cat_rows_is_cat():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=gen), torch.randn(2, 3, generator=gen)
    assert torch.equal(memory.cat_rows([a, b]), torch.cat([a, b]))
    v = torch.randn(4, generator=gen, dtype=torch.float64)
    assert torch.equal(memory.cat_rows([v, v[:1]]), torch.cat([v, v[:1]]))


@linux_only
@thp_kernel
def test_tables_and_states_are_advised(monkeypatch):
    """The tables fastmf allocates (fastmf.nn, MF) and the optimizer states beside them."""
    monkeypatch.delenv("FASTMF_HUGE_PAGES", raising=False)
    bag = fastmf.nn.EmbeddingBag(BIG_ROWS, 64, backend="reference")
    mf = fastmf.MF(BIG_ROWS, 10, dim=64, backend="reference")
    adagrad = fastmf.optim.SparseAdagrad([bag.weight], lr=0.1)
    adam = fastmf.optim.SparseAdam([mf.user_factors], lr=0.1)
    for tensor in (bag.weight, mf.user_factors, adagrad.state_for(bag.weight),
                   *adam.states(mf.user_factors)):
        if tensor.nbytes >= memory.MIN_BYTES:
            assert "hg" in vm_flags(tensor)
    assert "hg" in vm_flags(bag.weight) and "hg" in vm_flags(adagrad.state_for(bag.weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_training_either_way(monkeypatch, dtype):
    """Where the memory lives changes no value: a large table trained with and without the
    advice ends bit for bit equal."""
    rng = np.random.default_rng(7)
    ids = zipf_ids(BIG_ROWS, 320, generator=rng).view(64, 5)
    target = torch.as_tensor(rng.random(64), dtype=torch.float32)
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("FASTMF_HUGE_PAGES", setting)
        torch.manual_seed(3)
        bag = fastmf.nn.EmbeddingBag(BIG_ROWS, 64, dtype=dtype)
        opt = fastmf.optim.apply_in_backward(fastmf.optim.SparseAdagrad(bag.parameters(),
                                                                        lr=0.1))
        for _ in range(3):
            pooled = bag(ids)
            loss = (pooled.float().sum(1) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append((bag.weight.detach().clone(), opt.state_for(bag.weight).clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# Rounds of a step-like pattern: BLOCKS tensors of 4 MiB written, then all freed; the minor
# page faults of the last rounds. "mmap" first freezes glibc's mmap threshold at its starting
# value (128 KiB): every block is then mapped and unmapped, so each round faults all its
# pages in again, in every process. (With glibc's adaptive defaults whether the freed heap
# is trimmed varies from process to process: it needs the heap to have grown contiguously.)
BLOCKS = 24
FAULTS_SCRIPT = f"""
import ctypes, resource, sys, torch
from fastmf import memory
if "mmap" in sys.argv[1]:
    assert ctypes.CDLL(None).mallopt(-3, 128 << 10) == 1  # M_MMAP_THRESHOLD
if "keep" in sys.argv[1]:
    assert memory.keep_freed_memory() is True
def round_():
    blocks = [torch.empty(1 << 20).fill_(1.5) for _ in range({BLOCKS})]
    return sum(float(b[-1]) for b in blocks)
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
total = sum(round_() for _ in range(10))
assert total == 10 * {BLOCKS} * 1.5
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(memory._mallopt() is None, reason="keep_freed_memory needs glibc")
def test_keep_freed_memory_stops_refaulting():
    import subprocess

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], check=True,
                             capture_output=True, text=True, timeout=120)
        return int(out.stdout.split()[-1])

    pages = 10 * BLOCKS * (4 << 20) // 4096  # refaulting every page of every round
    mapped, kept_after, kept = faults("mmap"), faults("mmap+keep"), faults("keep")
    assert mapped > pages // 2, (mapped, kept_after, kept)
    assert kept_after < pages // 20, (mapped, kept_after, kept)
    assert kept < pages // 20, (mapped, kept_after, kept)


@pytest.mark.parametrize("limit", [True, 1.0e9, "1G", 0, (32 << 20) - 1, 2**31])
def test_keep_freed_memory_bad_limit(limit):
    with pytest.raises(ValueError, match="limit must be an int"):
        memory.keep_freed_memory(limit)
