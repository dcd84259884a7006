// The pairwise family on the CPU: train_step_pairwise, the fused BPR (or hinge) step, and
// train_step_pairwise_sampled, the same step drawing its uniform negatives first
// (csrc/cuda/pairwise.cu on the GPU). Each sample b is (u, i, j), with
//   x_b = b_i - b_j + <P[u], Q[i] - Q[j]>,   loss = mean_b l(x_b) + reg term,
// l = softplus(-x) (BPR) or relu(1 - x) (hinge: PairLoss below).
//
// Two phases, as in train_step (pointwise.cpp), but always users first: x needs the user row and two
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

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "../args.h"
#include "../checks.h"
#include "../codes.h"
#include "../negative_sampling.h"
#include "../ops.h"
#include "common.h"
#include "fused_step.h"
#include "isa.h"
#include "sampled.h"
#include "segment_update.h"
#include "segments.h"
#include "team.h"

namespace fastmf {
namespace FASTMF_CPU_NS {
namespace {

using namespace fused;

constexpr const char* kOp = "train_step_pairwise";
// fastmf/ops/checks.py check_train_step_pairwise validates the positives through the shared
// MF-table checks, which call them "items"; the native messages must read the same.
constexpr const char* kPosName = "items";
// F.softplus's default threshold: beyond it the reference's softplus is the identity and
// its gradient exactly 1, and the step must agree with the reference there too.
constexpr double kSoftplusThreshold = 20.0;

template <typename T>
struct Pairwise : StepScratch<T> {  // first phase: users; scratch indexed by sample b
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

