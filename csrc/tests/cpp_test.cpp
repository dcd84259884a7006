// C++ checks of the fastmf CPU kernels, called by name through the PyTorch dispatcher
// (as Python does), against plain ATen versions of fastmf/ops/reference. Built by
// CMakeLists.txt as fastmf_cpp_test; run under sanitizers by .ci/sanitize.sh.
// Exits 0 when every check passes, 1 otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "codes.h"
#include "cpu/segments.h"

namespace {

constexpr int64_t kMse = static_cast<int64_t>(fastmf::Loss::kMse);
constexpr int64_t kAdagrad = static_cast<int64_t>(fastmf::Optimizer::kAdagrad);

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

bool close(const Tensor& a, const Tensor& b, double tol = 1e-10) {
  return a.sizes() == b.sizes() && at::allclose(a, b, tol, tol);
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

Tensor mf_forward(const Tensor& users, const Tensor& items, const Tensor& P, const Tensor& Q,
                  const OptTensor& bu, const OptTensor& bi, double global_mean) {
  static auto h = op("fastmf::mf_forward")
                      .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const OptTensor&, const OptTensor&, double)>();
  return h.call(users, items, P, Q, bu, bi, global_mean);
}

void sparse_adagrad_update(const Tensor& w, const Tensor& state, const Tensor& ids,
                           const Tensor& grad_rows, double lr, double eps, bool rowwise) {
  static auto h = op("fastmf::sparse_adagrad_update")
                      .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  double, double, bool)>();
  h.call(w, state, ids, grad_rows, lr, eps, rowwise);
}

Tensor train_step(const Tensor& P, const Tensor& Q, const OptTensor& bu, const OptTensor& bi,
                  const OptTensor& sP, const OptTensor& sQ, const OptTensor& sbu,
                  const OptTensor& sbi, const Tensor& users, const Tensor& items,
                  const Tensor& targets, double global_mean, int64_t loss, double reg,
                  int64_t optimizer, double lr, double eps) {
  static auto h =
      op("fastmf::train_step")
          .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                        const Tensor&, const Tensor&, const Tensor&, double, int64_t, double,
                        int64_t, double, double, const OptTensor&)>();
  // The schema's last argument, per-sample weights: none here (every sample weighs 1).
  return h.call(P, Q, bu, bi, sP, sQ, sbu, sbi, users, items, targets, global_mean, loss, reg,
                optimizer, lr, eps, std::nullopt);
}

// ---- plain ATen versions of fastmf/ops/reference -------------------------------------------

Tensor ref_forward(const Tensor& users, const Tensor& items, const Tensor& P, const Tensor& Q,
                   const Tensor& bu, const Tensor& bi, double global_mean) {
  auto u = users.to(at::kLong), i = items.to(at::kLong);
  return (P.index_select(0, u) * Q.index_select(0, i)).sum(1) + global_mean +
         bu.index_select(0, u) + bi.index_select(0, i);
}

// Element-wise Adagrad, or row-wise (state (N,)), with the grad rows of each id summed
// first. Untouched rows get a zero sum, which leaves them exactly as they were.
void ref_adagrad(Tensor& w, Tensor& state, const Tensor& ids, const Tensor& grad_rows,
                 double lr, double eps, bool rowwise) {
  auto g = at::zeros_like(w).index_add_(0, ids.to(at::kLong), grad_rows);
  if (rowwise && w.dim() == 2) {
    state = state + g.pow(2).mean(1);
    w = w - lr * g / (state.sqrt() + eps).unsqueeze(1);
  } else {
    state = state + g.pow(2);
    w = w - lr * g / (state.sqrt() + eps);
  }
}

