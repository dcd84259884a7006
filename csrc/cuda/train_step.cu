// train_step on the GPU: forward, loss gradient, backward and sparse optimizer update of a
// batch, through the pipeline of fused_step.cuh. The B user keys fill slots [0, B) of the
// one sort, the B item keys [B, 2B). The forward pass writes the item-side gradient rows
// g_b * P[u_b]; the user rows derive theirs, g_b * Q[i_b], from Q before it is updated.
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
#include "fused_step.cuh"
#include "inputs.h"
#include "segment_update.cuh"
#include "sort.h"

namespace fastmf::cuda {
namespace {

enum LossCode : int { kMse = 0, kHuber = 1, kBce = 2 };

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    prepare_samples(IdArray users, IdArray items, const scalar_t* __restrict__ targets,
                    int32_t batch, StepKeys key, uint32_t* __restrict__ keys,
                    int32_t* __restrict__ positions, ErrorRecord* err) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= batch) return;
  const long long u = users[b], i = items[b];
  const scalar_t t = targets[b];
  const bool ok_u = u >= 0 && u < key.num_users;
  const bool ok_i = i >= 0 && i < key.num_items;
  const bool ok_t = isfinite(t);
  if (!ok_u) record_error(err, kOpTrainStep, kArgUsers, u, key.num_users, b);
  if (!ok_i) record_error(err, kOpTrainStep, kArgItems, i, key.num_items, b);
  if (!ok_t) {
    record_error(err, kOpTrainStep, kArgTargets, __double_as_longlong(static_cast<double>(t)), 0,
                 b);
  }
  const bool ok = ok_u && ok_i && ok_t;
  keys[b] = key.user(u, ok);
  keys[batch + b] = key.item(i, ok);
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
  block_loss_sums(loss_value, l2_value, a.lanes, a.block_sums);
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
  // The checks and messages of csrc/cpu/train_step.cpp.
  check_train_step_inputs(op, loss, optimizer, users, items, targets, user_factors,
                          item_factors, user_bias, item_bias);
  check_sort_key_limits(op, users, user_factors, item_factors);
  check_step_tables(op, optimizer, user_factors, item_factors, user_bias, item_bias,
                    user_factors_state, item_factors_state, user_bias_state, item_bias_state,
                    /*writes_user_bias=*/true, 2 * users.size(0), "twice the batch size");
  const bool has_bias = user_bias.has_value();
  const int64_t num_users = user_factors.size(0), num_items = item_factors.size(0);
  const StepKeys key{static_cast<uint32_t>(num_users), static_cast<uint32_t>(num_items)};

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
        key, key_ptr, positions.data_ptr<int32_t>(), err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const SortedRuns sorted = sort_runs(keys, positions, key.max_key());

    const StepTables<scalar_t> tab = step_tables<scalar_t>(
        optimizer, user_factors, item_factors, user_bias, item_bias, user_factors_state,
        item_factors_state, user_bias_state, item_bias_state);
    scalar_t* P = tab.user_factors;
    scalar_t* Q = tab.item_factors;

    // Forward: one group per sample; a fixed grid for a given batch, hence fixed sums.
    at::Tensor coef = at::empty({batch}, user_factors.options());
    at::Tensor item_grad_rows = at::empty({batch, dim}, user_factors.options());
    const ForwardGrid grid = forward_grid<scalar_t>(batch, dim, P, Q, user_factors.options());
    constexpr int kVec = 16 / sizeof(scalar_t);
    ForwardArgs<scalar_t> fa{key_ptr, static_cast<int32_t>(batch), num_users, dim, P, Q,
                             tab.user_bias, tab.item_bias,
                             t.data_ptr<scalar_t>(), static_cast<scalar_t>(global_mean),
                             static_cast<scalar_t>(1.0 / static_cast<double>(batch)),
                             static_cast<int>(loss), grid.lanes, coef.data_ptr<scalar_t>(),
                             item_grad_rows.data_ptr<scalar_t>(),
                             grid.block_sums.data_ptr<double>()};
    if (grid.packed) {
      train_forward_kernel<scalar_t, kVec>
          <<<static_cast<unsigned>(grid.blocks), kThreads, 0, stream>>>(fa);
    } else {
      train_forward_kernel<scalar_t, 1>
          <<<static_cast<unsigned>(grid.blocks), kThreads, 0, stream>>>(fa);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Packed state loads only for element-wise Adagrad (row-wise reads one value per row).
    const bool elementwise = optimizer == kAdagrad;

    // Users: gradient rows derived from Q (not yet updated).
    SegmentArgs<scalar_t> ua = table_segments<scalar_t>(
        sorted, 0, batch, 0, num_users, P, tab.user_factors_state, batch, dim, optimizer, lr,
        eps, reg);
    ua.bias = tab.user_bias;
    ua.bias_state = tab.user_bias_state;
    ua.coef = coef.data_ptr<scalar_t>();
    ua.other = Q;
    ua.other_keys = key_ptr + batch;
    ua.other_key_offset = key.item_offset();
    run_segment_update<scalar_t>(
        ua, packed_rows<scalar_t>(dim, {P, Q, elementwise ? ua.state : nullptr}),
        user_factors);

    // Items: the gradient rows written by the forward pass.
    SegmentArgs<scalar_t> ia = table_segments<scalar_t>(
        sorted, batch, batch, key.item_offset(), num_items, Q, tab.item_factors_state, batch,
        dim, optimizer, lr, eps, reg);
    ia.bias = tab.item_bias;
    ia.bias_state = tab.item_bias_state;
    ia.grad_rows = item_grad_rows.data_ptr<scalar_t>();
    ia.coef = has_bias ? coef.data_ptr<scalar_t>() : nullptr;
    run_segment_update<scalar_t>(
        ia, packed_rows<scalar_t>(dim, {Q, elementwise ? ia.state : nullptr}), item_factors);

    finish_loss<scalar_t>(grid.block_sums, grid.blocks, batch, reg, result);
  });
  return result;
}

}  // namespace
}  // namespace fastmf::cuda

TORCH_LIBRARY_IMPL(fastmf, CUDA, m) { m.impl("train_step", &fastmf::cuda::train_step_cuda); }
