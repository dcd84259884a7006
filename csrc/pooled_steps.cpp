// pooled_rank_steps: ranking steps of two-sided pooled embeddings (each user and each item
// the weighted sum of its feature rows, LightFM's model), one batch after another in one
// call. Its spec is fastmf/ops/reference/pooled.py: a loop that calls, per batch,
// sample_negatives, unique_bags (each side), embedding_bag_forward (each table), mf_forward,
// the loss and its gradient (a few ATen ops), mf_backward_dense and
// embedding_bag_backward_update_pair (each side). This file runs the same loop in C++: the
// same ops through the dispatcher, so the CPU and CUDA kernels of their families, in the
// same order on the same values, and so the same bits as the loop in Python. It is the
// one op of this extension that has no kernel of its own: registered for the CPU and (in a
// CUDA build) the CUDA dispatch keys from this one file, compiled once.
//
// Why it exists: a Hybrid BPR step at batch 4,096 on ml-latest-small took about 1.2 ms on two
// threads, of which about 0.8 ms were the kernels; the rest was Python: each op's wrapper,
// the small tensor ops between them, and per batch the data loop's slicing and draws (0.2
// ms a batch outside the step). Five epochs took 47-54 ms through this op against 70-76 ms
// batch by batch (benchmarks/README.md, "Hybrid's epoch in one call").
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "codes.h"

namespace fastmf {
namespace {

constexpr const char* kOp = "pooled_rank_steps";
// The caller the per-batch loop's draws name in their errors (NegativeSampler.sample_step).
constexpr const char* kSamplerOp = "NegativeSampler.sample_step";

using Bags5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

// The signatures of the ops the loop calls (their schemas in csrc/fastmf.cpp).
using SampleNegativesFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     int64_t, int64_t, int64_t, int64_t, c10::string_view);
using UniqueBagsFn = Bags5(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&);
using BagForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const OptTensor&, int64_t);
using MfForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const OptTensor&, const OptTensor&, double);
using MfBackwardDenseFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&);
using UpdatePairFn = void(const at::Tensor&, const OptTensor&, const OptTensor&,
                          const at::Tensor&, const at::Tensor&, const OptTensor&,
                          const OptTensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const OptTensor&, int64_t, int64_t, double, double,
                          double, double, double, int64_t, int64_t, int64_t, bool, int64_t,
                          int64_t, bool);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// The ops the loop calls, looked up once.
struct Ops {
  c10::TypedOperatorHandle<SampleNegativesFn> sample_negatives =
      op_handle<SampleNegativesFn>("fastmf::sample_negatives");
  c10::TypedOperatorHandle<UniqueBagsFn> unique_bags =
      op_handle<UniqueBagsFn>("fastmf::unique_bags");
  c10::TypedOperatorHandle<BagForwardFn> embedding_bag_forward =
      op_handle<BagForwardFn>("fastmf::embedding_bag_forward");
  c10::TypedOperatorHandle<MfForwardFn> mf_forward = op_handle<MfForwardFn>("fastmf::mf_forward");
  c10::TypedOperatorHandle<MfBackwardDenseFn> mf_backward_dense =
      op_handle<MfBackwardDenseFn>("fastmf::mf_backward_dense");
  c10::TypedOperatorHandle<UpdatePairFn> update_pair =
      op_handle<UpdatePairFn>("fastmf::embedding_bag_backward_update_pair");

  static const Ops& get() {
    static const Ops ops;
    return ops;
  }
};

// One side: a table (N, K) and its bias column (N, 1) with their states, the CSR bags of
// its rows, and the two tables' own (step, seed, stochastic rounding).
struct Side {
  at::Tensor table;
  OptTensor table_state1, table_state2;
  at::Tensor bias;
  OptTensor bias_state1, bias_state2;
  at::Tensor indptr, indices, weights;
  int64_t table_step, table_seed, bias_step, bias_seed;
  bool table_rounding, bias_rounding;
};

// The shared optimizer settings of the four tables.
struct Settings {
  int64_t optimizer;
  double lr, eps, beta1, beta2, weight_decay;
  int64_t weight_decay_mode;
};

// A side's distinct ids of one batch pooled once (the reference's _pooled_bags).
struct Pooled {
  at::Tensor inverse, indices, offsets, weights, vec, bias;
};

Pooled pool(const Ops& ops, const Side& side, const at::Tensor& ids) {
  auto [distinct, inverse, indices, offsets, weights] =
      ops.unique_bags.call(ids, side.indptr, side.indices, side.weights);
  (void)distinct;
  // The lookups' per-sample weights: in the table's dtype, then in the accumulation type
  // (what EmbeddingBag's forward hands the kernel).
  const at::ScalarType dtype = side.table.scalar_type();
  const at::ScalarType acc = at::toOpMathType(dtype);
  weights = weights.to(dtype).to(acc);
  const auto sum = static_cast<int64_t>(Pooling::kSum);
  at::Tensor vec = ops.embedding_bag_forward.call(side.table, indices, offsets, weights, sum);
  at::Tensor bias = ops.embedding_bag_forward.call(side.bias, indices, offsets, weights, sum);
  return {inverse, indices, offsets, weights, vec, bias.squeeze(1)};
}