// One mse + element-wise Adagrad step with biases; returns the loss.
Tensor ref_train_step(Tensor& P, Tensor& Q, Tensor& bu, Tensor& bi, Tensor& sP, Tensor& sQ,
                      Tensor& sbu, Tensor& sbi, const Tensor& users, const Tensor& items,
                      const Tensor& targets, double global_mean, double reg, double lr,
                      double eps) {
  auto u = users.to(at::kLong), i = items.to(at::kLong);
  const double n = static_cast<double>(users.numel());
  auto p = P.index_select(0, u), q = Q.index_select(0, i);
  auto b_u = bu.index_select(0, u), b_i = bi.index_select(0, i);
  auto pred = (p * q).sum(1) + global_mean + b_u + b_i;
  auto err = pred - targets;
  auto per_sample = p.pow(2).sum(1) + q.pow(2).sum(1) + b_u.pow(2) + b_i.pow(2);
  auto loss = err.pow(2).mean() + reg * per_sample.mean();
  auto dpred = 2.0 * err / n;
  const double dreg = 2.0 * reg / n;
  auto gp = dpred.unsqueeze(1) * q + dreg * p;
  auto gq = dpred.unsqueeze(1) * p + dreg * q;
  auto gbu = dpred + dreg * b_u;
  auto gbi = dpred + dreg * b_i;
  ref_adagrad(P, sP, u, gp, lr, eps, false);
  ref_adagrad(Q, sQ, i, gq, lr, eps, false);
  ref_adagrad(bu, sbu, u, gbu, lr, eps, false);
  ref_adagrad(bi, sbi, i, gbi, lr, eps, false);
  return loss;
}

// ---- checks --------------------------------------------------------------------------------

const auto kF64 = at::TensorOptions().dtype(at::kDouble);

Tensor id_tensor(std::vector<int64_t> values, at::ScalarType dtype = at::kLong) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(dtype);
}

void test_forward(at::ScalarType id_type) {
  const int64_t U = 7, I = 5, K = 6, B = 40;  // B >> U, I: many duplicate ids
  auto P = at::randn({U, K}, kF64), Q = at::randn({I, K}, kF64);
  auto bu = at::randn({U}, kF64), bi = at::randn({I}, kF64);
  auto users = at::randint(U, {B}, at::TensorOptions().dtype(id_type));
  auto items = at::randint(I, {B}, at::TensorOptions().dtype(id_type));
  auto got = mf_forward(users, items, P, Q, bu, bi, 3.5);
  check(close(got, ref_forward(users, items, P, Q, bu, bi, 3.5)),
        std::string("mf_forward ") + c10::toString(id_type));
  auto no_bias = mf_forward(users, items, P, Q, std::nullopt, std::nullopt, 0.0);
  auto u = users.to(at::kLong), i = items.to(at::kLong);
  check(close(no_bias, (P.index_select(0, u) * Q.index_select(0, i)).sum(1)),
        "mf_forward without biases");
}

// mf_backward_dense against index_add_ of the per-sample rows (the same operations in
// batch order: equal to the bit), on one and on three threads, with a hot row, a side
// with more rows than the batch, and an empty batch.
void test_backward_dense() {
  static auto h = op("fastmf::mf_backward_dense")
                      .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                        const Tensor&, const Tensor&,
                                                        const Tensor&)>();
  const int saved = at::get_num_threads();
  for (const int64_t batch : {0, 1, 37, 5000}) {
    for (const int threads : {1, 3}) {
      at::set_num_threads(threads);
      const int64_t U = 11, I = 4000, K = 9;
      auto P = at::randn({U, K}), Q = at::randn({I, K});
      auto users = at::randint(U, {batch}, at::TensorOptions().dtype(at::kInt));
      auto items = at::randint(I, {batch}, at::TensorOptions().dtype(at::kLong));
      if (batch > 3) users.narrow(0, 0, batch / 2).fill_(2);  // a hot row
      auto grad = at::randn({batch});
      auto [gp, gq] = h.call(grad, users, items, P, Q);
      auto u = users.to(at::kLong), i = items.to(at::kLong);
      auto g = grad.unsqueeze(1);
      auto want_p = at::zeros_like(P).index_add_(0, u, g * Q.index_select(0, i));
      auto want_q = at::zeros_like(Q).index_add_(0, i, g * P.index_select(0, u));
      check(at::equal(gp, want_p) && at::equal(gq, want_q),
            "mf_backward_dense batch " + std::to_string(batch) + " threads " +
                std::to_string(threads));
    }
  }
  at::set_num_threads(saved);
}

