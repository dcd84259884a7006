// The pointwise family on the CPU: mf_forward, mf_backward (and mf_backward_dense, its rows
// summed into the tables' gradients), sparse_adagrad_update,
// sparse_sgd_update, the fused train_step and train_step_sampled (the same step on each
// positive and the uniform negatives it draws, sampled.h). csrc/cuda/pointwise.cu is the
// same family on the GPU.
//
// mf_forward and mf_backward are gathers plus one K-length dot product or scale per
// sample, so they parallelise over the batch with no shared writes.
//
// The sparse updates group the batch's rows by id (segments.h), sum each id's gradient
// rows in batch order, then step each touched row once (segment_update.h). Rows not in
// `ids` are never read or written and no dense gradient is ever formed.
//
// train_step: forward, loss gradient, backward and sparse optimizer update of a
// batch, with no autograd graph, no per-sample gradient rows and no dense gradients.
//
// The batch is grouped by user and by item (a counting or a radix sort, segments.h). Call
// the side with more distinct rows "first" (usually users: the larger, colder table) and
// the other "second".
//   Phase 1, per first-side row r: load r's factors once; for each of its samples, gather
//     the second-side row, predict, take the loss and g_b = dLoss/dpred_b, and sum r's
//     gradient; keep a copy of r's old factors; step r at once.
//   Phase 2, per second-side row: sum its gradient from g_b and the copies of the old
//     first-side rows, and step it.
// So every gradient comes from the weights as they were before the step, each touched row
// of either table is written once, and the cold table's rows are read once.
//
// Work is split by sorted batch position, so a hot id costs its thread what its samples
// cost and no more. Each row's sum runs in batch order on one thread and the loss is
// summed per sample in a fixed order afterwards, so results do not depend on the thread
// count.
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

// ---------------------------------------------------------------------------------------
// mf_forward, mf_backward

constexpr int64_t kForwardGrain = 512;

// The checked ids and contiguous factor tables mf_forward and mf_backward read.
struct MfInputs {
  std::vector<int64_t> users, items;
  int64_t batch, dim;
  at::Tensor P, Q;

  MfInputs(const char* op, const at::Tensor& user_ids, const at::Tensor& item_ids,
           const at::Tensor& user_factors, const at::Tensor& item_factors)
      : batch(user_ids.size(0)),
        dim(user_factors.size(1)),
        P(user_factors.contiguous()),
        Q(item_factors.contiguous()) {
    load_ids(op, "users", user_ids.contiguous(), user_factors.size(0), users);
    load_ids(op, "items", item_ids.contiguous(), item_factors.size(0), items);
  }
};

