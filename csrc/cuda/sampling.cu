// The sampling family on the GPU: sample_negatives, the uniform negatives of the sampled
// steps on their own (csrc/cpu/sampling.cpp on the CPU; fastmf/ops/reference/sampling.py
// is the spec), one thread per draw (sampling.cuh). As everywhere on the GPU, the ids and
// rows are checked on the device: a bad user id, row or a user with every item is recorded
// under "sample_negatives" (errors.cu; raised by fastmf.ops.check_device_errors) and its
// negatives are -1. `op`, the caller's name, is used by the host-side checks only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "../checks.h"
#include "sampling.cuh"

namespace fastmf::cuda {
namespace {

at::Tensor sample_negatives(const at::Tensor& users_in, const at::Tensor& pos_indptr,
                            const at::Tensor& pos_indices, int64_t num_items,
                            int64_t num_negatives, int64_t seed, int64_t step,
                            c10::string_view op_name) {
  const std::string name(op_name);
  check_sample_negatives(name.c_str(), users_in, pos_indptr, pos_indices, num_items,
                         num_negatives);
  c10::cuda::CUDAGuard guard(users_in.device());
  const int64_t batch = users_in.size(0), k = num_negatives;
  at::Tensor out = at::empty({batch, k}, users_in.options().dtype(at::kLong));
  if (batch == 0) return out;
  const at::Tensor users = users_in.contiguous(), indptr = pos_indptr.contiguous();
  const at::Tensor indices = pos_indices.contiguous();
  sample_user_negatives<<<static_cast<unsigned>(ceil_div(batch * k, kThreads)), kThreads, 0,
                          current_stream()>>>(
      id_array(users), id_array(indptr), id_array(indices), indices.size(0),
      indptr.size(0) - 1, num_items, batch, k, sampling::step_key(seed, step),
      out.data_ptr<int64_t>(), error_record());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fastmf::cuda

TORCH_LIBRARY_IMPL(fastmf, CUDA, m) {
  m.impl("sample_negatives", &fastmf::cuda::sample_negatives);
}