  void bind_tables(Tables& tables) {
    user_factors = tables.user_factors.get().data_ptr<T>();
    user_state = Tables::ptr<T>(tables.user_factors_state);
    item_factors = tables.item_factors.get().data_ptr<T>();
    item_state = Tables::ptr<T>(tables.item_factors_state);
    item_bias = Tables::ptr<T>(tables.item_bias);
    item_bias_state = Tables::ptr<T>(tables.item_bias_state);
  }
};

// Pairwise losses of x = s_ui - s_uj: the sample's loss value and grad = dLoss/dx times
// scale (1/B). A new loss is a code in csrc/codes.h and a specialisation here (and in
// csrc/cuda/pairwise.cu).
template <PairwiseLoss kLoss>
struct PairLoss;

// BPR: softplus(z), z = -x, and d/dx softplus(-x) * scale, as F.softplus and its autograd
// formula compute them in T (the gradient as -(scale * e^z) / (e^z + 1)); below the
// threshold e^z cannot overflow. One exp serves both: the value's own exp and log1p in
// double, as it was first written, were 7 % of a one-thread step (perf, ml-latest-small,
// K = 1). With `fold` (StepScratch::folds: no weight, or a weight of 1) the value's
// log1p(e^z) is left to the step's sum as the factor 1 + e^z (fused_step.h log_product);
// another weight w makes the value w log1p(e^z).
template <>
struct PairLoss<PairwiseLoss::kBpr> {
  static constexpr bool kLogTerms = true;
  template <typename T>
  static void eval(T x, T scale, bool fold, T& grad, double& value, double& factor) {
    const T z = -x;
    factor = 1.0;
    if (static_cast<double>(z) > kSoftplusThreshold) {
      value = static_cast<double>(z);
      grad = -scale;
      return;
    }
    const T e = std::exp(z);
    if (fold) {
      value = 0.0;
      factor = 1.0 + static_cast<double>(e);
    } else {
      value = static_cast<double>(std::log1p(e));
    }
    grad = -((scale * e) / (e + T(1)));
  }
};

// The margin ranking hinge relu(1 - x), 1 - x formed in T as the reference forms it; the
// gradient is -scale where 1 - x > 0, else 0 (relu's autograd at 0 included).
template <>
struct PairLoss<PairwiseLoss::kHinge> {
  static constexpr bool kLogTerms = false;
  template <typename T>
  static void eval(T x, T scale, bool, T& grad, double& value, double&) {
    const T margin = T(1) - x;
    const bool active = margin > T(0);
    value = active ? static_cast<double>(margin) : 0.0;
    grad = active ? -scale : T(0);
  }
};

// first(): this thread's own work before its share (team.h parallel_for); it must not touch
// what the phase reads or writes.
template <typename T, Optimizer kOpt, typename LossFn, typename First = NoWork>
void phase_users(const Pairwise<T>& pr, const First& first = First{}) {
  const RowGroups& groups = *pr.user_groups;
  const int64_t dim = pr.dim, batch = pr.batch;
  const int64_t num_groups = groups.num_groups;
  const T* bias = pr.item_bias;
  const int64_t* pos = pr.items;
  const int64_t* neg = pr.items + batch;
  // In a team (train_steps_pairwise_sampled) this thread's share, then the team's
  // barrier; otherwise at::parallel_for.
  parallel_for(0, batch, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t first_group = groups.group_at(begin);
    const int64_t last_group = groups.group_at(end);
    std::vector<T> storage(static_cast<size_t>(2 * dim));
    T* acc = storage.data();
    T* diff = acc + dim;
    for (int64_t s = first_group; s < last_group; ++s) {
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
      const int32_t j0 = groups.starts[s], j1 = groups.starts[s + 1];
      if (pr.reg) {
        pr.first_norms[s] =
            static_cast<double>(j1 - j0) * static_cast<double>(dot(w, w, dim));
      }
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
        double factor;
        LossFn::eval(x, pr.scale, pr.folds(b), g, pr.loss[b], factor);
        if constexpr (LossFn::kLogTerms) pr.factors[b] = factor;
        pr.weigh(b, g, pr.loss[b]);
        pr.grad[b] = g;
        pr.group_of[b] = static_cast<int32_t>(s);
        add_sample(acc, g, diff, w, pr.reg_grad, pr.reg, dim);
      }
      step_row<kOpt>(w, state_of(pr.user_state, row, dim, kOpt), acc, dim, pr.lr, pr.eps);
    }
  }, first);
}

// Phase 2: the item rows over the 2B positions (b: positive of sample b, B + b: its
// negative, whose gradient is negated).
template <typename T, Optimizer kOpt>
void phase_items(const Pairwise<T>& pr) {
  const int64_t batch = pr.batch;
  const SecondSide<T> side{pr.item_factors, pr.item_state, pr.item_bias, pr.item_bias_state,
                           pr.item_groups, 2 * batch};
  const FirstResults<T> first{pr.grad, pr.group_of, pr.old_rows};
  step_from_old_rows<kOpt>(side, first, pr.dim, pr.reg_grad, pr.reg, pr.lr, pr.eps,
                           pr.second_norms, [batch](int64_t j) {
                             return j >= batch ? std::pair<int64_t, bool>(j - batch, true)
                                               : std::pair<int64_t, bool>(j, false);
                           });
}

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

// The step on the B samples ws.users[0, B) and ws.items[0, 2B) (the positives, then the
// negatives), `weights` undefined or (B,) contiguous, checked. The users are grouped on
// one thread while the other groups the 2B item positions.
void run_pairwise(const StepTables& tables_in, const StepTables& states, Workspace& ws,
                  int64_t batch, const at::Tensor& weights, PairwiseLoss loss, double reg,
                  const OptimizerArgs& opt, at::Tensor& result) {
  const at::Tensor& user_factors = tables_in.user_factors;
  const int64_t num_items = tables_in.item_factors.size(0);
  const double lr = opt.lr, eps = opt.eps;
  const int64_t* items = ws.items.data();
  at::parallel_for(0, 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t side = first; side < last; ++side) {
      if (side == 0) {
        group_rows(ws.users.data(), batch, user_factors.size(0), ws.user_groups);
      } else {
        group_rows(items, 2 * batch, num_items, ws.item_groups);
      }
    }
  });

  Tables tables(opt.optimizer, /*write_user_bias=*/false, tables_in, states);
  const int64_t dim = user_factors.size(1);
  result = at::empty({}, user_factors.options());

  AT_DISPATCH_FLOATING_TYPES(user_factors.scalar_type(), "fastmf.train_step_pairwise", [&] {
    using T = scalar_t;
    Pairwise<T> pr;
    pr.bind_tables(tables);
    pr.users = ws.users.data();
    pr.items = items;
    pr.user_groups = &ws.user_groups;
    pr.item_groups = &ws.item_groups;
    pr.bind(ws, batch, dim, ws.user_groups.num_groups, reg, lr, eps);
    pr.bind_weights(weights);

    dispatch_code(loss, [&](auto loss_code) {
      dispatch_code(opt.optimizer, [&](auto optimizer) {
        using LossFn = PairLoss<decltype(loss_code)::value>;
        phase_users<T, decltype(optimizer)::value, LossFn>(pr);
        phase_items<T, decltype(optimizer)::value>(pr);
        result.fill_(static_cast<T>(
            pr.mean_loss(ws.item_groups.num_groups, LossFn::kLogTerms)));
      });
    });
  });

  tables.commit();
}