at::Tensor mf_forward(const at::Tensor& users, const at::Tensor& items,
                      const at::Tensor& user_factors, const at::Tensor& item_factors,
                      const std::optional<at::Tensor>& user_bias,
                      const std::optional<at::Tensor>& item_bias, double global_mean) {
  const char* op = "mf_forward";
  check_mf_tables(op, users, items, user_factors, item_factors, user_bias, item_bias);
  const MfInputs in(op, users, items, user_factors, item_factors);
  const std::vector<int64_t>& u = in.users;
  const std::vector<int64_t>& i = in.items;
  const int64_t batch = in.batch, dim = in.dim;
  const at::Tensor& P = in.P;
  const at::Tensor& Q = in.Q;
  const bool has_bias = user_bias.has_value();
  const at::Tensor bu = has_bias ? user_bias->contiguous() : at::Tensor();
  const at::Tensor bi = has_bias ? item_bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({batch}, P.options());
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "fastmf.mf_forward", [&] {
    const scalar_t* p = P.data_ptr<scalar_t>();
    const scalar_t* q = Q.data_ptr<scalar_t>();
    const scalar_t* bu_ = has_bias ? bu.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bi_ = has_bias ? bi.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t mu = static_cast<scalar_t>(global_mean);
    at::parallel_for(0, batch, kForwardGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        // Same association as the reference: ((dot + mu) + b_u) + b_i.
        scalar_t pred = dot(p + u[b] * dim, q + i[b] * dim, dim) + mu;
        if (bu_ != nullptr) pred = pred + bu_[u[b]] + bi_[i[b]];
        o[b] = pred;
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mf_backward(const at::Tensor& grad_out,
                                               const at::Tensor& users,
                                               const at::Tensor& items,
                                               const at::Tensor& user_factors,
                                               const at::Tensor& item_factors) {
  const char* op = "mf_backward";
  check_mf_backward(op, grad_out, users, items, user_factors, item_factors);
  const MfInputs in(op, users, items, user_factors, item_factors);
  const std::vector<int64_t>& u = in.users;
  const std::vector<int64_t>& i = in.items;
  const int64_t batch = in.batch, dim = in.dim;
  const at::Tensor& P = in.P;
  const at::Tensor& Q = in.Q;
  const at::Tensor G = grad_out.contiguous();
  at::Tensor grad_p = at::empty({batch, dim}, P.options());
  at::Tensor grad_q = at::empty({batch, dim}, P.options());
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "fastmf.mf_backward", [&] {
    const scalar_t* p = P.data_ptr<scalar_t>();
    const scalar_t* q = Q.data_ptr<scalar_t>();
    const scalar_t* g = G.data_ptr<scalar_t>();
    scalar_t* gp = grad_p.data_ptr<scalar_t>();
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    at::parallel_for(0, batch, kForwardGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t gb = g[b];
        const scalar_t* qi = q + i[b] * dim;
        const scalar_t* pu = p + u[b] * dim;
        scalar_t* out_p = gp + b * dim;
        scalar_t* out_q = gq + b * dim;
        for (int64_t k = 0; k < dim; ++k) out_p[k] = gb * qi[k];
        for (int64_t k = 0; k < dim; ++k) out_q[k] = gb * pu[k];
      }
    });
  });
  return {grad_p, grad_q};
}

// ---------------------------------------------------------------------------------------
// mf_backward_dense

// Output rows [lo, hi) of one side: out[rows_of[b]] += g[b] * other[other_of[b]] for b in
// batch order, the product rounded, then the sum (-ffp-contract=off): mf_backward's row
// summed by scatter_rows, the same operations. Its own function with arguments by value,
// as scatter_range (csrc/cpu/embedding_bag.cpp) is, for the same reason.
template <typename T>
void add_side_rows(const T* __restrict g, const int64_t* __restrict rows_of,
                   const int64_t* __restrict other_of, const T* __restrict other, int64_t batch,
                   int64_t dim, int64_t lo, int64_t hi, T* __restrict out) {
  constexpr int64_t kAhead = 16;
  for (int64_t b = 0; b < batch; ++b) {
    if (b + kAhead < batch) {
      const int64_t ahead = rows_of[b + kAhead];
      if (ahead >= lo && ahead < hi) {
        prefetch_row(other + other_of[b + kAhead] * dim, dim, false);
        prefetch_row(out + ahead * dim, dim, true);
      }
    }
    const int64_t r = rows_of[b];
    if (r < lo || r >= hi) continue;
    const T gb = g[b];
    const T* src = other + other_of[b] * dim;
    T* dst = out + r * dim;
    for (int64_t k = 0; k < dim; ++k) dst[k] += gb * src[k];
  }
}

// Below this many values added per side (B K) one thread does both sides: the parallel
// region costs more than it saves.
constexpr int64_t kDenseParallelValues = int64_t{1} << 15;

