// sparse_adagrad_update and sparse_sgd_update on the CPU: group the batch's rows by id,
// sum each id's gradient rows in batch order, then step each touched row once. Rows not
// in `ids` are never read or written and no dense gradient is ever formed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "dedup.h"
#include "kernels.h"

namespace fastmf {
namespace cpu {
namespace {

constexpr int64_t kGrain = 256;
constexpr int64_t kPrefetchGroups = 4;

struct Workspace {
  std::vector<int64_t> ids;
  RowGroups groups;
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

// The checks of fastmf/_checks.py check_sparse_update, in the same order.
void check_sparse_update(const char* op, const at::Tensor& weight, const at::Tensor* state,
                         const at::Tensor& ids, const at::Tensor& grad_rows, bool rowwise) {
  TORCH_CHECK_VALUE(weight.dim() == 1 || weight.dim() == 2, "fastmf.", op,
                    ": weight must be 1-D or 2-D, got ", weight.sizes());
  check_weight(op, "weight", weight, weight.dim());
  check_weight(op, "grad_rows", grad_rows, weight.dim());
  check_like(op, "grad_rows", grad_rows, "weight", weight);
  if (weight.dim() == 2) {
    TORCH_CHECK_VALUE(grad_rows.size(1) == weight.size(1), "fastmf.", op, ": grad_rows has ",
                      grad_rows.size(1), " columns, weight has ", weight.size(1));
  }
  if (state != nullptr) {
    const bool per_row = rowwise && weight.dim() == 2;
    check_weight(op, "state", *state, per_row ? 1 : weight.dim());
    check_like(op, "state", *state, "weight", weight);
    check_shape(op, "state", *state, per_row ? weight.sizes().slice(0, 1) : weight.sizes());
  }
  check_id_dtype(op, "ids", ids);
  check_like_device(op, "ids", ids, "weight", weight);
  check_same_length(op, "ids", ids, "grad_rows", grad_rows);
  TORCH_CHECK_VALUE(ids.size(0) < (int64_t{1} << 31), "fastmf.", op, ": ", ids.size(0),
                    " ids in one call; at most 2^31 - 1 are supported");
}

// kOpt: the optimizer; `state` is null for SGD. A 1-D (bias) table has scalar rows
// (`scalar_rows`, width 1); `per_row_state`: one state value per row (row-wise Adagrad on
// a 2-D table).
template <int64_t kOpt, typename T>
void sparse_update(T* weight, T* state, int64_t width, bool scalar_rows, bool per_row_state,
                   const RowGroups& groups, const T* grad_rows, int64_t batch, T lr, T eps) {
  const int64_t state_width = per_row_state ? 1 : width;
  at::parallel_for(0, batch, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t first = groups.group_at(begin);
    const int64_t last = groups.group_at(end);
    std::vector<T> acc(static_cast<size_t>(width));
    T* a = acc.data();
    for (int64_t s = first; s < last; ++s) {
      if (s + kPrefetchGroups < groups.num_groups) {
        const int64_t ahead = groups.rows[s + kPrefetchGroups];
        prefetch_row(weight + ahead * width, width, true);
        if (state != nullptr) prefetch_row(state + ahead * state_width, state_width, true);
      }
      const int64_t row = groups.rows[s];
      std::fill(acc.begin(), acc.end(), T(0));
      for (int32_t j = groups.starts[s]; j < groups.starts[s + 1]; ++j) {
        const T* g = grad_rows + static_cast<int64_t>(groups.order[j]) * width;
        for (int64_t k = 0; k < width; ++k) a[k] += g[k];
      }
      T* w = weight + row * width;
      T* st = state == nullptr ? nullptr : state + row * state_width;
      if (scalar_rows) {
        step_scalar<kOpt>(w, st, a[0], lr, eps);
      } else if (kOpt == kAdagrad && per_row_state) {
        step_row<kRowwiseAdagrad>(w, st, a, width, lr, eps);
      } else {
        step_row<kOpt>(w, st, a, width, lr, eps);
      }
    }
  });
}

template <int64_t kOpt>
void run_sparse_update(const char* op, const at::Tensor& weight, const at::Tensor* state,
                       const at::Tensor& ids, const at::Tensor& grad_rows, double lr,
                       double eps, bool rowwise) {
  check_sparse_update(op, weight, state, ids, grad_rows, rowwise);
  Workspace& ws = workspace();
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
    sparse_update<kOpt, scalar_t>(w.get().data_ptr<scalar_t>(),
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

}  // namespace
}  // namespace cpu
}  // namespace fastmf

TORCH_LIBRARY_IMPL(fastmf, CPU, m) {
  m.impl("sparse_adagrad_update", &fastmf::cpu::sparse_adagrad_update);
  m.impl("sparse_sgd_update", &fastmf::cpu::sparse_sgd_update);
}
