// The uniform negatives of the sampled steps (train_step_pairwise_sampled,
// train_step_sampled), one definition for the CPU and the GPU
// (fastmf/ops/reference/sampling.py sample_negatives is the spec). Integer arithmetic only,
// so every backend draws the same items for the same (seed, step, pair).
#pragma once

#include <cstdint>

#include "counter_hash.h"

namespace fastmf {
namespace sampling {

using hash::splitmix64;
// The key of one step's draws; pair p = b * num_negatives + k then draws from
// splitmix64(key ^ p).
using hash::step_key;

// A uniform rank in [0, free) from the pair's high 32 bits (free < 2^31, so the product
// fits in 64 bits; the bias is below free / 2^32).
FASTMF_HOST_DEVICE int64_t draw_rank(uint64_t key, uint64_t pair, int64_t free) {
  const uint64_t bits = splitmix64(key ^ pair) >> 32;
  return static_cast<int64_t>((bits * static_cast<uint64_t>(free)) >> 32);
}

// The rank-th (0-based) item outside the sorted row[0..deg): row[t] - t non-positives lie
// below row[t]. Whatever the row holds, the result is rank + (a count in [0, deg]), so a
// rank below num_items - deg always gives an item in [0, num_items).
// Written without a data-dependent branch (the selects become conditional moves): the
// comparisons are coin flips, and mispredicting them cost more than the loads.
template <typename index_t>
FASTMF_HOST_DEVICE int64_t rank_to_item(const index_t* row, int64_t deg, int64_t rank) {
  int64_t lo = 0, len = deg;
  while (len > 0) {
    const int64_t half = len >> 1;
    const int64_t mid = lo + half;
    const bool below = static_cast<int64_t>(row[mid]) - mid <= rank;
    lo = below ? mid + 1 : lo;
    len = below ? len - half - 1 : half;
  }
  return rank + lo;
}

}  // namespace sampling
}  // namespace fastmf
