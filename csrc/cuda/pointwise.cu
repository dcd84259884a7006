// The pointwise family on the GPU: mf_forward, mf_backward (and mf_backward_dense: its rows
// summed by scatter_rows), sparse_adagrad_update,
// sparse_sgd_update, the fused train_step and train_step_sampled (train_step on the
// positives and the negatives one more kernel draws first, sampling.cuh).
// csrc/cpu/pointwise.cpp is the same family on the CPU, with the same checks
// (csrc/checks.h) and messages.
//
// mf_forward and mf_backward: one group of lanes per sample (see common.cuh), so a warp
// serves 32/L samples at small K and every load is a full 16-byte pack when the rows are
// aligned. Both are pure gathers: the row reads dominate, nothing is reused.
//
// The sparse updates sort the ids, sum each row's gradient rows and update each row once
// (segment_update.cuh). Bad ids are left out of the update and recorded on the device
// (errors.cu).
//
// train_step: forward, loss gradient, backward and sparse optimizer update of a batch,
// through the pipeline of fused_step.cuh. The B user keys fill slots [0, B) of the one
// sort, the B item keys [B, 2B). The forward pass writes the item-side gradient rows
// g_b * P[u_b]; the user rows derive theirs, g_b * Q[i_b], from Q before it is updated.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "../args.h"
#include "../checks.h"
#include "../codes.h"
#include "../ops.h"
#include "common.cuh"
#include "fused_step.cuh"
#include "sampling.cuh"
#include "segment_update.cuh"
#include "segments.cuh"

