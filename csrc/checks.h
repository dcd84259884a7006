// Every host-side input check of the fastmf kernels, shared by the CPU and CUDA backends
// (csrc/ops.h calls the fused steps' checks at the op boundary; each kernel file calls its
// op's check function). Each message names the op, the argument and the bad value; the
// exception types and texts match fastmf/ops/checks.py: IndexError for ids out of range,
// TypeError for dtypes, ValueError for the rest. A layout or size that only one device
// needs (CUDA: contiguous tables, 32-bit sort keys, row width) is a separate, named check
// below, called by that device's kernels alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "args.h"
#include "codes.h"

namespace fastmf {

// A code of enum E (Loss, PairwiseLoss, Optimizer), as fastmf.ops.checks.check_code says it.
template <typename E>
inline void check_code(const char* op, int64_t code) {
  TORCH_CHECK_VALUE(code >= 0 && code < num_codes<E>(), "fastmf.", op, ": unknown ",
                    AllCodes<E>::what, " code ", code, "; expected 0..", num_codes<E>() - 1);
}

// A float as Python's repr() writes it (0.1, 1.0, -0.5, 1e-08, 1e+16, nan, inf), so the
// messages that show a setting read as those of fastmf/ops/checks.py.
inline std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  // The shortest digits that round-trip, in scientific form: [-]d[.ddd]e[+-]x.
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  const std::string text(buf, res.ptr);
  const size_t e = text.find('e');
  const bool negative = text[0] == '-';
  std::string digits;
  for (size_t i = negative ? 1 : 0; i < e; ++i) {
    if (text[i] != '.') digits += text[i];
  }
  const int exponent = std::stoi(text.substr(e + 1));
  std::string out = negative ? "-" : "";
  if (exponent >= -4 && exponent < 16) {
    if (exponent < 0) {
      out += "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exponent + 1) {
      out += digits + std::string(static_cast<size_t>(exponent + 1) - digits.size(), '0') +
             ".0";
    } else {
      out += digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
    }
    return out;
  }
  out += digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  const int magnitude = exponent < 0 ? -exponent : exponent;
  out += std::string(exponent < 0 ? "e-" : "e+") + (magnitude < 10 ? "0" : "") +
         std::to_string(magnitude);
  return out;
}

// lr, eps, reg: a NaN or inf would poison every row the step touches, and a negative one
// turns descent into ascent; refused before anything is written.
inline void check_setting(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, "fastmf.", op, ": ", name,
                    " must be finite and >= 0, got ", py_float(value));
}

