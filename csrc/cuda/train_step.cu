// train_step on the GPU: forward, loss gradient, backward and sparse optimizer update of a
// batch, with no autograd graph, no dense gradient and no host synchronisation (the whole
// step can be captured in a CUDA graph).
//
//   1. prepare:  check ids and targets (errors.cu), build one array of sort keys for both
//                tables: user u -> u, item i -> U + 1 + i, a bad sample -> U (users) and
//                U + 1 + I (items), which sort after every row of their table;
//   2. sort:     one radix sort of the 2B keys (sort.h): slots [0, B) are the users' runs,
//                [B, 2B) the items';
//   3. forward:  per sample, prediction, loss and g_b = dLoss/dpred_b; the item-side
//                gradient rows g_b * P[u_b] are written out now, while P is unchanged;
//   4. users:    each user row's gradient sum_b g_b * Q[i_b] is read from Q, which is still
//                unchanged, and the row is updated (segment_update.cuh);
//   5. items:    each item row sums its gradient rows from step 3 and is updated;
//   6. loss:     per-block loss sums (fixed order), then one block adds them in order.
//
// The L2 term of a row seen n times, n * (2 reg / B) * w, is added when the row is
// updated, from the row as read just before its write: the pre-step value. Every gradient
// therefore comes from the pre-step weights, as in fastmf/reference.py.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

#include "common.cuh"
#include "inputs.h"
#include "segment_update.cuh"
#include "sort.h"

namespace fastmf::cuda {
namespace {

enum LossCode : int { kMse = 0, kHuber = 1, kBce = 2 };

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    prepare_samples(IdArray users, IdArray items, const scalar_t* __restrict__ targets,
                    int32_t batch, int64_t num_users, int64_t num_items,
                    uint32_t* __restrict__ keys, int32_t* __restrict__ positions,
                    ErrorRecord* err) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= batch) return;
  const long long u = users[b], i = items[b];
  const scalar_t t = targets[b];
  const bool ok_u = u >= 0 && u < num_users;
  const bool ok_i = i >= 0 && i < num_items;
  const bool ok_t = isfinite(t);
  if (!ok_u) record_error(err, kOpTrainStep, kArgUsers, u, num_users, b);
  if (!ok_i) record_error(err, kOpTrainStep, kArgItems, i, num_items, b);
  if (!ok_t) {
    record_error(err, kOpTrainStep, kArgTargets, __double_as_longlong(static_cast<double>(t)), 0,
                 b);
  }
  const bool ok = ok_u && ok_i && ok_t;
  const uint32_t item_base = static_cast<uint32_t>(num_users) + 1u;
  keys[b] = ok ? static_cast<uint32_t>(u) : static_cast<uint32_t>(num_users);
  keys[batch + b] = item_base + static_cast<uint32_t>(ok ? i : num_items);
  positions[b] = static_cast<int32_t>(b);
  positions[batch + b] = static_cast<int32_t>(b);
}

template <typename scalar_t>
struct ForwardArgs {
  const uint32_t* keys;  // (2B,) unsorted keys from prepare_samples
  int32_t batch;
  int64_t num_users;
  int64_t dim;
  const scalar_t* user_factors;
  const scalar_t* item_factors;
  const scalar_t* user_bias;
  const scalar_t* item_bias;
  const scalar_t* targets;
  scalar_t global_mean;
  scalar_t scale;  // 1/B
  int loss;
  int lanes;
  scalar_t* coef;            // (B,) dLoss/dpred
  scalar_t* item_grad_rows;  // (B, dim) coef[b] * P[u_b]
  double* block_sums;        // (blocks, 2): loss sum, L2 sum
};

