// What the fused CPU steps (train_step in pointwise.cpp, train_step_pairwise in
// pairwise.cpp) share: the tables they update in place, their scratch, the loss sum, and
// the second phase, which steps each row of one table from per-sample gradients g_b and
// the copies of the other table's pre-step rows that the first phase kept.
// csrc/cuda/fused_step.cuh is the CUDA counterpart.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "../args.h"
#include "../checks.h"
#include "../codes.h"
#include "common.h"
#include "isa.h"
#include "segment_update.h"
#include "segments.h"
#include "team.h"

namespace fastmf {
namespace FASTMF_CPU_NS {
namespace fused {

constexpr int64_t kGrain = 256;
// How far ahead (in groups, and in sorted samples) rows are prefetched.
constexpr int64_t kPrefetchGroups = 4;
constexpr int64_t kPrefetchSamples = 8;

// One sample's share of a row's gradient: acc += g x, plus the L2 term c w of the row's
// pre-step value w when reg is on (added once per occurrence, as the reference does).
// kFirst: acc's first sample, added to 0 (the same bits as zeroing acc first, which the
// compiler made a memset call per row: 4 % of a one-thread BPR epoch's samples).
template <bool kFirst = false, typename T>
inline void add_sample(T* __restrict acc, T g, const T* x, const T* w, T c, bool reg,
                       int64_t dim) {
  if (reg) {
    for (int64_t k = 0; k < dim; ++k) {
      acc[k] = (kFirst ? T(0) : acc[k]) + (g * x[k] + c * w[k]);
    }
  } else {
    for (int64_t k = 0; k < dim; ++k) acc[k] = (kFirst ? T(0) : acc[k]) + g * x[k];
  }
}

// The state of a factor row: dim values (Adagrad), one (row-wise Adagrad), none (SGD).
template <typename T>
inline T* state_of(T* state, int64_t row, int64_t dim, Optimizer opt) {
  if (opt == kAdagrad) return state + row * dim;
  if (opt == kRowwiseAdagrad) return state + row;
  return nullptr;
}

// A factor row and its state, ahead of their update. Not the biases: their tables are
// small enough to stay cached, and prefetching them measured slower.
template <Optimizer kOpt, typename T>
inline void prefetch_table_row(const T* factors, const T* state, int64_t row, int64_t dim) {
  prefetch_row(factors + row * dim, dim, true);
  if (kOpt == kAdagrad) prefetch_row(state + row * dim, dim, true);
  if (kOpt == kRowwiseAdagrad) __builtin_prefetch(state + row, 1);
}

// A fixed-order sum (four interleaved partial sums, combined pairwise).
inline double ordered_sum(const double* x, int64_t n) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t b = 0;
  for (; b + 4 <= n; b += 4) {
    for (int l = 0; l < 4; ++l) acc[l] += x[b + l];
  }
  double tail = 0.0;
  for (; b < n; ++b) tail += x[b];
  return ((acc[0] + acc[2]) + (acc[1] + acc[3])) + tail;
}

// The sum of log(f_b) over n factors f_b in [1, 2^30): the log of their product, one log
// per block of 32 (a block's product stays below 2^960), four interleaved products in a
// block, in a fixed order. BPR's softplus log(1 + e^z) and BCE's log(1 + e^-|x|) leave
// their log term here as the factor 1 + e: a scalar log1p per sample was 9 % of a
// one-thread BPR epoch (perf, ml-latest-small, 1 negative), and 20.2-21.0 ms an epoch
// took 18.5-18.6 without it. The product of 32 factors rounds 32 times in double, so the
// sum is closer to exact than the per-sample float log1p it replaces.
inline double log_product(const double* f, int64_t n) {
  constexpr int64_t kBlock = 32;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = std::min(n, b + kBlock);
    double p[4] = {1.0, 1.0, 1.0, 1.0};
    int64_t i = b;
    for (; i + 4 <= end; i += 4) {
      for (int l = 0; l < 4; ++l) p[l] *= f[i + l];
    }
    for (; i < end; ++i) p[0] *= f[i];
    total += std::log((p[0] * p[2]) * (p[1] * p[3]));
  }
  return total;
}

// A step's `weights` (undefined, or the B weights the op boundary checked the shape of)
// made contiguous, with their values checked before anything is written.
inline at::Tensor checked_weights(const char* op, const at::Tensor& weights, int64_t batch) {
  if (!weights.defined()) return weights;
  const at::Tensor w = weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastmf.check_weights", [&] {
    check_weight_values(op, w.data_ptr<scalar_t>(), batch);
  });
  return w;
}

// The tables of a step and their optimizer states; write_user_bias is false for the
// pairwise step, where the user bias cancels and is never written.
struct Tables {
  InPlace user_factors, item_factors;
  std::optional<InPlace> user_bias, item_bias, user_factors_state, item_factors_state,
      user_bias_state, item_bias_state;

