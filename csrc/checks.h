// Input checks shared by every fastmf kernel (CPU and CUDA). Each message names the op,
// the argument and the bad value; the exception types match fastmf/_checks.py:
// IndexError for ids out of range, TypeError for dtypes, ValueError for the rest.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fastmf {

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

// Host-side range check: call before any kernel touches memory through these ids.
template <typename index_t>
inline void check_id_range(const char* op, const char* name, const index_t* ids, int64_t n,
                           int64_t num_rows) {
  for (int64_t b = 0; b < n; ++b) {
    const int64_t id = static_cast<int64_t>(ids[b]);
    TORCH_CHECK_INDEX(id >= 0 && id < num_rows, "fastmf.", op, ": ", name, " id ", id,
                      " out of range [0, ", num_rows, ")");
  }
}

}  // namespace fastmf