// unique_bags against ATen: a sorted unique, then each distinct row's entries gathered.
// Id ranges within twice the batch (rows marked) and past it (ids grouped), empty rows,
// and a batch past kParallelIds (grouped on the threads).
void test_unique_bags() {
  static auto h = op("fastmf::unique_bags")
                      .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
                          const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  const int saved = at::get_num_threads();
  for (const int64_t rows : {1, 50, 40000}) {
    for (const int64_t batch : {0, 1, 37, 5000, 70000}) {
      for (const int threads : {1, 3}) {
        at::set_num_threads(threads);
        auto lengths = at::randint(4, {rows}, at::TensorOptions().dtype(at::kLong));
        auto indptr = at::cat({at::zeros({1}, at::kLong), lengths.cumsum(0)});
        const int64_t nnz = indptr[rows].item<int64_t>();
        auto indices = at::randint(1000, {nnz}, at::TensorOptions().dtype(at::kInt));
        auto weights = at::rand({nnz});
        auto ids = at::randint(rows, {batch}, at::TensorOptions().dtype(at::kInt));
        if (batch > 3) ids.narrow(0, 0, batch / 2).fill_(rows / 2);  // a hot row
        auto [distinct, inverse, bag_indices, offsets, bag_weights] =
            h.call(ids, indptr, indices, weights);
        auto [want_distinct, want_inverse, counts] =
            at::_unique2(ids.to(at::kLong), true, true, false);
        std::vector<int64_t> positions, want_offsets{0};
        for (int64_t g = 0; g < want_distinct.size(0); ++g) {
          const int64_t r = want_distinct[g].item<int64_t>();
          for (int64_t j = indptr[r].item<int64_t>(); j < indptr[r + 1].item<int64_t>(); ++j) {
            positions.push_back(j);
          }
          want_offsets.push_back(static_cast<int64_t>(positions.size()));
        }
        auto pos = at::tensor(positions, at::kLong);
        check(at::equal(distinct, want_distinct) && at::equal(inverse, want_inverse) &&
                  at::equal(bag_indices, indices.index_select(0, pos)) &&
                  at::equal(offsets, at::tensor(want_offsets, at::kLong).to(at::kInt)) &&
                  at::equal(bag_weights, weights.index_select(0, pos)),
              "unique_bags rows " + std::to_string(rows) + " batch " + std::to_string(batch) +
                  " threads " + std::to_string(threads));
        if (rows == 40000 && batch > 37) break;  // the slow reference loop once is enough
      }
    }
  }
  at::set_num_threads(saved);
}

void test_adagrad(bool rowwise, int64_t dim) {
  const int64_t N = 9, K = 4, B = 30;
  auto w = dim == 2 ? at::randn({N, K}, kF64) : at::randn({N}, kF64);
  auto state = (rowwise && dim == 2) ? at::rand({N}, kF64) : at::rand_like(w);
  auto ids = at::randint(N - 2, {B}, at::kLong);  // duplicates; rows N-2, N-1 untouched
  auto grad_rows = dim == 2 ? at::randn({B, K}, kF64) : at::randn({B}, kF64);
  auto w_ref = w.clone(), state_ref = state.clone();
  sparse_adagrad_update(w, state, ids, grad_rows, 0.1, 1e-10, rowwise);
  ref_adagrad(w_ref, state_ref, ids, grad_rows, 0.1, 1e-10, rowwise);
  const std::string name = std::string("sparse_adagrad_update ") +
                            (rowwise ? "rowwise " : "") + std::to_string(dim) + "-D";
  check(close(w, w_ref) && close(state, state_ref), name);
}

void test_train_step(at::ScalarType id_type) {
  const int64_t U = 6, I = 8, K = 5, B = 64;
  auto P = at::randn({U, K}, kF64) * 0.3, Q = at::randn({I, K}, kF64) * 0.3;
  auto bu = at::randn({U}, kF64) * 0.1, bi = at::randn({I}, kF64) * 0.1;
  auto sP = at::zeros_like(P), sQ = at::zeros_like(Q);
  auto sbu = at::zeros_like(bu), sbi = at::zeros_like(bi);
  auto users = at::randint(U, {B}, at::TensorOptions().dtype(id_type));
  auto items = at::randint(I, {B}, at::TensorOptions().dtype(id_type));
  auto targets = at::rand({B}, kF64) * 4 + 1;
  auto rP = P.clone(), rQ = Q.clone(), rbu = bu.clone(), rbi = bi.clone();
  auto rsP = sP.clone(), rsQ = sQ.clone(), rsbu = sbu.clone(), rsbi = sbi.clone();
  const double gm = 3.0, reg = 0.05, lr = 0.1, eps = 1e-10;
  bool ok = true;
  for (int step = 0; step < 3; ++step) {
    auto loss = train_step(P, Q, bu, bi, sP, sQ, sbu, sbi, users, items, targets, gm, kMse,
                           reg, kAdagrad, lr, eps);
    auto ref_loss = ref_train_step(rP, rQ, rbu, rbi, rsP, rsQ, rsbu, rsbi, users, items,
                                   targets, gm, reg, lr, eps);
    ok = ok && loss.dim() == 0 && close(loss, ref_loss) && close(P, rP) && close(Q, rQ) &&
         close(bu, rbu) && close(bi, rbi) && close(sP, rsP) && close(sQ, rsQ) &&
         close(sbu, rsbu) && close(sbi, rsbi);
  }
  check(ok, std::string("train_step mse+adagrad, 3 steps, ") + c10::toString(id_type));
}

