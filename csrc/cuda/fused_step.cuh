// What the fused training steps (train_step in pointwise.cu, train_step_pairwise in
// pairwise.cu) have in common; csrc/cpu/fused_step.h is the CPU counterpart.
// Both run the same pipeline on a batch, with no autograd graph, no dense gradient and no
// host synchronisation (the whole step can be captured in a CUDA graph):
//
//   1. prepare:  check the ids on the device (errors.cu) and write one array of sort keys
//                for both tables (StepKeys): the user slots first, then the item slots;
//   2. sort:     one radix sort of all the keys (segments.cuh) groups every table row's slots;
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
// therefore comes from the pre-step weights, as in fastmf/ops/reference.
//
// Every check, the CUDA-only layout and width limits included (check_step_layout), runs
// before the first launch, so a step that raises has written nothing.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>

#include "../args.h"
#include "../checks.h"
#include "../codes.h"
#include "common.cuh"
#include "segment_update.cuh"
#include "segments.cuh"

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

// Per-sample weights (the batch's `weights`, csrc/args.h): a null pointer for None. The
// prepare kernels check each weight (weight_ok) and leave a sample with a bad one out, as
// a bad id; the forward kernels scale a sample's gradient and loss value by its weight,
// as the CPU kernels do (csrc/cpu/fused_step.h StepScratch::weigh).
template <typename scalar_t>
inline const scalar_t* weights_ptr(const at::Tensor& weights) {
  return weights.defined() ? weights.data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
__device__ __forceinline__ void weigh(const scalar_t* weights, int64_t b, scalar_t& grad,
                                      double& value) {
  if (weights == nullptr) return;
  const scalar_t w = weights[b];
  grad *= w;
  value *= static_cast<double>(w);
}

// The sampled steps' check of their B positives' weights, recorded under `op`.
inline void launch_check_weights(const at::Tensor& weights, int op) {
  const int64_t n = weights.size(0);
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "fastmf.check_weights", [&] {
    check_weights<scalar_t><<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0,
                              current_stream()>>>(weights.data_ptr<scalar_t>(), n,
                                                  error_record(), op);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------
// Host side.

// What the CUDA steps need beyond the shared checks (csrc/checks.h), all before any launch:
// every table and state the step writes contiguous (updated in place); room for `slots`
// sort keys (`slots_what` names the count) and for both tables' rows in the key space; and
// rows no wider than the update kernels hold, for both tables, with the packing each
// table's update will use. user_bias (and its state) only when `writes_user_bias`.
inline void check_step_layout(const char* op, const StepTables& tables, const StepTables& states,
                              const OptimizerArgs& opt, bool writes_user_bias, int64_t batch,
                              int64_t slots, const char* slots_what) {
  const auto table_slots = tables.slots();
  const auto state_slots = states.slots();
  const bool adagrad = opt.optimizer != Optimizer::kSgd;
  for (size_t s = 0; s < table_slots.size(); ++s) {
    if (!table_slots[s]->defined() || (s == 2 && !writes_user_bias)) continue;
    check_contiguous(op, kTableNames[s], *table_slots[s]);
    if (adagrad) check_contiguous(op, kStateNames[s], *state_slots[s]);
  }
  const int64_t num_users = tables.user_factors.size(0);
  const int64_t num_items = tables.item_factors.size(0);
  check_fits_32bit(op, "user_factors row count", num_users);
  check_fits_32bit(op, "item_factors row count", num_items);
  check_fits_32bit(op, "batch size", batch);
  // Both tables' slots go through one sort.
  check_fits_32bit(op, slots_what, slots);
  // Item keys go up to U + 1 + I, which must stay below kNoKey.
  TORCH_CHECK_VALUE(static_cast<uint64_t>(num_users) + static_cast<uint64_t>(num_items) + 1 <
                        static_cast<uint64_t>(kNoKey),
                    "fastmf.", op, ": ", num_users, " users and ", num_items,
                    " items are too many for the CUDA kernels (at most 2^32 - 2 together)");
  if (batch == 0) return;  // nothing to update, as on the CPU
  const int64_t dim = tables.user_factors.size(1);
  const int64_t size = tables.user_factors.element_size();
  const void* P = tables.user_factors.data_ptr();
  const void* Q = tables.item_factors.data_ptr();
  // Packed state loads only for element-wise Adagrad (row-wise reads one value per row).
  const bool elementwise = opt.optimizer == Optimizer::kAdagrad;
  const void* P_state = elementwise ? states.user_factors.data_ptr() : nullptr;
  const void* Q_state = elementwise ? states.item_factors.data_ptr() : nullptr;
  // The same packing run_segment_update gets in the steps: the user rows read P and Q,
  // the item rows Q.
  check_update_width(op, "user_factors", dim, size, packed_rows(dim, size, {P, Q, P_state}));
  check_update_width(op, "item_factors", dim, size, packed_rows(dim, size, {Q, Q_state}));
}

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

// Step 6: out[0] = loss_sum / batch + reg * (l2_sum / batch), from the (blocks, 2)
// per-block sums written by block_loss_sums, added in a fixed order by one block.
template <typename scalar_t>
void finish_loss(const at::Tensor& block_sums, int64_t blocks, int64_t batch, double reg,
                 const at::Tensor& out) {
  finish_loss_kernel<scalar_t><<<1, kThreads, 0, current_stream()>>>(
      block_sums.data_ptr<double>(), static_cast<int32_t>(blocks), static_cast<int32_t>(batch),
      reg, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tables and states of a step as raw pointers (null when absent or unused).
template <typename scalar_t>
struct TablePointers {
  scalar_t* user_factors;
  scalar_t* item_factors;
  scalar_t* user_bias;
  scalar_t* item_bias;
  scalar_t* user_factors_state;
  scalar_t* item_factors_state;
  scalar_t* user_bias_state;
  scalar_t* item_bias_state;

  static TablePointers of(const StepTables& tables, const StepTables& states,
                          Optimizer optimizer) {
    auto ptr = [](const at::Tensor& t) -> scalar_t* {
      return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
    };
    auto state = [&](const at::Tensor& s) -> scalar_t* {
      return optimizer != Optimizer::kSgd ? ptr(s) : nullptr;
    };
    const bool has_bias = tables.has_bias();
    return TablePointers{ptr(tables.user_factors),
                         ptr(tables.item_factors),
                         ptr(tables.user_bias),
                         ptr(tables.item_bias),
                         state(states.user_factors),
                         state(states.item_factors),
                         has_bias ? state(states.user_bias) : nullptr,
                         has_bias ? state(states.item_bias) : nullptr};
  }
};

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
  const bool packed = packed_rows(dim, sizeof(scalar_t), {user_factors, item_factors});
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
                                     const OptimizerArgs& opt, double reg) {
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
  a.optimizer = opt.optimizer;
  a.lr = static_cast<scalar_t>(opt.lr);
  a.eps = static_cast<scalar_t>(opt.eps);
  // Per occurrence of a row: the gradient of reg * mean_b(||w||^2) is (2 reg / B) w.
  a.reg_scale = static_cast<scalar_t>(2.0 * reg / static_cast<double>(batch));
  return a;
}

// Step 1's buffers: `slots` sort keys (the batch's ids in the StepKeys space) and their
// batch positions, int32 on the step's device.
struct StepKeyBuffers {
  at::Tensor keys;
  at::Tensor positions;
  uint32_t* key_ptr;
};

inline StepKeyBuffers step_key_buffers(int64_t slots, const at::TensorOptions& options) {
  at::Tensor keys = at::empty({slots}, options.dtype(at::kInt));
  at::Tensor positions = at::empty({slots}, options.dtype(at::kInt));
  auto* key_ptr = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
  return StepKeyBuffers{keys, positions, key_ptr};
}

// Step 4: each user row sums coef[b] * Q[i_b] (or, for a pairwise step,
// coef[b] * (Q[i_b] - Q[j_b]) from the keys after the positives) over its slots, from Q as
// it is before step 5, and is updated once. Packed state loads only for element-wise
// Adagrad (row-wise reads one value per row): the packing check_step_layout checked.
template <typename scalar_t>
void update_user_rows(const SortedRuns& sorted, const StepKeys& key, const uint32_t* key_ptr,
                      const TablePointers<scalar_t>& tab, const scalar_t* coef, int64_t batch,
                      int64_t dim, const OptimizerArgs& opt, double reg, bool writes_user_bias,
                      bool pairwise, const at::Tensor& user_factors) {
  SegmentArgs<scalar_t> a = table_segments<scalar_t>(
      sorted, 0, batch, 0, user_factors.size(0), tab.user_factors, tab.user_factors_state,
      batch, dim, opt, reg);
  if (writes_user_bias) {
    a.bias = tab.user_bias;
    a.bias_state = tab.user_bias_state;
  }
  a.coef = coef;
  a.other = tab.item_factors;
  a.other_keys = key_ptr + batch;
  if (pairwise) a.other_keys_minus = key_ptr + 2 * batch;
  a.other_key_offset = key.item_offset();
  const bool elementwise = opt.optimizer == Optimizer::kAdagrad;
  run_segment_update<scalar_t>(
      a, packed_rows(dim, sizeof(scalar_t), {tab.user_factors, tab.item_factors,
                                             elementwise ? a.state : nullptr}),
      user_factors);
}

// Step 5: each item row sums the gradient rows step 3 wrote for its `slots` slots (after
// the batch's user slots; slot positions from `negated_from` on read the row of position
// - negated_from, negated: a pairwise step's negatives) and is updated once.
template <typename scalar_t>
void update_item_rows(const SortedRuns& sorted, int64_t slots, const StepKeys& key,
                      const TablePointers<scalar_t>& tab, const scalar_t* grad_rows,
                      const scalar_t* coef, int64_t negated_from, int64_t batch, int64_t dim,
                      const OptimizerArgs& opt, double reg, const at::Tensor& item_factors) {
  SegmentArgs<scalar_t> a = table_segments<scalar_t>(
      sorted, batch, slots, key.item_offset(), item_factors.size(0), tab.item_factors,
      tab.item_factors_state, batch, dim, opt, reg);
  a.bias = tab.item_bias;
  a.bias_state = tab.item_bias_state;
  a.grad_rows = grad_rows;
  if (negated_from < slots) a.negated_from = static_cast<int32_t>(negated_from);
  // The bias gradient is coef[b] itself; without a bias the rows carry everything.
  a.coef = tab.item_bias != nullptr ? coef : nullptr;
  const bool elementwise = opt.optimizer == Optimizer::kAdagrad;
  run_segment_update<scalar_t>(
      a, packed_rows(dim, sizeof(scalar_t), {tab.item_factors, elementwise ? a.state : nullptr}),
      item_factors);
}

// ---------------------------------------------------------------------------------------
// Device side.

// Step 3's item-side gradient row of one sample: out = scale * row, written by the
// sample's group (the row is still in L1 from the dot product).
template <typename scalar_t, int V>
__device__ __forceinline__ void store_scaled_row(const Group& g, scalar_t* __restrict__ out,
                                                 const scalar_t* __restrict__ row,
                                                 scalar_t scale, int64_t dim) {
  const int64_t step = static_cast<int64_t>(g.size) * V;
  for (int64_t e = static_cast<int64_t>(g.lane) * V; e < dim; e += step) {
    Pack<scalar_t, V> x = load_pack<scalar_t, V>(row + e);
#pragma unroll
    for (int v = 0; v < V; ++v) x.v[v] = scale * x.v[v];
    store_pack<scalar_t, V>(out + e, x);
  }
}

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

// The multi-step sampled ops (train_steps_pairwise_sampled, train_steps_sampled): `step`
// (the sampled step) on each run of batch_size positives of `in` in turn, the t-th at
// in.step + t, launched from one host loop (no per-step dispatch or Python, no host sync).
// As in the step, bad ids and rows are recorded on the device (under the step's name) and
// raised by check_device_errors, so the steps before a bad one have run. Returns the
// steps' losses. A run read through in.order is gathered on the device first, after one
// host read of the order's range (`op` names the caller in that error).
template <typename Batch, typename Step>
at::Tensor steps_in_turn(const char* op, const StepTables& tables, const StepTables& states,
                         const Batch& run, int64_t batch_size, const OptimizerArgs& opt,
                         Step step) {
  Batch in = run;
  if (in.order.defined()) {
    check_device_id_range(op, "order", in.order, in.users.size(0));
    in.users = in.users.index_select(0, in.order);
    in.pos_items = in.pos_items.index_select(0, in.order);
    if (in.weights.defined()) in.weights = in.weights.index_select(0, in.order);
    in.order = at::Tensor();
  }
  const int64_t n = in.users.size(0);
  const int64_t num_steps = n / batch_size + (n % batch_size != 0 ? 1 : 0);
  at::Tensor losses = at::empty({num_steps}, tables.user_factors.options());
  for (int64_t t = 0; t < num_steps; ++t) {
    const int64_t lo = t * batch_size, batch = std::min(batch_size, n - lo);
    Batch slice = in;
    slice.users = in.users.narrow(0, lo, batch);
    slice.pos_items = in.pos_items.narrow(0, lo, batch);
    if (in.weights.defined()) slice.weights = in.weights.narrow(0, lo, batch);
    slice.step = in.step + t;
    losses.select(0, t).copy_(step(tables, states, slice, opt));
  }
  return losses;
}

}  // namespace fastmf::cuda
