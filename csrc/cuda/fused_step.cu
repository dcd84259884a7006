// Host side of fused_step.cuh: the checks both fused steps make and the final loss sum.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <optional>

#include "common.cuh"
#include "fused_step.cuh"
#include "inputs.h"

namespace fastmf::cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    finish_loss_kernel(const double* __restrict__ block_sums, int32_t blocks, int32_t batch,
                       double reg, scalar_t* __restrict__ out) {
  __shared__ double shared_loss[kThreads];
  __shared__ double shared_l2[kThreads];
  double loss_sum = 0, l2_sum = 0;
  for (int32_t k = static_cast<int32_t>(threadIdx.x); k < blocks; k += kThreads) {
    loss_sum += block_sums[2 * k];
    l2_sum += block_sums[2 * k + 1];
  }
  shared_loss[threadIdx.x] = loss_sum;
  shared_l2[threadIdx.x] = l2_sum;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) {
      shared_loss[threadIdx.x] += shared_loss[threadIdx.x + half];
      shared_l2[threadIdx.x] += shared_l2[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double n = static_cast<double>(batch);
    out[0] = static_cast<scalar_t>(shared_loss[0] / n +
                                   (reg != 0.0 ? reg * (shared_l2[0] / n) : 0.0));
  }
}

}  // namespace

void check_state(const char* op, int64_t optimizer, const char* name,
                 const std::optional<at::Tensor>& state, const at::Tensor& table,
                 const char* table_name) {
  TORCH_CHECK_VALUE(state.has_value(), "fastmf.", op, ": ", optimizer_name(optimizer),
                    " needs ", name, ", got None");
  const bool per_row = optimizer == kRowwiseAdagrad && table.dim() == 2;
  check_weight(op, name, *state, per_row ? 1 : table.dim());
  check_like(op, name, *state, table_name, table);
  if (per_row) {
    check_shape(op, name, *state, {table.size(0)});
  } else {
    check_shape(op, name, *state, table.sizes());
  }
  check_contiguous(op, name, *state);
}

void check_step_tables(const char* op, int64_t optimizer, const at::Tensor& user_factors,
                       const at::Tensor& item_factors, const std::optional<at::Tensor>& user_bias,
                       const std::optional<at::Tensor>& item_bias,
                       const std::optional<at::Tensor>& user_factors_state,
                       const std::optional<at::Tensor>& item_factors_state,
                       const std::optional<at::Tensor>& user_bias_state,
                       const std::optional<at::Tensor>& item_bias_state, bool writes_user_bias,
                       int64_t slots, const char* slots_what) {
  const bool has_bias = user_bias.has_value();
  if (optimizer != kSgd) {
    check_state(op, optimizer, "user_factors_state", user_factors_state, user_factors,
                "user_factors");
    check_state(op, optimizer, "item_factors_state", item_factors_state, item_factors,
                "item_factors");
    if (has_bias) {
      check_state(op, optimizer, "user_bias_state", user_bias_state, *user_bias, "user_bias");
      check_state(op, optimizer, "item_bias_state", item_bias_state, *item_bias, "item_bias");
    }
  }
  check_contiguous(op, "user_factors", user_factors);
  check_contiguous(op, "item_factors", item_factors);
  if (has_bias) {
    if (writes_user_bias) check_contiguous(op, "user_bias", *user_bias);
    check_contiguous(op, "item_bias", *item_bias);
  }
  // Both tables' slots go through one sort.
  check_fits_32bit(op, slots_what, slots);
  const int64_t num_users = user_factors.size(0), num_items = item_factors.size(0);
  // Item keys go up to U + 1 + I, which must stay below kNoKey.
  TORCH_CHECK_VALUE(static_cast<uint64_t>(num_users) + static_cast<uint64_t>(num_items) + 1 <
                        static_cast<uint64_t>(kNoKey),
                    "fastmf.", op, ": ", num_users, " users and ", num_items,
                    " items are too many for the CUDA kernels (at most 2^32 - 2 together)");
}

template <typename scalar_t>
void finish_loss(const at::Tensor& block_sums, int64_t blocks, int64_t batch, double reg,
                 const at::Tensor& out) {
  finish_loss_kernel<scalar_t><<<1, kThreads, 0, current_stream()>>>(
      block_sums.data_ptr<double>(), static_cast<int32_t>(blocks), static_cast<int32_t>(batch),
      reg, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void finish_loss<float>(const at::Tensor&, int64_t, int64_t, double, const at::Tensor&);
template void finish_loss<double>(const at::Tensor&, int64_t, int64_t, double, const at::Tensor&);

}  // namespace fastmf::cuda
