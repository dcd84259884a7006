// The op boundary of the fused steps: the flat schema arguments (csrc/fastmf.cpp) become
// the bundles of csrc/args.h and pass the shared checks of csrc/checks.h here, once, for
// every backend. A backend writes its kernel against the bundles and registers it with
//   m.impl("train_step", &train_step_op<fastmf::cpu::train_step>);
// so the long flat signature exists in this file only.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

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
                         double reg, int64_t optimizer, double lr, double eps) {
  constexpr const char* op = "train_step";
  check_code<Loss>(op, loss);
  check_code<Optimizer>(op, optimizer);
  const StepTables tables = StepTables::of(user_factors, item_factors, user_bias, item_bias);
  const StepTables states = StepTables::of(user_factors_state, item_factors_state,
                                           user_bias_state, item_bias_state);
  const PointwiseBatch batch{users, items, targets, global_mean, static_cast<Loss>(loss), reg};
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
    int64_t optimizer, double lr, double eps) {
  constexpr const char* op = "train_step_pairwise";
  check_code<PairwiseLoss>(op, loss);
  check_code<Optimizer>(op, optimizer);
  const StepTables tables = StepTables::of(user_factors, item_factors, user_bias, item_bias);
  const StepTables states = StepTables::of(user_factors_state, item_factors_state,
                                           user_bias_state, item_bias_state);
  const PairwiseBatch batch{users, pos_items, neg_items, static_cast<PairwiseLoss>(loss), reg};
  const OptimizerArgs opt{static_cast<Optimizer>(optimizer), lr, eps};
  check_train_step_pairwise(op, tables, states, batch, opt);
  return kKernel(tables, states, batch, opt);
}

}  // namespace fastmf