// Formulas as in the CPU kernels (csrc/cpu/train_step.cpp), so both backends agree to
// rounding: the loss value in double, the gradient in the weights' type with scale = 1/B.
template <typename scalar_t>
__device__ __forceinline__ void pointwise_loss(int loss, scalar_t pred, scalar_t target,
                                               scalar_t scale, scalar_t& grad, double& value) {
  const scalar_t diff = pred - target;
  if (loss == kMse) {
    grad = (scalar_t(2) * scale) * diff;
    value = static_cast<double>(diff) * static_cast<double>(diff);
  } else if (loss == kHuber) {
    const double d = static_cast<double>(diff);
    const double a = fabs(d);
    value = a < 1.0 ? 0.5 * d * d : a - 0.5;
    grad = diff <= scalar_t(-1) ? -scale : (diff >= scalar_t(1) ? scale : scale * diff);
  } else {
    const double x = static_cast<double>(pred);
    const double t = static_cast<double>(target);
    value = fmax(x, 0.0) - x * t + log1p(exp(-fabs(x)));
    const scalar_t sigmoid = scalar_t(1) / (scalar_t(1) + exp(-pred));
    grad = (sigmoid - target) * scale;
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) train_forward_kernel(const ForwardArgs<scalar_t> a) {
  __shared__ double shared_loss[kThreads];
  __shared__ double shared_l2[kThreads];
  const Group g = make_group(a.lanes);
  const int groups = kThreads / a.lanes;
  const int gi = static_cast<int>(threadIdx.x) / a.lanes;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * groups + gi;
  const int64_t step = static_cast<int64_t>(a.lanes) * V;
  double loss_value = 0, l2_value = 0;
  if (b < a.batch) {
    const uint32_t user_key = a.keys[b];
    if (user_key >= a.num_users) {  // a bad sample: no row is read, the loss shows it
      loss_value = std::numeric_limits<double>::quiet_NaN();
      if (g.lane == 0) a.coef[b] = scalar_t(0);
    } else {
      const int64_t u = user_key;
      const int64_t i = static_cast<int64_t>(a.keys[a.batch + b]) - (a.num_users + 1);
      const scalar_t* p = a.user_factors + u * a.dim;
      const scalar_t* q = a.item_factors + i * a.dim;
      scalar_t dot = 0, norms = 0;
      for (int64_t e = static_cast<int64_t>(g.lane) * V; e < a.dim; e += step) {
        const Pack<scalar_t, V> pp = load_pack<scalar_t, V>(p + e);
        const Pack<scalar_t, V> qq = load_pack<scalar_t, V>(q + e);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          dot += pp.v[v] * qq.v[v];
          norms += pp.v[v] * pp.v[v] + qq.v[v] * qq.v[v];
        }
      }
      dot = group_sum(g, dot);
      norms = group_sum(g, norms);
      scalar_t pred = dot + a.global_mean;
      if (a.user_bias != nullptr) {
        const scalar_t bu = a.user_bias[u], bi = a.item_bias[i];
        pred = pred + bu + bi;
        norms = norms + bu * bu + bi * bi;
      }
      scalar_t grad;
      pointwise_loss(a.loss, pred, a.targets[b], a.scale, grad, loss_value);
      l2_value = static_cast<double>(norms);
      if (g.lane == 0) a.coef[b] = grad;
      // P's row is still in L1 from the dot product above.
      scalar_t* out = a.item_grad_rows + b * a.dim;
      for (int64_t e = static_cast<int64_t>(g.lane) * V; e < a.dim; e += step) {
        Pack<scalar_t, V> x = load_pack<scalar_t, V>(p + e);
#pragma unroll
        for (int v = 0; v < V; ++v) x.v[v] = grad * x.v[v];
        store_pack<scalar_t, V>(out + e, x);
      }
    }
  }
  // Block sums in a fixed order: one value per group, then warp 0 adds them.
  if (g.lane == 0) {
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
      a.block_sums[2 * blockIdx.x] = loss_sum;
      a.block_sums[2 * blockIdx.x + 1] = l2_sum;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    finish_loss(const double* __restrict__ block_sums, int32_t blocks, int32_t batch, double reg,
                scalar_t* __restrict__ out) {
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

void check_state(const char* op, int64_t optimizer, const char* name,
                 const std::optional<at::Tensor>& state, const at::Tensor& table) {
  TORCH_CHECK_VALUE(state.has_value(), "fastmf.", op, ": ",
                    optimizer == kRowwiseAdagrad ? "rowwise_adagrad" : "adagrad", " needs ",
                    name, ", got None");
  const bool per_row = optimizer == kRowwiseAdagrad && table.dim() == 2;
  check_weight(op, name, *state, per_row ? 1 : table.dim());
  check_like(op, name, *state, "user_factors", table);
  if (per_row) {
    check_shape(op, name, *state, {table.size(0)});
  } else {
    check_shape(op, name, *state, table.sizes());
  }
  check_contiguous(op, name, *state);
}

at::Tensor train_step_cuda(const at::Tensor& user_factors, const at::Tensor& item_factors,
                           const std::optional<at::Tensor>& user_bias,
                           const std::optional<at::Tensor>& item_bias,
                           const std::optional<at::Tensor>& user_factors_state,
                           const std::optional<at::Tensor>& item_factors_state,
                           const std::optional<at::Tensor>& user_bias_state,
                           const std::optional<at::Tensor>& item_bias_state,
                           const at::Tensor& users, const at::Tensor& items,
                           const at::Tensor& targets, double global_mean, int64_t loss,
                           double reg, int64_t optimizer, double lr, double eps) {
  constexpr const char* op = "train_step";
  TORCH_CHECK_VALUE(loss >= 0 && loss <= 2, "fastmf.", op, ": unknown loss code ", loss,
                    "; expected 0..2");
  TORCH_CHECK_VALUE(optimizer >= 0 && optimizer <= 2, "fastmf.", op,
                    ": unknown optimizer code ", optimizer, "; expected 0..2");
  check_tables(op, users, items, user_factors, item_factors, user_bias, item_bias);
  TORCH_CHECK_TYPE(targets.scalar_type() == user_factors.scalar_type(), "fastmf.", op,
                   ": targets has dtype ", targets.scalar_type(), ", expected ",
                   user_factors.scalar_type(), " like the weights");
  TORCH_CHECK_VALUE(targets.dim() == 1, "fastmf.", op, ": targets must be 1-D, got shape ",
                    targets.sizes());
  check_on_device(op, "targets", targets, "user_factors", user_factors);
  check_same_length(op, "users", users, "targets", targets);
  const bool has_bias = user_bias.has_value();
  if (optimizer != kSgd) {
    check_state(op, optimizer, "user_factors_state", user_factors_state, user_factors);
    check_state(op, optimizer, "item_factors_state", item_factors_state, item_factors);
    if (has_bias) {
      check_state(op, optimizer, "user_bias_state", user_bias_state, *user_bias);
      check_state(op, optimizer, "item_bias_state", item_bias_state, *item_bias);
    }
  }
  check_contiguous(op, "user_factors", user_factors);
  check_contiguous(op, "item_factors", item_factors);
  if (has_bias) {
    check_contiguous(op, "user_bias", *user_bias);
    check_contiguous(op, "item_bias", *item_bias);
  }
  // Both tables' samples go through one sort of 2B keys.
  check_fits_32bit(op, "twice the batch size", 2 * users.size(0));
  const int64_t num_users = user_factors.size(0), num_items = item_factors.size(0);
  // Item keys go up to U + 1 + I, which must stay below kNoKey.
  TORCH_CHECK_VALUE(static_cast<uint64_t>(num_users) + static_cast<uint64_t>(num_items) + 1 <
                        static_cast<uint64_t>(kNoKey),
                    "fastmf.", op, ": ", num_users, " users and ", num_items,
                    " items are too many for the CUDA kernels (at most 2^32 - 2 together)");

  c10::cuda::CUDAGuard guard(user_factors.device());
  const int64_t batch = users.size(0), dim = user_factors.size(1);
  if (batch == 0) return at::zeros({}, user_factors.options());
  const at::Tensor u_ids = users.contiguous(), i_ids = items.contiguous();
  const at::Tensor t = targets.contiguous();
  cudaStream_t stream = current_stream();
  ErrorRecord* err = error_record();

  at::Tensor keys = at::empty({2 * batch}, user_factors.options().dtype(at::kInt));
  at::Tensor positions = at::empty({2 * batch}, user_factors.options().dtype(at::kInt));
  auto* key_ptr = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
  at::Tensor result = at::empty({}, user_factors.options());

  AT_DISPATCH_FLOATING_TYPES(user_factors.scalar_type(), "fastmf_train_step_cuda", [&] {
    const unsigned sample_blocks = static_cast<unsigned>(ceil_div(batch, kThreads));
    prepare_samples<scalar_t><<<sample_blocks, kThreads, 0, stream>>>(
        id_array(u_ids), id_array(i_ids), t.data_ptr<scalar_t>(), static_cast<int32_t>(batch),
        num_users, num_items, key_ptr, positions.data_ptr<int32_t>(), err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const SortedRuns sorted =
        sort_runs(keys, positions, static_cast<uint64_t>(num_users + 1 + num_items));

    scalar_t* P = user_factors.data_ptr<scalar_t>();
    scalar_t* Q = item_factors.data_ptr<scalar_t>();
    scalar_t* bu = has_bias ? user_bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* bi = has_bias ? item_bias->data_ptr<scalar_t>() : nullptr;
    auto state_ptr = [&](const std::optional<at::Tensor>& s) -> scalar_t* {
      return optimizer != kSgd && s.has_value() ? s->data_ptr<scalar_t>() : nullptr;
    };
    scalar_t* P_state = state_ptr(user_factors_state);
    scalar_t* Q_state = state_ptr(item_factors_state);
    scalar_t* bu_state = has_bias ? state_ptr(user_bias_state) : nullptr;
    scalar_t* bi_state = has_bias ? state_ptr(item_bias_state) : nullptr;

    // Forward: one group per sample; a fixed grid for a given batch, hence fixed sums.
    constexpr int kVec = 16 / sizeof(scalar_t);
    at::Tensor coef = at::empty({batch}, user_factors.options());
    at::Tensor item_grad_rows = at::empty({batch, dim}, user_factors.options());
    const bool forward_packed = dim % kVec == 0 && aligned16(P) && aligned16(Q);
    const RowLayout fl = row_layout(dim, forward_packed ? kVec : 1);
    const int64_t forward_blocks = ceil_div(batch, kThreads / fl.lanes);
    at::Tensor block_sums = at::empty({forward_blocks * 2}, user_factors.options().dtype(at::kDouble));
    ForwardArgs<scalar_t> fa{key_ptr, static_cast<int32_t>(batch), num_users, dim, P, Q, bu, bi,
                             t.data_ptr<scalar_t>(), static_cast<scalar_t>(global_mean),
                             static_cast<scalar_t>(1.0 / static_cast<double>(batch)),
                             static_cast<int>(loss), fl.lanes, coef.data_ptr<scalar_t>(),
                             item_grad_rows.data_ptr<scalar_t>(), block_sums.data_ptr<double>()};
    if (forward_packed) {
      train_forward_kernel<scalar_t, kVec>
          <<<static_cast<unsigned>(forward_blocks), kThreads, 0, stream>>>(fa);
    } else {
      train_forward_kernel<scalar_t, 1>
          <<<static_cast<unsigned>(forward_blocks), kThreads, 0, stream>>>(fa);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const auto* sorted_keys = reinterpret_cast<const uint32_t*>(sorted.keys.data_ptr<int32_t>());
    const int32_t* sorted_pos = sorted.positions.data_ptr<int32_t>();
    const int32_t* run_start = sorted.run_start.data_ptr<int32_t>();
    const int elementwise = optimizer == kAdagrad;

    SegmentArgs<scalar_t> common;
    common.n = static_cast<int32_t>(batch);
    common.dim = dim;
    common.optimizer = static_cast<int>(optimizer);
    common.lr = static_cast<scalar_t>(lr);
    common.eps = static_cast<scalar_t>(eps);
    common.reg_scale = static_cast<scalar_t>(2.0 * reg / static_cast<double>(batch));

    // Users: gradient rows derived from Q (not yet updated).
    SegmentArgs<scalar_t> ua = common;
    ua.keys = sorted_keys;
    ua.positions = sorted_pos;
    ua.run_start = run_start;
    ua.run_start_base = 0;
    ua.key_offset = 0;
    ua.num_rows = num_users;
    ua.weight = P;
    ua.state = P_state;
    ua.bias = bu;
    ua.bias_state = bu_state;
    ua.coef = coef.data_ptr<scalar_t>();
    ua.other = Q;
    ua.other_keys = key_ptr + batch;
    ua.other_key_offset = static_cast<uint32_t>(num_users) + 1u;
    const bool user_packed = dim % kVec == 0 && aligned16(P) && aligned16(Q) &&
                             (!elementwise || aligned16(P_state));
    run_segment_update<scalar_t>(ua, user_packed, user_factors);

    // Items: the gradient rows written by the forward pass.
    SegmentArgs<scalar_t> ia = common;
    ia.keys = sorted_keys + batch;
    ia.positions = sorted_pos + batch;
    ia.run_start = run_start + batch;
    ia.run_start_base = static_cast<int32_t>(batch);
    ia.key_offset = static_cast<uint32_t>(num_users) + 1u;
    ia.num_rows = num_items;
    ia.weight = Q;
    ia.state = Q_state;
    ia.bias = bi;
    ia.bias_state = bi_state;
    ia.grad_rows = item_grad_rows.data_ptr<scalar_t>();
    ia.coef = has_bias ? coef.data_ptr<scalar_t>() : nullptr;
    const bool item_packed = dim % kVec == 0 && aligned16(Q) &&
                             (!elementwise || aligned16(Q_state));
    run_segment_update<scalar_t>(ia, item_packed, item_factors);

    finish_loss<scalar_t><<<1, kThreads, 0, stream>>>(
        block_sums.data_ptr<double>(), static_cast<int32_t>(forward_blocks),
        static_cast<int32_t>(batch), reg, result.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

}  // namespace
}  // namespace fastmf::cuda

TORCH_LIBRARY_IMPL(fastmf, CUDA, m) { m.impl("train_step", &fastmf::cuda::train_step_cuda); }