// out[index[j]] += rows[j] in index order (the reference's add_rows): index_add_ on the
// CPU; on CUDA index_put_ with accumulate, which sorts the index and sums each row's terms
// in a fixed order, where index_add_ would add them with atomics in any order.
at::Tensor add_rows(at::Tensor out, const at::Tensor& index, const at::Tensor& rows) {
  if (out.device().is_cpu()) return out.index_add_(0, index, rows);
  return out.index_put_({index}, rows, true);
}

void update(const Ops& ops, const Side& side, const Pooled& pooled, const at::Tensor& grad_vec,
            const at::Tensor& grad_bias, const Settings& s, int64_t t) {
  ops.update_pair.call(side.table, side.table_state1, side.table_state2, grad_vec, side.bias,
                       side.bias_state1, side.bias_state2, grad_bias.unsqueeze(1),
                       pooled.indices, pooled.offsets, pooled.weights,
                       static_cast<int64_t>(Pooling::kSum), s.optimizer, s.lr, s.eps, s.beta1,
                       s.beta2, s.weight_decay, s.weight_decay_mode, side.table_step + t,
                       side.table_seed, side.table_rounding, side.bias_step + t,
                       side.bias_seed, side.bias_rounding);
}

// One batch: the reference's step (rank_forward, rank_backward, the two updates) with the
// upstream gradient 1 (rank_backward multiplies the coefficients by it: exact, left out).
at::Tensor rank_step(const Ops& ops, const Side& us, const Side& is, const at::Tensor& users,
                     const at::Tensor& items, const at::Tensor& negatives,
                     const at::Tensor& weights, bool bpr, double reg, const Settings& s,
                     int64_t t) {
  const int64_t size = users.size(0), n = negatives.size(1);
  const Pooled pu = pool(ops, us, users);
  const Pooled pi = pool(ops, is, at::cat({items, negatives.reshape(-1)}));
  const at::Tensor& p = pu.vec;
  const at::Tensor& q = pi.vec;
  const at::Tensor& bu = pu.bias;
  const at::Tensor& bi = pi.bias;
  // Every pair: the positives, then the negatives row by row (pi.inverse's layout).
  const at::Tensor at_user = at::cat({pu.inverse, pu.inverse.repeat_interleave(n)});
  const at::Tensor& at_item = pi.inverse;
  const at::Tensor scores = ops.mf_forward.call(at_user, at_item, p, q, bu, bi, 0.0);
  const at::Tensor pos = scores.slice(0, 0, size);
  const at::Tensor neg = scores.slice(0, size).view({size, n});
  const at::Tensor w = weights.defined() ? weights.to(pos.scalar_type()) : at::Tensor();
  at::Tensor value, c_pos, c_neg;
  if (bpr) {
    const at::Tensor diff = at::sub(neg, pos.unsqueeze(1));
    const int64_t pairs = std::max<int64_t>(diff.numel(), 1);
    at::Tensor terms = at::softplus(diff, 1, 20);
    if (w.defined()) terms = terms.mul(w.unsqueeze(1));
    value = terms.sum().div(pairs);
    c_neg = diff.sigmoid_();
    if (w.defined()) c_neg.mul_(w.unsqueeze(1));
    c_neg.div_(pairs);
    c_pos = c_neg.sum(1).neg_();
  } else {
    const int64_t pairs = std::max<int64_t>(size * (n + 1), 1);
    at::Tensor pos_terms = at::softplus(pos.neg(), 1, 20);
    if (w.defined()) pos_terms = pos_terms.mul(w);
    value = pos_terms.sum().add(at::softplus(neg, 1, 20).sum()).div(pairs);
    c_pos = at::sigmoid(pos.neg()).neg_();
    if (w.defined()) c_pos.mul_(w);
    c_pos.div_(pairs);
    c_neg = at::sigmoid(neg).div_(pairs);
  }
  at::Tensor user_count, item_count;
  if (reg != 0.0 && size > 0) {
    const double r = reg / static_cast<double>(size);
    user_count = at::bincount(pu.inverse, {}, p.size(0)).to(p.scalar_type());
    item_count = at::bincount(at_item, {}, q.size(0)).to(q.scalar_type());
    const at::Tensor penalty =
        user_count.mul(p.square().sum(1).add(bu.square())).sum().add(
            item_count.mul(q.square().sum(1).add(bi.square())).sum());
    value = value.add(penalty.mul(r));
    user_count.mul_(2 * reg / static_cast<double>(size));
    item_count.mul_(2 * reg / static_cast<double>(size));
  }
  const at::Tensor coef = at::cat({c_pos, c_neg.reshape(-1)});
  auto [grad_p, grad_q] = ops.mf_backward_dense.call(coef, at_user, at_item, p, q);
  // A user's bias takes each positive's terms summed first (see the reference).
  at::Tensor grad_bu = add_rows(at::zeros_like(bu), pu.inverse, c_pos.add(c_neg.sum(1)));
  at::Tensor grad_bi = add_rows(at::zeros_like(bi), at_item, coef);
  if (user_count.defined()) {
    grad_p.addcmul_(p, user_count.unsqueeze(1));
    grad_bu.addcmul_(bu, user_count);
    grad_q.addcmul_(q, item_count.unsqueeze(1));
    grad_bi.addcmul_(bi, item_count);
  }
  update(ops, us, pu, grad_p, grad_bu, s, t);
  update(ops, is, pi, grad_q, grad_bi, s, t);
  return value;
}