// The two tables' dense gradients, each row's terms summed in batch order from zero. The
// work is split by side and, with more than two threads, by ranges of each side's rows;
// every task scans the whole batch and adds only its rows' terms, so the bits do not
// depend on the thread count. Against mf_backward then scatter_rows for each side, no
// (B, K) rows are written and read back: in a Hybrid BPR step (8,192 pairs, 64 columns,
// into 610 user and 4,586 item rows) those two calls took 0.5-0.9 ms, the rows (4 MB)
// out of the caches by the time they were summed, and both scatters ran on one thread.
std::tuple<at::Tensor, at::Tensor> mf_backward_dense(const at::Tensor& grad_out,
                                                     const at::Tensor& users,
                                                     const at::Tensor& items,
                                                     const at::Tensor& user_factors,
                                                     const at::Tensor& item_factors) {
  const char* op = "mf_backward_dense";
  check_mf_backward(op, grad_out, users, items, user_factors, item_factors);
  const MfInputs in(op, users, items, user_factors, item_factors);
  const int64_t batch = in.batch, dim = in.dim;
  const at::Tensor G = grad_out.contiguous();
  if (batch == 0 || dim == 0) {
    return {at::zeros(in.P.sizes(), in.P.options()), at::zeros(in.Q.sizes(), in.Q.options())};
  }
  // Each task zeroes its own rows just before adding into them: in parallel, and into the
  // cache the adds then use. at::zeros filled both tables on one thread first (79 of a
  // call's 169 us in a Hybrid BPR step at batch 4,096, two threads).
  at::Tensor grad_p = at::empty(in.P.sizes(), in.P.options());
  at::Tensor grad_q = at::empty(in.Q.sizes(), in.Q.options());
  const int64_t threads = batch * dim >= kDenseParallelValues ? at::get_num_threads() : 1;
  // Ranges per side: one each on up to two threads, else half the threads each.
  const int64_t ranges = std::max<int64_t>(1, threads / 2);
  const int64_t num_p = in.P.size(0), num_q = in.Q.size(0);
  AT_DISPATCH_FLOATING_TYPES(in.P.scalar_type(), "fastmf.mf_backward_dense", [&] {
    const scalar_t* g = G.data_ptr<scalar_t>();
    const scalar_t* p = in.P.data_ptr<scalar_t>();
    const scalar_t* q = in.Q.data_ptr<scalar_t>();
    scalar_t* gp = grad_p.data_ptr<scalar_t>();
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    const int64_t* u = in.users.data();
    const int64_t* i = in.items.data();
    const int64_t grain = threads > 1 ? 1 : 2 * ranges;
    at::parallel_for(0, 2 * ranges, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c = t % ranges;
        // Tasks [0, ranges) write the users' rows (from the items' factors), the rest the
        // items' rows (from the users').
        const bool user_side = t < ranges;
        const int64_t rows = user_side ? num_p : num_q;
        const int64_t lo = chunk_begin(c, ranges, rows), hi = chunk_begin(c + 1, ranges, rows);
        scalar_t* out = user_side ? gp : gq;
        std::fill(out + lo * dim, out + hi * dim, scalar_t(0));
        add_side_rows(g, user_side ? u : i, user_side ? i : u, user_side ? q : p, batch, dim,
                      lo, hi, out);
      }
    });
  });
  return {grad_p, grad_q};
}

// ---------------------------------------------------------------------------------------
// sparse_adagrad_update, sparse_sgd_update

struct SparseWorkspace {
  std::vector<int64_t> ids;
  RowGroups groups;

  size_t bytes() const { return scratch_bytes(ids) + groups.bytes(); }
  void release() { *this = SparseWorkspace(); }
};

SparseWorkspace& sparse_workspace() {
  thread_local SparseWorkspace ws;
  return ws;
}

template <Optimizer kOpt>
void run_sparse_update(const char* op, const at::Tensor& weight, const at::Tensor* state,
                       const at::Tensor& ids, const at::Tensor& grad_rows, double lr,
                       double eps, bool rowwise) {
  check_sparse_update(op, weight, state, ids, grad_rows, rowwise, lr, eps);
  SparseWorkspace& ws = sparse_workspace();
  const TrimOnExit<SparseWorkspace> trim(ws);
  load_ids(op, "ids", ids.contiguous(), weight.size(0), ws.ids);
  const int64_t batch = ids.size(0);
  if (batch == 0) return;
  group_rows(ws.ids.data(), batch, weight.size(0), ws.groups);
  InPlace w(weight);
  std::optional<InPlace> st;
  if (state != nullptr) st.emplace(*state);
  const at::Tensor g = grad_rows.contiguous();
  const bool scalar_rows = weight.dim() == 1;
  const int64_t width = scalar_rows ? 1 : weight.size(1);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "fastmf.sparse_update", [&] {
    update_segments<kOpt, scalar_t>(w.get().data_ptr<scalar_t>(),
                                    st ? st->get().data_ptr<scalar_t>() : nullptr, width,
                                    scalar_rows, rowwise && !scalar_rows, ws.groups,
                                    g.data_ptr<scalar_t>(), batch, static_cast<scalar_t>(lr),
                                    static_cast<scalar_t>(eps));
  });
  w.commit();
  if (st) st->commit();
}