inline void check_optimizer_args(const char* op, const OptimizerArgs& opt) {
  check_setting(op, "lr", opt.lr);
  check_setting(op, "eps", opt.eps);
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
// fastmf/ops/checks.py check_topk_inputs (which interleaves the value checks: an input with several
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

// An undefined tensor (an absent slot of StepTables) as the schema's None.
inline std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The optimizer states of a step (fastmf/ops/checks.py check_states): none for SGD; for the
// Adagrads one per table present, shaped like it (element-wise) or (N,) (row-wise).
inline void check_states(const char* op, const StepTables& tables, const StepTables& states,
                         Optimizer optimizer) {
  if (optimizer == Optimizer::kSgd) return;
  const bool per_row = optimizer == Optimizer::kRowwiseAdagrad;
  const auto table_slots = tables.slots();
  const auto state_slots = states.slots();
  for (size_t s = 0; s < table_slots.size(); ++s) {
    const at::Tensor& table = *table_slots[s];
    const at::Tensor& state = *state_slots[s];
    const char* name = kStateNames[s];
    if (!table.defined()) continue;
    TORCH_CHECK_VALUE(state.defined(), "fastmf.", op, ": ", fastmf::name(optimizer), " needs ",
                      name, ", got None");
    // A 1-D (bias) table has one value per row: its row-wise state is shaped like it.
    check_weight(op, name, state, per_row ? 1 : table.dim());
    check_like(op, name, state, kTableNames[s], table);
    check_shape(op, name, state, per_row ? table.sizes().slice(0, 1) : table.sizes());
  }
}

// Whether a and b have memory in common: the address ranges their elements span overlap.
// Distinct allocations never overlap, so this also catches two tensors over one buffer
// (from_blob, numpy). Views that interleave without sharing an element (columns 0..7 and
// 8..15 of one matrix) count as sharing: rare, and refusing them is the safe side.
inline bool share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    uintptr_t last = 0;  // offset of the last element (strides are never negative)
    for (int64_t d = 0; d < t.dim(); ++d) {
      last += static_cast<uintptr_t>((t.size(d) - 1) * t.stride(d));
    }
    return std::pair<uintptr_t, uintptr_t>(begin, begin + (last + 1) * t.element_size());
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// The fused steps update rows of one table while they read rows of the others, and write
// each table and state through its own row indexing: tables that share memory (the user
// and item tables as one tensor, a state aliasing a weight) would read rows that another
// group writes. `touched`: every table and state the step reads or writes, named.
inline void check_separate_memory(
    const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> touched) {
  for (auto a = touched.begin(); a != touched.end(); ++a) {
    for (auto b = a + 1; b != touched.end(); ++b) {
      TORCH_CHECK_VALUE(!share_memory(*a->second, *b->second), "fastmf.", op, ": ", a->first,
                        " and ", b->first,
                        " share memory; each table and state needs memory of its own");
    }
  }
}

// The MF steps' tables and states (fastmf/ops/checks.py check_separate): the pointwise
// steps write all eight; the pairwise ones never touch user_bias or its state (the user
// bias cancels in x_ui - x_uj), so those two may share memory with anything.
inline void check_separate_step_tables(const char* op, const StepTables& tables,
                                       const StepTables& states, const OptimizerArgs& opt,
                                       bool writes_user_bias) {
  const bool adagrad = opt.optimizer != Optimizer::kSgd;
  const at::Tensor none;
  const at::Tensor& user_bias = writes_user_bias ? tables.user_bias : none;
  const at::Tensor& user_bias_state = writes_user_bias && adagrad ? states.user_bias : none;
  check_separate_memory(op, {{"user_factors", &tables.user_factors},
                             {"item_factors", &tables.item_factors},
                             {"user_bias", &user_bias},
                             {"item_bias", &tables.item_bias},
                             {"user_factors_state", adagrad ? &states.user_factors : &none},
                             {"item_factors_state", adagrad ? &states.item_factors : &none},
                             {"user_bias_state", &user_bias_state},
                             {"item_bias_state", adagrad ? &states.item_bias : &none}});
}

// One value per sample (targets, weights): user_factors' dtype (the TypeError says
// "expected ... like `like`"), 1-D, on its device, as long as `users` (fastmf/ops/checks.py
// check_per_sample).
inline void check_per_sample(const char* op, const char* name, const at::Tensor& values,
                             const at::Tensor& user_factors, const at::Tensor& users,
                             const char* like) {
  TORCH_CHECK_TYPE(values.scalar_type() == user_factors.scalar_type(), "fastmf.", op, ": ",
                   name, " has dtype ", values.scalar_type(), ", expected ",
                   user_factors.scalar_type(), " like ", like);
  TORCH_CHECK_VALUE(values.dim() == 1, "fastmf.", op, ": ", name, " must be 1-D, got shape ",
                    values.sizes());
  check_like_device(op, name, values, "user_factors", user_factors);
  check_same_length(op, "users", users, name, values);
}

// A fused step's per-sample weights: undefined, or one per sample (fastmf/ops/checks.py
// check_step_weights, which also reads the values; the kernels check those with
// check_weight_values, or record them on the GPU).
inline void check_step_weights(const char* op, const at::Tensor& weights,
                               const at::Tensor& user_factors, const at::Tensor& users) {
  if (!weights.defined()) return;
  check_per_sample(op, "weights", weights, user_factors, users, "user_factors");
}

// train_step: the codes, the settings, the tables, the ids and the targets, the states
// and the tables' memory, with no id or target value read (fastmf/ops/checks.py
// check_train_step reads those too; the kernels check them where they read them).
inline void check_train_step(const char* op, const StepTables& tables, const StepTables& states,
                             const PointwiseBatch& batch, const OptimizerArgs& opt) {
  check_optimizer_args(op, opt);
  check_setting(op, "reg", batch.reg);
  check_mf_tables(op, batch.users, batch.items, tables.user_factors, tables.item_factors,
                  maybe(tables.user_bias), maybe(tables.item_bias));
  check_per_sample(op, "targets", batch.targets, tables.user_factors, batch.users,
                   "the weights");
  check_states(op, tables, states, opt.optimizer);
  check_separate_step_tables(op, tables, states, opt, /*writes_user_bias=*/true);
  check_step_weights(op, batch.weights, tables.user_factors, batch.users);
}

// train_step_pairwise: likewise, with the three id arrays (fastmf/ops/checks.py
// check_train_step_pairwise, which names the positives "items"). user_bias and its state
// are neither read nor written (the user bias cancels), so they may share memory.
inline void check_train_step_pairwise(const char* op, const StepTables& tables,
                                      const StepTables& states, const PairwiseBatch& batch,
                                      const OptimizerArgs& opt) {
  check_optimizer_args(op, opt);
  check_setting(op, "reg", batch.reg);
  const at::Tensor& users = batch.users;
  const at::Tensor& neg_items = batch.neg_items;
  check_mf_tables(op, users, batch.pos_items, tables.user_factors, tables.item_factors,
                  maybe(tables.user_bias), maybe(tables.item_bias));
  check_like_device(op, "neg_items", neg_items, "user_factors", tables.user_factors);
  check_id_dtype(op, "neg_items", neg_items);
  TORCH_CHECK_VALUE(users.size(0) == neg_items.size(0), "fastmf.", op, ": lengths differ (",
                    "users has ", users.size(0), ", pos_items has ", batch.pos_items.size(0),
                    ", neg_items has ", neg_items.size(0), ")");
  // The CPU item grouping holds 2B positions in int32 (the CUDA sort 3B keys, checked there).
  TORCH_CHECK_VALUE(users.size(0) < (int64_t{1} << 30), "fastmf.", op, ": batch of ",
                    users.size(0), " samples; at most 2^30 - 1 are supported");
  check_states(op, tables, states, opt.optimizer);
  check_separate_step_tables(op, tables, states, opt, /*writes_user_bias=*/false);
  check_step_weights(op, batch.weights, tables.user_factors, users);
}

// What the two sampled steps share (fastmf/ops/checks.py _check_sampled): the tables and
// positives, the CSR's structure and the counts. positive_rows is 0 when each positive
// becomes its num_negatives pairs (train_step_pairwise_sampled), 1 when it also keeps a
// row of its own (train_step_sampled). The row pointers' values are checked by the kernels
// for the batch's users only (a full pass over them every step would cost more than the
// step).
// `b`: the positives of one step (all of them for one step; a batch's worth for the
// multi-step ops).
// A draw's rank is below the item count, drawn with 32 random bits (negative_sampling.h):
// at most 2^31 - 1 items (fastmf/ops/checks.py MAX_SAMPLED_ITEMS).
constexpr int64_t kMaxSampledItems = (int64_t{1} << 31) - 1;

// The positives' CSR of the sampled ops: row pointers and items int32/int64 and 1-D, on
// the device of `like` (their values are checked where the draws read them).
inline void check_positives_csr(const char* op, const at::Tensor& pos_indptr,
                                const at::Tensor& pos_indices, const char* like_name,
                                const at::Tensor& like) {
  check_id_dtype(op, "pos_indptr", pos_indptr);
  check_like_device(op, "pos_indptr", pos_indptr, like_name, like);
  check_id_dtype(op, "pos_indices", pos_indices);
  check_like_device(op, "pos_indices", pos_indices, like_name, like);
}

template <typename Batch>
inline void check_sampled(const char* op, const StepTables& tables, const StepTables& states,
                          const Batch& batch, const OptimizerArgs& opt,
                          int64_t positive_rows, int64_t b) {
  TORCH_CHECK_VALUE(batch.num_negatives >= 1, "fastmf.", op, ": num_negatives must be >= 1, ",
                    "got ", batch.num_negatives);
  check_optimizer_args(op, opt);
  check_setting(op, "reg", batch.reg);
  check_mf_tables(op, batch.users, batch.pos_items, tables.user_factors, tables.item_factors,
                  maybe(tables.user_bias), maybe(tables.item_bias));
  check_positives_csr(op, batch.pos_indptr, batch.pos_indices, "user_factors",
                      tables.user_factors);
  const int64_t num_users = tables.user_factors.size(0);
  const int64_t num_items = tables.item_factors.size(0);
  TORCH_CHECK_VALUE(batch.pos_indptr.size(0) == num_users + 1, "fastmf.", op, ": pos_indptr has ",
                    batch.pos_indptr.size(0), " entries, expected num_users + 1 = ",
                    num_users + 1);
  constexpr int64_t kMaxRows = (int64_t{1} << 30) - 1;
  TORCH_CHECK_VALUE(num_items <= kMaxSampledItems, "fastmf.", op, ": item_factors has ",
                    num_items, " rows; sampling supports at most ", kMaxSampledItems);
  const int64_t per = batch.num_negatives + positive_rows;
  if (positive_rows == 0) {
    TORCH_CHECK_VALUE(b <= kMaxRows / per, "fastmf.", op, ": ", b, " positives x ",
                      batch.num_negatives, " negatives = ", b * per, " pairs; at most ",
                      kMaxRows, " are supported");
  } else {
    TORCH_CHECK_VALUE(b <= kMaxRows / per, "fastmf.", op, ": ", b, " positives x (1 + ",
                      batch.num_negatives, " negatives) = ", b * per, " rows; at most ",
                      kMaxRows, " are supported");
  }
  check_states(op, tables, states, opt.optimizer);
}

// The positives a multi-step sampled op runs: len(order) when the run is read through
// `order` (its type, shape and device checked here; its values where they are read), else
// len(users) (fastmf/ops/checks.py check_run_order).
template <typename Batch>
inline int64_t run_length(const char* op, const Batch& batch, const at::Tensor& user_factors) {
  if (!batch.order.defined()) return batch.users.size(0);
  check_id_dtype(op, "order", batch.order);
  check_like_device(op, "order", batch.order, "user_factors", user_factors);
  return batch.order.size(0);
}

// train_step_pairwise_sampled: the shared checks; user_bias and its state are never touched
// (as in train_step_pairwise), so they may share memory.
inline void check_train_step_pairwise_sampled(const char* op, const StepTables& tables,
                                              const StepTables& states,
                                              const SampledPairwiseBatch& batch,
                                              const OptimizerArgs& opt,
                                              int64_t batch_size = -1) {
  const int64_t n = run_length(op, batch, tables.user_factors);
  check_sampled(op, tables, states, batch, opt, /*positive_rows=*/0,
                batch_size < 0 ? n : std::min(n, batch_size));
  check_separate_step_tables(op, tables, states, opt, /*writes_user_bias=*/false);
  check_step_weights(op, batch.weights, tables.user_factors, batch.users);
}

// train_step_sampled: the shared checks; every table and state is written, as in train_step.
inline void check_train_step_sampled(const char* op, const StepTables& tables,
                                     const StepTables& states,
                                     const SampledPointwiseBatch& batch,
                                     const OptimizerArgs& opt, int64_t batch_size = -1) {
  const int64_t n = run_length(op, batch, tables.user_factors);
  check_sampled(op, tables, states, batch, opt, /*positive_rows=*/1,
                batch_size < 0 ? n : std::min(n, batch_size));
  check_separate_step_tables(op, tables, states, opt, /*writes_user_bias=*/true);
  check_step_weights(op, batch.weights, tables.user_factors, batch.users);
}

// permutation: `out` 1-D int32/int64 and contiguous (the positions are written in place);
// an int32 one holds at most 2^31 positions.
inline void check_permutation(const char* op, const at::Tensor& out) {
  check_id_dtype(op, "out", out);
  TORCH_CHECK_VALUE(out.is_contiguous(), "fastmf.", op, ": out must be contiguous");
  TORCH_CHECK_VALUE(out.scalar_type() == at::kLong || out.numel() <= (int64_t{1} << 31),
                    "fastmf.", op, ": ", out.numel(),
                    " positions do not fit in int32; use an int64 out");
}

// sample_negatives (csrc/ops.h sample_negatives_op, for both devices): the ids' and the
// CSR's types and shapes, one device, num_items in [1, 2^31 - 1] (a draw's rank is below
// 2^31), at least 1 negative, and at most 2^31 - 1 draws (the pairs' counters). The users'
// range and their rows are checked where the ids are read (on the GPU, recorded there).
inline void check_sample_negatives(const char* op, const at::Tensor& users,
                                   const at::Tensor& pos_indptr, const at::Tensor& pos_indices,
                                   int64_t num_items, int64_t num_negatives) {
  check_id_dtype(op, "users", users);
  check_positives_csr(op, pos_indptr, pos_indices, "users", users);
  TORCH_CHECK_VALUE(pos_indptr.size(0) >= 1, "fastmf.", op,
                    ": pos_indptr must have num_users + 1 >= 1 entries, got 0");
  TORCH_CHECK_VALUE(num_items >= 1 && num_items <= kMaxSampledItems, "fastmf.", op,
                    ": num_items must be in [1, ", kMaxSampledItems, "], got ", num_items);
  TORCH_CHECK_VALUE(num_negatives >= 1, "fastmf.", op, ": num_negatives must be >= 1, got ",
                    num_negatives);
  // The pairs' counters: at most 2^31 - 1 draws, as many as items.
  TORCH_CHECK_VALUE(users.size(0) <= kMaxSampledItems / num_negatives, "fastmf.", op, ": ",
                    users.size(0), " users x ", num_negatives, " negatives = ",
                    users.size(0) * num_negatives, " draws; at most ", kMaxSampledItems,
                    " are supported");
}

// A row pointer the CSR cannot hold, or a user with no item left to sample: the ValueErrors
// of fastmf/ops/reference/sampling.py sample_negatives (the CUDA kernel records them, see
// csrc/cuda/errors.cu).
[[noreturn]] inline void report_bad_row(const char* op, int64_t user, int64_t start,
                                        int64_t end, int64_t nnz) {
  TORCH_CHECK_VALUE(false, "fastmf.", op, ": pos_indptr gives user ", user, " the row [", start,
                    ", ", end, "), not an ordered range within [0, ", nnz,
                    "] (len(pos_indices))");
}
[[noreturn]] inline void report_no_negative(const char* op, int64_t user, int64_t deg,
                                            int64_t num_items) {
  TORCH_CHECK_VALUE(false, "fastmf.", op, ": user ", user, " has ", deg, " positives of ",
                    num_items, " items; no item is left to sample as a negative");
}

// mf_backward: the tables and ids as mf_forward, and grad_out (B,) like the weights.
inline void check_mf_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& users,
                              const at::Tensor& items, const at::Tensor& user_factors,
                              const at::Tensor& item_factors) {
  check_mf_tables(op, users, items, user_factors, item_factors, std::nullopt, std::nullopt);
  check_weight(op, "grad_out", grad_out, 1);
  check_like(op, "grad_out", grad_out, "user_factors", user_factors);
  check_same_length(op, "grad_out", grad_out, "users", users);
}

