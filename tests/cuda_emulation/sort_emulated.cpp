// Stand-in for csrc/cuda/segments.cu (CUB cannot run on the CPU): the same contract, computed
// on the host. It also checks that every key fits the bits the radix sort is told to use.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "segments.cuh"

namespace fastmf::cuda {

int key_bits(uint64_t max_key) {
  int bits = 1;
  while (bits < 32 && (max_key >> bits) != 0) ++bits;
  return bits;
}

SortedRuns sort_runs(const at::Tensor& keys, const at::Tensor& positions, uint64_t max_key) {
  const int64_t n = keys.numel();
  const int end_bit = key_bits(max_key);
  const auto* k = reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>());
  const int32_t* p = positions.data_ptr<int32_t>();
  for (int64_t j = 0; j < n; ++j) {
    if (end_bit < 32 && (k[j] >> end_bit) != 0) throw std::runtime_error("key beyond end_bit");
    if (k[j] > max_key) throw std::runtime_error("key beyond max_key");
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return k[a] < k[b]; });
  SortedRuns out{at::empty_like(keys), at::empty_like(positions), at::empty_like(positions)};
  auto* ko = reinterpret_cast<uint32_t*>(out.keys.data_ptr<int32_t>());
  int32_t* po = out.positions.data_ptr<int32_t>();
  int32_t* rs = out.run_start.data_ptr<int32_t>();
  for (int64_t j = 0; j < n; ++j) {
    ko[j] = k[order[j]];
    po[j] = p[order[j]];
    rs[j] = (j == 0 || ko[j] != ko[j - 1]) ? static_cast<int32_t>(j) : rs[j - 1];
  }
  return out;
}

}  // namespace fastmf::cuda