template <class F>
void expect_index_error(const std::string& name, F&& f) {
  bool ok = false;
  try {
    f();
  } catch (const c10::IndexError&) {
    ok = true;
  } catch (const std::exception& e) {
    std::printf("  unexpected exception: %s\n", e.what());
  }
  check(ok, name + " raises c10::IndexError");
}

void test_out_of_range() {
  const int64_t U = 4, I = 3, K = 2;
  auto P = at::randn({U, K}, kF64), Q = at::randn({I, K}, kF64);
  auto bu = at::zeros({U}, kF64), bi = at::zeros({I}, kF64);
  auto ok_items = id_tensor({0, 1, 2}, at::kLong);
  expect_index_error("mf_forward user id == num_users", [&] {
    mf_forward(id_tensor({0, U, 1}, at::kLong), ok_items, P, Q, bu, bi, 0.0);
  });
  expect_index_error("mf_forward negative item id", [&] {
    mf_forward(id_tensor({0, 1, 2}, at::kInt), id_tensor({0, -1, 2}, at::kInt), P, Q, bu, bi,
               0.0);
  });
  auto state = at::zeros_like(P);
  expect_index_error("sparse_adagrad_update id == num_rows", [&] {
    sparse_adagrad_update(P, state, id_tensor({1, U}, at::kLong), at::ones({2, K}, kF64), 0.1,
                          1e-10, false);
  });
  auto P0 = P.clone();
  expect_index_error("train_step item id == num_items", [&] {
    train_step(P, Q, bu, bi, at::zeros_like(P), at::zeros_like(Q), at::zeros_like(bu),
               at::zeros_like(bi), id_tensor({0, 1, 2}, at::kLong),
               id_tensor({0, I, 1}, at::kLong), at::ones({3}, kF64), 0.0, kMse, 0.0, kAdagrad,
               0.1, 1e-10);
  });
  check(at::equal(P, P0), "a rejected update leaves the weights untouched");
}

template <class F>
void expect_value_error(const std::string& name, const std::string& message, F&& f) {
  bool ok = false;
  try {
    f();
  } catch (const c10::ValueError& e) {
    ok = std::string(e.what_without_backtrace()).find(message) != std::string::npos;
    if (!ok) std::printf("  unexpected message: %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::printf("  unexpected exception: %s\n", e.what());
  }
  check(ok, name + " raises c10::ValueError");
}

// Checks made before anything is written (csrc/checks.h): tables that share memory, and
// non-finite or negative settings.
void test_refused_before_writing() {
  const int64_t U = 6, I = 4, K = 3, B = 10;
  auto W = at::randn({U + I, K}, kF64);
  auto P = W.narrow(0, 0, U), Q = at::randn({I, K}, kF64);
  auto bu = at::randn({U}, kF64), bi = at::randn({I}, kF64);
  auto users = at::randint(U, {B}, at::kLong), items = at::randint(I, {B}, at::kLong);
  auto targets = at::rand({B}, kF64);
  auto W0 = W.clone(), Q0 = Q.clone(), bu0 = bu.clone(), bi0 = bi.clone();
  auto step = [&](const Tensor& p, const Tensor& q, const OptTensor& sp, const OptTensor& sq,
                  double reg, double lr, double eps) {
    train_step(p, q, bu, bi, sp, sq, at::zeros_like(bu), at::zeros_like(bi), users, items,
               targets, 0.0, kMse, reg, kAdagrad, lr, eps);
  };
  expect_value_error("train_step on overlapping user and item tables",
                     "fastmf.train_step: user_factors and item_factors share memory", [&] {
                       step(P, W.narrow(0, U - 1, I), at::zeros_like(P), at::zeros_like(Q), 0.0,
                            0.1, 1e-10);
                     });
  expect_value_error("train_step with a state aliasing its table",
                     "fastmf.train_step: item_factors and item_factors_state share memory",
                     [&] { step(P, Q, at::zeros_like(P), Q, 0.0, 0.1, 1e-10); });
  const double nan = std::nan("");
  expect_value_error("train_step with lr = nan",
                     "fastmf.train_step: lr must be finite and >= 0, got nan",
                     [&] { step(P, Q, at::zeros_like(P), at::zeros_like(Q), 0.0, nan, 1e-10); });
  expect_value_error("train_step with reg = inf",
                     "fastmf.train_step: reg must be finite and >= 0, got inf", [&] {
                       step(P, Q, at::zeros_like(P), at::zeros_like(Q), INFINITY, 0.1, 1e-10);
                     });
  expect_value_error("sparse_adagrad_update with weight as its state",
                     "fastmf.sparse_adagrad_update: weight and state share memory", [&] {
                       sparse_adagrad_update(Q, Q, items, at::ones({B, K}, kF64), 0.1, 1e-10,
                                             false);
                     });
  check(at::equal(W, W0) && at::equal(Q, Q0) && at::equal(bu, bu0) && at::equal(bi, bi0),
        "refused steps leave every table untouched");
}

}  // namespace