namespace fastmf::cuda {
namespace {

// ---------------------------------------------------------------------------------------
// mf_forward, mf_backward

// Reads both ids of sample b and checks them against the tables; records (once per
// sample) and returns false for a bad one so no row is read through it.
__device__ __forceinline__ bool load_pair(const IdArray& users, const IdArray& items,
                                          long long b, long long num_users, long long num_items,
                                          int op, ErrorRecord* err, const Group& g,
                                          long long& u, long long& i) {
  u = users[b];
  i = items[b];
  const bool ok_u = u >= 0 && u < num_users;
  const bool ok_i = i >= 0 && i < num_items;
  if (g.lane == 0) {
    if (!ok_u) record_error(err, op, kArgUsers, u, num_users, b);
    if (!ok_i) record_error(err, op, kArgItems, i, num_items, b);
  }
  return ok_u && ok_i;
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    mf_forward_kernel(IdArray users, IdArray items, const scalar_t* __restrict__ user_factors,
                      const scalar_t* __restrict__ item_factors,
                      const scalar_t* __restrict__ user_bias,
                      const scalar_t* __restrict__ item_bias, scalar_t global_mean,
                      long long batch, long long num_users, long long num_items, long long dim,
                      int lanes, scalar_t* __restrict__ out, ErrorRecord* err) {
  const Group g = make_group(lanes);
  const long long b =
      static_cast<long long>(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  if (b >= batch) return;  // uniform over the group
  long long u, i;
  if (!load_pair(users, items, b, num_users, num_items, kOpMfForward, err, g, u, i)) {
    if (g.lane == 0) out[b] = std::numeric_limits<scalar_t>::quiet_NaN();
    return;
  }
  const scalar_t* p = user_factors + u * dim;
  const scalar_t* q = item_factors + i * dim;
  scalar_t dot = 0;
  for (long long e = static_cast<long long>(g.lane) * V; e < dim; e += static_cast<long long>(lanes) * V) {
    const Pack<scalar_t, V> pp = load_pack<scalar_t, V>(p + e);
    const Pack<scalar_t, V> qq = load_pack<scalar_t, V>(q + e);
#pragma unroll
    for (int v = 0; v < V; ++v) dot += pp.v[v] * qq.v[v];
  }
  dot = group_sum(g, dot);
  if (g.lane == 0) {
    scalar_t pred = dot + global_mean;
    if (user_bias != nullptr) pred = pred + user_bias[u] + item_bias[i];
    out[b] = pred;
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    mf_backward_kernel(const scalar_t* __restrict__ grad_out, IdArray users, IdArray items,
                       const scalar_t* __restrict__ user_factors,
                       const scalar_t* __restrict__ item_factors, long long batch,
                       long long num_users, long long num_items, long long dim, int lanes,
                       scalar_t* __restrict__ grad_user_rows,
                       scalar_t* __restrict__ grad_item_rows, ErrorRecord* err) {
  const Group g = make_group(lanes);
  const long long b =
      static_cast<long long>(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  if (b >= batch) return;
  long long u, i;
  const bool ok = load_pair(users, items, b, num_users, num_items, kOpMfBackward, err, g, u, i);
  const scalar_t go = grad_out[b];
  scalar_t* gp = grad_user_rows + b * dim;
  scalar_t* gq = grad_item_rows + b * dim;
  for (long long e = static_cast<long long>(g.lane) * V; e < dim; e += static_cast<long long>(lanes) * V) {
    Pack<scalar_t, V> rp = zero_pack<scalar_t, V>(), rq = zero_pack<scalar_t, V>();
    if (ok) {
      const Pack<scalar_t, V> pp = load_pack<scalar_t, V>(user_factors + u * dim + e);
      const Pack<scalar_t, V> qq = load_pack<scalar_t, V>(item_factors + i * dim + e);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        rp.v[v] = go * qq.v[v];
        rq.v[v] = go * pp.v[v];
      }
    }
    store_pack<scalar_t, V>(gp + e, rp);
    store_pack<scalar_t, V>(gq + e, rq);
  }
}

at::Tensor mf_forward(const at::Tensor& users, const at::Tensor& items,
                           const at::Tensor& user_factors, const at::Tensor& item_factors,
                           const std::optional<at::Tensor>& user_bias,
                           const std::optional<at::Tensor>& item_bias, double global_mean) {
  constexpr const char* op = "mf_forward";
  check_mf_tables(op, users, items, user_factors, item_factors, user_bias, item_bias);
  c10::cuda::CUDAGuard guard(user_factors.device());
  const int64_t batch = users.size(0), dim = user_factors.size(1);
  at::Tensor out = at::empty({batch}, user_factors.options());
  if (batch == 0) return out;
  const at::Tensor u = users.contiguous(), i = items.contiguous();
  const at::Tensor p = user_factors.contiguous(), q = item_factors.contiguous();
  at::Tensor bu, bi;
  if (user_bias.has_value()) {
    bu = user_bias->contiguous();
    bi = item_bias->contiguous();
  }
  ErrorRecord* err = error_record();
  cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "fastmf.mf_forward", [&] {
    const scalar_t* bu_ptr = bu.defined() ? bu.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bi_ptr = bi.defined() ? bi.data_ptr<scalar_t>() : nullptr;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool packed = packed_rows(dim, sizeof(scalar_t), {p.data_ptr(), q.data_ptr()});
    const RowLayout layout = row_layout(dim, packed ? kVec : 1);
    const int64_t per_block = kThreads / layout.lanes;
    const dim3 grid(static_cast<unsigned>(ceil_div(batch, per_block)));
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(
          id_array(u), id_array(i), p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), bu_ptr,
          bi_ptr, static_cast<scalar_t>(global_mean), batch, p.size(0), q.size(0), dim,
          layout.lanes, out.data_ptr<scalar_t>(), err);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) launch(mf_forward_kernel<scalar_t, kVec>);
    else launch(mf_forward_kernel<scalar_t, 1>);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mf_backward(const at::Tensor& grad_out,
                                               const at::Tensor& users,
                                               const at::Tensor& items,
                                               const at::Tensor& user_factors,
                                               const at::Tensor& item_factors) {
  constexpr const char* op = "mf_backward";
  check_mf_backward(op, grad_out, users, items, user_factors, item_factors);
  c10::cuda::CUDAGuard guard(user_factors.device());
  const int64_t batch = users.size(0), dim = user_factors.size(1);
  at::Tensor grad_p = at::empty({batch, dim}, user_factors.options());
  at::Tensor grad_q = at::empty({batch, dim}, user_factors.options());
  if (batch == 0 || dim == 0) return {grad_p, grad_q};
  const at::Tensor go = grad_out.contiguous();
  const at::Tensor u = users.contiguous(), i = items.contiguous();
  const at::Tensor p = user_factors.contiguous(), q = item_factors.contiguous();
  ErrorRecord* err = error_record();
  cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "fastmf.mf_backward", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool packed = packed_rows(
        dim, sizeof(scalar_t), {p.data_ptr(), q.data_ptr(), grad_p.data_ptr(), grad_q.data_ptr()});
    const RowLayout layout = row_layout(dim, packed ? kVec : 1);
    const int64_t per_block = kThreads / layout.lanes;
    const dim3 grid(static_cast<unsigned>(ceil_div(batch, per_block)));
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(
          go.data_ptr<scalar_t>(), id_array(u), id_array(i), p.data_ptr<scalar_t>(),
          q.data_ptr<scalar_t>(), batch, p.size(0), q.size(0), dim, layout.lanes,
          grad_p.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(), err);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) launch(mf_backward_kernel<scalar_t, kVec>);
    else launch(mf_backward_kernel<scalar_t, 1>);
  });
  return {grad_p, grad_q};
}

// mf_backward's rows summed by scatter_rows into the tables' gradients: each side's rows
// grouped by id and summed in index order, with scatter_rows' one difference from the CPU
// (a row hit more than kHotChunk times is summed chunk by chunk, so its last bits may
// differ). A bad id is recorded under mf_backward's name, as in that op.
std::tuple<at::Tensor, at::Tensor> mf_backward_dense(const at::Tensor& grad_out,
                                                     const at::Tensor& users,
                                                     const at::Tensor& items,
                                                     const at::Tensor& user_factors,
                                                     const at::Tensor& item_factors) {
  constexpr const char* op = "mf_backward_dense";
  check_mf_backward(op, grad_out, users, items, user_factors, item_factors);
  const auto rows = mf_backward(grad_out, users, items, user_factors, item_factors);
  return {scatter_rows_for(users, std::get<0>(rows), user_factors.size(0)),
          scatter_rows_for(items, std::get<1>(rows), item_factors.size(0))};
}

// ---------------------------------------------------------------------------------------
// sparse_adagrad_update, sparse_sgd_update

// Sort keys: the id, or num_rows (past every row) for a bad id.
__global__ void __launch_bounds__(kThreads)
    prepare_ids(IdArray ids, int32_t n, int64_t num_rows, int op, uint32_t* __restrict__ keys,
                int32_t* __restrict__ positions, ErrorRecord* err) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= n) return;
  const long long id = ids[b];
  const bool ok = id >= 0 && id < num_rows;
  if (!ok) record_error(err, op, kArgIds, id, num_rows, b);
  keys[b] = ok ? static_cast<uint32_t>(id) : static_cast<uint32_t>(num_rows);
  positions[b] = static_cast<int32_t>(b);
}

// Whether the update moves 16-byte packs: the weight, the gradient rows and an element-wise
// state all aligned, and the width a multiple of 16 bytes.
bool update_packed(const at::Tensor& weight, const std::optional<at::Tensor>& state,
                   const at::Tensor& grad_rows, Optimizer optimizer) {
  const int64_t dim = weight.dim() == 2 ? weight.size(1) : 1;
  const bool elementwise_state = optimizer == kAdagrad;
  return packed_rows(dim, weight.element_size(),
                     {weight.data_ptr(), grad_rows.data_ptr(),
                      elementwise_state ? state->data_ptr() : nullptr});
}

// What the CUDA update needs beyond the shared checks: contiguous tables (updated in
// place), 32-bit sort keys, and rows no wider than the kernels hold (checked before any
// launch; grad_rows as the kernel will read it, contiguous).
void check_update_layout(const char* op, const at::Tensor& weight,
                         const std::optional<at::Tensor>& state, const at::Tensor& ids,
                         const at::Tensor& grad_rows, Optimizer optimizer) {
  check_contiguous(op, "weight", weight);
  if (state.has_value()) check_contiguous(op, "state", *state);
  check_fits_32bit(op, "weight row count", weight.size(0));
  check_fits_32bit(op, "batch size", ids.size(0));
  if (ids.size(0) == 0) return;
  const int64_t dim = weight.dim() == 2 ? weight.size(1) : 1;
  check_update_width(op, "weight", dim, weight.element_size(),
                     update_packed(weight, state, grad_rows, optimizer));
}

void run_update(const char* op, int op_code, const at::Tensor& weight,
                const std::optional<at::Tensor>& state, const at::Tensor& ids,
                const at::Tensor& grad_rows, Optimizer optimizer, double lr, double eps) {
  const at::Tensor grads = grad_rows.contiguous();
  check_update_layout(op, weight, state, ids, grads, optimizer);
  const int64_t n = ids.size(0);
  if (n == 0) return;
  const int64_t num_rows = weight.size(0);
  const int64_t dim = weight.dim() == 2 ? weight.size(1) : 1;
  const at::Tensor id_tensor = ids.contiguous();
  at::Tensor keys = at::empty({n}, weight.options().dtype(at::kInt));
  at::Tensor positions = at::empty({n}, weight.options().dtype(at::kInt));
  cudaStream_t stream = current_stream();
  prepare_ids<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      id_array(id_tensor), static_cast<int32_t>(n), num_rows, op_code,
      reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()), positions.data_ptr<int32_t>(),
      error_record());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const SortedRuns sorted = sort_runs(keys, positions, static_cast<uint64_t>(num_rows));
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "fastmf.sparse_update", [&] {
    SegmentArgs<scalar_t> a;
    a.keys = reinterpret_cast<const uint32_t*>(sorted.keys.data_ptr<int32_t>());
    a.positions = sorted.positions.data_ptr<int32_t>();
    a.run_start = sorted.run_start.data_ptr<int32_t>();
    a.n = static_cast<int32_t>(n);
    a.num_rows = num_rows;
    a.dim = dim;
    a.weight = weight.data_ptr<scalar_t>();
    a.state = state.has_value() ? state->data_ptr<scalar_t>() : nullptr;
    a.grad_rows = grads.data_ptr<scalar_t>();
    a.optimizer = optimizer;
    a.lr = static_cast<scalar_t>(lr);
    a.eps = static_cast<scalar_t>(eps);
    run_segment_update<scalar_t>(a, update_packed(weight, state, grads, optimizer), weight);
  });
}

