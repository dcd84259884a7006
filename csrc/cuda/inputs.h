// Host-side checks of the CUDA ops: everything that needs no device data (dtypes, shapes,
// devices, lengths), with the messages and exception types of csrc/checks.h. Id ranges and
// target values live on the device and are checked there (see errors.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../checks.h"

namespace fastmf::cuda {

// In-place updates write through the tensor's own storage, row after row.
inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastmf.", op, ": ", name,
                    " must be contiguous to be updated in place (got strides ", t.strides(),
                    ")");
}

// The sort keys are 32-bit: ids below 2^31 and a batch below 2^31 samples.
inline void check_fits_32bit(const char* op, const char* what, int64_t count) {
  TORCH_CHECK_VALUE(count < (int64_t{1} << 31), "fastmf.", op, ": ", what, " ", count,
                    " is too large for the CUDA kernels (at most 2^31 - 1)");
}

// The 32-bit limits of the sort keys: row ids and batch positions.
inline void check_sort_key_limits(const char* op, const at::Tensor& users,
                                  const at::Tensor& user_factors,
                                  const at::Tensor& item_factors) {
  check_fits_32bit(op, "user_factors row count", user_factors.size(0));
  check_fits_32bit(op, "item_factors row count", item_factors.size(0));
  check_fits_32bit(op, "batch size", users.size(0));
}

// The CPU kernels' table checks (csrc/checks.h), plus the 32-bit limits of the sort keys.
inline void check_tables(const char* op, const at::Tensor& users, const at::Tensor& items,
                         const at::Tensor& user_factors, const at::Tensor& item_factors,
                         const std::optional<at::Tensor>& user_bias,
                         const std::optional<at::Tensor>& item_bias) {
  check_mf_tables(op, users, items, user_factors, item_factors, user_bias, item_bias);
  check_sort_key_limits(op, users, user_factors, item_factors);
}

}  // namespace fastmf::cuda