// sparse_adagrad_update / sparse_sgd_update (fastmf/ops/checks.py check_sparse_update, in
// its order); `state` is null for SGD.
inline void check_sparse_update(const char* op, const at::Tensor& weight, const at::Tensor* state,
                                const at::Tensor& ids, const at::Tensor& grad_rows,
                                bool rowwise, double lr, double eps) {
  check_setting(op, "lr", lr);
  if (state != nullptr) check_setting(op, "eps", eps);
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
    check_separate_memory(op, {{"weight", &weight}, {"state", state}});
  }
  check_id_dtype(op, "ids", ids);
  check_like_device(op, "ids", ids, "weight", weight);
  check_same_length(op, "ids", ids, "grad_rows", grad_rows);
  TORCH_CHECK_VALUE(ids.size(0) < (int64_t{1} << 31), "fastmf.", op, ": ", ids.size(0),
                    " ids in one call; at most 2^31 - 1 are supported");
}

// ---------------------------------------------------------------------------------------
// The embedding_bag family (fastmf/ops/checks.py, its second half): the same checks in the
// same order, with the messages spelled as Python spells them (shapes as tuples, dtypes as
// torch.float16), since the reference backend raises them too. Only the values a check reads
// differ by device: the CPU kernels read offsets and ids on the host; the CUDA ones record
// bad ones on the device (csrc/cuda/embedding_bag.cu).