// After the shared checks of the op boundary (csrc/ops.h).
at::Tensor train_step_pairwise(const StepTables& tables, const StepTables& states,
                               const PairwiseBatch& in, const OptimizerArgs& opt) {
  const int64_t batch = in.users.size(0);
  const int64_t num_items = tables.item_factors.size(0);
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  load_ids(kOp, "users", in.users.contiguous(), tables.user_factors.size(0), ws.users);
  load_ids(kOp, kPosName, in.pos_items.contiguous(), num_items, ws.items);
  load_ids(kOp, "neg_items", in.neg_items.contiguous(), num_items, ws.negatives);
  const at::Tensor weights = checked_weights(kOp, in.weights, batch);
  if (batch == 0) return at::zeros({}, tables.user_factors.options());
  int64_t* items = scratch(ws.items, 2 * batch);
  std::copy(ws.negatives.data(), ws.negatives.data() + batch, items + batch);
  at::Tensor result;
  run_pairwise(tables, states, ws, batch, weights, in.loss, in.reg, opt, result);
  return result;
}

// train_step_pairwise_sampled: the positives expanded to the B * K pairs, their negatives
// drawn (sampled.h) split over the threads, then the step above. Drawing
// before run_pairwise's grouping region, not inside it on the item-grouping thread,
// keeps that region's two sides even: the draws alone took longer than grouping the users.
at::Tensor train_step_pairwise_sampled(const StepTables& tables, const StepTables& states,
                                       const SampledPairwiseBatch& in,
                                       const OptimizerArgs& opt) {
  constexpr const char* op = "train_step_pairwise_sampled";
  const int64_t num_users = tables.user_factors.size(0);
  const int64_t num_items = tables.item_factors.size(0);
  const int64_t batch = in.users.size(0), k = in.num_negatives, pairs = batch * k;
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  // The batch's users go to ws.negatives, which run_pairwise does not use.
  load_ids(op, "users", in.users.contiguous(), num_users, ws.negatives);
  std::vector<int64_t> pos;
  load_ids(op, kPosName, in.pos_items.contiguous(), num_items, pos);
  // Each positive's weight serves its K pairs.
  at::Tensor weights = checked_weights(op, in.weights, batch);
  if (weights.defined()) weights = weights.repeat_interleave(k);
  if (batch == 0) return at::zeros({}, tables.user_factors.options());
  int64_t* users = scratch(ws.users, pairs);
  int64_t* items = scratch(ws.items, 2 * pairs);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < k; ++j) {
      users[b * k + j] = ws.negatives[b];
      items[b * k + j] = pos[b];
    }
  }
  draw_negatives_of(op, ws.negatives.data(), batch, k, in.pos_indptr, in.pos_indices,
                    num_items, in.seed, in.step, items + pairs);
  at::Tensor result;
  run_pairwise(tables, states, ws, pairs, weights, in.loss, in.reg, opt, result);
  return result;
}