void sparse_adagrad_update(const at::Tensor& weight, const at::Tensor& state,
                           const at::Tensor& ids, const at::Tensor& grad_rows, double lr,
                           double eps, bool rowwise) {
  run_sparse_update<kAdagrad>("sparse_adagrad_update", weight, &state, ids, grad_rows, lr, eps,
                              rowwise);
}

void sparse_sgd_update(const at::Tensor& weight, const at::Tensor& ids,
                       const at::Tensor& grad_rows, double lr) {
  run_sparse_update<kSgd>("sparse_sgd_update", weight, nullptr, ids, grad_rows, lr, 0.0, false);
}

// ---------------------------------------------------------------------------------------
// train_step

using namespace fused;

// Pointwise losses: grad = dLoss/dpred of the batch mean (scale = 1/B) and the sample's
// loss value for the reported mean; a loss with kLogTerms leaves the log(1 + e) term of a
// sample that folds (StepScratch::folds) as the factor 1 + e (fused_step.h log_product). A new
// loss is a code in csrc/codes.h and a specialisation here (and its formula in
// csrc/cuda/pointwise.cu).
template <Loss kLoss>
struct PointwiseLoss;

template <>
struct PointwiseLoss<Loss::kMse> {
  static constexpr bool kLogTerms = false;
  template <typename T>
  static void eval(T pred, T target, T scale, bool, T& grad, double& value, double&) {
    const T diff = pred - target;
    grad = (T(2) * scale) * diff;
    value = static_cast<double>(diff) * static_cast<double>(diff);
  }
};

template <>
struct PointwiseLoss<Loss::kHuber> {  // F.huber_loss(delta=kHuberDelta)
  static constexpr bool kLogTerms = false;
  template <typename T>
  static void eval(T pred, T target, T scale, bool, T& grad, double& value, double&) {
    const T diff = pred - target;
    const double d = static_cast<double>(diff);
    const double a = std::fabs(d);
    value = a < kHuberDelta ? 0.5 * d * d : kHuberDelta * (a - 0.5 * kHuberDelta);
    const T delta = static_cast<T>(kHuberDelta);
    grad = diff <= -delta ? -(scale * delta) : (diff >= delta ? scale * delta : scale * diff);
  }
};

template <>
struct PointwiseLoss<Loss::kBce> {  // with logits
  static constexpr bool kLogTerms = true;
  template <typename T>
  static void eval(T pred, T target, T scale, bool fold, T& grad, double& value,
                   double& factor) {
    const double x = static_cast<double>(pred);
    const double t = static_cast<double>(target);
    // max(x, 0) - x t + log(1 + e^-|x|): never overflows, never takes log(0).
    const double e = std::exp(-std::fabs(x));
    value = std::max(x, 0.0) - x * t;
    if (fold) {
      factor = 1.0 + e;
    } else {
      value += std::log1p(e);
      factor = 1.0;
    }
    const T sigmoid = T(1) / (T(1) + std::exp(-pred));
    grad = (sigmoid - target) * scale;
  }
};

// One side of the factorization: a factor table, its optional bias, their states and the
// batch's ids into them, grouped.
template <typename T>
struct Side {
  T* factors;
  T* bias;            // null without biases
  T* factors_state;   // null for SGD
  T* bias_state;      // null for SGD or without biases
  const int64_t* ids;  // (B,)
  const RowGroups* groups;
};