// A dtype as Python prints it: torch.float32.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A shape as a Python tuple: (3,), (2, 3), ().
inline std::string py_shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (d > 0) out += ", ";
    out += std::to_string(sizes[d]);
  }
  if (sizes.size() == 1) out += ",";
  return out + ")";
}

// Embedding tables (and their gradients): float32, float64, float16 or bfloat16, with one of
// `dims` dimensions.
inline void check_embedding_weight(const char* op, const char* name, const at::Tensor& weight,
                                   std::initializer_list<int64_t> dims = {2}) {
  const auto t = weight.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "fastmf.", op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", py_dtype(t));
  bool ok = false;
  std::string want;
  for (const int64_t d : dims) {
    ok |= weight.dim() == d;
    if (!want.empty()) want += " or ";
    want += std::to_string(d) + "-D";
  }
  TORCH_CHECK_VALUE(ok, "fastmf.", op, ": ", name, " must be ", want, ", got shape ",
                    py_shape(weight.sizes()));
}

// The type the embedding ops compute in: float64 for float64 tables, float32 otherwise (also
// the bag output's and the optimizer states' type).
inline at::ScalarType accumulation_type(at::ScalarType weight) {
  return weight == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// A 1-D int32/int64 tensor (ids or offsets); reads no value.
inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "fastmf.", op,
                   ": ", name, " must be int32 or int64, got ", py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1, "fastmf.", op, ": ", name, " must be 1-D, got shape ",
                    py_shape(t.sizes()));
}

// `t` is on `reference`'s device (fastmf/ops/checks.py check_same_device).
inline void check_device_of(const char* op, const char* name, const at::Tensor& t,
                            const char* reference_name, const at::Tensor& reference) {
  if (!t.defined()) return;
  TORCH_CHECK_VALUE(t.device() == reference.device(), "fastmf.", op, ": ", name, " is on ",
                    t.device(), " but ", reference_name, " is on ", reference.device(),
                    "; move them to one device");
}