// train_steps_pairwise_sampled: train_step_pairwise_sampled on each run of batch_size
// positives in turn, in one call. Every id, weight and CSR row is checked first, so bad
// input anywhere writes nothing. Then one team of threads (team.h) runs all the steps
// inside one OpenMP region: per step, three phases, each handed out in pieces (team.h),
// each ending at the team's barrier: the negatives drawn, while rank 0 first groups the
// users; the users' phase, while another thread first groups the item positions; the
// items' phase. (Four barriers until the groupings became a thread's own work before its
// pieces: the items' grouping, two radix passes over twice the ids, kept the users'
// thread waiting at a barrier of its own.) The arithmetic is the single step's, so the
// tables and losses are those of calling it on each slice, bit for bit. What one call
// saves, on ml-latest-small (100k positives, batch 4,096, 1 negative, 2 threads): the
// per-step Python and dispatch (about 1.1-1.3x an epoch with spinning workers), and, with
// OMP_WAIT_POLICY=PASSIVE, a sleep and a wake-up of the workers at each of a step's
// parallel regions (see benchmarks/README.md).
at::Tensor train_steps_pairwise_sampled(const StepTables& tables_in, const StepTables& states,
                                        const SampledPairwiseBatch& in, int64_t batch_size,
                                        const OptimizerArgs& opt) {
  constexpr const char* op = "train_steps_pairwise_sampled";
  const at::Tensor& user_factors = tables_in.user_factors;
  const int64_t num_users = user_factors.size(0);
  const int64_t num_items = tables_in.item_factors.size(0);
  const int64_t k = in.num_negatives, dim = user_factors.size(1);
  const SampledRun run(op, kPosName, in, num_users, num_items, batch_size);
  const int64_t n = run.n, num_steps = run.num_steps;
  const int64_t* users = run.users.data();
  const int64_t* pos = run.pos.data();
  const at::Tensor& weights = run.weights;
  at::Tensor losses = at::empty({num_steps}, user_factors.options());
  if (num_steps == 0) return losses;
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  // The step's ids, sized for the largest step before the team starts: no thread
  // resizes what another reads.
  const int64_t most_pairs = std::min(batch_size, n) * k;
  int64_t* step_users = scratch(ws.users, most_pairs);
  int64_t* items = scratch(ws.items, 2 * most_pairs);
  Tables tables(opt.optimizer, /*write_user_bias=*/false, tables_in, states);

  AT_DISPATCH_FLOATING_TYPES(user_factors.scalar_type(), "fastmf.train_step_pairwise", [&] {
    using T = scalar_t;
    Pairwise<T> pr;
    pr.bind_tables(tables);
    pr.users = step_users;
    pr.items = items;
    pr.user_groups = &ws.user_groups;
    pr.item_groups = &ws.item_groups;
    const T* all_weights = weights.defined() ? weights.data_ptr<T>() : nullptr;
    std::vector<T> expanded_weights;  // each positive's weight for its K pairs (K > 1)
    T* loss_out = losses.data_ptr<T>();

    dispatch_code(in.loss, [&](auto loss_code) {
      dispatch_code(opt.optimizer, [&](auto optimizer) {
        constexpr Optimizer kOpt = decltype(optimizer)::value;
        using LossFn = PairLoss<decltype(loss_code)::value>;
        run_team([&](Team& team, int rank) {
          // The thread that groups the item positions while the users' phase starts.
          const int item_rank = team.size() > 1 ? 1 : 0;
          for (int64_t t = 0; t < num_steps && !team.stopped(); ++t) {
            const SampledRun::Slice slice = run.slice(t);
            const int64_t lo = slice.lo, batch = slice.batch;
            const uint64_t key = slice.key;
            const int64_t pairs = batch * k;
            // The negatives drawn in pieces over the team (from the positives' own users),
            // while rank 0 first expands this step's users to their K pairs, groups them
            // and binds the step's scratch.
            parallel_for(0, pairs, kGrain, [&](int64_t p0, int64_t p1) {
              for_pairs(p0, p1, k, [&](int64_t p, int64_t b) { items[p] = pos[lo + b]; });
              run.draw(p0, p1, k, users + lo, num_items, key, items + pairs);
            }, [&] {
              if (rank != 0) return;
              for_pairs(0, pairs, k,
                        [&](int64_t p, int64_t b) { step_users[p] = users[lo + b]; });
              group_rows(step_users, pairs, num_users, ws.user_groups);
              pr.bind(ws, pairs, dim, ws.user_groups.num_groups, in.reg, opt.lr, opt.eps);
              pr.weights = nullptr;
              if (all_weights != nullptr && k == 1) pr.weights = all_weights + lo;
              if (all_weights != nullptr && k > 1) {
                expanded_weights.resize(static_cast<size_t>(pairs));
                for_pairs(0, pairs, k, [&](int64_t p, int64_t b) {
                  expanded_weights[p] = all_weights[lo + b];
                });
                pr.weights = expanded_weights.data();
              }
            });
            // The users' phase, while item_rank first groups the 2 * pairs item positions
            // (only the items' phase reads them).
            phase_users<T, kOpt, LossFn>(pr, [&] {
              if (rank == item_rank) group_rows(items, 2 * pairs, num_items, ws.item_groups);
            });
            phase_items<T, kOpt>(pr);
            // Rank 0 sums the loss before it joins the next step's draws, which touch
            // none of what it reads.
            if (rank == 0 && !team.stopped()) {
              loss_out[t] = static_cast<T>(
                  pr.mean_loss(ws.item_groups.num_groups, LossFn::kLogTerms));
            }
          }
        });
      });
    });
  });
  tables.commit();
  return losses;
}

}  // namespace
}  // namespace FASTMF_CPU_NS
}  // namespace fastmf

namespace fastmf {
namespace FASTMF_CPU_NS {

// The family's CPU kernels; csrc/cpu/register.cpp registers this build's or the
// AVX2 build's (csrc/cpu/isa.h).
void register_pairwise(torch::Library& m) {
  m.impl("train_step_pairwise", &train_step_pairwise_op<train_step_pairwise>);
  m.impl("train_step_pairwise_sampled",
         &train_step_pairwise_sampled_op<train_step_pairwise_sampled>);
  m.impl("train_steps_pairwise_sampled",
         &train_steps_pairwise_sampled_op<train_steps_pairwise_sampled>);
}

}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