template <typename T>
struct Problem : StepScratch<T> {
  Side<T> first, second;
  const T* targets;
  T global_mean;
  bool first_is_user;

  // The two sides of `tables` over ws's grouped ids (users in ws.users, items in
  // ws.items), the side with more groups first (its rows' copies are the ones kept), and
  // the step's scratch bound for the B = batch rows.
  void bind_sides(Tables& tables, Workspace& ws, int64_t batch, int64_t dim, double reg,
                  double lr, double eps) {
    const Side<T> user{tables.user_factors.get().data_ptr<T>(),
                       Tables::ptr<T>(tables.user_bias),
                       Tables::ptr<T>(tables.user_factors_state),
                       Tables::ptr<T>(tables.user_bias_state), ws.users.data(), &ws.user_groups};
    const Side<T> item{tables.item_factors.get().data_ptr<T>(),
                       Tables::ptr<T>(tables.item_bias),
                       Tables::ptr<T>(tables.item_factors_state),
                       Tables::ptr<T>(tables.item_bias_state), ws.items.data(), &ws.item_groups};
    first_is_user = ws.user_groups.num_groups >= ws.item_groups.num_groups;
    first = first_is_user ? user : item;
    second = first_is_user ? item : user;
    this->bind(ws, batch, dim, first.groups->num_groups, reg, lr, eps);
  }
};

template <Optimizer kOpt, typename T>
inline void step_bias(const Side<T>& side, int64_t row, T g, T lr, T eps) {
  step_scalar<kOpt>(side.bias + row, kOpt == kSgd ? nullptr : side.bias_state + row, g, lr,
                    eps);
}

template <typename T, typename LossFn, Optimizer kOpt>
void phase_first(const Problem<T>& pr) {
  const Side<T>& a = pr.first;
  const Side<T>& o = pr.second;
  const RowGroups& groups = *a.groups;
  const int64_t dim = pr.dim;
  const int64_t num_groups = groups.num_groups;
  const bool has_bias = a.bias != nullptr;
  // In a team (train_steps_sampled) this thread's share, then the team's barrier;
  // otherwise at::parallel_for.
  parallel_for(0, pr.batch, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t first = groups.group_at(begin);
    const int64_t last = groups.group_at(end);
    std::vector<T> acc_storage(static_cast<size_t>(dim));
    T* acc = acc_storage.data();
    for (int64_t s = first; s < last; ++s) {
      if (s + kPrefetchGroups < num_groups) {
        prefetch_table_row<kOpt>(a.factors, a.factors_state, groups.rows[s + kPrefetchGroups],
                                 dim);
      }
      const int64_t row = groups.rows[s];
      T* w = a.factors + row * dim;
      T* old = pr.old_rows + s * dim;
      for (int64_t k = 0; k < dim; ++k) {
        old[k] = w[k];
        acc[k] = T(0);
      }
      const T own_bias = has_bias ? a.bias[row] : T(0);
      T bias_sum = T(0);
      const int32_t j0 = groups.starts[s], j1 = groups.starts[s + 1];
      if (pr.reg) {
        pr.first_norms[s] = static_cast<double>(j1 - j0) *
                            static_cast<double>(dot(w, w, dim) + own_bias * own_bias);
      }
      for (int32_t j = j0; j < j1; ++j) {
        if (j + kPrefetchSamples < pr.batch) {
          const int64_t ahead = o.ids[groups.order[j + kPrefetchSamples]];
          prefetch_row(o.factors + ahead * dim, dim, false);
          if (has_bias) __builtin_prefetch(o.bias + ahead, 0);
        }
        const int64_t b = groups.order[j];
        const int64_t other = o.ids[b];
        const T* q = o.factors + other * dim;
        // The reference's association: ((<p, q> + mu) + b_u) + b_i.
        T pred = dot(w, q, dim) + pr.global_mean;
        if (has_bias) {
          pred = pr.first_is_user ? (pred + own_bias) + o.bias[other]
                                  : (pred + o.bias[other]) + own_bias;
        }
        T g;
        double factor;
        LossFn::eval(pred, pr.targets[b], pr.scale, pr.folds(b), g, pr.loss[b], factor);
        if constexpr (LossFn::kLogTerms) pr.factors[b] = factor;
        pr.weigh(b, g, pr.loss[b]);
        pr.grad[b] = g;
        pr.group_of[b] = static_cast<int32_t>(s);
        add_sample(acc, g, q, w, pr.reg_grad, pr.reg, dim);
        bias_sum += pr.reg ? g + pr.reg_grad * own_bias : g;
      }
      step_row<kOpt>(w, state_of(a.factors_state, row, dim, kOpt), acc, dim, pr.lr, pr.eps);
      if (has_bias) step_bias<kOpt>(a, row, bias_sum, pr.lr, pr.eps);
    }
  });
}