// The offsets' values: offsets[0] == 0, non-decreasing, offsets[B] == num_indices. `o`: the
// offsets on the host, any int type.
template <typename index_t>
inline void check_offsets_values(const char* op, const index_t* o, int64_t n,
                                 int64_t num_indices) {
  if (n == 0) return;
  TORCH_CHECK_VALUE(o[0] == 0, "fastmf.", op, ": offsets must start at 0, got offsets[0] = ",
                    static_cast<int64_t>(o[0]));
  for (int64_t b = 0; b + 1 < n; ++b) {
    TORCH_CHECK_VALUE(o[b + 1] >= o[b], "fastmf.", op, ": offsets must be non-decreasing, got ",
                      static_cast<int64_t>(o[b]), " then ", static_cast<int64_t>(o[b + 1]),
                      " at offsets[", b, "], offsets[", b + 1, "]");
  }
  const int64_t end = static_cast<int64_t>(o[n - 1]);
  TORCH_CHECK_VALUE(end <= num_indices, "fastmf.", op, ": offsets[", n - 1, "] = ", end,
                    " is past the end of indices (", num_indices, " ids)");
  TORCH_CHECK_VALUE(end == num_indices, "fastmf.", op,
                    ": the last offset must equal the number of indices (", num_indices,
                    "), got offsets[", n - 1, "] = ", end);
}

// The bag structure without its values: codes, index tensors, per-sample weights of `like`'s
// dtype with SUM pooling only (fastmf/ops/checks.py check_bag_structure up to
// check_offsets_values, which the kernels run where they read the offsets).
inline void check_bag_layout(const char* op, const at::Tensor& indices, const at::Tensor& offsets,
                             const std::optional<at::Tensor>& per_sample_weights,
                             int64_t pooling, const at::Tensor& like) {
  check_code<Pooling>(op, pooling);
  check_index_tensor(op, "indices", indices);
  check_index_tensor(op, "offsets", offsets);
  TORCH_CHECK_TYPE(offsets.scalar_type() == indices.scalar_type(), "fastmf.", op,
                   ": offsets has dtype ", py_dtype(offsets.scalar_type()), ", expected ",
                   py_dtype(indices.scalar_type()), " like indices");
  TORCH_CHECK_VALUE(offsets.numel() > 0, "fastmf.", op,
                    ": offsets must have one entry per bag plus one, got 0 entries");
  check_device_of(op, "indices", indices, "weight", like);
  check_device_of(op, "offsets", offsets, "weight", like);
  if (per_sample_weights.has_value()) {
    const at::Tensor& psw = *per_sample_weights;
    check_device_of(op, "per_sample_weights", psw, "weight", like);
    TORCH_CHECK_VALUE(static_cast<Pooling>(pooling) == Pooling::kSum, "fastmf.", op,
                      ": per_sample_weights needs sum pooling, got mean");
    TORCH_CHECK_TYPE(psw.scalar_type() == like.scalar_type(), "fastmf.", op,
                     ": per_sample_weights has dtype ", py_dtype(psw.scalar_type()),
                     ", expected ", py_dtype(like.scalar_type()));
    TORCH_CHECK_VALUE(psw.sizes() == indices.sizes(), "fastmf.", op,
                      ": per_sample_weights has shape ", py_shape(psw.sizes()), ", expected ",
                      py_shape(indices.sizes()), " like indices");
  }
  // The kernels group positions in int32 (csrc/cpu/segments.h, the CUDA sort keys).
  TORCH_CHECK_VALUE(indices.size(0) < (int64_t{1} << 31), "fastmf.", op, ": ",
                    indices.size(0), " ids in one call; at most 2^31 - 1 are supported");
}

// embedding_bag_forward: weight, then the bag layout against an output of the accumulation
// type (per-sample weights have the output's dtype).
inline void check_embedding_bag_forward(const char* op, const at::Tensor& weight,
                                        const at::Tensor& indices, const at::Tensor& offsets,
                                        const std::optional<at::Tensor>& per_sample_weights,
                                        int64_t pooling) {
  check_embedding_weight(op, "weight", weight);
  const at::Tensor out_like = at::empty(
      {0}, weight.options().dtype(accumulation_type(weight.scalar_type())));
  check_bag_layout(op, indices, offsets, per_sample_weights, pooling, out_like);
}

// embedding_bag_backward: grad_output (B, K), one row per bag.
inline void check_embedding_bag_backward(const char* op, const at::Tensor& grad_output,
                                         const at::Tensor& indices, const at::Tensor& offsets,
                                         const std::optional<at::Tensor>& per_sample_weights,
                                         int64_t pooling) {
  check_embedding_weight(op, "grad_output", grad_output);
  check_bag_layout(op, indices, offsets, per_sample_weights, pooling, grad_output);
  TORCH_CHECK_VALUE(grad_output.size(0) == offsets.size(0) - 1, "fastmf.", op,
                    ": grad_output has ", grad_output.size(0),
                    " rows, expected one per bag (", offsets.size(0) - 1, ")");
}

// scatter_rows (fastmf/ops/checks.py check_scatter_rows, in its order): ids (L,) int32/int64,
// rows (L,) or (L, K) float on the ids' device, num_rows >= 0. The ids' values are checked
// where they are read.
inline void check_scatter_rows(const char* op, const at::Tensor& ids, const at::Tensor& rows,
                               int64_t num_rows) {
  TORCH_CHECK_VALUE(num_rows >= 0, "fastmf.", op, ": num_rows must be >= 0, got ", num_rows);
  check_index_tensor(op, "ids", ids);
  check_embedding_weight(op, "rows", rows, {1, 2});
  check_device_of(op, "rows", rows, "ids", ids);
  TORCH_CHECK_VALUE(rows.size(0) == ids.size(0), "fastmf.", op, ": rows has ", rows.size(0),
                    " rows, expected one per id (", ids.size(0), ")");
}

