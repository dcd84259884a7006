// The counter-based hash behind every random number the kernels draw (stochastic rounding
// of float16/bfloat16 rows, sampled negatives): splitmix64 of a per-step key XOR a counter
// (for stochastic rounding, per row, then a 32-bit mix per column: element_bits).
// One definition for the CPU and the GPU, integer arithmetic only, so every backend and
// thread count draws the same bits (the Python specs: fastmf/ops/reference/embedding_bag.py
// random_bits, fastmf/ops/reference/sampling.py sample_negatives).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define FASTMF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTMF_HOST_DEVICE inline
#endif

namespace fastmf {
namespace hash {

FASTMF_HOST_DEVICE uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The key of one (seed, step): its draws are splitmix64(key ^ counter).
FASTMF_HOST_DEVICE uint64_t step_key(int64_t seed, int64_t step) {
  return splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(step));
}

// The key of a permutation at `seed` (permutation_draw): a stream apart from the negatives'
// step_key(seed, step) at every step.
FASTMF_HOST_DEVICE uint64_t permutation_key(int64_t seed) {
  return splitmix64(step_key(seed, 0) ^ 0x7065726D75746521ull);  // "permute!"
}

// floor(x * m / 2^64): a draw in [0, m) from 64 random bits x, biased by less than m / 2^64.
// The Numba and Python specs, without a 128-bit type, compute it exactly from 32-bit halves;
// so does a compiler without one. The 128-bit product was faster in permutation's loop
// (180-210 against 255-290 us for 100,226 positions, AVX2 build flags).
FASTMF_HOST_DEVICE uint64_t mulhi64(uint64_t x, uint64_t m) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(x, m);
#elif defined(__SIZEOF_INT128__)
  return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * m) >> 64);
#else
  const uint64_t x_lo = x & 0xFFFFFFFFull, x_hi = x >> 32;
  const uint64_t m_lo = m & 0xFFFFFFFFull, m_hi = m >> 32;
  const uint64_t lo_lo = x_lo * m_lo, hi_lo = x_hi * m_lo, lo_hi = x_lo * m_hi;
  const uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFull) + lo_hi;
  return x_hi * m_hi + (hi_lo >> 32) + (cross >> 32);
#endif
}

// Step i of permutation's Fisher-Yates pass over n positions: the position in [i, n) that
// position i swaps with.
FASTMF_HOST_DEVICE uint64_t permutation_draw(uint64_t key, int64_t i, int64_t n) {
  return static_cast<uint64_t>(i) +
         mulhi64(splitmix64(key ^ static_cast<uint64_t>(i)), static_cast<uint64_t>(n - i));
}

// murmur3's 32-bit finalizer: a bijection of uint32 with full avalanche.
FASTMF_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// Stochastic rounding's 32 random bits of element (row, col) of a table at `key`:
// fmix32(row_bits(key, row) ^ col * 0x9E3779B9), with row_bits = low32(splitmix64(key ^
// row)) computed once per row. The per-element work is 32-bit (two products) so the CPU
// rounds 8 or 16 lanes at a time: splitmix64 per element cost 0.28 ns an element with
// AVX-512 and 0.72 with AVX2 (64-bit products, emulated on AVX2), this 0.10 with either.
FASTMF_HOST_DEVICE uint32_t row_bits(uint64_t key, int64_t row) {
  return static_cast<uint32_t>(splitmix64(key ^ static_cast<uint64_t>(row)));
}
FASTMF_HOST_DEVICE uint32_t element_bits(uint32_t row_bits, int64_t col) {
  return fmix32(row_bits ^ (static_cast<uint32_t>(col) * 0x9E3779B9u));
}

}  // namespace hash
}  // namespace fastmf