// The C++ signatures must equal the CPU kernels' (const references), or the dispatcher
// refuses to register both for one op.
void sparse_adagrad_update(const at::Tensor& weight, const at::Tensor& state,
                           const at::Tensor& ids, const at::Tensor& grad_rows, double lr,
                           double eps, bool rowwise) {
  constexpr const char* op = "sparse_adagrad_update";
  check_sparse_update(op, weight, &state, ids, grad_rows, rowwise, lr, eps);
  c10::cuda::CUDAGuard guard(weight.device());
  // A 1-D table has one value per row, so row-wise and element-wise Adagrad coincide.
  const bool rowwise_2d = rowwise && weight.dim() == 2;
  run_update(op, kOpSparseAdagrad, weight, state, ids, grad_rows,
             rowwise_2d ? kRowwiseAdagrad : kAdagrad, lr, eps);
}

void sparse_sgd_update(const at::Tensor& weight, const at::Tensor& ids,
                       const at::Tensor& grad_rows, double lr) {
  constexpr const char* op = "sparse_sgd_update";
  check_sparse_update(op, weight, nullptr, ids, grad_rows, false, lr, 0.0);
  c10::cuda::CUDAGuard guard(weight.device());
  run_update(op, kOpSparseSgd, weight, std::nullopt, ids, grad_rows, kSgd, lr, 0.0);
}