// unique_bags (fastmf/ops/checks.py check_unique_bags, in its order): ids (n,), indptr
// (R + 1,) with R >= 0, indices (nnz,) int32/int64; weights (nnz,) float; all on the ids'
// device. The ids' values and the row pointers of the rows they name are checked where
// they are read (report_id_range, check_bag_row).
inline void check_unique_bags(const char* op, const at::Tensor& ids, const at::Tensor& indptr,
                              const at::Tensor& indices, const at::Tensor& weights) {
  check_index_tensor(op, "ids", ids);
  check_index_tensor(op, "indptr", indptr);
  TORCH_CHECK_VALUE(indptr.size(0) >= 1, "fastmf.", op,
                    ": indptr must hold num_rows + 1 >= 1 entries, got 0");
  check_index_tensor(op, "indices", indices);
  check_embedding_weight(op, "weights", weights, {1});
  check_device_of(op, "indptr", indptr, "ids", ids);
  check_device_of(op, "indices", indices, "ids", ids);
  check_device_of(op, "weights", weights, "ids", ids);
  TORCH_CHECK_VALUE(weights.size(0) == indices.size(0), "fastmf.", op, ": weights has ",
                    weights.size(0), " entries, expected one per index (", indices.size(0),
                    ")");
}

// Row `row`'s entries [start, end) of a CSR matrix with `nnz` entries, as unique_bags reads
// them (fastmf/ops/checks.py check_bag_row).
inline void check_bag_row(const char* op, int64_t row, int64_t start, int64_t end,
                          int64_t nnz) {
  TORCH_CHECK_VALUE(0 <= start && start <= end && end <= nnz, "fastmf.", op, ": indptr[", row,
                    "] = ", start, " and indptr[", row + 1, "] = ", end,
                    " do not bound a row of the ", nnz, " indices");
}

// unique_bags' `total` entries fit offsets of the indices' int type (rows may share
// entries, so the bags can outgrow it; fastmf/ops/checks.py check_bag_total).
inline void check_bag_total(const char* op, int64_t total, at::ScalarType index_type) {
  const int64_t limit = index_type == at::kInt ? std::numeric_limits<int32_t>::max()
                                               : std::numeric_limits<int64_t>::max();
  TORCH_CHECK_VALUE(total <= limit, "fastmf.", op, ": the bags hold more than ", limit,
                    " entries, past what ", py_dtype(index_type),
                    " offsets can hold; pass int64 indices");
}

// Adam's betas: finite numbers in [0, 1).
inline void check_betas(const char* op, double beta1, double beta2) {
  check_setting(op, "beta1", beta1);
  check_setting(op, "beta2", beta2);
  TORCH_CHECK_VALUE(beta1 < 1.0, "fastmf.", op, ": beta1 must be in [0, 1), got ",
                    py_float(beta1));
  TORCH_CHECK_VALUE(beta2 < 1.0, "fastmf.", op, ": beta2 must be in [0, 1), got ",
                    py_float(beta2));
}

// The settings of sparse_update / embedding_bag_backward_update, before any write.
inline void check_row_optimizer_args(const char* op, int64_t optimizer, double lr, double eps,
                                     double beta1, double beta2, double weight_decay,
                                     int64_t weight_decay_mode, int64_t step, int64_t seed) {
  TORCH_CHECK_VALUE(optimizer >= 0 && optimizer < RowOptimizerCodes::type::size, "fastmf.", op,
                    ": unknown optimizer code ", optimizer, "; expected 0..",
                    RowOptimizerCodes::type::size - 1);
  check_code<WeightDecay>(op, weight_decay_mode);
  check_setting(op, "lr", lr);
  check_setting(op, "eps", eps);
  check_setting(op, "weight_decay", weight_decay);
  check_betas(op, beta1, beta2);
  TORCH_CHECK_VALUE(step >= 1, "fastmf.", op, ": step must be in [1, 2**63), got ", step);
  TORCH_CHECK_VALUE(seed >= 0, "fastmf.", op, ": seed must be in [0, 2**63), got ", seed);
}

// Gradients of float32/float64 tables have the table's dtype; those of float16/bfloat16
// tables the table's dtype or float32 (the bag output's dtype).
inline void check_grad_dtype(const char* op, const char* name, const at::Tensor& grad,
                             const at::Tensor& weight) {
  const auto w = weight.scalar_type(), g = grad.scalar_type();
  const bool half = is_half_type(w);
  TORCH_CHECK_TYPE(g == w || (half && g == at::kFloat), "fastmf.", op, ": ", name,
                   " has dtype ", py_dtype(g), ", expected ", py_dtype(w),
                   half ? " or torch.float32" : "", " for ", py_dtype(w), " weights");
}

