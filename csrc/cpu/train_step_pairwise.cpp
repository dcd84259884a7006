// train_step_pairwise on the CPU: the fused BPR step. Each sample b is (u, i, j), with
//   x_b = b_i - b_j + <P[u], Q[i] - Q[j]>,   loss = mean_b softplus(-x_b) + reg term.
//
// Two phases, as in train_step.cpp, but always users first: x needs the user row and two
// item rows, so only the user side can compute it while holding its own row in L1.
//   Phase 1, per user group: for each of its samples, gather Q[i] and Q[j], take x_b and
//     g_b = dLoss/dx_b, and sum the user's gradient g_b (Q[i] - Q[j]); keep a copy of the
//     user's old row; step it. user_bias cancels in x and gets no gradient: it and its
//     state are never written.
//   Phase 2, per item group: the item ids of the batch are laid out as positions
//     0..B-1 (positives) then B..2B-1 (negatives), the reference's torch.cat order, and
//     grouped together, so an item that is a positive in one sample and a negative in
//     another sums both kinds of gradient (+g_b P_old[u] and -g_b P_old[u]) in position
//     order before its one update.
// All gradients come from the pre-step weights; every touched row is written once. Work
// is split by sorted position and each row's sum runs in a fixed order on one thread, so
// the results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../checks.h"
#include "dedup.h"
#include "kernels.h"

namespace fastmf {
namespace cpu {
namespace {

constexpr const char* kOp = "train_step_pairwise";
// fastmf/_checks.py check_train_step_pairwise validates the positives through the shared
// MF-table checks, which call them "items"; the native messages must read the same.
constexpr const char* kPosName = "items";
constexpr int64_t kNumPairwiseLosses = 1;  // 0: bpr (fastmf/reference.py PAIRWISE_LOSSES)
constexpr int64_t kGrain = 256;
constexpr int64_t kPrefetchGroups = 4;
constexpr int64_t kPrefetchSamples = 8;
// F.softplus's default threshold: beyond it the reference's softplus is the identity and
// its gradient exactly 1, and the step must agree with the reference there too.
constexpr double kSoftplusThreshold = 20.0;

template <typename T>
struct Pairwise {
  T* user_factors;
  T* user_state;       // null for SGD
  T* item_factors;
  T* item_state;       // null for SGD
  T* item_bias;        // null without biases
  T* item_bias_state;  // null for SGD or without biases
  const int64_t* users;  // (B,)
  const int64_t* items;  // (2B,): positives, then negatives
  const RowGroups* user_groups;
  const RowGroups* item_groups;  // over the 2B item positions
  int64_t batch, dim;
  T scale, reg_grad, lr, eps;  // scale = 1/B, reg_grad = 2 reg / B
  bool reg;
  // Scratch indexed by sample b, or by user group s for old_rows.
  T* grad;            // (B,) g_b = dLoss/dx_b
  double* loss;       // (B,) softplus(-x_b)
  double* norms;      // (B,) the sample's reg term, when reg
  int32_t* group_of;  // (B,) user group of sample b
  T* old_rows;        // (user groups, dim) user factors before the step

