// Input checks shared by every fastmf kernel (CPU and CUDA). Each message names the op,
// the argument and the bad value; the exception types and texts match fastmf/_checks.py:
// IndexError for ids out of range, TypeError for dtypes, ValueError for the rest.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace fastmf {

// Codes shared with fastmf/reference.py (LOSSES, OPTIMIZERS).
constexpr int64_t kNumLosses = 3;
constexpr int64_t kNumOptimizers = 3;
constexpr int64_t kNumPairwiseLosses = 1;  // 0: bpr (fastmf/reference.py PAIRWISE_LOSSES)
inline const char* optimizer_name(int64_t code) {
  switch (code) {
    case 0: return "sgd";
    case 1: return "adagrad";
    case 2: return "rowwise_adagrad";
    default: return "unknown";
  }
}

inline void check_id_dtype(const char* op, const char* name, const at::Tensor& ids) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, "fastmf.",
                   op, ": ", name, " must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1, "fastmf.", op, ": ", name, " must be 1-D, got shape ",
                    ids.sizes());
}

inline void check_weight(const char* op, const char* name, const at::Tensor& weight,
                         int64_t dim) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
                   "fastmf.", op, ": ", name, " must be float32 or float64, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == dim, "fastmf.", op, ": ", name, " must be ", dim,
                    "-D, got shape ", weight.sizes());
}

// `weight` must match `like` in dtype and device.
inline void check_like(const char* op, const char* name, const at::Tensor& weight,
                       const char* like_name, const at::Tensor& like) {
  TORCH_CHECK_TYPE(weight.scalar_type() == like.scalar_type(), "fastmf.", op, ": ", name,
                   " has dtype ", weight.scalar_type(), ", expected ", like.scalar_type(),
                   " like ", like_name);
  TORCH_CHECK_VALUE(weight.device() == like.device(), "fastmf.", op, ": ", name, " is on ",
                    weight.device(), " but ", like_name, " is on ", like.device(),
                    "; move them to one device");
}

inline void check_same_length(const char* op, const char* a_name, const at::Tensor& a,
                              const char* b_name, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.size(0) == b.size(0), "fastmf.", op, ": lengths differ (", a_name,
                    " has ", a.size(0), ", ", b_name, " has ", b.size(0), ")");
}

inline void check_like_device(const char* op, const char* name, const at::Tensor& t,
                              const char* like_name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), "fastmf.", op, ": ", name, " is on ",
                    t.device(), " but ", like_name, " is on ", like.device(),
                    "; move them to one device");
}

// `t` must have exactly the sizes `expected` (a state table, a grad_rows block).
inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "fastmf.", op, ": ", name, " has shape ",
                    t.sizes(), ", expected ", expected);
}

// Two (rows, dim) factor tables scored against each other: each a 2-D weight, `b` of
// `a`'s dtype and device, and the same dim.
inline void check_factor_pair(const char* op, const char* a_name, const at::Tensor& a,
                              const char* b_name, const at::Tensor& b) {
  check_weight(op, a_name, a, 2);
  check_weight(op, b_name, b, 2);
  check_like(op, b_name, b, a_name, a);
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "fastmf.", op, ": ", a_name, " has dim ",
                    a.size(1), " but ", b_name, " has dim ", b.size(1));
}