// Phase 2: the second side's rows, from g_b and the first side's old rows.
template <typename T, Optimizer kOpt>
void phase_second(const Problem<T>& pr) {
  const Side<T>& a = pr.second;
  const SecondSide<T> side{a.factors, a.factors_state, a.bias, a.bias_state, a.groups,
                           pr.batch};
  const FirstResults<T> first{pr.grad, pr.group_of, pr.old_rows};
  step_from_old_rows<kOpt>(side, first, pr.dim, pr.reg_grad, pr.reg, pr.lr, pr.eps,
                           pr.second_norms,
                           [](int64_t b) { return std::pair<int64_t, bool>(b, false); });
}

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

// The step on the B rows ws.users[0, B), ws.items[0, B) against targets (B,), contiguous,
// like the tables, finite; `weights` undefined or (B,) like the targets, checked.
at::Tensor run_pointwise(const StepTables& tables_in, const StepTables& states, Workspace& ws,
                         int64_t batch, const at::Tensor& t, const at::Tensor& weights,
                         double global_mean, Loss loss, double reg, const OptimizerArgs& opt) {
  const at::Tensor& user_factors = tables_in.user_factors;
  const at::Tensor& item_factors = tables_in.item_factors;
  const double lr = opt.lr, eps = opt.eps;
  at::parallel_for(0, 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t side = first; side < last; ++side) {
      if (side == 0) {
        group_rows(ws.users.data(), batch, user_factors.size(0), ws.user_groups);
      } else {
        group_rows(ws.items.data(), batch, item_factors.size(0), ws.item_groups);
      }
    }
  });

  Tables tables(opt.optimizer, /*write_user_bias=*/true, tables_in, states);
  const int64_t dim = user_factors.size(1);
  at::Tensor result = at::empty({}, user_factors.options());

  AT_DISPATCH_FLOATING_TYPES(user_factors.scalar_type(), "fastmf.train_step", [&] {
    using T = scalar_t;
    Problem<T> pr;
    pr.bind_sides(tables, ws, batch, dim, reg, lr, eps);
    pr.bind_weights(weights);
    pr.targets = t.data_ptr<T>();
    pr.global_mean = static_cast<T>(global_mean);

    dispatch_code(loss, [&](auto loss) {
      dispatch_code(opt.optimizer, [&](auto optimizer) {
        using LossFn = PointwiseLoss<decltype(loss)::value>;
        phase_first<T, LossFn, decltype(optimizer)::value>(pr);
        phase_second<T, decltype(optimizer)::value>(pr);
        result.fill_(static_cast<T>(
            pr.mean_loss(pr.second.groups->num_groups, LossFn::kLogTerms)));
      });
    });
  });

  tables.commit();
  return result;
}