  T* state_of(T* state, int64_t row, int64_t opt) const {
    if (opt == kAdagrad) return state + row * dim;
    if (opt == kRowwiseAdagrad) return state + row;
    return nullptr;
  }
};

// softplus(z) and d/dz softplus(z) * scale, as F.softplus and its autograd formula
// compute them (the gradient as (scale * e^z) / (e^z + 1)); below the threshold e^z cannot
// overflow.
template <typename T>
inline void bpr_loss(T x, T scale, T& grad, double& value) {
  const T z = -x;
  if (static_cast<double>(z) > kSoftplusThreshold) {
    value = static_cast<double>(z);
    grad = -scale;
    return;
  }
  value = std::log1p(std::exp(static_cast<double>(z)));
  const T e = std::exp(z);
  grad = -((scale * e) / (e + T(1)));
}

// A factor row and its state, ahead of their update. Not the bias tables: one value per
// row keeps them small enough to stay cached.
template <int64_t kOpt, typename T>
inline void prefetch_table_row(const T* factors, const T* state, int64_t row, int64_t dim) {
  prefetch_row(factors + row * dim, dim, true);
  if (kOpt == kAdagrad) prefetch_row(state + row * dim, dim, true);
  if (kOpt == kRowwiseAdagrad) __builtin_prefetch(state + row, 1);
}

template <typename T, int64_t kOpt>
void phase_users(const Pairwise<T>& pr) {
  const RowGroups& groups = *pr.user_groups;
  const int64_t dim = pr.dim, batch = pr.batch;
  const int64_t num_groups = groups.num_groups;
  const T* bias = pr.item_bias;
  const int64_t* pos = pr.items;
  const int64_t* neg = pr.items + batch;
  at::parallel_for(0, batch, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t first = groups.group_at(begin);
    const int64_t last = groups.group_at(end);
    std::vector<T> storage(static_cast<size_t>(2 * dim));
    T* acc = storage.data();
    T* diff = acc + dim;
    for (int64_t s = first; s < last; ++s) {
      if (s + kPrefetchGroups < num_groups) {
        prefetch_table_row<kOpt>(pr.user_factors, pr.user_state,
                                 groups.rows[s + kPrefetchGroups], dim);
      }
      const int64_t row = groups.rows[s];
      T* w = pr.user_factors + row * dim;
      T* old = pr.old_rows + s * dim;
      for (int64_t k = 0; k < dim; ++k) {
        old[k] = w[k];
        acc[k] = T(0);
      }
      const T own_norm = pr.reg ? dot(w, w, dim) : T(0);
      const int32_t j0 = groups.starts[s], j1 = groups.starts[s + 1];
      for (int32_t j = j0; j < j1; ++j) {
        if (j + kPrefetchSamples < batch) {
          const int64_t ahead = groups.order[j + kPrefetchSamples];
          prefetch_row(pr.item_factors + pos[ahead] * dim, dim, false);
          prefetch_row(pr.item_factors + neg[ahead] * dim, dim, false);
        }
        const int64_t b = groups.order[j];
        const int64_t i = pos[b], n = neg[b];
        const T* qi = pr.item_factors + i * dim;
        const T* qj = pr.item_factors + n * dim;
        // The reference's association: <p, qi - qj>, then (+ b_i) - b_j.
        for (int64_t k = 0; k < dim; ++k) diff[k] = qi[k] - qj[k];
        T x = dot(w, diff, dim);
        if (bias != nullptr) x = (x + bias[i]) - bias[n];
        T g;
        bpr_loss(x, pr.scale, g, pr.loss[b]);
        pr.grad[b] = g;
        pr.group_of[b] = static_cast<int32_t>(s);
        if (pr.reg) {
          T norm = own_norm + dot(qi, qi, dim) + dot(qj, qj, dim);
          if (bias != nullptr) norm = norm + bias[i] * bias[i] + bias[n] * bias[n];
          pr.norms[b] = static_cast<double>(norm);
          const T c = pr.reg_grad;
          for (int64_t k = 0; k < dim; ++k) acc[k] += g * diff[k] + c * w[k];
        } else {
          for (int64_t k = 0; k < dim; ++k) acc[k] += g * diff[k];
        }
      }
      step_row<kOpt>(w, pr.state_of(pr.user_state, row, kOpt), acc, dim, pr.lr, pr.eps);
    }
  });
}

template <typename T, int64_t kOpt>
void phase_items(const Pairwise<T>& pr) {
  const RowGroups& groups = *pr.item_groups;
  const int64_t dim = pr.dim, batch = pr.batch;
  const int64_t positions = 2 * batch;
  const int64_t num_groups = groups.num_groups;
  const bool has_bias = pr.item_bias != nullptr;
  at::parallel_for(0, positions, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t first = groups.group_at(begin);
    const int64_t last = groups.group_at(end);
    std::vector<T> storage(static_cast<size_t>(dim));
    T* acc = storage.data();
    for (int64_t s = first; s < last; ++s) {
      if (s + kPrefetchGroups < num_groups) {
        prefetch_table_row<kOpt>(pr.item_factors, pr.item_state,
                                 groups.rows[s + kPrefetchGroups], dim);
      }
      const int64_t row = groups.rows[s];
      T* w = pr.item_factors + row * dim;
      const T own_bias = has_bias ? pr.item_bias[row] : T(0);
      for (int64_t k = 0; k < dim; ++k) acc[k] = T(0);
      T bias_sum = T(0);
      const int32_t j0 = groups.starts[s], j1 = groups.starts[s + 1];
      for (int32_t j = j0; j < j1; ++j) {
        if (j + kPrefetchSamples < positions) {
          int64_t ahead = groups.order[j + kPrefetchSamples];
          if (ahead >= batch) ahead -= batch;
          // written by whichever thread owned the user: often another core's cache
          prefetch_row(pr.old_rows + static_cast<int64_t>(pr.group_of[ahead]) * dim, dim,
                       false);
        }
        int64_t b = groups.order[j];
        const bool negative = b >= batch;
        if (negative) b -= batch;
        // Negating is exact, so -(g p) of the reference equals (-g) p.
        const T g = negative ? -pr.grad[b] : pr.grad[b];
        const T* p = pr.old_rows + static_cast<int64_t>(pr.group_of[b]) * dim;
        if (pr.reg) {
          const T c = pr.reg_grad;
          for (int64_t k = 0; k < dim; ++k) acc[k] += g * p[k] + c * w[k];
          bias_sum += g + c * own_bias;
        } else {
          for (int64_t k = 0; k < dim; ++k) acc[k] += g * p[k];
          bias_sum += g;
        }
      }
      step_row<kOpt>(w, pr.state_of(pr.item_state, row, kOpt), acc, dim, pr.lr, pr.eps);
      if (has_bias) {
        step_scalar<kOpt>(pr.item_bias + row,
                          kOpt == kSgd ? nullptr : pr.item_bias_state + row, bias_sum, pr.lr,
                          pr.eps);
      }
    }
  });
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

struct Workspace {
  std::vector<int64_t> users, items, negatives;
  RowGroups user_groups, item_groups;
  std::vector<double> loss, norms;
  std::vector<int32_t> group_of;
  std::vector<float> float_scratch;
  std::vector<double> double_scratch;
  std::vector<float>& typed(float) { return float_scratch; }
  std::vector<double>& typed(double) { return double_scratch; }
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

void check_state(int64_t optimizer, const char* name, const std::optional<at::Tensor>& state,
                 const at::Tensor& table, const char* table_name) {
  TORCH_CHECK_VALUE(state.has_value(), "fastmf.", kOp, ": ", optimizer_name(optimizer),
                    " needs ", name, ", got None");
  const bool per_row = optimizer == kRowwiseAdagrad;
  check_weight(kOp, name, *state, per_row ? 1 : table.dim());
  check_like(kOp, name, *state, table_name, table);
  check_shape(kOp, name, *state, per_row ? table.sizes().slice(0, 1) : table.sizes());
}

at::Tensor train_step_pairwise(
    const at::Tensor& user_factors, const at::Tensor& item_factors,
    const std::optional<at::Tensor>& user_bias, const std::optional<at::Tensor>& item_bias,
    const std::optional<at::Tensor>& user_factors_state,
    const std::optional<at::Tensor>& item_factors_state,
    const std::optional<at::Tensor>& user_bias_state,
    const std::optional<at::Tensor>& item_bias_state, const at::Tensor& users,
    const at::Tensor& pos_items, const at::Tensor& neg_items, int64_t loss, double reg,
    int64_t optimizer, double lr, double eps) {
  // Every check before any write, as fastmf/_checks.py check_train_step_pairwise makes them.
  TORCH_CHECK_VALUE(loss >= 0 && loss < kNumPairwiseLosses, "fastmf.", kOp,
                    ": unknown pairwise loss code ", loss, "; expected 0..",
                    kNumPairwiseLosses - 1);
  check_optimizer_code(kOp, optimizer);
  check_mf_tables(kOp, users, pos_items, user_factors, item_factors, user_bias, item_bias);
  check_like_device(kOp, "neg_items", neg_items, "user_factors", user_factors);
  check_id_dtype(kOp, "neg_items", neg_items);
  TORCH_CHECK_VALUE(users.size(0) == neg_items.size(0), "fastmf.", kOp, ": lengths differ (",
                    "users has ", users.size(0), ", pos_items has ", pos_items.size(0),
                    ", neg_items has ", neg_items.size(0), ")");
  // The item grouping holds 2B positions in int32.
  TORCH_CHECK_VALUE(users.size(0) < (int64_t{1} << 30), "fastmf.", kOp, ": batch of ",
                    users.size(0), " samples; at most 2^30 - 1 are supported");
  const bool has_bias = user_bias.has_value();
  if (optimizer != kSgd) {
    check_state(optimizer, "user_factors_state", user_factors_state, user_factors,
                "user_factors");
    check_state(optimizer, "item_factors_state", item_factors_state, item_factors,
                "item_factors");
    if (has_bias) {
      check_state(optimizer, "user_bias_state", user_bias_state, *user_bias, "user_bias");
      check_state(optimizer, "item_bias_state", item_bias_state, *item_bias, "item_bias");
    }
  }
  const int64_t batch = users.size(0);
  const int64_t num_items = item_factors.size(0);
  Workspace& ws = workspace();
  load_ids(kOp, "users", users.contiguous(), user_factors.size(0), ws.users);
  load_ids(kOp, kPosName, pos_items.contiguous(), num_items, ws.items);
  load_ids(kOp, "neg_items", neg_items.contiguous(), num_items, ws.negatives);
  if (batch == 0) return at::zeros({}, user_factors.options());
  int64_t* items = scratch(ws.items, 2 * batch);
  std::copy(ws.negatives.data(), ws.negatives.data() + batch, items + batch);

  at::parallel_for(0, 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t side = first; side < last; ++side) {
      if (side == 0) {
        group_rows(ws.users.data(), batch, user_factors.size(0), ws.user_groups);
      } else {
        group_rows(items, 2 * batch, num_items, ws.item_groups);
      }
    }
  });

