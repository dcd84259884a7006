// Building blocks shared by the CPU kernels: id loading, row arithmetic and the per-row
// optimizer steps. Every reduction here has a fixed association order written in the
// source, so results do not depend on thread count, pointer alignment or the compiler's
// choice of vector width.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "../checks.h"

namespace fastmf {
namespace cpu {

enum Optimizer : int64_t { kSgd = 0, kAdagrad = 1, kRowwiseAdagrad = 2 };

// Grows (never shrinks) a scratch vector kept between calls and returns its storage.
template <typename T>
inline T* scratch(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Range-checks ids (before any kernel dereferences them) and widens them to int64, so the
// kernels are compiled once rather than once per pair of id dtypes.
inline void load_ids(const char* op, const char* name, const at::Tensor& ids, int64_t num_rows,
                     std::vector<int64_t>& out) {
  const int64_t n = ids.numel();
  int64_t* dst = scratch(out, n);
  if (n == 0) return;
  int64_t lo = 0, hi = 0;
  auto widen = [&](const auto* src) {
    int64_t mn = src[0], mx = src[0];
    for (int64_t b = 0; b < n; ++b) {
      const int64_t id = static_cast<int64_t>(src[b]);
      dst[b] = id;
      mn = std::min(mn, id);
      mx = std::max(mx, id);
    }
    lo = mn;
    hi = mx;
  };
  if (ids.scalar_type() == at::kInt) {
    widen(ids.data_ptr<int32_t>());
  } else {
    widen(ids.data_ptr<int64_t>());
  }
  report_id_range(op, name, lo, hi, num_rows);
}

// Rows are gathered at random, so the hardware prefetcher cannot see them coming; the
// kernels ask for the rows of the groups a few steps ahead instead.
template <typename T>
inline void prefetch_row(const T* row, int64_t dim, bool write) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(T));
  if (write) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 1);
  } else {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0);
  }
}

// sum_k a[k] * b[k] over eight interleaved partial sums (which the compiler keeps in
// vector registers), combined pairwise.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[k + l] * b[k + l];
  }
  T tail = 0;
  for (; k < n; ++k) tail += a[k] * b[k];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) +
         tail;
}

// y = sqrt(x). Vector square roots by hand: without -fno-math-errno the compiler keeps
// sqrt scalar (it must be able to set errno), and Adagrad takes one per element. Both
// paths are correctly rounded, so the results agree bit for bit.
inline void sqrt_n(const float* x, float* y, int64_t n) {
  int64_t k = 0;
#if defined(__SSE2__)
  for (; k + 4 <= n; k += 4) _mm_storeu_ps(y + k, _mm_sqrt_ps(_mm_loadu_ps(x + k)));
#elif defined(__aarch64__) && defined(__ARM_NEON)
  for (; k + 4 <= n; k += 4) vst1q_f32(y + k, vsqrtq_f32(vld1q_f32(x + k)));
#endif
  for (; k < n; ++k) y[k] = std::sqrt(x[k]);
}

inline void sqrt_n(const double* x, double* y, int64_t n) {
  int64_t k = 0;
#if defined(__SSE2__)
  for (; k + 2 <= n; k += 2) _mm_storeu_pd(y + k, _mm_sqrt_pd(_mm_loadu_pd(x + k)));
#elif defined(__aarch64__) && defined(__ARM_NEON)
  for (; k + 2 <= n; k += 2) vst1q_f64(y + k, vsqrtq_f64(vld1q_f64(x + k)));
#endif
  for (; k < n; ++k) y[k] = std::sqrt(x[k]);
}

// One optimizer step on one row, given the row's summed gradient g (length n). `state`
// points at the row's state: n values for Adagrad, one for row-wise Adagrad, unused for
// SGD. The arithmetic follows fastmf/reference.py operation by operation:
//   G += g*g;  w -= (lr*g) / (sqrt(G) + eps).
template <int64_t kOpt, typename T>
inline void step_row(T* __restrict w, T* __restrict state, const T* __restrict g, int64_t n,
                     T lr, T eps) {
  if (kOpt == kSgd) {
    for (int64_t k = 0; k < n; ++k) w[k] -= lr * g[k];
  } else if (kOpt == kAdagrad) {
    constexpr int64_t kChunk = 64;
    T root[kChunk];
    for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
      const int64_t m = std::min(kChunk, n - k0);
      T* G = state + k0;
      const T* gk = g + k0;
      T* wk = w + k0;
      for (int64_t k = 0; k < m; ++k) G[k] += gk[k] * gk[k];
      sqrt_n(G, root, m);
      for (int64_t k = 0; k < m; ++k) wk[k] -= lr * gk[k] / (root[k] + eps);
    }
  } else {
    const T mean_sq = dot(g, g, n) / static_cast<T>(n);
    state[0] += mean_sq;
    const T denom = std::sqrt(state[0]) + eps;
    for (int64_t k = 0; k < n; ++k) w[k] -= lr * g[k] / denom;
  }
}

// A 1-D (bias) table: row-wise Adagrad on a one-element row is element-wise Adagrad.
template <int64_t kOpt, typename T>
inline void step_scalar(T* w, T* state, T g, T lr, T eps) {
  if (kOpt == kSgd) {
    *w -= lr * g;
  } else {
    const T G = *state + g * g;
    *state = G;
    *w -= lr * g / (std::sqrt(G) + eps);
  }
}

// Calls f(kOpt) with the optimizer code as a compile-time constant.
template <typename F>
inline void dispatch_optimizer(int64_t optimizer, F&& f) {
  switch (optimizer) {
    case kSgd: f(std::integral_constant<int64_t, kSgd>{}); break;
    case kAdagrad: f(std::integral_constant<int64_t, kAdagrad>{}); break;
    default: f(std::integral_constant<int64_t, kRowwiseAdagrad>{}); break;
  }
}

// A table updated in place: kernels work on contiguous memory, so a strided view is
// updated through a contiguous copy that is written back.
class InPlace {
 public:
  explicit InPlace(const at::Tensor& t) : original_(t), work_(t.contiguous()) {}
  at::Tensor& get() { return work_; }
  void commit() {
    if (!work_.is_same(original_)) original_.copy_(work_);
  }

 private:
  at::Tensor original_;
  at::Tensor work_;
};

}  // namespace cpu
}  // namespace fastmf