// The multi-step sampled ops (one OpenMP team for all their steps) against their single
// step called on each slice: the same tables, states and losses, to the bit; and read
// through an order (a shuffle with repeats, int32) against the gathered run. Under the
// sanitizers this runs the team's barrier, its split of every phase and the gathers.
void test_steps_in_one_call(const char* steps_name, const char* step_name, bool pointwise) {
  const int64_t num_users = 40, num_items = 30, dim = 8, n = 300, batch_size = 64, k = 2;
  std::vector<int64_t> indptr{0}, indices;
  for (int64_t u = 0; u < num_users; ++u) {
    for (int64_t i = u % 3; i < num_items; i += 4 + u % 5) indices.push_back(i);
    indptr.push_back(static_cast<int64_t>(indices.size()));
  }
  const Tensor ptr = at::tensor(indptr, at::kLong), idx = at::tensor(indices, at::kLong);
  const Tensor users = at::randint(num_users, {n}, at::kLong);
  const Tensor pos = at::randint(num_items, {n}, at::kLong);
  const Tensor weights = at::rand({n}, at::kDouble) + 0.5;
  auto fresh = [&] {
    at::manual_seed(7);
    return std::vector<Tensor>{at::randn({num_users, dim}, at::kDouble) * 0.1,
                               at::randn({num_items, dim}, at::kDouble) * 0.1,
                               at::randn({num_users}, at::kDouble) * 0.1,
                               at::randn({num_items}, at::kDouble) * 0.1,
                               at::full({num_users, dim}, 0.1, at::kDouble),
                               at::full({num_items, dim}, 0.1, at::kDouble),
                               at::full({num_users}, 0.1, at::kDouble),
                               at::full({num_items}, 0.1, at::kDouble)};
  };
  const int64_t loss = pointwise ? static_cast<int64_t>(fastmf::Loss::kBce)
                                 : static_cast<int64_t>(fastmf::PairwiseLoss::kBpr);
  auto call = [&](const char* name, const std::vector<Tensor>& t, const Tensor& u,
                  const Tensor& p, const Tensor& w, int64_t step, bool steps,
                  const Tensor& order = Tensor()) {
    std::vector<c10::IValue> stack(t.begin(), t.end());
    for (const auto& x : {u, p, ptr, idx}) stack.emplace_back(x);
    stack.emplace_back(k);
    if (steps) stack.emplace_back(batch_size);
    stack.emplace_back(int64_t{11});
    stack.emplace_back(step);
    if (pointwise) stack.emplace_back(0.0);
    stack.emplace_back(loss);
    stack.emplace_back(0.01);
    stack.emplace_back(kAdagrad);
    stack.emplace_back(0.05);
    stack.emplace_back(1e-8);
    stack.emplace_back(w);
    if (steps) stack.emplace_back(order.defined() ? c10::IValue(order) : c10::IValue());
    op(name).callBoxed(&stack);
    return stack.at(0).toTensor();
  };
  const std::vector<Tensor> together = fresh();
  const Tensor losses = call(steps_name, together, users, pos, weights, 3, true);
  const std::vector<Tensor> apart = fresh();
  std::vector<Tensor> each;
  for (int64_t t = 0, lo = 0; lo < n; ++t, lo += batch_size) {
    const int64_t b = std::min(batch_size, n - lo);
    each.push_back(call(step_name, apart, users.narrow(0, lo, b), pos.narrow(0, lo, b),
                        weights.narrow(0, lo, b), 3 + t, false));
  }
  bool same = at::equal(losses, at::stack(each));
  for (size_t j = 0; j < together.size(); ++j) same = same && at::equal(together[j], apart[j]);
  check(same, std::string(steps_name) + " equals its step on each slice");

  const Tensor order = at::cat({at::randperm(n, at::kLong).narrow(0, 0, n - 40),
                                at::randint(n, {90}, at::kLong)}).to(at::kInt);
  const std::vector<Tensor> through = fresh();
  const Tensor ordered = call(steps_name, through, users, pos, weights, 3, true, order);
  const std::vector<Tensor> gathered = fresh();
  const Tensor idx_long = order.to(at::kLong);
  const Tensor expected = call(steps_name, gathered, users.index_select(0, idx_long),
                               pos.index_select(0, idx_long),
                               weights.index_select(0, idx_long), 3, true);
  same = at::equal(ordered, expected);
  for (size_t j = 0; j < through.size(); ++j) same = same && at::equal(through[j], gathered[j]);
  check(same, std::string(steps_name) + " through an order equals it on the gathered run");
}