// After the shared checks of the op boundary (csrc/ops.h).
at::Tensor train_step(const StepTables& tables, const StepTables& states,
                      const PointwiseBatch& in, const OptimizerArgs& opt) {
  const char* op = "train_step";
  const at::Tensor& users = in.users;
  TORCH_CHECK_VALUE(users.size(0) < (int64_t{1} << 31), "fastmf.", op, ": batch of ",
                    users.size(0), " samples; at most 2^31 - 1 are supported");
  const at::Tensor t = in.targets.contiguous();
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  load_ids(op, "users", users.contiguous(), tables.user_factors.size(0), ws.users);
  load_ids(op, "items", in.items.contiguous(), tables.item_factors.size(0), ws.items);
  const int64_t batch = users.size(0);
  AT_DISPATCH_FLOATING_TYPES(tables.user_factors.scalar_type(), "fastmf.train_step", [&] {
    check_finite(op, "targets", t.data_ptr<scalar_t>(), batch);
  });
  const at::Tensor w = checked_weights(op, in.weights, batch);
  if (batch == 0) return at::zeros({}, tables.user_factors.options());
  return run_pointwise(tables, states, ws, batch, t, w, in.global_mean, in.loss, in.reg, opt);
}

// train_step_sampled: rows [0, B) are the positives, rows B + b * K + k their negatives
// (the reference's torch.cat order), drawn as train_step_pairwise_sampled draws them
// (sampled.h); then the step above against targets 1 and 0.
at::Tensor train_step_sampled(const StepTables& tables, const StepTables& states,
                              const SampledPointwiseBatch& in, const OptimizerArgs& opt) {
  constexpr const char* op = "train_step_sampled";
  const int64_t num_users = tables.user_factors.size(0);
  const int64_t num_items = tables.item_factors.size(0);
  const int64_t batch = in.users.size(0), k = in.num_negatives, rows = batch * (1 + k);
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  // The positives' rows first, loaded in place; growing the scratch keeps them.
  load_ids(op, "users", in.users.contiguous(), num_users, ws.users);
  load_ids(op, "items", in.pos_items.contiguous(), num_items, ws.items);
  // The positives' weights, then 1 for each negative's row.
  at::Tensor weights = checked_weights(op, in.weights, batch);
  if (weights.defined()) weights = at::cat({weights, at::ones({batch * k}, weights.options())});
  if (batch == 0) return at::zeros({}, tables.user_factors.options());
  int64_t* users = scratch(ws.users, rows);
  int64_t* items = scratch(ws.items, rows);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < k; ++j) users[batch + b * k + j] = users[b];
  }
  draw_negatives_of(op, users, batch, k, in.pos_indptr, in.pos_indices, num_items, in.seed,
                    in.step, items + batch);
  at::Tensor targets = at::zeros({rows}, tables.user_factors.options());
  targets.narrow(0, 0, batch).fill_(1);
  return run_pointwise(tables, states, ws, rows, targets, weights, in.global_mean, in.loss,
                       in.reg, opt);
}