// state1/state2: exactly the states `optimizer` uses, in the accumulation type, on the
// weight's device, sharing memory with neither the weight nor each other.
inline void check_row_states(const char* op, Optimizer optimizer, const RowTable& table) {
  const at::Tensor& weight = table.weight;
  const auto dtype = accumulation_type(weight.scalar_type());
  const std::vector<int64_t> full(weight.sizes().begin(), weight.sizes().end());
  const std::vector<int64_t> per_row = {weight.size(0)};
  const std::vector<int64_t>* shapes[2] = {nullptr, nullptr};
  switch (optimizer) {
    case Optimizer::kSgd: break;
    case Optimizer::kAdagrad: shapes[0] = &full; break;
    case Optimizer::kRowwiseAdagrad: shapes[0] = &per_row; break;
    case Optimizer::kAdam: shapes[0] = &full; shapes[1] = &full; break;
    case Optimizer::kRowwiseAdam: shapes[0] = &full; shapes[1] = &per_row; break;
  }
  const char* slots[2] = {"state1", "state2"};
  const at::Tensor* states[2] = {&table.state1, &table.state2};
  for (int s = 0; s < 2; ++s) {
    const at::Tensor& state = *states[s];
    if (shapes[s] == nullptr) {
      TORCH_CHECK_VALUE(!state.defined(), "fastmf.", op, ": ", name(optimizer), " takes no ",
                        slots[s], ", got a tensor of shape ", py_shape(state.sizes()));
      continue;
    }
    TORCH_CHECK_VALUE(state.defined(), "fastmf.", op, ": ", name(optimizer), " needs ",
                      slots[s], ", got None");
    TORCH_CHECK_TYPE(state.scalar_type() == dtype, "fastmf.", op, ": ", slots[s],
                     " has dtype ", py_dtype(state.scalar_type()), ", expected ",
                     py_dtype(dtype), " for ", py_dtype(weight.scalar_type()), " weights");
    TORCH_CHECK_VALUE(state.sizes() == at::IntArrayRef(*shapes[s]), "fastmf.", op, ": ",
                      slots[s], " has shape ", py_shape(state.sizes()), ", expected ",
                      py_shape(*shapes[s]));
    check_device_of(op, slots[s], state, "weight", weight);
  }
  check_separate_memory(op, {{"weight", &table.weight},
                             {"state1", &table.state1},
                             {"state2", &table.state2}});
}

// sparse_update: every check before any write except the ids' range, which the kernels check
// where they read the ids (fastmf/ops/checks.py check_sparse_update_inputs, in its order).
inline void check_sparse_update_inputs(const char* op, const RowTable& table,
                                       Optimizer optimizer, const at::Tensor& ids,
                                       const at::Tensor& grad_rows) {
  const at::Tensor& weight = table.weight;
  check_embedding_weight(op, "weight", weight, {1, 2});
  check_embedding_weight(op, "grad_rows", grad_rows, {weight.dim()});
  check_grad_dtype(op, "grad_rows", grad_rows, weight);
  if (weight.dim() == 2) {
    TORCH_CHECK_VALUE(grad_rows.size(1) == weight.size(1), "fastmf.", op, ": grad_rows has ",
                      grad_rows.size(1), " columns, weight has ", weight.size(1));
  }
  check_row_states(op, optimizer, table);
  check_device_of(op, "ids", ids, "weight", weight);
  check_device_of(op, "grad_rows", grad_rows, "weight", weight);
  check_index_tensor(op, "ids", ids);
  TORCH_CHECK_VALUE(ids.size(0) == grad_rows.size(0), "fastmf.", op, ": lengths differ (ids has ",
                    ids.size(0), ", grad_rows has ", grad_rows.size(0), ")");
  TORCH_CHECK_VALUE(ids.size(0) < (int64_t{1} << 31), "fastmf.", op, ": ", ids.size(0),
                    " ids in one call; at most 2^31 - 1 are supported");
}

// embedding_bag_backward_update: every check before any write except the values of the
// offsets and ids (fastmf/ops/checks.py check_backward_update_inputs, in its order).
inline void check_backward_update_inputs(const char* op, const RowTable& table,
                                         Optimizer optimizer, const at::Tensor& grad_output,
                                         const Bags& bags, int64_t pooling) {
  const at::Tensor& weight = table.weight;
  check_embedding_weight(op, "weight", weight);
  check_embedding_bag_backward(op, grad_output, bags.indices, bags.offsets,
                               maybe(bags.per_sample_weights), pooling);
  check_grad_dtype(op, "grad_output", grad_output, weight);
  TORCH_CHECK_VALUE(grad_output.size(1) == weight.size(1), "fastmf.", op, ": grad_output has ",
                    grad_output.size(1), " columns, weight has ", weight.size(1));
  check_row_states(op, optimizer, table);
  check_device_of(op, "grad_output", grad_output, "weight", weight);
  check_device_of(op, "indices", bags.indices, "weight", weight);
}

