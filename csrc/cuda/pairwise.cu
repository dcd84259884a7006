// The pairwise family on the GPU: train_step_pairwise, the fused BPR step, through the
// pipeline of fused_step.cuh (csrc/cpu/pairwise.cpp on the CPU), and
// train_step_pairwise_sampled, which draws its negatives in one more kernel first
// (sampling.cuh). Each sample b is (u, i, j), with
//   x_b = b_i - b_j + <P[u], Q[i] - Q[j]>,   loss = mean_b softplus(-x_b) + reg term.
//
// The sort holds 3B keys: users in slots [0, B), then the item slots [B, 3B), positives
// (batch positions 0..B-1) before negatives (B..2B-1), the reference's torch.cat order.
// The radix sort is stable, so an item row that is a positive in some samples and a
// negative in others sums its positive gradients in batch order, then its negative ones,
// as the CPU kernel does, before its one update.
//
//   forward: per sample, x_b, the loss and g_b = dLoss/dx_b; the positive's gradient row
//            g_b * P[u] is written out (the negative's is that row negated: read as
//            such, not stored twice);
//   users:   each user row sums g_b * (Q[i_b] - Q[j_b]), read from Q before it is
//            updated; user_bias cancels in x, so it and its state are never written;
//   items:   each item row sums +-g_b * P_old[u_b] over its 2B-slot run, and its bias
//            +-g_b likewise.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

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

constexpr const char* kOp = "train_step_pairwise";
// F.softplus's default threshold, as in the CPU kernel: beyond it the reference's softplus
// is the identity and its gradient exactly 1.
constexpr double kSoftplusThreshold = 20.0;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    prepare_pairwise(IdArray users, IdArray pos_items, IdArray neg_items,
                     const scalar_t* __restrict__ weights, int32_t batch, StepKeys key,
                     uint32_t* __restrict__ keys, int32_t* __restrict__ positions,
                     ErrorRecord* err) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= batch) return;
  const long long u = users[b], i = pos_items[b], j = neg_items[b];
  const bool ok_u = u >= 0 && u < key.num_users;
  const bool ok_i = i >= 0 && i < key.num_items;
  const bool ok_j = j >= 0 && j < key.num_items;
  if (!ok_u) record_error(err, kOpTrainStepPairwise, kArgUsers, u, key.num_users, b);
  // The positives are "items" in the messages, as in the CPU kernel and fastmf/ops/checks.py.
  if (!ok_i) record_error(err, kOpTrainStepPairwise, kArgItems, i, key.num_items, b);
  if (!ok_j) record_error(err, kOpTrainStepPairwise, kArgNegItems, j, key.num_items, b);
  const bool ok_w = weight_ok(weights, b, err, kOpTrainStepPairwise);
  const bool ok = ok_u && ok_i && ok_j && ok_w;
  keys[b] = key.user(u, ok);
  keys[batch + b] = key.item(i, ok);
  keys[2 * static_cast<int64_t>(batch) + b] = key.item(j, ok);
  positions[b] = static_cast<int32_t>(b);
  positions[batch + b] = static_cast<int32_t>(b);
  positions[2 * static_cast<int64_t>(batch) + b] = static_cast<int32_t>(batch + b);
}

template <typename scalar_t>
struct PairwiseForwardArgs {
  const uint32_t* keys;  // (3B,) unsorted keys from prepare_pairwise
  int32_t batch;
  int64_t num_users;
  int64_t dim;
  const scalar_t* user_factors;
  const scalar_t* item_factors;
  const scalar_t* item_bias;  // null without biases
  const scalar_t* weights;    // (B,) or null (every weight 1)
  scalar_t scale;             // 1/B
  int lanes;
  scalar_t* coef;       // (B,) dLoss/dx
  scalar_t* grad_rows;  // (B, dim) coef[b] * P[u_b]: the positive item's gradient row
  double* block_sums;   // (blocks, 2): loss sum, L2 sum
};

// The pairwise loss of x and its gradient in x times scale, as the CPU kernel (PairLoss in
// csrc/cpu/pairwise.cpp) computes them. BPR: softplus(-x), as F.softplus with its autograd
// formula: the value in double, the gradient in the weights' type as -(scale * e) / (e + 1),
// e = exp(-x). Hinge: relu(1 - x), gradient -scale where 1 - x > 0, else 0.
template <PairwiseLoss kLoss, typename scalar_t>
__device__ __forceinline__ void pair_loss(scalar_t x, scalar_t scale, scalar_t& grad,
                                          double& value) {
  if constexpr (kLoss == PairwiseLoss::kHinge) {
    const scalar_t margin = scalar_t(1) - x;
    const bool active = margin > scalar_t(0);
    value = active ? static_cast<double>(margin) : 0.0;
    grad = active ? -scale : scalar_t(0);
    return;
  } else {
    static_assert(kLoss == PairwiseLoss::kBpr, "a new PairwiseLoss needs its formula here");
    const scalar_t z = -x;
    if (static_cast<double>(z) > kSoftplusThreshold) {
      value = static_cast<double>(z);
      grad = -scale;
      return;
    }
    value = log1p(exp(static_cast<double>(z)));
    const scalar_t e = exp(z);
    grad = -((scale * e) / (e + scalar_t(1)));
  }
}