  InPlace P(user_factors), Q(item_factors);
  std::optional<InPlace> bi, Ps, Qs, bis;
  if (has_bias) bi.emplace(*item_bias);
  if (optimizer != kSgd) {
    Ps.emplace(*user_factors_state);
    Qs.emplace(*item_factors_state);
    if (has_bias) bis.emplace(*item_bias_state);
  }
  const int64_t dim = user_factors.size(1);
  at::Tensor result = at::empty({}, user_factors.options());

  AT_DISPATCH_FLOATING_TYPES(user_factors.scalar_type(), "fastmf.train_step_pairwise", [&] {
    using T = scalar_t;
    auto ptr = [](std::optional<InPlace>& x) -> T* {
      return x ? x->get().data_ptr<T>() : nullptr;
    };
    Pairwise<T> pr;
    pr.user_factors = P.get().data_ptr<T>();
    pr.user_state = ptr(Ps);
    pr.item_factors = Q.get().data_ptr<T>();
    pr.item_state = ptr(Qs);
    pr.item_bias = ptr(bi);
    pr.item_bias_state = ptr(bis);
    pr.users = ws.users.data();
    pr.items = items;
    pr.user_groups = &ws.user_groups;
    pr.item_groups = &ws.item_groups;
    pr.batch = batch;
    pr.dim = dim;
    pr.scale = static_cast<T>(1.0 / static_cast<double>(batch));
    pr.reg_grad = static_cast<T>(2.0 * reg / static_cast<double>(batch));
    pr.reg = reg != 0.0;
    pr.lr = static_cast<T>(lr);
    pr.eps = static_cast<T>(eps);
    pr.grad = scratch(ws.typed(T{}), batch + ws.user_groups.num_groups * dim);
    pr.old_rows = pr.grad + batch;
    pr.loss = scratch(ws.loss, batch);
    pr.norms = pr.reg ? scratch(ws.norms, batch) : nullptr;
    pr.group_of = scratch(ws.group_of, batch);

    dispatch_optimizer(optimizer, [&](auto opt) {
      phase_users<T, decltype(opt)::value>(pr);
      phase_items<T, decltype(opt)::value>(pr);
    });
    const double n = static_cast<double>(batch);
    double total = ordered_sum(pr.loss, batch) / n;
    if (pr.reg) total += reg * (ordered_sum(pr.norms, batch) / n);
    result.fill_(static_cast<T>(total));
  });

  for (auto* x : {&P, &Q}) x->commit();
  for (auto* x : {&bi, &Ps, &Qs, &bis}) {
    if (*x) (*x)->commit();
  }
  return result;
}

}  // namespace
}  // namespace cpu
}  // namespace fastmf

TORCH_LIBRARY_IMPL(fastmf, CPU, m) {
  m.impl("train_step_pairwise", &fastmf::cpu::train_step_pairwise);
}
