"""The counter-based stochastic rounding of the embedding ops: the reference's random bits
and roundings equal a plain-Python-int implementation of the spec; roundings are unbiased
and deterministic."""

from __future__ import annotations

import struct

import pytest
import torch

from fastmf.ops.codes import Optimizer, WeightDecay
from fastmf.ops.reference import sparse_update
from fastmf.ops.reference.embedding_bag import random_bits, stochastic_round

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def fmix32(h: int) -> int:
    """murmur3's 32-bit finalizer."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def python_bits(row: int, col: int, num_cols: int, seed: int, step: int) -> int:
    """The spec's bits of element (row, col) with plain ints (independent of num_cols)."""
    key = splitmix64(splitmix64(seed) ^ step)
    row_bits = splitmix64(key ^ row) & 0xFFFFFFFF
    return fmix32(row_bits ^ ((col * 0x9E3779B9) & 0xFFFFFFFF))


def float_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def bits_float(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u & 0xFFFFFFFF))[0]


def python_round(v: float, dtype: torch.dtype, bits: int) -> float:
    """The spec's rounding of the float32 value ``v`` with plain ints and struct."""
    plain = float(torch.tensor(v, dtype=torch.float32).to(dtype))
    if v != v or v in (float("inf"), float("-inf")):
        return plain
    if dtype == torch.float16:
        if abs(v) >= 65504.0 or abs(v) < 2.0 ** -14:
            return plain
        u = (float_bits(v) + (bits >> 19)) & ~0x1FFF
    else:
        u = (float_bits(v) + (bits >> 16)) & ~0xFFFF
        rounded = bits_float(u)
        if rounded in (float("inf"), float("-inf")):
            return plain
    return float(torch.tensor(bits_float(u), dtype=torch.float32).to(dtype))


SEEDS_STEPS = [(0, 1), (1, 1), (12345, 7), (2**62 + 3, 2**40 + 1), (2**63 - 1, 3)]


@pytest.mark.parametrize("seed,step", SEEDS_STEPS)
def test_random_bits_match_python_ints(seed, step):
    rows = torch.tensor([0, 1, 2, 17, 123456789, 2**40])
    for num_cols in (1, 3, 64):
        got = random_bits(rows, num_cols, seed, step)
        assert got.shape == (rows.numel(), num_cols)
        assert int(got.min()) >= 0 and int(got.max()) < 2**32
        for a, r in enumerate(rows.tolist()):
            for c in range(num_cols):
                assert int(got[a, c]) == python_bits(r, c, num_cols, seed, step)


VALUES = [1.0, -1.0, 0.1, -0.1, 3.14159, -2.71828, 1e-3, -7e-4, 65000.0, -65503.0, 1e-5, -3e-6,
          0.0, -0.0, 70000.0, float("inf"), float("-inf"), float("nan"), 3.0e38, -3.3e38,
          1e-40, 123.456]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_round_matches_python_ints(dtype):
    values = torch.tensor(VALUES, dtype=torch.float32)
    for step in range(1, 6):
        bits = random_bits(torch.arange(len(VALUES)), 1, 99, step).view(-1)
        got = stochastic_round(values, dtype, bits)
        assert got.dtype == dtype
        for i, v in enumerate(values.tolist()):
            want = python_round(v, dtype, int(bits[i]))
            g = float(got[i])
            assert (g == want) or (g != g and want != want), (v, g, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [0.1, -0.1, 1.0 / 3.0, -2.7182818, 1234.567, 7.77e-4,
                                   -3.3e-3])
def test_rounding_is_unbiased(dtype, value):
    """The mean of 20000 roundings of one value (different counters) is within 4 standard
    errors of the value; and both neighbours occur."""
    n = 20000
    v = torch.full((n,), value, dtype=torch.float32)
    bits = random_bits(torch.arange(n), 1, 2024, 1).view(-1)
    rounded = stochastic_round(v, dtype, bits).double()
    assert rounded.unique().numel() == 2
    standard_error = rounded.std() / n ** 0.5
    exact = float(torch.tensor(value, dtype=torch.float32))
    assert abs(float(rounded.mean()) - exact) < 4 * float(standard_error)
    nearest_bias = abs(float(v.to(dtype).double()[0]) - exact)
    assert nearest_bias > 4 * float(standard_error)  # the test could tell nearest apart


def test_determinism_and_dependence_on_the_counter():
    rows = torch.arange(100)
    assert torch.equal(random_bits(rows, 8, 5, 3), random_bits(rows, 8, 5, 3))
    assert not torch.equal(random_bits(rows, 8, 5, 3), random_bits(rows, 8, 5, 4))
    assert not torch.equal(random_bits(rows, 8, 5, 3), random_bits(rows, 8, 6, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_update_rounds_by_seed_and_step(dtype):
    """The same update at the same (seed, step) writes the same half values; another step
    draws other bits; rounding to nearest differs from both somewhere."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(40, 16, generator=gen) * 0.1).to(dtype)
    ids = torch.randint(0, 40, (200,), generator=gen)
    grad = torch.randn(200, 16, generator=gen)

    def run(step, stochastic):
        w = weight.clone()
        sparse_update(w, None, None, ids, grad, Optimizer.SGD, 0.003, 0.0, 0.9, 0.999, 0.0,
                      WeightDecay.NONE, step, 11, stochastic)
        return w

    assert torch.equal(run(2, True), run(2, True))
    assert not torch.equal(run(2, True), run(3, True))
    assert not torch.equal(run(2, True), run(2, False))
    # the stochastic result is always one of the two neighbours of the float32 result
    exact = weight.float().clone()
    exact.index_add_(0, ids, -0.003 * grad)
    touched = torch.zeros(40, dtype=torch.bool)
    touched[ids] = True
    spacing = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=2.0 ** -14)))
                      - (10 if dtype == torch.float16 else 7))
    diff = (run(2, True).float() - exact).abs()[touched]
    assert bool((diff <= spacing[touched] * 1.001).all())