template <typename scalar_t, int V, PairwiseLoss kLoss>
__global__ void __launch_bounds__(kThreads)
    pairwise_forward_kernel(const PairwiseForwardArgs<scalar_t> a) {
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
      const int64_t item_offset = a.num_users + 1;
      const int64_t u = user_key;
      const int64_t i = static_cast<int64_t>(a.keys[a.batch + b]) - item_offset;
      const int64_t j = static_cast<int64_t>(a.keys[2 * static_cast<int64_t>(a.batch) + b]) -
                        item_offset;
      const scalar_t* p = a.user_factors + u * a.dim;
      const scalar_t* qi = a.item_factors + i * a.dim;
      const scalar_t* qj = a.item_factors + j * a.dim;
      scalar_t dot = 0, norms = 0;
      for (int64_t e = static_cast<int64_t>(g.lane) * V; e < a.dim; e += step) {
        const Pack<scalar_t, V> pp = load_pack<scalar_t, V>(p + e);
        const Pack<scalar_t, V> xi = load_pack<scalar_t, V>(qi + e);
        const Pack<scalar_t, V> xj = load_pack<scalar_t, V>(qj + e);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          // The reference's association: <p, qi - qj>.
          dot += pp.v[v] * (xi.v[v] - xj.v[v]);
          norms += pp.v[v] * pp.v[v] + xi.v[v] * xi.v[v] + xj.v[v] * xj.v[v];
        }
      }
      dot = group_sum(g, dot);
      norms = group_sum(g, norms);
      scalar_t x = dot;
      if (a.item_bias != nullptr) {
        const scalar_t bi = a.item_bias[i], bj = a.item_bias[j];
        x = (x + bi) - bj;
        norms = norms + bi * bi + bj * bj;
      }
      scalar_t grad;
      pair_loss<kLoss>(x, a.scale, grad, loss_value);
      weigh(a.weights, b, grad, loss_value);
      l2_value = static_cast<double>(norms);
      if (g.lane == 0) a.coef[b] = grad;
      store_scaled_row<scalar_t, V>(g, a.grad_rows + b * a.dim, p, grad, a.dim);
    }
  }
  block_loss_sums(loss_value, l2_value, a.lanes, a.block_sums);
}

