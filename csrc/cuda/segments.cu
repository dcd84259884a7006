// The CUB part of segments.cuh, kept in one file because its templates are among the
// slowest things in the build to compile.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>

#include "common.cuh"
#include "segments.cuh"

namespace fastmf::cuda {
namespace {

struct MaxOp {
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const {
    return a > b ? a : b;
  }
};

// A run head holds its own slot, every other slot 0; a running max then gives every slot
// its run's head.
__global__ void __launch_bounds__(kThreads)
    mark_run_heads(const uint32_t* __restrict__ keys, int32_t n, int32_t* __restrict__ heads) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n) return;
  heads[j] = (j == 0 || keys[j] != keys[j - 1]) ? static_cast<int32_t>(j) : 0;
}

}  // namespace

int key_bits(uint64_t max_key) {
  int bits = 1;
  while (bits < 32 && (max_key >> bits) != 0) ++bits;
  return bits;
}

SortedRuns sort_runs(const at::Tensor& keys, const at::Tensor& positions, uint64_t max_key) {
  const int64_t n64 = keys.numel();
  TORCH_INTERNAL_ASSERT(n64 > 0 && n64 < (int64_t{1} << 31));
  TORCH_INTERNAL_ASSERT(keys.scalar_type() == at::kInt && positions.scalar_type() == at::kInt);
  const int32_t n = static_cast<int32_t>(n64);
  const int end_bit = key_bits(max_key);
  cudaStream_t stream = current_stream();

  SortedRuns out{at::empty_like(keys), at::empty_like(positions), at::empty_like(positions)};
  at::Tensor heads = at::empty_like(positions);
  const auto* keys_in = reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>());
  auto* keys_out = reinterpret_cast<uint32_t*>(out.keys.data_ptr<int32_t>());
  const int32_t* pos_in = positions.data_ptr<int32_t>();
  int32_t* pos_out = out.positions.data_ptr<int32_t>();
  int32_t* run_start = out.run_start.data_ptr<int32_t>();

  // Sizes depend on n and end_bit only: queried on the host, no device work.
  size_t sort_bytes = 0, scan_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys_in, keys_out, pos_in,
                                                 pos_out, n, 0, end_bit, stream));
  // Out of place: every CUB version has this overload.
  int32_t* head_ptr = heads.data_ptr<int32_t>();
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveScan(nullptr, scan_bytes, head_ptr, run_start, MaxOp(),
                                                n, stream));
  // From PyTorch's caching allocator, so it is stream-ordered and graph-safe.
  at::Tensor temp = at::empty({static_cast<int64_t>(std::max<size_t>({sort_bytes, scan_bytes, 1}))},
                              keys.options().dtype(at::kByte));

  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), sort_bytes, keys_in, keys_out,
                                                 pos_in, pos_out, n, 0, end_bit, stream));
  mark_run_heads<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      keys_out, n, head_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveScan(temp.data_ptr(), scan_bytes, head_ptr, run_start,
                                                MaxOp(), n, stream));
  return out;
}

}  // namespace fastmf::cuda