// ---------------------------------------------------------------------------------------
// train_step

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    prepare_samples(IdArray users, IdArray items, const scalar_t* __restrict__ targets,
                    const scalar_t* __restrict__ weights, int32_t batch, StepKeys key,
                    uint32_t* __restrict__ keys, int32_t* __restrict__ positions,
                    ErrorRecord* err) {
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
  const bool ok_w = weight_ok(weights, b, err, kOpTrainStep);
  const bool ok = ok_u && ok_i && ok_t && ok_w;
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
  const scalar_t* weights;  // (B,) or null (every weight 1)
  scalar_t global_mean;
  scalar_t scale;  // 1/B
  int lanes;
  scalar_t* coef;            // (B,) dLoss/dpred
  scalar_t* item_grad_rows;  // (B, dim) coef[b] * P[u_b]
  double* block_sums;        // (blocks, 2): loss sum, L2 sum
};

// Formulas as in the CPU kernels (PointwiseLoss in csrc/cpu/pointwise.cpp), so both
// backends agree to rounding: the loss value in double, the gradient in the weights' type
// with scale = 1/B.
template <Loss kLoss, typename scalar_t>
__device__ __forceinline__ void pointwise_loss(scalar_t pred, scalar_t target, scalar_t scale,
                                               scalar_t& grad, double& value) {
  const scalar_t diff = pred - target;
  if constexpr (kLoss == Loss::kMse) {
    grad = (scalar_t(2) * scale) * diff;
    value = static_cast<double>(diff) * static_cast<double>(diff);
  } else if constexpr (kLoss == Loss::kHuber) {
    const double d = static_cast<double>(diff);
    const double a = fabs(d);
    value = a < kHuberDelta ? 0.5 * d * d : kHuberDelta * (a - 0.5 * kHuberDelta);
    const scalar_t delta = static_cast<scalar_t>(kHuberDelta);
    grad = diff <= -delta ? -(scale * delta) : (diff >= delta ? scale * delta : scale * diff);
  } else {
    static_assert(kLoss == Loss::kBce, "a new Loss needs its formula here");
    const double x = static_cast<double>(pred);
    const double t = static_cast<double>(target);
    value = fmax(x, 0.0) - x * t + log1p(exp(-fabs(x)));
    const scalar_t sigmoid = scalar_t(1) / (scalar_t(1) + exp(-pred));
    grad = (sigmoid - target) * scale;
  }
}