  // states: undefined slots for SGD. Checked (csrc/checks.h) before this is built.
  Tables(Optimizer optimizer, bool write_user_bias, const StepTables& tables,
         const StepTables& states)
      : user_factors(tables.user_factors), item_factors(tables.item_factors) {
    const bool has_bias = tables.has_bias();
    if (has_bias) {
      if (write_user_bias) user_bias.emplace(tables.user_bias);
      item_bias.emplace(tables.item_bias);
    }
    if (optimizer != Optimizer::kSgd) {
      user_factors_state.emplace(states.user_factors);
      item_factors_state.emplace(states.item_factors);
      if (has_bias) {
        if (write_user_bias) user_bias_state.emplace(states.user_bias);
        item_bias_state.emplace(states.item_bias);
      }
    }
  }

  template <typename T>
  static T* ptr(std::optional<InPlace>& x) {
    return x ? x->get().data_ptr<T>() : nullptr;
  }

  void commit() {
    user_factors.commit();
    item_factors.commit();
    for (auto* x : {&user_bias, &item_bias, &user_factors_state, &item_factors_state,
                    &user_bias_state, &item_bias_state}) {
      if (*x) (*x)->commit();
    }
  }
};

// Scratch kept between calls (one per op and thread; TrimOnExit caps what it keeps).
struct Workspace {
  std::vector<int64_t> users, items, negatives;
  RowGroups user_groups, item_groups;
  std::vector<double> loss, factors, norms;
  std::vector<int32_t> group_of;
  // Per-sample g_b and the old first-side rows, in the weights' dtype.
  std::vector<float> float_scratch;
  std::vector<double> double_scratch;
  std::vector<float>& typed(float) { return float_scratch; }
  std::vector<double>& typed(double) { return double_scratch; }

  size_t bytes() const {
    return scratch_bytes(users) + scratch_bytes(items) + scratch_bytes(negatives) +
           user_groups.bytes() + item_groups.bytes() + scratch_bytes(loss) +
           scratch_bytes(factors) + scratch_bytes(norms) + scratch_bytes(group_of) +
           scratch_bytes(float_scratch) + scratch_bytes(double_scratch);
  }
  void release() { *this = Workspace(); }
};

// The scalars and per-sample scratch both fused steps keep (Problem in pointwise.cpp,
// Pairwise in pairwise.cpp): `old_groups` is the number of first-phase row groups whose
// pre-step rows are kept.
template <typename T>
struct StepScratch {
  int64_t batch, dim, first_groups;
  T scale, reg_grad, lr, eps;  // scale = 1/B, reg_grad = 2 reg / B
  bool reg;
  double reg_value;
  T* grad;            // (B,) g_b, the loss gradient of sample b
  double* loss;       // (B,) loss value of sample b, but for a log term left in factors
  double* factors;    // (B,) 1 + e of sample b's log term log(1 + e) (LossFn::kLogTerms)
  // The reg term, per row: the row's count in the step times its squared norm (bias
  // included), when reg; first_norms (first_groups,), second_norms (up to 2B) for the
  // second phase's groups. The same sum as the reference's per-sample terms, with a dot
  // per distinct row instead of the other side's dots per sample (a BPR sample's two
  // items): those dots were 10-15 % of a one-thread BPR epoch on ml-latest-small.
  double* first_norms;
  double* second_norms;
  int32_t* group_of;  // (B,) first-phase group of sample b
  T* old_rows;        // (old_groups, dim) first-phase rows before the step
  const T* weights;   // (B,) w_b scaling sample b's data term, or null (all 1)

  void bind(Workspace& ws, int64_t batch_, int64_t dim_, int64_t old_groups, double reg_,
            double lr_, double eps_) {
    batch = batch_;
    dim = dim_;
    first_groups = old_groups;
    scale = static_cast<T>(1.0 / static_cast<double>(batch));
    reg_grad = static_cast<T>(2.0 * reg_ / static_cast<double>(batch));
    reg = reg_ != 0.0;
    reg_value = reg_;
    lr = static_cast<T>(lr_);
    eps = static_cast<T>(eps_);
    grad = scratch(ws.typed(T{}), batch + old_groups * dim);
    old_rows = grad + batch;
    loss = scratch(ws.loss, batch);
    factors = scratch(ws.factors, batch);
    // A second phase has at most 2B positions (pairwise), so at most 2B groups.
    first_norms = reg ? scratch(ws.norms, old_groups + 2 * batch) : nullptr;
    second_norms = reg ? first_norms + old_groups : nullptr;
    group_of = scratch(ws.group_of, batch);
    weights = nullptr;
  }

  // The step's reported loss: the mean data term (the log terms from `factors` when the
  // loss has them), plus reg times the mean reg term, each summed in a fixed order;
  // `second_groups`: the second phase's number of groups.
  double mean_loss(int64_t second_groups, bool log_terms) const {
    const double n = static_cast<double>(batch);
    double data = ordered_sum(loss, batch);
    if (log_terms) data += log_product(factors, batch);
    double total = data / n;
    if (reg) {
      total += reg_value * ((ordered_sum(first_norms, first_groups) +
                             ordered_sum(second_norms, second_groups)) / n);
    }
    return total;
  }

