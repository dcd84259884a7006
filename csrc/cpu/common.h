// Building blocks shared by the CPU kernels (the CUDA ones have csrc/cuda/common.cuh): id
// loading, scratch, row arithmetic. Every reduction here has a fixed association order
// written in the source, so results do not depend on thread count, pointer alignment or
// the compiler's choice of vector width.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <immintrin.h>  // the AVX2 build's sqrt_n (csrc/cpu/avx2/prelude.h includes it first)
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "../checks.h"
#include "isa.h"

namespace fastmf {
namespace FASTMF_CPU_NS {

// Grows a scratch vector kept between calls (one per op and thread) and returns its storage.
// Between calls it only shrinks through release_scratch.
template <typename T>
inline T* scratch(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Scratch a thread keeps after a call: up to 32 MiB per workspace. That holds a 65536-sample
// step at K = 64 (about 22 MiB), so steady training allocates nothing, while one huge batch
// (8M samples: ~760 MiB) no longer pins its scratch for the thread's life.
constexpr size_t kMaxRetainedScratchBytes = size_t{32} << 20;

template <typename T>
inline size_t scratch_bytes(const std::vector<T>& v) {
  return v.capacity() * sizeof(T);
}

template <typename T>
inline void release_scratch(std::vector<T>& v) {
  std::vector<T>().swap(v);
}

// Calls ws.trim() when the enclosing call returns or throws: a workspace over
// kMaxRetainedScratchBytes gives its memory back.
template <typename Workspace>
class TrimOnExit {
 public:
  explicit TrimOnExit(Workspace& ws) : ws_(ws) {}
  ~TrimOnExit() {
    if (ws_.bytes() > kMaxRetainedScratchBytes) ws_.release();
  }
  TrimOnExit(const TrimOnExit&) = delete;
  TrimOnExit& operator=(const TrimOnExit&) = delete;

 private:
  Workspace& ws_;
};

// From this many ids on, the serial prologue of an op (widening and range-checking ids,
// grouping them: csrc/cpu/segments.h) runs on contiguous chunks on the intra-op threads:
// below it, waking the threads costs more than the passes.
constexpr int64_t kParallelIds = int64_t{1} << 15;

// Chunks for such work on n items: one per thread, each at least kParallelIds / 2 items;
// 1 inside a parallel region (nested regions run inline).
inline int64_t parallel_chunks(int64_t n) {
  if (n < kParallelIds || at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / (kParallelIds / 2)));
}

// First item of chunk c of `chunks` contiguous chunks of n items.
inline int64_t chunk_begin(int64_t c, int64_t chunks, int64_t n) { return c * n / chunks; }

// Range-checks contiguous ids (before any kernel dereferences them) and, with kWiden,
// widens them to int64 into dst[0, n).
template <bool kWiden>
inline void scan_ids(const char* op, const char* name, const at::Tensor& ids, int64_t num_rows,
                     int64_t* dst) {
  const int64_t n = ids.numel();
  if (n == 0) return;
  const int64_t chunks = parallel_chunks(n);
  std::vector<int64_t> bounds(static_cast<size_t>(2 * chunks));
  auto scan = [&](const auto* src) {
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const int64_t b0 = chunk_begin(c, chunks, n), b1 = chunk_begin(c + 1, chunks, n);
        int64_t mn = src[b0], mx = src[b0];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t id = static_cast<int64_t>(src[b]);
          if constexpr (kWiden) dst[b] = id;
          mn = std::min(mn, id);
          mx = std::max(mx, id);
        }
        bounds[2 * c] = mn;
        bounds[2 * c + 1] = mx;
      }
    });
  };
  if (ids.scalar_type() == at::kInt) {
    scan(ids.data_ptr<int32_t>());
  } else {
    scan(ids.data_ptr<int64_t>());
  }
  int64_t lo = bounds[0], hi = bounds[1];
  for (int64_t c = 1; c < chunks; ++c) {
    lo = std::min(lo, bounds[2 * c]);
    hi = std::max(hi, bounds[2 * c + 1]);
  }
  report_id_range(op, name, lo, hi, num_rows);
}