template <typename scalar_t, int V, Loss kLoss>
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
      pointwise_loss<kLoss>(pred, a.targets[b], a.scale, grad, loss_value);
      weigh(a.weights, b, grad, loss_value);
      l2_value = static_cast<double>(norms);
      if (g.lane == 0) a.coef[b] = grad;
      store_scaled_row<scalar_t, V>(g, a.item_grad_rows + b * a.dim, p, grad, a.dim);
    }
  }
  block_loss_sums(loss_value, l2_value, a.lanes, a.block_sums);
}

// After the shared checks of the op boundary (csrc/ops.h).
at::Tensor train_step(const StepTables& tables, const StepTables& states,
                      const PointwiseBatch& in, const OptimizerArgs& opt) {
  constexpr const char* op = "train_step";
  const at::Tensor& user_factors = tables.user_factors;
  const at::Tensor& item_factors = tables.item_factors;
  const int64_t batch = in.users.size(0), dim = user_factors.size(1);
  check_step_layout(op, tables, states, opt, /*writes_user_bias=*/true, batch, 2 * batch,
                    "twice the batch size");
  const int64_t num_users = user_factors.size(0), num_items = item_factors.size(0);
  const StepKeys key{static_cast<uint32_t>(num_users), static_cast<uint32_t>(num_items)};

  c10::cuda::CUDAGuard guard(user_factors.device());
  if (batch == 0) return at::zeros({}, user_factors.options());
  const at::Tensor u_ids = in.users.contiguous(), i_ids = in.items.contiguous();
  const at::Tensor t = in.targets.contiguous();
  const at::Tensor w = in.weights.defined() ? in.weights.contiguous() : at::Tensor();
  cudaStream_t stream = current_stream();
  ErrorRecord* err = error_record();

  const StepKeyBuffers buffers = step_key_buffers(2 * batch, user_factors.options());
  uint32_t* key_ptr = buffers.key_ptr;
  at::Tensor result = at::empty({}, user_factors.options());

  AT_DISPATCH_FLOATING_TYPES(user_factors.scalar_type(), "fastmf.train_step", [&] {
    const unsigned sample_blocks = static_cast<unsigned>(ceil_div(batch, kThreads));
    prepare_samples<scalar_t><<<sample_blocks, kThreads, 0, stream>>>(
        id_array(u_ids), id_array(i_ids), t.data_ptr<scalar_t>(), weights_ptr<scalar_t>(w),
        static_cast<int32_t>(batch), key, key_ptr, buffers.positions.data_ptr<int32_t>(), err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const SortedRuns sorted = sort_runs(buffers.keys, buffers.positions, key.max_key());

    const auto tab = TablePointers<scalar_t>::of(tables, states, opt.optimizer);
    scalar_t* P = tab.user_factors;
    scalar_t* Q = tab.item_factors;

    // Forward: one group per sample; a fixed grid for a given batch, hence fixed sums.
    at::Tensor coef = at::empty({batch}, user_factors.options());
    at::Tensor item_grad_rows = at::empty({batch, dim}, user_factors.options());
    const ForwardGrid grid = forward_grid<scalar_t>(batch, dim, P, Q, user_factors.options());
    constexpr int kVec = 16 / sizeof(scalar_t);
    ForwardArgs<scalar_t> fa{key_ptr, static_cast<int32_t>(batch), num_users, dim, P, Q,
                             tab.user_bias, tab.item_bias,
                             t.data_ptr<scalar_t>(), weights_ptr<scalar_t>(w),
                             static_cast<scalar_t>(in.global_mean),
                             static_cast<scalar_t>(1.0 / static_cast<double>(batch)),
                             grid.lanes, coef.data_ptr<scalar_t>(),
                             item_grad_rows.data_ptr<scalar_t>(),
                             grid.block_sums.data_ptr<double>()};
    const unsigned blocks = static_cast<unsigned>(grid.blocks);
    dispatch_code(in.loss, [&](auto loss) {
      constexpr Loss kLoss = decltype(loss)::value;
      if (grid.packed) {
        train_forward_kernel<scalar_t, kVec, kLoss><<<blocks, kThreads, 0, stream>>>(fa);
      } else {
        train_forward_kernel<scalar_t, 1, kLoss><<<blocks, kThreads, 0, stream>>>(fa);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    update_user_rows<scalar_t>(sorted, key, key_ptr, tab, coef.data_ptr<scalar_t>(), batch, dim,
                               opt, in.reg, /*writes_user_bias=*/true, /*pairwise=*/false,
                               user_factors);
    update_item_rows<scalar_t>(sorted, batch, key, tab, item_grad_rows.data_ptr<scalar_t>(),
                               coef.data_ptr<scalar_t>(), /*negated_from=*/batch, batch, dim,
                               opt, in.reg, item_factors);

    finish_loss<scalar_t>(grid.block_sums, grid.blocks, batch, in.reg, result);
  });
  return result;
}

// train_step_sampled: rows [0, B) are the positives, rows B + b * K + k their negatives
// (the reference's torch.cat order), drawn by sample_pairs (sampling.cuh); then train_step
// on those rows against targets 1 and 0. A bad id or row is recorded by sample_pairs under
// this op before train_step's own record of it, which is dropped.
at::Tensor train_step_sampled(const StepTables& tables, const StepTables& states,
                              const SampledPointwiseBatch& in, const OptimizerArgs& opt) {
  const int64_t batch = in.users.size(0), k = in.num_negatives, rows = batch * (1 + k);
  c10::cuda::CUDAGuard guard(tables.user_factors.device());
  const at::TensorOptions ids = in.users.options().dtype(at::kLong);
  at::Tensor users = at::empty({rows}, ids);
  at::Tensor items = at::empty({rows}, ids);
  at::Tensor targets = at::zeros({rows}, tables.user_factors.options());
  // The positives' weights, then 1 for each negative's row.
  at::Tensor weights;
  if (in.weights.defined()) {
    const at::Tensor w = in.weights.contiguous();
    launch_check_weights(w, kOpTrainStepSampled);
    weights = at::cat({w, at::ones({batch * k}, w.options())});
  }
  if (batch > 0) {
    const at::Tensor u_ids = in.users.contiguous(), i_ids = in.pos_items.contiguous();
    users.narrow(0, 0, batch).copy_(u_ids);
    items.narrow(0, 0, batch).copy_(i_ids);
    targets.narrow(0, 0, batch).fill_(1);
    const at::Tensor indptr = in.pos_indptr.contiguous(), indices = in.pos_indices.contiguous();
    sample_pairs<<<static_cast<unsigned>(ceil_div(batch * k, kThreads)), kThreads, 0,
                   current_stream()>>>(
        id_array(u_ids), id_array(i_ids), id_array(indptr), id_array(indices),
        indices.size(0), tables.user_factors.size(0), tables.item_factors.size(0), batch, k,
        sampling::step_key(in.seed, in.step), users.data_ptr<int64_t>() + batch, nullptr,
        items.data_ptr<int64_t>() + batch, error_record(), kOpTrainStepSampled);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const PointwiseBatch expanded{users, items, targets, in.global_mean, in.loss, in.reg,
                                weights};
  return train_step(tables, states, expanded, opt);
}

// train_steps_sampled: the sampled step above on each run of batch_size
// positives in turn, from one host loop (fused_step.cuh steps_in_turn).
at::Tensor train_steps_sampled(const StepTables& tables, const StepTables& states,
                               const SampledPointwiseBatch& in, int64_t batch_size,
                               const OptimizerArgs& opt) {
  c10::cuda::CUDAGuard guard(tables.user_factors.device());
  return steps_in_turn("train_steps_sampled", tables, states, in, batch_size, opt, train_step_sampled);
}

}  // namespace
}  // namespace fastmf::cuda

TORCH_LIBRARY_IMPL(fastmf, CUDA, m) {
  m.impl("mf_forward", &fastmf::cuda::mf_forward);
  m.impl("mf_backward", &fastmf::cuda::mf_backward);
  m.impl("mf_backward_dense", &fastmf::cuda::mf_backward_dense);
  m.impl("sparse_adagrad_update", &fastmf::cuda::sparse_adagrad_update);
  m.impl("sparse_sgd_update", &fastmf::cuda::sparse_sgd_update);
  m.impl("train_step", &fastmf::train_step_op<fastmf::cuda::train_step>);
  m.impl("train_step_sampled", &fastmf::train_step_sampled_op<fastmf::cuda::train_step_sampled>);
  m.impl("train_steps_sampled",
         &fastmf::train_steps_sampled_op<fastmf::cuda::train_steps_sampled>);
}