// The checks every matrix-factorization op makes on its tables and ids (the ids' range
// is checked on the host, where the kernels read them).
inline void check_mf_tables(const char* op, const at::Tensor& users, const at::Tensor& items,
                            const at::Tensor& user_factors, const at::Tensor& item_factors,
                            const std::optional<at::Tensor>& user_bias,
                            const std::optional<at::Tensor>& item_bias) {
  check_factor_pair(op, "user_factors", user_factors, "item_factors", item_factors);
  TORCH_CHECK_VALUE(user_bias.has_value() == item_bias.has_value(), "fastmf.", op,
                    ": user_bias and item_bias must both be given or both None");
  if (user_bias.has_value()) {
    check_weight(op, "user_bias", *user_bias, 1);
    check_weight(op, "item_bias", *item_bias, 1);
    check_like(op, "user_bias", *user_bias, "user_factors", user_factors);
    check_like(op, "item_bias", *item_bias, "user_factors", user_factors);
    TORCH_CHECK_VALUE(user_bias->size(0) == user_factors.size(0), "fastmf.", op,
                      ": user_bias has ", user_bias->size(0), " rows, user_factors has ",
                      user_factors.size(0));
    TORCH_CHECK_VALUE(item_bias->size(0) == item_factors.size(0), "fastmf.", op,
                      ": item_bias has ", item_bias->size(0), " rows, item_factors has ",
                      item_factors.size(0));
  }
  check_id_dtype(op, "users", users);
  check_id_dtype(op, "items", items);
  check_like_device(op, "users", users, "user_factors", user_factors);
  check_like_device(op, "items", items, "user_factors", user_factors);
  check_same_length(op, "users", users, "items", items);
}

// topk_scores: every check that reads no id value, with the messages of
// fastmf/retrieval/_inputs.py (which interleaves the value checks: an input with several
// faults may be reported by another one first). The CPU kernel then checks the ids on the
// host; the CUDA kernel records bad ones on the device.
inline void check_topk_inputs(const char* op, const at::Tensor& queries,
                              const at::Tensor& item_factors,
                              const std::optional<at::Tensor>& item_bias, int64_t k,
                              const std::optional<at::Tensor>& exclude_indptr,
                              const std::optional<at::Tensor>& exclude_indices,
                              const std::optional<at::Tensor>& candidates) {
  check_factor_pair(op, "queries", queries, "item_factors", item_factors);
  TORCH_CHECK_VALUE(k > 0, "fastmf.", op, ": k must be positive, got ", k);
  if (item_bias.has_value()) {
    check_weight(op, "item_bias", *item_bias, 1);
    check_like(op, "item_bias", *item_bias, "queries", queries);
    TORCH_CHECK_VALUE(item_bias->size(0) == item_factors.size(0), "fastmf.", op,
                      ": item_bias has ", item_bias->size(0), " rows, item_factors has ",
                      item_factors.size(0));
  }
  TORCH_CHECK_VALUE(exclude_indptr.has_value() == exclude_indices.has_value(), "fastmf.", op,
                    ": exclude_indptr and exclude_indices must both be given or both None");
  if (exclude_indptr.has_value()) {
    check_id_dtype(op, "exclude_indptr", *exclude_indptr);
    check_id_dtype(op, "exclude_indices", *exclude_indices);
    check_like_device(op, "exclude_indptr", *exclude_indptr, "queries", queries);
    check_like_device(op, "exclude_indices", *exclude_indices, "queries", queries);
    TORCH_CHECK_VALUE(exclude_indptr->size(0) == queries.size(0) + 1, "fastmf.", op,
                      ": exclude_indptr must have one entry per query plus one (",
                      queries.size(0) + 1, "), got ", exclude_indptr->size(0));
  }
  if (candidates.has_value()) {
    check_id_dtype(op, "candidates", *candidates);
    check_like_device(op, "candidates", *candidates, "queries", queries);
  }
}

inline void check_loss_code(const char* op, int64_t loss) {
  TORCH_CHECK_VALUE(loss >= 0 && loss < kNumLosses, "fastmf.", op, ": unknown loss code ",
                    loss, "; expected 0..", kNumLosses - 1);
}

inline void check_optimizer_code(const char* op, int64_t optimizer) {
  TORCH_CHECK_VALUE(optimizer >= 0 && optimizer < kNumOptimizers, "fastmf.", op,
                    ": unknown optimizer code ", optimizer, "; expected 0..",
                    kNumOptimizers - 1);
}

