// What the fused training steps (train_step.cu, train_step_pairwise.cu) have in common.
// Both run the same pipeline on a batch, with no autograd graph, no dense gradient and no
// host synchronisation (the whole step can be captured in a CUDA graph):
//
//   1. prepare:  check the ids on the device (errors.cu) and write one array of sort keys
//                for both tables (StepKeys): the user slots first, then the item slots;
//   2. sort:     one radix sort of all the keys (sort.h) groups every table row's slots;
//   3. forward:  per sample, the loss and its gradient; the item-side gradient rows are
//                written out now, while the user rows are unchanged; per-block loss sums
//                (block_loss_sums);
//   4. users:    each user row sums gradients derived from the (still unchanged) item rows
//                and is updated once (segment_update.cuh);
//   5. items:    each item row sums its gradient rows from step 3 and is updated once;
//   6. loss:     the block sums are added in a fixed order (finish_loss).
//
// The L2 term of a row seen n times, n * (2 reg / B) * w, is added when the row is
// updated, from the row as read just before its write: the pre-step value. Every gradient
// therefore comes from the pre-step weights, as in fastmf/reference.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "common.cuh"
#include "segment_update.cuh"
#include "sort.h"

namespace fastmf::cuda {

// The sort keys of both tables in one key space: user u -> u, item i -> U + 1 + i. A bad
// sample gets U (users) and U + 1 + I (items), which sort after every row of their table
// and are never read as rows.
struct StepKeys {
  uint32_t num_users;
  uint32_t num_items;