// permutation: a permutation of 0..n-1, the same in int32 and int64, moved by the seed.
void test_permutation() {
  static auto h = op("fastmf::permutation").typed<void(const Tensor&, int64_t)>();
  for (const int64_t n : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{1000}, int64_t{100003}}) {
    const Tensor wide = at::empty({n}, at::kLong), narrow = at::empty({n}, at::kInt);
    const Tensor other = at::empty({n}, at::kLong);
    h.call(wide, 42);
    h.call(narrow, 42);
    h.call(other, 43);
    const bool is_permutation = at::equal(std::get<0>(wide.sort()), at::arange(n, at::kLong));
    check(is_permutation && at::equal(wide, narrow.to(at::kLong)) &&
              (n < 1000 || !at::equal(wide, other)),
          "permutation of " + std::to_string(n) + ": 0..n-1 once each, int32 as int64, "
          "moved by the seed");
  }
}

// sample_negatives: every draw outside its user's (sorted) row and in [0, num_items), the same
// items on 1 and 2 threads and for int32 ids, and a user with every item refused.
void test_sample_negatives() {
  static auto h = op("fastmf::sample_negatives")
                      .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t,
                                    int64_t, int64_t, int64_t, c10::string_view)>();
  const int64_t num_users = 50, num_items = 200, k = 3, n = 5000;
  std::vector<int64_t> indptr{0}, indices;
  for (int64_t u = 0; u < num_users; ++u) {
    // Rows of 0 to 199 items: every (u % 5 + 1)-th item from u % 7 + 1, or all but one.
    if (u == 7) {
      for (int64_t i = 0; i < num_items; ++i) {
        if (i != 123) indices.push_back(i);
      }
    } else if (u % 10 != 0) {
      for (int64_t i = u % 7 + 1; i < num_items; i += u % 5 + 1) indices.push_back(i);
    }
    indptr.push_back(static_cast<int64_t>(indices.size()));
  }
  const Tensor ptr = at::tensor(indptr, at::kLong), idx = at::tensor(indices, at::kLong);
  const Tensor users = at::randint(num_users, {n}, at::kLong);
  at::set_num_threads(1);
  const Tensor one = h.call(users, ptr, idx, num_items, k, 5, 9, "cpp_test");
  at::set_num_threads(2);
  const Tensor two = h.call(users, ptr, idx, num_items, k, 5, 9, "cpp_test");
  const Tensor narrow = h.call(users.to(at::kInt), ptr.to(at::kInt), idx.to(at::kInt),
                               num_items, k, 5, 9, "cpp_test");
  bool outside = one.sizes() == at::IntArrayRef{n, k};
  const int64_t* u = users.data_ptr<int64_t>();
  const int64_t* neg = one.data_ptr<int64_t>();
  for (int64_t b = 0; b < n && outside; ++b) {
    const auto row_begin = indices.begin() + indptr[u[b]];
    const auto row_end = indices.begin() + indptr[u[b] + 1];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t item = neg[b * k + j];
      outside = outside && item >= 0 && item < num_items &&
                !std::binary_search(row_begin, row_end, item) && (u[b] != 7 || item == 123);
    }
  }
  check(outside, "sample_negatives draws outside each row, in range");
  check(at::equal(one, two) && at::equal(one, narrow),
        "sample_negatives: the same items on 1 and 2 threads and for int32 ids");
  expect_value_error("sample_negatives for a user with every item", "no item is left", [&] {
    h.call(users, ptr, idx, num_items - 1, k, 5, 9, "cpp_test");
  });
}