// train_step: the codes, the tables, the ids and the targets, with no value read
// (fastmf/_checks.py check_train_step).
inline void check_train_step_inputs(const char* op, int64_t loss, int64_t optimizer,
                                    const at::Tensor& users, const at::Tensor& items,
                                    const at::Tensor& targets, const at::Tensor& user_factors,
                                    const at::Tensor& item_factors,
                                    const std::optional<at::Tensor>& user_bias,
                                    const std::optional<at::Tensor>& item_bias) {
  check_loss_code(op, loss);
  check_optimizer_code(op, optimizer);
  check_mf_tables(op, users, items, user_factors, item_factors, user_bias, item_bias);
  TORCH_CHECK_TYPE(targets.scalar_type() == user_factors.scalar_type(), "fastmf.", op,
                   ": targets has dtype ", targets.scalar_type(), ", expected ",
                   user_factors.scalar_type(), " like the weights");
  TORCH_CHECK_VALUE(targets.dim() == 1, "fastmf.", op, ": targets must be 1-D, got shape ",
                    targets.sizes());
  check_like_device(op, "targets", targets, "user_factors", user_factors);
  check_same_length(op, "users", users, "targets", targets);
}

// train_step_pairwise: the codes, the tables and the three id arrays, with no id value
// read (fastmf/_checks.py check_train_step_pairwise, which names the positives "items").
inline void check_pairwise_step_inputs(const char* op, int64_t loss, int64_t optimizer,
                                       const at::Tensor& users, const at::Tensor& pos_items,
                                       const at::Tensor& neg_items,
                                       const at::Tensor& user_factors,
                                       const at::Tensor& item_factors,
                                       const std::optional<at::Tensor>& user_bias,
                                       const std::optional<at::Tensor>& item_bias) {
  TORCH_CHECK_VALUE(loss >= 0 && loss < kNumPairwiseLosses, "fastmf.", op,
                    ": unknown pairwise loss code ", loss, "; expected 0..",
                    kNumPairwiseLosses - 1);
  check_optimizer_code(op, optimizer);
  check_mf_tables(op, users, pos_items, user_factors, item_factors, user_bias, item_bias);
  check_like_device(op, "neg_items", neg_items, "user_factors", user_factors);
  check_id_dtype(op, "neg_items", neg_items);
  TORCH_CHECK_VALUE(users.size(0) == neg_items.size(0), "fastmf.", op, ": lengths differ (",
                    "users has ", users.size(0), ", pos_items has ", pos_items.size(0),
                    ", neg_items has ", neg_items.size(0), ")");
  // The CPU item grouping holds 2B positions in int32 (the CUDA sort 3B keys, checked there).
  TORCH_CHECK_VALUE(users.size(0) < (int64_t{1} << 30), "fastmf.", op, ": batch of ",
                    users.size(0), " samples; at most 2^30 - 1 are supported");
}

// `lo`, `hi`: the smallest and largest id of a batch.
inline void report_id_range(const char* op, const char* name, int64_t lo, int64_t hi,
                            int64_t num_rows) {
  const int64_t bad = lo < 0 ? lo : hi;
  TORCH_CHECK_INDEX(lo >= 0 && hi < num_rows, "fastmf.", op, ": ", name, " id ", bad,
                    " out of range [0, ", num_rows, ")");
}

// Host-side range check: call before any kernel touches memory through these ids. Reports
// the smallest id when one is negative, else the largest, as fastmf/_checks.py does.
template <typename index_t>
inline void check_id_range(const char* op, const char* name, const index_t* ids, int64_t n,
                           int64_t num_rows) {
  if (n == 0) return;
  int64_t lo = static_cast<int64_t>(ids[0]), hi = lo;
  for (int64_t b = 1; b < n; ++b) {
    const int64_t id = static_cast<int64_t>(ids[b]);
    lo = id < lo ? id : lo;
    hi = id > hi ? id : hi;
  }
  report_id_range(op, name, lo, hi, num_rows);
}

// Host-side: NaN or inf targets would silently poison every row they touch.
template <typename scalar_t>
inline void check_finite(const char* op, const char* name, const scalar_t* values,
                         int64_t n) {
  bool finite = true;
  for (int64_t b = 0; b < n; ++b) finite &= std::isfinite(values[b]);
  if (finite) return;
  for (int64_t b = 0; b < n; ++b) {
    TORCH_CHECK_VALUE(std::isfinite(values[b]), "fastmf.", op, ": ", name,
                      " contains a non-finite value (", values[b], ")");
  }
}

}  // namespace fastmf
