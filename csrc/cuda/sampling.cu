// The sampling family on the GPU: sample_negatives, the uniform negatives of the sampled
// steps on their own (csrc/cpu/sampling.cpp on the CPU; fastmf/ops/reference/sampling.py
// is the spec), one thread per draw (sampling.cuh). As everywhere on the GPU, the ids and
// rows are checked on the device: a bad user id, row or a user with every item is recorded
// under "sample_negatives" (errors.cu; raised by fastmf.ops.check_device_errors) and its
// negatives are -1. `op`, the caller's name, is used by the host-side checks only
// (sample_negatives_op in csrc/ops.h).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../ops.h"
#include "sampling.cuh"

namespace fastmf::cuda {
namespace {

// One thread a draw into out (sampling.cuh), on the users' device and stream.
void sample_negatives(const at::Tensor& users, const at::Tensor& pos_indptr,
                      const at::Tensor& pos_indices, int64_t num_items, int64_t seed,
                      int64_t step, const char* /*op*/, at::Tensor& out) {
  c10::cuda::CUDAGuard guard(users.device());
  const int64_t batch = users.size(0), k = out.size(1);
  sample_user_negatives<<<static_cast<unsigned>(ceil_div(batch * k, kThreads)), kThreads, 0,
                          current_stream()>>>(
      id_array(users), id_array(pos_indptr), id_array(pos_indices), pos_indices.size(0),
      pos_indptr.size(0) - 1, num_items, batch, k, sampling::step_key(seed, step),
      out.data_ptr<int64_t>(), error_record());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fastmf::cuda

TORCH_LIBRARY_IMPL(fastmf, CUDA, m) {
  m.impl("sample_negatives", &fastmf::sample_negatives_op<fastmf::cuda::sample_negatives>);
}