// The grouping of a batch's ids (csrc/cpu/segments.h): group_rows, which takes the
// counting sort for id ranges up to kCountingRange times the batch and the radix sort past
// them, and group_by_counting on every case, against a stable sort of the positions by id.
bool same_groups(const fastmf::cpu::RowGroups& g, const std::vector<int64_t>& ids,
                 int64_t num_groups) {
  const int64_t n = static_cast<int64_t>(ids.size());
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return ids[a] < ids[b]; });
  std::vector<int32_t> starts;
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < n; ++j) {
    if (j == 0 || ids[order[j]] != ids[order[j - 1]]) {
      starts.push_back(static_cast<int32_t>(j));
      rows.push_back(ids[order[j]]);
    }
  }
  bool ok = num_groups == static_cast<int64_t>(rows.size()) && g.starts[num_groups] == n;
  for (int64_t j = 0; j < n && ok; ++j) ok = g.order[j] == order[j];
  for (int64_t s = 0; s < num_groups && ok; ++s) {
    ok = g.starts[s] == starts[s] && g.rows[s] == rows[s];
  }
  return ok;
}

void test_group_rows() {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  int cases = 0, counted = 0;
  bool ok = true;
  for (int64_t n : {1, 2, 7, 64, 65, 1000, 4096}) {
    for (int64_t range : {int64_t{1}, int64_t{3}, n / 2 + 1, n, 2 * n, 2 * n + 1, 100 * n}) {
      for (int shape = 0; shape < 4; ++shape) {
        std::vector<int64_t> ids(static_cast<size_t>(n));
        for (int64_t b = 0; b < n; ++b) {
          const double u = uniform(rng);
          // Zipf-like (many duplicates of the low ids), uniform, one id, descending.
          const int64_t id = shape == 0   ? static_cast<int64_t>(range * u * u * u)
                             : shape == 1 ? static_cast<int64_t>(range * u)
                             : shape == 2 ? range - 1
                                          : (n - 1 - b) % range;
          ids[b] = std::min(id, range - 1);
        }
        fastmf::cpu::RowGroups g;
        fastmf::cpu::group_rows(ids.data(), n, range, g);
        ok = ok && same_groups(g, ids, g.num_groups);
        // The counting sort on the same ids, on the scratch the call above left (sized for
        // n, as between steps).
        const int64_t groups = fastmf::cpu::group_by_counting(ids.data(), n, range, g);
        g.starts[groups] = static_cast<int32_t>(n);
        ok = ok && same_groups(g, ids, groups);
        ++cases;
        counted += range <= fastmf::cpu::kCountingRange * n ? 1 : 0;
      }
    }
  }
  check(ok && counted > 0 && counted < cases,
        "group_rows (counting and radix sorts) and group_by_counting group as a stable sort "
        "(" + std::to_string(cases) + " cases)");
}

int main() {
  at::manual_seed(0);
  try {
    test_forward(at::kLong);
    test_forward(at::kInt);
    test_backward_dense();
    test_unique_bags();
    test_adagrad(false, 2);
    test_adagrad(true, 2);
    test_adagrad(false, 1);
    test_train_step(at::kLong);
    test_train_step(at::kInt);
    test_out_of_range();
    test_refused_before_writing();
    test_steps_in_one_call("fastmf::train_steps_pairwise_sampled",
                           "fastmf::train_step_pairwise_sampled", false);
    test_steps_in_one_call("fastmf::train_steps_sampled", "fastmf::train_step_sampled", true);
    test_sample_negatives();
    test_permutation();
    test_group_rows();
  } catch (const std::exception& e) {
    std::printf("FAIL uncaught exception: %s\n", e.what());
    return 1;
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
