// The counter-based hash behind every random number the kernels draw (stochastic rounding
// of float16/bfloat16 rows, sampled negatives): splitmix64 of a per-step key XOR a counter.
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

}  // namespace hash
}  // namespace fastmf