// Range-checks ids and widens them to int64, so the kernels are compiled once rather than
// once per pair of id dtypes.
inline void load_ids(const char* op, const char* name, const at::Tensor& ids, int64_t num_rows,
                     std::vector<int64_t>& out) {
  scan_ids<true>(op, name, ids, num_rows, scratch(out, ids.numel()));
}

// Range-checks ids without copying them (the ids of a run read through an order:
// gather_ids below).
inline void check_ids_in_range(const char* op, const char* name, const at::Tensor& ids,
                               int64_t num_rows) {
  scan_ids<false>(op, name, ids.contiguous(), num_rows, nullptr);
}

// out[b] = ids[order[b]], widened to int64: ids and order int32/int64, both range-checked
// (check_ids_in_range). One pass instead of an index_select and then load_ids' pass: an
// epoch's shuffle of ml-latest-small's 100,226 positives gathered this way instead of by two
// index_selects before the call saved 0.1-0.2 ms of an 8.5-8.8 ms BPR epoch (2 threads;
// the two index_selects took 0.25-0.30 ms, the gathers here add 0.05-0.06 ms to the op).
inline void gather_ids(const at::Tensor& ids, const at::Tensor& order, std::vector<int64_t>& out) {
  const int64_t n = order.numel();
  int64_t* dst = scratch(out, n);
  if (n == 0) return;
  const at::Tensor src_t = ids.contiguous(), at_t = order.contiguous();
  auto gather = [&](const auto* src, const auto* at) {
    at::parallel_for(0, n, kParallelIds / 2, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) dst[b] = static_cast<int64_t>(src[at[b]]);
    });
  };
  auto with_order = [&](const auto* src) {
    if (at_t.scalar_type() == at::kInt) {
      gather(src, at_t.data_ptr<int32_t>());
    } else {
      gather(src, at_t.data_ptr<int64_t>());
    }
  };
  if (src_t.scalar_type() == at::kInt) {
    with_order(src_t.data_ptr<int32_t>());
  } else {
    with_order(src_t.data_ptr<int64_t>());
  }
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
// sqrt scalar (it must be able to set errno), and Adagrad takes one per element. Every
// path is correctly rounded, so the results agree bit for bit. The AVX2 build takes 8 (4
// doubles) at a time: on the 2-core AMD EPYC (Zen 4) a 64-float row's roots took 11 ns
// that way against 22 ns 4 at a time, and Adagrad's step takes them for every row it
// updates (element-wise Adagrad is the BPR and BCE default).
inline void sqrt_n(const float* x, float* y, int64_t n) {
  int64_t k = 0;
#if defined(FASTMF_AVX2_BUILD)
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(y + k, _mm256_sqrt_ps(_mm256_loadu_ps(x + k)));
#endif
#if defined(__SSE2__)
  for (; k + 4 <= n; k += 4) _mm_storeu_ps(y + k, _mm_sqrt_ps(_mm_loadu_ps(x + k)));
#elif defined(__aarch64__) && defined(__ARM_NEON)
  for (; k + 4 <= n; k += 4) vst1q_f32(y + k, vsqrtq_f32(vld1q_f32(x + k)));
#endif
  for (; k < n; ++k) y[k] = std::sqrt(x[k]);
}

inline void sqrt_n(const double* x, double* y, int64_t n) {
  int64_t k = 0;
#if defined(FASTMF_AVX2_BUILD)
  for (; k + 4 <= n; k += 4) _mm256_storeu_pd(y + k, _mm256_sqrt_pd(_mm256_loadu_pd(x + k)));
#endif
#if defined(__SSE2__)
  for (; k + 2 <= n; k += 2) _mm_storeu_pd(y + k, _mm_sqrt_pd(_mm_loadu_pd(x + k)));
#elif defined(__aarch64__) && defined(__ARM_NEON)
  for (; k + 2 <= n; k += 2) vst1q_f64(y + k, vsqrtq_f64(vld1q_f64(x + k)));
#endif
  for (; k < n; ++k) y[k] = std::sqrt(x[k]);
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

}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