// train_steps_sampled: train_step_sampled on each run of batch_size positives in turn, in
// one call, as train_steps_pairwise_sampled (pairwise.cpp) runs its step: every id, weight
// and CSR row checked first, then one team of threads (team.h) runs all the steps in one
// OpenMP region. Per step: the negatives drawn in pieces while rank 0 first lays out and
// groups the users; the items grouped and the step bound on one thread (which side goes
// first, as run_pointwise picks it, needs both groupings); then the two phases: four
// barriers, and the single step's arithmetic, so the tables and losses are those of
// calling it on each slice, bit for bit.
at::Tensor train_steps_sampled(const StepTables& tables_in, const StepTables& states,
                               const SampledPointwiseBatch& in, int64_t batch_size,
                               const OptimizerArgs& opt) {
  constexpr const char* op = "train_steps_sampled";
  const at::Tensor& user_factors = tables_in.user_factors;
  const int64_t num_users = user_factors.size(0);
  const int64_t num_items = tables_in.item_factors.size(0);
  const int64_t k = in.num_negatives, dim = user_factors.size(1);
  const SampledRun run(op, "items", in, num_users, num_items, batch_size);
  const int64_t n = run.n, num_steps = run.num_steps;
  const int64_t* users = run.users.data();
  const int64_t* pos = run.pos.data();
  const at::Tensor& weights = run.weights;
  at::Tensor losses = at::empty({num_steps}, user_factors.options());
  if (num_steps == 0) return losses;
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  // The step's rows, sized for the largest step before the team starts.
  const int64_t most_rows = std::min(batch_size, n) * (1 + k);
  int64_t* step_users = scratch(ws.users, most_rows);
  int64_t* items = scratch(ws.items, most_rows);
  Tables tables(opt.optimizer, /*write_user_bias=*/true, tables_in, states);

  AT_DISPATCH_FLOATING_TYPES(user_factors.scalar_type(), "fastmf.train_step", [&] {
    using T = scalar_t;
    const T* all_weights = weights.defined() ? weights.data_ptr<T>() : nullptr;
    std::vector<T> targets, row_weights;  // per step: 1 then 0; the positives' weights then 1
    Problem<T> pr;
    T* loss_out = losses.data_ptr<T>();

    dispatch_code(in.loss, [&](auto loss_code) {
      dispatch_code(opt.optimizer, [&](auto optimizer) {
        constexpr Optimizer kOpt = decltype(optimizer)::value;
        using LossFn = PointwiseLoss<decltype(loss_code)::value>;
        run_team([&](Team& team, int rank) {
          const int item_rank = team.size() > 1 ? 1 : 0;
          for (int64_t t = 0; t < num_steps && !team.stopped(); ++t) {
            const SampledRun::Slice slice = run.slice(t);
            const int64_t lo = slice.lo, batch = slice.batch;
            const uint64_t key = slice.key;
            const int64_t step_rows = batch * (1 + k);
            // Row b (< batch) is positive b; row batch + p the p-th pair's negative. The
            // negatives drawn in pieces over the team (from the positives' own users), while
            // rank 0 first lays out and groups the step's users.
            parallel_for(0, batch * k, kGrain, [&](int64_t p0, int64_t p1) {
              for_pairs(p0, p1, k, [&](int64_t p, int64_t b) {
                if (p == b * k) items[b] = pos[lo + b];
              });
              run.draw(p0, p1, k, users + lo, num_items, key, items + batch);
            }, [&] {
              if (rank != 0) return;
              for (int64_t b = 0; b < batch; ++b) step_users[b] = users[lo + b];
              for_pairs(0, batch * k, k,
                        [&](int64_t p, int64_t b) { step_users[batch + p] = users[lo + b]; });
              group_rows(step_users, step_rows, num_users, ws.user_groups);
            });
            // The items grouped, and the step bound (which side goes first, as run_pointwise
            // picks it, needs both groupings), on item_rank.
            team.sync([&] {
              if (rank != item_rank) return;
              group_rows(items, step_rows, num_items, ws.item_groups);
              pr.bind_sides(tables, ws, step_rows, dim, in.reg, opt.lr, opt.eps);
              targets.assign(static_cast<size_t>(step_rows), T(0));
              std::fill(targets.begin(), targets.begin() + batch, T(1));
              pr.targets = targets.data();
              pr.global_mean = static_cast<T>(in.global_mean);
              pr.weights = nullptr;
              if (all_weights != nullptr) {
                row_weights.assign(static_cast<size_t>(step_rows), T(1));
                std::copy(all_weights + lo, all_weights + lo + batch, row_weights.begin());
                pr.weights = row_weights.data();
              }
            });
            phase_first<T, LossFn, kOpt>(pr);
            phase_second<T, kOpt>(pr);
            // Rank 0 sums the loss before it joins the next step's draws.
            if (rank == 0 && !team.stopped()) {
              loss_out[t] = static_cast<T>(
                  pr.mean_loss(pr.second.groups->num_groups, LossFn::kLogTerms));
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
void register_pointwise(torch::Library& m) {
  m.impl("mf_forward", &mf_forward);
  m.impl("mf_backward", &mf_backward);
  m.impl("mf_backward_dense", &mf_backward_dense);
  m.impl("sparse_adagrad_update", &sparse_adagrad_update);
  m.impl("sparse_sgd_update", &sparse_sgd_update);
  m.impl("train_step", &train_step_op<train_step>);
  m.impl("train_step_sampled", &train_step_sampled_op<train_step_sampled>);
  m.impl("train_steps_sampled", &train_steps_sampled_op<train_steps_sampled>);
}

}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