// embedding_bag_backward_update_pair: the bags index both tables, and no tensor the pair
// writes shares memory with another (each is stepped on its own).
inline void check_update_pair(const char* op, const RowTable& table, const RowTable& table_b) {
  TORCH_CHECK_VALUE(table_b.weight.size(0) == table.weight.size(0), "fastmf.", op,
                    ": weight has ", table.weight.size(0), " rows, weight_b ",
                    table_b.weight.size(0), "; the bags index both");
  const at::Tensor written[] = {table.weight, table.state1, table.state2,
                                table_b.weight, table_b.state1, table_b.state2};
  const char* names[] = {"weight", "state1", "state2", "weight_b", "state1_b", "state2_b"};
  for (int i = 0; i < 6; ++i) {
    for (int j = i + 1; j < 6; ++j) {
      TORCH_CHECK_VALUE(!written[i].defined() || !written[j].defined() ||
                            !written[i].is_alias_of(written[j]),
                        "fastmf.", op, ": ", names[j], " shares memory with ", names[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Layouts and sizes only the CUDA kernels need (the CPU kernels take any strides and size).

// The CUDA kernels update a table in place through its own storage, row after row (the CPU
// ones go through a contiguous copy that is written back).
inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastmf.", op, ": ", name,
                    " must be contiguous to be updated in place (got strides ", t.strides(),
                    ")");
}

// The CUDA sort keys are 32-bit: ids below 2^31 and a batch below 2^31 samples.
inline void check_fits_32bit(const char* op, const char* what, int64_t count) {
  TORCH_CHECK_VALUE(count < (int64_t{1} << 31), "fastmf.", op, ": ", what, " ", count,
                    " is too large for the CUDA kernels (at most 2^31 - 1)");
}

// The CUDA update kernels hold a row in registers: at most `max_dim` values (1024 float32 /
// 512 float64 when the rows move as 16-byte packs, 256 when they cannot). Checked for
// every table before a step writes any.
inline void check_row_width(const char* op, const char* name, int64_t dim, int64_t max_dim,
                            int64_t packed_max_dim) {
  TORCH_CHECK_VALUE(dim <= max_dim, "fastmf.", op, ": ", name, " rows of ", dim,
                    " values are too wide for the CUDA update kernels (at most ", max_dim,
                    " here; ", packed_max_dim, " when the width is a multiple of 16 bytes ",
                    "and every table the update reads starts on a 16-byte boundary)");
}

// `lo`, `hi`: the smallest and largest id of a batch.
inline void report_id_range(const char* op, const char* name, int64_t lo, int64_t hi,
                            int64_t num_rows) {
  const int64_t bad = lo < 0 ? lo : hi;
  TORCH_CHECK_INDEX(lo >= 0 && hi < num_rows, "fastmf.", op, ": ", name, " id ", bad,
                    " out of range [0, ", num_rows, ")");
}

// Host-side range check: call before any kernel touches memory through these ids. Reports
// the smallest id when one is negative, else the largest, as fastmf/ops/checks.py does.
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

// The first of n values that `ok` rejects, or null: one branch-free pass when all pass (the
// common case), a second to find the culprit for the message.
template <typename scalar_t, typename Ok>
inline const scalar_t* first_rejected(const scalar_t* values, int64_t n, Ok ok) {
  bool all = true;
  for (int64_t b = 0; b < n; ++b) all &= ok(values[b]);
  if (all) return nullptr;
  for (int64_t b = 0; b < n; ++b) {
    if (!ok(values[b])) return values + b;
  }
  return nullptr;
}

// Host-side: NaN or inf targets would silently poison every row they touch.
template <typename scalar_t>
inline void check_finite(const char* op, const char* name, const scalar_t* values,
                         int64_t n) {
  const scalar_t* bad = first_rejected(values, n, [](scalar_t v) { return std::isfinite(v); });
  // The message is formed only on failure, when bad points at the value.
  TORCH_CHECK_VALUE(bad == nullptr, "fastmf.", op, ": ", name, " contains a non-finite value (",
                    *bad, ")");
}

// Host-side: a NaN, infinite or negative weight (the message of fastmf/ops/checks.py
// check_step_weights). NaN fails w >= 0.
template <typename scalar_t>
inline void check_weight_values(const char* op, const scalar_t* w, int64_t n) {
  const scalar_t* bad =
      first_rejected(w, n, [](scalar_t v) { return (v >= scalar_t(0)) & !std::isinf(v); });
  TORCH_CHECK_VALUE(bad == nullptr, "fastmf.", op, ": weights must be finite and >= 0, got ",
                    *bad);
}

// pooled_rank_steps (fastmf/ops/checks.py check_pooled_rank_steps, in its order): the run's
// ids (n,) int32/int64 of equal length, its weights undefined or (n,) float, batch_size and
// num_negatives >= 1, the loss "bpr" or "bce", reg finite and >= 0, and (step, seed, stochastic
// rounding) for each of the four tables. The tables, bags and optimizer settings are checked
// by the ops the steps call, before their first write.
inline void check_pooled_rank_steps(const char* op, const at::Tensor& users,
                                    const at::Tensor& pos_items,
                                    const std::optional<at::Tensor>& weights,
                                    int64_t num_negatives, int64_t batch_size,
                                    c10::string_view loss, double reg, at::IntArrayRef steps,
                                    at::IntArrayRef seeds, at::IntArrayRef rounding) {
  check_index_tensor(op, "users", users);
  check_index_tensor(op, "pos_items", pos_items);
  check_same_length(op, "users", users, "pos_items", pos_items);
  check_device_of(op, "pos_items", pos_items, "users", users);
  if (weights.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(weights->scalar_type()), "fastmf.", op,
                     ": weights must be a floating tensor, got ",
                     py_dtype(weights->scalar_type()));
    TORCH_CHECK_VALUE(weights->dim() == 1, "fastmf.", op, ": weights must be 1-D, got shape ",
                      py_shape(weights->sizes()));
    check_same_length(op, "users", users, "weights", *weights);
    check_device_of(op, "weights", *weights, "users", users);
  }
  TORCH_CHECK_VALUE(batch_size >= 1, "fastmf.", op, ": batch_size must be >= 1, got ",
                    batch_size);
  TORCH_CHECK_VALUE(num_negatives >= 1, "fastmf.", op, ": num_negatives must be >= 1, got ",
                    num_negatives);
  TORCH_CHECK_VALUE(loss == c10::string_view("bpr") || loss == c10::string_view("bce"),
                    "fastmf.", op, ": loss must be 'bpr' or 'bce', got '", std::string(loss),
                    "'");
  check_setting(op, "reg", reg);
  TORCH_CHECK_VALUE(steps.size() == 4 && seeds.size() == 4 && rounding.size() == 4, "fastmf.",
                    op, ": steps, seeds and stochastic_rounding must hold one value per table "
                    "(4), got ", steps.size(), ", ", seeds.size(), " and ", rounding.size());
}

}  // namespace fastmf