at::Tensor pooled_rank_steps(
    const at::Tensor& user_table, const OptTensor& user_table_state1,
    const OptTensor& user_table_state2, const at::Tensor& user_bias,
    const OptTensor& user_bias_state1, const OptTensor& user_bias_state2,
    const at::Tensor& item_table, const OptTensor& item_table_state1,
    const OptTensor& item_table_state2, const at::Tensor& item_bias,
    const OptTensor& item_bias_state1, const OptTensor& item_bias_state2,
    const at::Tensor& user_indptr, const at::Tensor& user_indices,
    const at::Tensor& user_weights, const at::Tensor& item_indptr,
    const at::Tensor& item_indices, const at::Tensor& item_weights, const at::Tensor& users_in,
    const at::Tensor& pos_items_in, const OptTensor& weights_in, const at::Tensor& pos_indptr,
    const at::Tensor& pos_indices, int64_t num_items, int64_t num_negatives, int64_t batch_size,
    int64_t seed, c10::string_view loss, double reg, int64_t optimizer, double lr, double eps,
    double beta1, double beta2, double weight_decay, int64_t weight_decay_mode,
    at::IntArrayRef steps, at::IntArrayRef seeds, at::IntArrayRef stochastic_rounding) {
  check_pooled_rank_steps(kOp, users_in, pos_items_in, weights_in, num_negatives, batch_size,
                          loss, reg, steps, seeds, stochastic_rounding);
  // The inner ops run below autograd, as from Python under no_grad: no graph, and no
  // autograd fallback on each call.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Ops& ops = Ops::get();
  const Side us{user_table,  user_table_state1, user_table_state2, user_bias,
                user_bias_state1, user_bias_state2, user_indptr, user_indices,
                user_weights, steps[0], seeds[0], steps[1], seeds[1],
                stochastic_rounding[0] != 0, stochastic_rounding[1] != 0};
  const Side is{item_table,  item_table_state1, item_table_state2, item_bias,
                item_bias_state1, item_bias_state2, item_indptr, item_indices,
                item_weights, steps[2], seeds[2], steps[3], seeds[3],
                stochastic_rounding[2] != 0, stochastic_rounding[3] != 0};
  const Settings s{optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode};
  const bool bpr = loss == c10::string_view("bpr");
  const at::Tensor users = users_in.to(at::kLong);
  const at::Tensor pos_items = pos_items_in.to(at::kLong);
  const at::Tensor weights = weights_in.has_value() ? *weights_in : at::Tensor();
  const int64_t n = users.size(0);
  std::vector<at::Tensor> losses;
  for (int64_t lo = 0, t = 0; lo < n; lo += batch_size, ++t) {
    const int64_t hi = std::min(n, lo + batch_size);
    const at::Tensor u = users.slice(0, lo, hi);
    const at::Tensor negatives = ops.sample_negatives.call(
        u, pos_indptr, pos_indices, num_items, num_negatives, seed, t, kSamplerOp);
    losses.push_back(rank_step(ops, us, is, u, pos_items.slice(0, lo, hi), negatives,
                               weights.defined() ? weights.slice(0, lo, hi) : at::Tensor(),
                               bpr, reg, s, t));
  }
  if (losses.empty()) {
    return at::empty({0}, user_table.options().dtype(at::toOpMathType(user_table.scalar_type())));
  }
  return at::stack(losses);
}

}  // namespace
}  // namespace fastmf

// The same function for both devices: the ops it calls dispatch on the tensors' device.
TORCH_LIBRARY_IMPL(fastmf, CPU, m) { m.impl("pooled_rank_steps", &fastmf::pooled_rank_steps); }
#ifdef FASTMF_WITH_CUDA
TORCH_LIBRARY_IMPL(fastmf, CUDA, m) { m.impl("pooled_rank_steps", &fastmf::pooled_rank_steps); }
#endif
