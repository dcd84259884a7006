// The argument bundles the kernels take, built once at the op boundary (csrc/ops.h) from the
// flat schema arguments (TORCH_LIBRARY needs flat schemas; fastmf/ops/args.py has the same
// bundles in Python). FBGEMM's CommonArgs/OptimizerArgs are the model: a new op family adds
// a bundle here instead of another long parameter list in every file it passes through.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "codes.h"

namespace fastmf {

// The four tables of biased MF (fastmf.ops.MFTables), or their optimizer states in the same
// slots. An absent slot (None) is an undefined tensor: no bias, or no state for SGD.
struct StepTables {
  at::Tensor user_factors, item_factors, user_bias, item_bias;

  static StepTables of(const std::optional<at::Tensor>& user_factors,
                       const std::optional<at::Tensor>& item_factors,
                       const std::optional<at::Tensor>& user_bias,
                       const std::optional<at::Tensor>& item_bias) {
    return StepTables{user_factors.value_or(at::Tensor()), item_factors.value_or(at::Tensor()),
                      user_bias.value_or(at::Tensor()), item_bias.value_or(at::Tensor())};
  }

  bool has_bias() const { return item_bias.defined(); }
  // The slots in schema order, for checks that treat all four alike.
  std::array<const at::Tensor*, 4> slots() const {
    return {&user_factors, &item_factors, &user_bias, &item_bias};
  }
};

// The names of the slots in messages, as the schemas name the arguments.
constexpr std::array<const char*, 4> kTableNames = {"user_factors", "item_factors", "user_bias",
                                                    "item_bias"};
constexpr std::array<const char*, 4> kStateNames = {
    "user_factors_state", "item_factors_state", "user_bias_state", "item_bias_state"};

// Which sparse optimizer a step applies, and its settings (fastmf.ops.OptimizerArgs).
struct OptimizerArgs {
  Optimizer optimizer;
  double lr;
  double eps;
};

// Every fused step's batch ends with `weights`: undefined (None), or (B,) per-positive
// weights of the data term (finite, >= 0; fastmf/ops/reference/pointwise.py).

// train_step's batch and loss: prediction mu + b_u + b_i + <P[u], Q[i]> against targets.
struct PointwiseBatch {
  at::Tensor users, items, targets;  // (B,) each
  double global_mean;
  Loss loss;
  double reg;
  at::Tensor weights;
};

// train_step_pairwise's batch and loss: (user, positive item, negative item) triples.
struct PairwiseBatch {
  at::Tensor users, pos_items, neg_items;  // (B,) each
  PairwiseLoss loss;
  double reg;
  at::Tensor weights;
};

// train_step_pairwise_sampled's batch: the positives, the positives' CSR (user u's row is
// pos_indices[pos_indptr[u], pos_indptr[u + 1])) and how many uniform negatives each
// positive meets, drawn from (seed, step).
struct SampledPairwiseBatch {
  at::Tensor users, pos_items;          // (B,) each
  at::Tensor pos_indptr, pos_indices;   // (U + 1,), (nnz,)
  int64_t num_negatives, seed, step;
  PairwiseLoss loss;
  double reg;
  at::Tensor weights;  // one per positive, for each of its pairs
  // The multi-step op only: undefined, or (n,) int32/int64 positions in [0, B): the run is
  // users[order], pos_items[order] (and weights[order]), read without a gathered copy.
  at::Tensor order;
};

// train_step_sampled's batch: the positives and their CSR as in SampledPairwiseBatch; each
// positive is a row labelled 1, each of its num_negatives negatives a row labelled 0, the
// rows scored as in PointwiseBatch.
struct SampledPointwiseBatch {
  at::Tensor users, pos_items;          // (B,) each
  at::Tensor pos_indptr, pos_indices;   // (U + 1,), (nnz,)
  int64_t num_negatives, seed, step;
  double global_mean;
  Loss loss;
  double reg;
  at::Tensor weights;  // one per positive, for its own row; the negatives' rows weigh 1
  at::Tensor order;    // the multi-step op only, as in SampledPairwiseBatch
};

// The settings of one exact sparse step of the embedding_bag family (sparse_update,
// embedding_bag_backward_update; fastmf.ops.RowOptimizerArgs). `step` counts this step
// (>= 1): Adam's bias correction and the stochastic-rounding counter read it.
struct RowOptimizerArgs {
  Optimizer optimizer;
  double lr;
  double eps;
  double beta1;
  double beta2;
  double weight_decay;
  WeightDecay weight_decay_mode;
  int64_t step;
  int64_t seed;
  bool stochastic_rounding;
};

// An embedding table and its optimizer states (state1/state2 undefined where the optimizer
// has none: see fastmf/ops/reference/embedding_bag.py).
struct RowTable {
  at::Tensor weight, state1, state2;
};

// CSR bags: bag b is indices[offsets[b], offsets[b + 1]); per_sample_weights undefined for
// None.
struct Bags {
  at::Tensor indices, offsets, per_sample_weights;
  Pooling pooling;
};

}  // namespace fastmf