  __host__ __device__ __forceinline__ uint32_t item_offset() const { return num_users + 1u; }
  __host__ __device__ __forceinline__ uint32_t user(long long u, bool ok) const {
    return ok ? static_cast<uint32_t>(u) : num_users;
  }
  __host__ __device__ __forceinline__ uint32_t item(long long i, bool ok) const {
    return item_offset() + (ok ? static_cast<uint32_t>(i) : num_items);
  }
  uint64_t max_key() const {
    return static_cast<uint64_t>(num_users) + 1u + static_cast<uint64_t>(num_items);
  }
};

// ---------------------------------------------------------------------------------------
// Host side (fused_step.cu).

// An optimizer state: present for the Adagrads, shaped like its table (element-wise) or
// (N,) (row-wise, 2-D tables), contiguous. Messages as in the CPU kernels.
void check_state(const char* op, int64_t optimizer, const char* name,
                 const std::optional<at::Tensor>& state, const at::Tensor& table,
                 const char* table_name);

// What both fused steps check after their own arguments: the four optimizer states, the
// contiguity of every table the step writes, and room for `slots` sort keys in the key
// space (`slots_what` names the count in the message). user_bias is checked for
// contiguity only when `writes_user_bias`.
void check_step_tables(const char* op, int64_t optimizer, const at::Tensor& user_factors,
                       const at::Tensor& item_factors, const std::optional<at::Tensor>& user_bias,
                       const std::optional<at::Tensor>& item_bias,
                       const std::optional<at::Tensor>& user_factors_state,
                       const std::optional<at::Tensor>& item_factors_state,
                       const std::optional<at::Tensor>& user_bias_state,
                       const std::optional<at::Tensor>& item_bias_state, bool writes_user_bias,
                       int64_t slots, const char* slots_what);

// Step 6: out[0] = loss_sum / batch + reg * (l2_sum / batch), from the (blocks, 2)
// per-block sums written by block_loss_sums, added in a fixed order by one block.
template <typename scalar_t>
void finish_loss(const at::Tensor& block_sums, int64_t blocks, int64_t batch, double reg,
                 const at::Tensor& out);

// The tables and states of a step as raw pointers (null when absent or unused).
template <typename scalar_t>
struct StepTables {
  scalar_t* user_factors;
  scalar_t* item_factors;
  scalar_t* user_bias;
  scalar_t* item_bias;
  scalar_t* user_factors_state;
  scalar_t* item_factors_state;
  scalar_t* user_bias_state;
  scalar_t* item_bias_state;
};

template <typename scalar_t>
StepTables<scalar_t> step_tables(int64_t optimizer, const at::Tensor& user_factors,
                                 const at::Tensor& item_factors,
                                 const std::optional<at::Tensor>& user_bias,
                                 const std::optional<at::Tensor>& item_bias,
                                 const std::optional<at::Tensor>& user_factors_state,
                                 const std::optional<at::Tensor>& item_factors_state,
                                 const std::optional<at::Tensor>& user_bias_state,
                                 const std::optional<at::Tensor>& item_bias_state) {
  auto ptr = [](const std::optional<at::Tensor>& t) -> scalar_t* {
    return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
  };
  auto state = [&](const std::optional<at::Tensor>& s) -> scalar_t* {
    return optimizer != kSgd ? ptr(s) : nullptr;
  };
  const bool has_bias = user_bias.has_value();
  return StepTables<scalar_t>{user_factors.data_ptr<scalar_t>(),
                              item_factors.data_ptr<scalar_t>(),
                              ptr(user_bias),
                              ptr(item_bias),
                              state(user_factors_state),
                              state(item_factors_state),
                              has_bias ? state(user_bias_state) : nullptr,
                              has_bias ? state(item_bias_state) : nullptr};
}

// Whether rows of `dim` scalars at every base in `bases` can move as 16-byte packs.
template <typename scalar_t>
bool packed_rows(int64_t dim, std::initializer_list<const void*> bases) {
  if (dim % (16 / static_cast<int64_t>(sizeof(scalar_t))) != 0) return false;
  for (const void* p : bases) {
    if (!aligned16(p)) return false;
  }
  return true;
}

// Step 3's grid: one group of lanes per sample, moving 16-byte packs when both factor
// tables allow it. The grid is fixed for a given batch and dim, and so are the per-block
// loss sums in block_sums ((blocks, 2) doubles, for finish_loss).
struct ForwardGrid {
  bool packed;
  int lanes;
  int64_t blocks;
  at::Tensor block_sums;
};

template <typename scalar_t>
ForwardGrid forward_grid(int64_t batch, int64_t dim, const scalar_t* user_factors,
                         const scalar_t* item_factors, const at::TensorOptions& options) {
  const bool packed = packed_rows<scalar_t>(dim, {user_factors, item_factors});
  const RowLayout layout = row_layout(dim, packed ? 16 / static_cast<int>(sizeof(scalar_t)) : 1);
  const int64_t blocks = ceil_div(batch, kThreads / layout.lanes);
  return ForwardGrid{packed, layout.lanes, blocks,
                     at::empty({blocks * 2}, options.dtype(at::kDouble))};
}

// One table's slots of the sorted batch [first_slot, first_slot + slots) as the segment
// update reads them, with the optimizer settings of the step. The caller then says where
// each slot's gradient comes from (SegmentArgs: grad_rows, coef, other, ...).
template <typename scalar_t>
SegmentArgs<scalar_t> table_segments(const SortedRuns& sorted, int64_t first_slot, int64_t slots,
                                     uint32_t key_offset, int64_t num_rows, scalar_t* weight,
                                     scalar_t* state, int64_t batch, int64_t dim,
                                     int64_t optimizer, double lr, double eps, double reg) {
  SegmentArgs<scalar_t> a;
  a.keys = reinterpret_cast<const uint32_t*>(sorted.keys.data_ptr<int32_t>()) + first_slot;
  a.positions = sorted.positions.data_ptr<int32_t>() + first_slot;
  a.run_start = sorted.run_start.data_ptr<int32_t>() + first_slot;
  a.run_start_base = static_cast<int32_t>(first_slot);
  a.n = static_cast<int32_t>(slots);
  a.key_offset = key_offset;
  a.num_rows = num_rows;
  a.dim = dim;
  a.weight = weight;
  a.state = state;
  a.optimizer = static_cast<int>(optimizer);
  a.lr = static_cast<scalar_t>(lr);
  a.eps = static_cast<scalar_t>(eps);
  // Per occurrence of a row: the gradient of reg * mean_b(||w||^2) is (2 reg / B) w.
  a.reg_scale = static_cast<scalar_t>(2.0 * reg / static_cast<double>(batch));
  return a;
}

// ---------------------------------------------------------------------------------------
// Device side.

// Step 3's loss sums: every group of `lanes` lanes gives one sample's loss and L2 values
// (read from its lane 0); the block's sums go to block_sums[2 * blockIdx.x + {0, 1}] in a
// fixed order (one value per group, then warp 0 adds them), so reruns are bit-identical.
// Every thread of the block must call it.
__device__ __forceinline__ void block_loss_sums(double loss_value, double l2_value, int lanes,
                                                double* __restrict__ block_sums) {
  __shared__ double shared_loss[kThreads];
  __shared__ double shared_l2[kThreads];
  const int groups = kThreads / lanes;
  const int gi = static_cast<int>(threadIdx.x) / lanes;
  if (static_cast<int>(threadIdx.x) % lanes == 0) {
    shared_loss[gi] = loss_value;
    shared_l2[gi] = l2_value;
  }
  __syncthreads();
  if (threadIdx.x < kWarp) {
    double loss_sum = 0, l2_sum = 0;
    for (int k = static_cast<int>(threadIdx.x); k < groups; k += kWarp) {
      loss_sum += shared_loss[k];
      l2_sum += shared_l2[k];
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      loss_sum += __shfl_xor_sync(0xffffffffu, loss_sum, offset);
      l2_sum += __shfl_xor_sync(0xffffffffu, l2_sum, offset);
    }
    if (threadIdx.x == 0) {
      block_sums[2 * blockIdx.x] = loss_sum;
      block_sums[2 * blockIdx.x + 1] = l2_sum;
    }
  }
}

}  // namespace fastmf::cuda
