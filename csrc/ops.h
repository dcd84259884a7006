// The op boundary of the fused steps: the flat schema arguments (csrc/fastmf.cpp) become
// the bundles of csrc/args.h and pass the shared checks of csrc/checks.h here, once, for
// every backend. A backend writes its kernel against the bundles and registers it with
//   m.impl("train_step", &train_step_op<fastmf::cpu::train_step>);
// so the long flat signature exists in this file only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <string>

#include "args.h"
#include "checks.h"
#include "codes.h"

namespace fastmf {

using StepKernel = at::Tensor (*)(const StepTables& tables, const StepTables& states,
                                  const PointwiseBatch& batch, const OptimizerArgs& opt);
using PairwiseStepKernel = at::Tensor (*)(const StepTables& tables, const StepTables& states,
                                          const PairwiseBatch& batch, const OptimizerArgs& opt);

template <StepKernel kKernel>
at::Tensor train_step_op(const at::Tensor& user_factors, const at::Tensor& item_factors,
                         const std::optional<at::Tensor>& user_bias,
                         const std::optional<at::Tensor>& item_bias,
                         const std::optional<at::Tensor>& user_factors_state,
                         const std::optional<at::Tensor>& item_factors_state,
                         const std::optional<at::Tensor>& user_bias_state,
                         const std::optional<at::Tensor>& item_bias_state,
                         const at::Tensor& users, const at::Tensor& items,
                         const at::Tensor& targets, double global_mean, int64_t loss,
                         double reg, int64_t optimizer, double lr, double eps,
                         const std::optional<at::Tensor>& weights) {
  constexpr const char* op = "train_step";
  check_code<Loss>(op, loss);
  check_code<Optimizer>(op, optimizer);
  const StepTables tables = StepTables::of(user_factors, item_factors, user_bias, item_bias);
  const StepTables states = StepTables::of(user_factors_state, item_factors_state,
                                           user_bias_state, item_bias_state);
  const PointwiseBatch batch{users, items, targets, global_mean, static_cast<Loss>(loss), reg,
                             weights.value_or(at::Tensor())};
  const OptimizerArgs opt{static_cast<Optimizer>(optimizer), lr, eps};
  check_train_step(op, tables, states, batch, opt);
  return kKernel(tables, states, batch, opt);
}

template <PairwiseStepKernel kKernel>
at::Tensor train_step_pairwise_op(
    const at::Tensor& user_factors, const at::Tensor& item_factors,
    const std::optional<at::Tensor>& user_bias, const std::optional<at::Tensor>& item_bias,
    const std::optional<at::Tensor>& user_factors_state,
    const std::optional<at::Tensor>& item_factors_state,
    const std::optional<at::Tensor>& user_bias_state,
    const std::optional<at::Tensor>& item_bias_state, const at::Tensor& users,
    const at::Tensor& pos_items, const at::Tensor& neg_items, int64_t loss, double reg,
    int64_t optimizer, double lr, double eps, const std::optional<at::Tensor>& weights) {
  constexpr const char* op = "train_step_pairwise";
  check_code<PairwiseLoss>(op, loss);
  check_code<Optimizer>(op, optimizer);
  const StepTables tables = StepTables::of(user_factors, item_factors, user_bias, item_bias);
  const StepTables states = StepTables::of(user_factors_state, item_factors_state,
                                           user_bias_state, item_bias_state);
  const PairwiseBatch batch{users, pos_items, neg_items, static_cast<PairwiseLoss>(loss), reg,
                            weights.value_or(at::Tensor())};
  const OptimizerArgs opt{static_cast<Optimizer>(optimizer), lr, eps};
  check_train_step_pairwise(op, tables, states, batch, opt);
  return kKernel(tables, states, batch, opt);
}

using SampledPairwiseStepKernel = at::Tensor (*)(const StepTables& tables,
                                                 const StepTables& states,
                                                 const SampledPairwiseBatch& batch,
                                                 const OptimizerArgs& opt);

template <SampledPairwiseStepKernel kKernel>
at::Tensor train_step_pairwise_sampled_op(
    const at::Tensor& user_factors, const at::Tensor& item_factors,
    const std::optional<at::Tensor>& user_bias, const std::optional<at::Tensor>& item_bias,
    const std::optional<at::Tensor>& user_factors_state,
    const std::optional<at::Tensor>& item_factors_state,
    const std::optional<at::Tensor>& user_bias_state,
    const std::optional<at::Tensor>& item_bias_state, const at::Tensor& users,
    const at::Tensor& pos_items, const at::Tensor& pos_indptr, const at::Tensor& pos_indices,
    int64_t num_negatives, int64_t seed, int64_t step, int64_t loss, double reg,
    int64_t optimizer, double lr, double eps, const std::optional<at::Tensor>& weights) {
  constexpr const char* op = "train_step_pairwise_sampled";
  check_code<PairwiseLoss>(op, loss);
  check_code<Optimizer>(op, optimizer);
  const StepTables tables = StepTables::of(user_factors, item_factors, user_bias, item_bias);
  const StepTables states = StepTables::of(user_factors_state, item_factors_state,
                                           user_bias_state, item_bias_state);
  const SampledPairwiseBatch batch{users,        pos_items,
                                   pos_indptr,   pos_indices,
                                   num_negatives, seed,
                                   step,         static_cast<PairwiseLoss>(loss),
                                   reg,          weights.value_or(at::Tensor())};
  const OptimizerArgs opt{static_cast<Optimizer>(optimizer), lr, eps};
  check_train_step_pairwise_sampled(op, tables, states, batch, opt);
  return kKernel(tables, states, batch, opt);
}

using SampledPairwiseStepsKernel = at::Tensor (*)(const StepTables& tables,
                                                  const StepTables& states,
                                                  const SampledPairwiseBatch& batch,
                                                  int64_t batch_size, const OptimizerArgs& opt);

// train_steps_pairwise_sampled: the sampled step's checks on the whole run of positives,
// with one step's pairs (batch_size positives) held to the step's limit.
template <SampledPairwiseStepsKernel kKernel>
at::Tensor train_steps_pairwise_sampled_op(
    const at::Tensor& user_factors, const at::Tensor& item_factors,
    const std::optional<at::Tensor>& user_bias, const std::optional<at::Tensor>& item_bias,
    const std::optional<at::Tensor>& user_factors_state,
    const std::optional<at::Tensor>& item_factors_state,
    const std::optional<at::Tensor>& user_bias_state,
    const std::optional<at::Tensor>& item_bias_state, const at::Tensor& users,
    const at::Tensor& pos_items, const at::Tensor& pos_indptr, const at::Tensor& pos_indices,
    int64_t num_negatives, int64_t batch_size, int64_t seed, int64_t step, int64_t loss,
    double reg, int64_t optimizer, double lr, double eps,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& order) {
  constexpr const char* op = "train_steps_pairwise_sampled";
  TORCH_CHECK_VALUE(batch_size >= 1, "fastmf.", op, ": batch_size must be >= 1, got ",
                    batch_size);
  check_code<PairwiseLoss>(op, loss);
  check_code<Optimizer>(op, optimizer);
  const StepTables tables = StepTables::of(user_factors, item_factors, user_bias, item_bias);
  const StepTables states = StepTables::of(user_factors_state, item_factors_state,
                                           user_bias_state, item_bias_state);
  const SampledPairwiseBatch batch{users,        pos_items,
                                   pos_indptr,   pos_indices,
                                   num_negatives, seed,
                                   step,         static_cast<PairwiseLoss>(loss),
                                   reg,          weights.value_or(at::Tensor()),
                                   order.value_or(at::Tensor())};
  const OptimizerArgs opt{static_cast<Optimizer>(optimizer), lr, eps};
  check_train_step_pairwise_sampled(op, tables, states, batch, opt, batch_size);
  return kKernel(tables, states, batch, batch_size, opt);
}

using SampledPointwiseStepKernel = at::Tensor (*)(const StepTables& tables,
                                                  const StepTables& states,
                                                  const SampledPointwiseBatch& batch,
                                                  const OptimizerArgs& opt);

template <SampledPointwiseStepKernel kKernel>
at::Tensor train_step_sampled_op(
    const at::Tensor& user_factors, const at::Tensor& item_factors,
    const std::optional<at::Tensor>& user_bias, const std::optional<at::Tensor>& item_bias,
    const std::optional<at::Tensor>& user_factors_state,
    const std::optional<at::Tensor>& item_factors_state,
    const std::optional<at::Tensor>& user_bias_state,
    const std::optional<at::Tensor>& item_bias_state, const at::Tensor& users,
    const at::Tensor& pos_items, const at::Tensor& pos_indptr, const at::Tensor& pos_indices,
    int64_t num_negatives, int64_t seed, int64_t step, double global_mean, int64_t loss,
    double reg, int64_t optimizer, double lr, double eps,
    const std::optional<at::Tensor>& weights) {
  constexpr const char* op = "train_step_sampled";
  check_code<Loss>(op, loss);
  check_code<Optimizer>(op, optimizer);
  const StepTables tables = StepTables::of(user_factors, item_factors, user_bias, item_bias);
  const StepTables states = StepTables::of(user_factors_state, item_factors_state,
                                           user_bias_state, item_bias_state);
  const SampledPointwiseBatch batch{users,         pos_items, pos_indptr,  pos_indices,
                                    num_negatives, seed,      step,        global_mean,
                                    static_cast<Loss>(loss),  reg,
                                    weights.value_or(at::Tensor())};
  const OptimizerArgs opt{static_cast<Optimizer>(optimizer), lr, eps};
  check_train_step_sampled(op, tables, states, batch, opt);
  return kKernel(tables, states, batch, opt);
}

using SampledPointwiseStepsKernel = at::Tensor (*)(const StepTables& tables,
                                                   const StepTables& states,
                                                   const SampledPointwiseBatch& batch,
                                                   int64_t batch_size,
                                                   const OptimizerArgs& opt);

// train_steps_sampled: the sampled pointwise step's checks on the whole run of positives,
// with one step's rows (batch_size positives) held to the step's limit.
template <SampledPointwiseStepsKernel kKernel>
at::Tensor train_steps_sampled_op(
    const at::Tensor& user_factors, const at::Tensor& item_factors,
    const std::optional<at::Tensor>& user_bias, const std::optional<at::Tensor>& item_bias,
    const std::optional<at::Tensor>& user_factors_state,
    const std::optional<at::Tensor>& item_factors_state,
    const std::optional<at::Tensor>& user_bias_state,
    const std::optional<at::Tensor>& item_bias_state, const at::Tensor& users,
    const at::Tensor& pos_items, const at::Tensor& pos_indptr, const at::Tensor& pos_indices,
    int64_t num_negatives, int64_t batch_size, int64_t seed, int64_t step, double global_mean,
    int64_t loss, double reg, int64_t optimizer, double lr, double eps,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& order) {
  constexpr const char* op = "train_steps_sampled";
  TORCH_CHECK_VALUE(batch_size >= 1, "fastmf.", op, ": batch_size must be >= 1, got ",
                    batch_size);
  check_code<Loss>(op, loss);
  check_code<Optimizer>(op, optimizer);
  const StepTables tables = StepTables::of(user_factors, item_factors, user_bias, item_bias);
  const StepTables states = StepTables::of(user_factors_state, item_factors_state,
                                           user_bias_state, item_bias_state);
  const SampledPointwiseBatch batch{users,         pos_items, pos_indptr,  pos_indices,
                                    num_negatives, seed,      step,        global_mean,
                                    static_cast<Loss>(loss),  reg,
                                    weights.value_or(at::Tensor()),
                                    order.value_or(at::Tensor())};
  const OptimizerArgs opt{static_cast<Optimizer>(optimizer), lr, eps};
  check_train_step_sampled(op, tables, states, batch, opt, batch_size);
  return kKernel(tables, states, batch, batch_size, opt);
}

// The embedding_bag family's two steps: flat settings -> RowOptimizerArgs, tables ->
// RowTable, bags -> Bags, and every check that reads no id or offset value.
using SparseUpdateKernel = void (*)(const RowTable& table, const at::Tensor& ids,
                                    const at::Tensor& grad_rows, const RowOptimizerArgs& opt);
using BackwardUpdateKernel = void (*)(const RowTable& table, const at::Tensor& grad_output,
                                      const Bags& bags, const RowOptimizerArgs& opt);

inline RowOptimizerArgs row_optimizer_args(const char* op, int64_t optimizer, double lr,
                                           double eps, double beta1, double beta2,
                                           double weight_decay, int64_t weight_decay_mode,
                                           int64_t step, int64_t seed,
                                           bool stochastic_rounding) {
  check_row_optimizer_args(op, optimizer, lr, eps, beta1, beta2, weight_decay,
                           weight_decay_mode, step, seed);
  return RowOptimizerArgs{static_cast<Optimizer>(optimizer), lr, eps, beta1, beta2,
                          weight_decay, static_cast<WeightDecay>(weight_decay_mode), step, seed,
                          stochastic_rounding};
}

template <SparseUpdateKernel kKernel>
void sparse_update_op(const at::Tensor& weight, const std::optional<at::Tensor>& state1,
                      const std::optional<at::Tensor>& state2, const at::Tensor& ids,
                      const at::Tensor& grad_rows, int64_t optimizer, double lr, double eps,
                      double beta1, double beta2, double weight_decay,
                      int64_t weight_decay_mode, int64_t step, int64_t seed,
                      bool stochastic_rounding) {
  constexpr const char* op = "sparse_update";
  const RowOptimizerArgs opt =
      row_optimizer_args(op, optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode,
                         step, seed, stochastic_rounding);
  const RowTable table{weight, state1.value_or(at::Tensor()), state2.value_or(at::Tensor())};
  check_sparse_update_inputs(op, table, opt.optimizer, ids, grad_rows);
  kKernel(table, ids, grad_rows, opt);
}

template <BackwardUpdateKernel kKernel>
void embedding_bag_backward_update_op(
    const at::Tensor& weight, const std::optional<at::Tensor>& state1,
    const std::optional<at::Tensor>& state2, const at::Tensor& grad_output,
    const at::Tensor& indices, const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights, int64_t pooling, int64_t optimizer,
    double lr, double eps, double beta1, double beta2, double weight_decay,
    int64_t weight_decay_mode, int64_t step, int64_t seed, bool stochastic_rounding) {
  constexpr const char* op = "embedding_bag_backward_update";
  const RowOptimizerArgs opt =
      row_optimizer_args(op, optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode,
                         step, seed, stochastic_rounding);
  const RowTable table{weight, state1.value_or(at::Tensor()), state2.value_or(at::Tensor())};
  const Bags bags{indices, offsets, per_sample_weights.value_or(at::Tensor()),
                  static_cast<Pooling>(pooling)};
  check_backward_update_inputs(op, table, opt.optimizer, grad_output, bags, pooling);
  kKernel(table, grad_output, bags, opt);
}

// embedding_bag_backward_update_pair: both tables' updates over one set of bags.
using BackwardUpdatePairKernel = void (*)(const RowTable& table, const at::Tensor& grad_output,
                                          const RowOptimizerArgs& opt, const RowTable& table_b,
                                          const at::Tensor& grad_output_b,
                                          const RowOptimizerArgs& opt_b, const Bags& bags);

template <BackwardUpdatePairKernel kKernel>
void embedding_bag_backward_update_pair_op(
    const at::Tensor& weight, const std::optional<at::Tensor>& state1,
    const std::optional<at::Tensor>& state2, const at::Tensor& grad_output,
    const at::Tensor& weight_b, const std::optional<at::Tensor>& state1_b,
    const std::optional<at::Tensor>& state2_b, const at::Tensor& grad_output_b,
    const at::Tensor& indices, const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights, int64_t pooling, int64_t optimizer,
    double lr, double eps, double beta1, double beta2, double weight_decay,
    int64_t weight_decay_mode, int64_t step, int64_t seed, bool stochastic_rounding,
    int64_t step_b, int64_t seed_b, bool stochastic_rounding_b) {
  constexpr const char* op = "embedding_bag_backward_update_pair";
  const RowOptimizerArgs opt =
      row_optimizer_args(op, optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode,
                         step, seed, stochastic_rounding);
  const RowOptimizerArgs opt_b =
      row_optimizer_args(op, optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode,
                         step_b, seed_b, stochastic_rounding_b);
  const RowTable table{weight, state1.value_or(at::Tensor()), state2.value_or(at::Tensor())};
  const RowTable table_b{weight_b, state1_b.value_or(at::Tensor()),
                         state2_b.value_or(at::Tensor())};
  const Bags bags{indices, offsets, per_sample_weights.value_or(at::Tensor()),
                  static_cast<Pooling>(pooling)};
  check_backward_update_inputs(op, table, opt.optimizer, grad_output, bags, pooling);
  check_backward_update_inputs(op, table_b, opt.optimizer, grad_output_b, bags, pooling);
  check_update_pair(op, table, table_b);
  kKernel(table, grad_output, opt, table_b, grad_output_b, opt_b, bags);
}

// sample_negatives: the draws of users' (B,) rows into out (B, num_negatives) int64, B >= 1;
// `op` names the caller in the errors.
using SampleNegativesKernel = void (*)(const at::Tensor& users, const at::Tensor& pos_indptr,
                                       const at::Tensor& pos_indices, int64_t num_items,
                                       int64_t seed, int64_t step, const char* op,
                                       at::Tensor& out);

template <SampleNegativesKernel kKernel>
at::Tensor sample_negatives_op(const at::Tensor& users, const at::Tensor& pos_indptr,
                               const at::Tensor& pos_indices, int64_t num_items,
                               int64_t num_negatives, int64_t seed, int64_t step,
                               c10::string_view op_name) {
  const std::string name(op_name);
  check_sample_negatives(name.c_str(), users, pos_indptr, pos_indices, num_items,
                         num_negatives);
  at::Tensor out = at::empty({users.size(0), num_negatives}, users.options().dtype(at::kLong));
  if (users.size(0) > 0) {
    kKernel(users.contiguous(), pos_indptr.contiguous(), pos_indices.contiguous(), num_items,
            seed, step, name.c_str(), out);
  }
  return out;
}

using PermutationKernel = void (*)(const at::Tensor& out, int64_t seed);

template <PermutationKernel kKernel>
void permutation_op(const at::Tensor& out, int64_t seed) {
  check_permutation("permutation", out);
  kKernel(out, seed);
}

}  // namespace fastmf