  // Whether sample b's log term goes to `factors` (LossFn::kLogTerms): without weights, and
  // for a weight of exactly 1, which multiplies exactly, so weights of 1 report the
  // unweighted step's loss bit for bit. Another weight scales the term: w_b log1p(e).
  bool folds(int64_t b) const { return weights == nullptr || weights[b] == T(1); }

  // Sample b's gradient and loss value scaled by its weight: w_b g_b is the gradient of
  // w_b loss_b, as autograd of the weighted mean forms it (to rounding).
  void weigh(int64_t b, T& g, double& value) const {
    if (weights == nullptr) return;
    const T w = weights[b];
    g *= w;
    value *= static_cast<double>(w);
  }

  // `w`: an undefined tensor, or (B,) contiguous in T.
  void bind_weights(const at::Tensor& w) {
    weights = w.defined() ? w.data_ptr<T>() : nullptr;
  }
};

// The second phase's table: its rows, their grouping over `positions` sorted positions,
// and where each position's gradient comes from.
template <typename T>
struct SecondSide {
  T* factors;
  T* factors_state;  // null for SGD
  T* bias;           // null without biases
  T* bias_state;     // null for SGD or without biases
  const RowGroups* groups;
  int64_t positions;
};

// The first phase's results the second one reads: g_b per sample, and per sample the
// copy of its first-side row before the step.
template <typename T>
struct FirstResults {
  const T* grad;            // (B,)
  const int32_t* group_of;  // (B,) the first-side group of sample b
  const T* old_rows;        // (first-side groups, dim)
};

// Steps every row of `side`: its gradient is sum over its positions j of
// sign_j g_b P_old[b] (+ the L2 term), in sorted (= batch) order, where
// sample_of(j) -> (b, negative) maps a position to its sample. Each row is written once.
// With reg, norms[s] is group s's count times its pre-step squared norm (bias included).
template <Optimizer kOpt, typename T, typename SampleOf>
void step_from_old_rows(const SecondSide<T>& side, const FirstResults<T>& first, int64_t dim,
                        T reg_grad, bool reg, T lr, T eps, double* norms,
                        SampleOf sample_of) {
  const RowGroups& groups = *side.groups;
  const int64_t num_groups = groups.num_groups;
  const bool has_bias = side.bias != nullptr;
  // In a team (train_steps_pairwise_sampled) this thread's share, then the team's
  // barrier; otherwise at::parallel_for.
  fastmf::FASTMF_CPU_NS::parallel_for(0, side.positions, kGrain, [&](int64_t begin,
                                                                     int64_t end) {
    const int64_t first_group = groups.group_at(begin);
    const int64_t last_group = groups.group_at(end);
    std::vector<T> acc_storage(static_cast<size_t>(dim));
    T* acc = acc_storage.data();
    for (int64_t s = first_group; s < last_group; ++s) {
      if (s + kPrefetchGroups < num_groups) {
        prefetch_table_row<kOpt>(side.factors, side.factors_state,
                                 groups.rows[s + kPrefetchGroups], dim);
      }
      const int64_t row = groups.rows[s];
      T* w = side.factors + row * dim;
      const T own_bias = has_bias ? side.bias[row] : T(0);
      T bias_sum = T(0);
      const int32_t j0 = groups.starts[s], j1 = groups.starts[s + 1];
      for (int32_t j = j0; j < j1; ++j) {
        // The copies of the old rows outgrow the L2 cache at large batches, and were
        // written by whichever thread owned the first-side row.
        if (j + kPrefetchSamples < side.positions) {
          const int64_t ahead = sample_of(groups.order[j + kPrefetchSamples]).first;
          prefetch_row(first.old_rows + static_cast<int64_t>(first.group_of[ahead]) * dim,
                       dim, false);
        }
        const auto [b, negative] = sample_of(groups.order[j]);
        // Negating is exact, so -(g p) of the reference equals (-g) p.
        const T g = negative ? -first.grad[b] : first.grad[b];
        const T* p = first.old_rows + static_cast<int64_t>(first.group_of[b]) * dim;
        // A group holds at least one position.
        if (j == j0) {
          add_sample<true>(acc, g, p, w, reg_grad, reg, dim);
        } else {
          add_sample(acc, g, p, w, reg_grad, reg, dim);
        }
        bias_sum += reg ? g + reg_grad * own_bias : g;
      }
      if (reg) {
        norms[s] = static_cast<double>(j1 - j0) *
                   static_cast<double>(dot(w, w, dim) + own_bias * own_bias);
      }
      step_row<kOpt>(w, state_of(side.factors_state, row, dim, kOpt), acc, dim, lr, eps);
      if (has_bias) {
        step_scalar<kOpt>(side.bias + row, kOpt == kSgd ? nullptr : side.bias_state + row,
                          bias_sum, lr, eps);
      }
    }
  });
}

}  // namespace fused
}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