// After the shared checks of the op boundary (csrc/ops.h).
at::Tensor train_step_pairwise(const StepTables& tables, const StepTables& states,
                               const PairwiseBatch& in, const OptimizerArgs& opt) {
  const at::Tensor& user_factors = tables.user_factors;
  const at::Tensor& item_factors = tables.item_factors;
  const int64_t batch = in.users.size(0), dim = user_factors.size(1);
  check_step_layout(kOp, tables, states, opt, /*writes_user_bias=*/false, batch, 3 * batch,
                    "three times the batch size");
  const int64_t num_users = user_factors.size(0), num_items = item_factors.size(0);
  const StepKeys key{static_cast<uint32_t>(num_users), static_cast<uint32_t>(num_items)};

  c10::cuda::CUDAGuard guard(user_factors.device());
  if (batch == 0) return at::zeros({}, user_factors.options());
  const at::Tensor u_ids = in.users.contiguous();
  const at::Tensor i_ids = in.pos_items.contiguous(), j_ids = in.neg_items.contiguous();
  const at::Tensor w = in.weights.defined() ? in.weights.contiguous() : at::Tensor();
  cudaStream_t stream = current_stream();
  ErrorRecord* err = error_record();

  const StepKeyBuffers buffers = step_key_buffers(3 * batch, user_factors.options());
  uint32_t* key_ptr = buffers.key_ptr;
  AT_DISPATCH_FLOATING_TYPES(user_factors.scalar_type(), "fastmf.train_step_pairwise", [&] {
    prepare_pairwise<scalar_t>
        <<<static_cast<unsigned>(ceil_div(batch, kThreads)), kThreads, 0, stream>>>(
            id_array(u_ids), id_array(i_ids), id_array(j_ids), weights_ptr<scalar_t>(w),
            static_cast<int32_t>(batch), key, key_ptr, buffers.positions.data_ptr<int32_t>(),
            err);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const SortedRuns sorted = sort_runs(buffers.keys, buffers.positions, key.max_key());
  at::Tensor result = at::empty({}, user_factors.options());

  AT_DISPATCH_FLOATING_TYPES(user_factors.scalar_type(), "fastmf.train_step_pairwise", [&] {
    const auto tab = TablePointers<scalar_t>::of(tables, states, opt.optimizer);
    scalar_t* P = tab.user_factors;
    scalar_t* Q = tab.item_factors;

    // Forward: one group per sample; a fixed grid for a given batch, hence fixed sums.
    at::Tensor coef = at::empty({batch}, user_factors.options());
    at::Tensor grad_rows = at::empty({batch, dim}, user_factors.options());
    const ForwardGrid grid = forward_grid<scalar_t>(batch, dim, P, Q, user_factors.options());
    constexpr int kVec = 16 / sizeof(scalar_t);
    const PairwiseForwardArgs<scalar_t> fa{
        key_ptr, static_cast<int32_t>(batch), num_users, dim, P, Q, tab.item_bias,
        weights_ptr<scalar_t>(w), static_cast<scalar_t>(1.0 / static_cast<double>(batch)),
        grid.lanes,
        coef.data_ptr<scalar_t>(), grad_rows.data_ptr<scalar_t>(),
        grid.block_sums.data_ptr<double>()};
    dispatch_code(in.loss, [&](auto loss) {
      constexpr PairwiseLoss kLoss = decltype(loss)::value;
      if (grid.packed) {
        pairwise_forward_kernel<scalar_t, kVec, kLoss>
            <<<static_cast<unsigned>(grid.blocks), kThreads, 0, stream>>>(fa);
      } else {
        pairwise_forward_kernel<scalar_t, 1, kLoss>
            <<<static_cast<unsigned>(grid.blocks), kThreads, 0, stream>>>(fa);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Users: g_b * (Q[i_b] - Q[j_b]); no bias (it cancels in x_uij).
    update_user_rows<scalar_t>(sorted, key, key_ptr, tab, coef.data_ptr<scalar_t>(), batch, dim,
                               opt, in.reg, /*writes_user_bias=*/false, /*pairwise=*/true,
                               user_factors);
    // Items: 2B slots; a positive reads its gradient row, a negative (batch position
    // B + b) the row of sample b negated.
    update_item_rows<scalar_t>(sorted, 2 * batch, key, tab, grad_rows.data_ptr<scalar_t>(),
                               coef.data_ptr<scalar_t>(), /*negated_from=*/batch, batch, dim,
                               opt, in.reg, item_factors);

    finish_loss<scalar_t>(grid.block_sums, grid.blocks, batch, in.reg, result);
  });
  return result;
}

at::Tensor train_step_pairwise_sampled(const StepTables& tables, const StepTables& states,
                                       const SampledPairwiseBatch& in,
                                       const OptimizerArgs& opt) {
  const int64_t batch = in.users.size(0), k = in.num_negatives;
  c10::cuda::CUDAGuard guard(tables.user_factors.device());
  const at::TensorOptions ids = in.users.options().dtype(at::kLong);
  at::Tensor users_rep = at::empty({batch * k}, ids);
  at::Tensor pos_rep = at::empty({batch * k}, ids);
  at::Tensor neg = at::empty({batch * k}, ids);
  // Each positive's weight serves its K pairs.
  at::Tensor weights;
  if (in.weights.defined()) {
    const at::Tensor w = in.weights.contiguous();
    launch_check_weights(w, kOpTrainStepPairwiseSampled);
    weights = w.repeat_interleave(k);
  }
  if (batch > 0) {
    const at::Tensor u_ids = in.users.contiguous(), i_ids = in.pos_items.contiguous();
    const at::Tensor indptr = in.pos_indptr.contiguous(), indices = in.pos_indices.contiguous();
    sample_pairs<<<static_cast<unsigned>(ceil_div(batch * k, kThreads)), kThreads, 0,
                   current_stream()>>>(
        id_array(u_ids), id_array(i_ids), id_array(indptr), id_array(indices),
        indices.size(0), tables.user_factors.size(0), tables.item_factors.size(0), batch, k,
        sampling::step_key(in.seed, in.step), users_rep.data_ptr<int64_t>(),
        pos_rep.data_ptr<int64_t>(), neg.data_ptr<int64_t>(), error_record(),
        kOpTrainStepPairwiseSampled);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const PairwiseBatch pairs{users_rep, pos_rep, neg, in.loss, in.reg, weights};
  return train_step_pairwise(tables, states, pairs, opt);
}

// train_steps_pairwise_sampled: the sampled step above on each run of batch_size
// positives in turn, from one host loop (fused_step.cuh steps_in_turn).
at::Tensor train_steps_pairwise_sampled(const StepTables& tables, const StepTables& states,
                                        const SampledPairwiseBatch& in, int64_t batch_size,
                                        const OptimizerArgs& opt) {
  c10::cuda::CUDAGuard guard(tables.user_factors.device());
  return steps_in_turn("train_steps_pairwise_sampled", tables, states, in, batch_size, opt, train_step_pairwise_sampled);
}

}  // namespace
}  // namespace fastmf::cuda

TORCH_LIBRARY_IMPL(fastmf, CUDA, m) {
  m.impl("train_step_pairwise",
         &fastmf::train_step_pairwise_op<fastmf::cuda::train_step_pairwise>);
  m.impl("train_step_pairwise_sampled",
         &fastmf::train_step_pairwise_sampled_op<fastmf::cuda::train_step_pairwise_sampled>);
  m.impl("train_steps_pairwise_sampled",
         &fastmf::train_steps_pairwise_sampled_op<fastmf::cuda::train_steps_pairwise_sampled>);
}
