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

inline void check_on_device(const char* op, const char* name, const at::Tensor& t,
                            const char* like_name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), "fastmf.", op, ": ", name, " is on ",
                    t.device(), " but ", like_name, " is on ", like.device(),
                    "; move them to one device");
}

// In-place updates write through the tensor's own storage, row after row.
inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastmf.", op, ": ", name,
                    " must be contiguous to be updated in place (got strides ", t.strides(),
                    ")");
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "fastmf.", op, ": ", name, " has shape ", t.sizes(),
                    ", expected ", expected);
}

// The sort keys are 32-bit: ids below 2^31 and a batch below 2^31 samples.
inline void check_fits_32bit(const char* op, const char* what, int64_t count) {
  TORCH_CHECK_VALUE(count < (int64_t{1} << 31), "fastmf.", op, ": ", what, " ", count,
                    " is too large for the CUDA kernels (at most 2^31 - 1)");
}

inline void check_tables(const char* op, const at::Tensor& users, const at::Tensor& items,
                         const at::Tensor& user_factors, const at::Tensor& item_factors,
                         const std::optional<at::Tensor>& user_bias,
                         const std::optional<at::Tensor>& item_bias) {
  check_weight(op, "user_factors", user_factors, 2);
  check_weight(op, "item_factors", item_factors, 2);
  check_like(op, "item_factors", item_factors, "user_factors", user_factors);
  TORCH_CHECK_VALUE(user_factors.size(1) == item_factors.size(1), "fastmf.", op,
                    ": user_factors has dim ", user_factors.size(1), " but item_factors has dim ",
                    item_factors.size(1));
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
  check_on_device(op, "users", users, "user_factors", user_factors);
  check_on_device(op, "items", items, "user_factors", user_factors);
  check_same_length(op, "users", users, "items", items);
  check_fits_32bit(op, "user_factors row count", user_factors.size(0));
  check_fits_32bit(op, "item_factors row count", item_factors.size(0));
  check_fits_32bit(op, "batch size", users.size(0));
}

}  // namespace fastmf::cuda
