// The sparse optimizer step on the CPU, after the batch was grouped into segments
// (segments.h): sum the gradient rows of each segment in batch order, then update its row
// once. It serves sparse_adagrad_update and sparse_sgd_update (pointwise.cpp); the fused
// steps (fused_step.h) call step_row/step_scalar on the sums they form themselves.
// csrc/cuda/segment_update.cuh is the CUDA counterpart.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../codes.h"
#include "common.h"
#include "isa.h"
#include "segments.h"

namespace fastmf {
namespace FASTMF_CPU_NS {

constexpr Optimizer kSgd = Optimizer::kSgd;
constexpr Optimizer kAdagrad = Optimizer::kAdagrad;
constexpr Optimizer kRowwiseAdagrad = Optimizer::kRowwiseAdagrad;

// One optimizer step on one row, given the row's summed gradient g (length n). `state`
// points at the row's state: n values for Adagrad, one for row-wise Adagrad, unused for
// SGD. The arithmetic follows fastmf/ops/reference operation by operation:
//   G += g*g;  w -= (lr*g) / (sqrt(G) + eps).
template <Optimizer kOpt, typename T>
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
template <Optimizer kOpt, typename T>
inline void step_scalar(T* w, T* state, T g, T lr, T eps) {
  if (kOpt == kSgd) {
    *w -= lr * g;
  } else {
    const T G = *state + g * g;
    *state = G;
    *w -= lr * g / (std::sqrt(G) + eps);
  }
}

// kOpt: the optimizer; `state` is null for SGD. A 1-D (bias) table has scalar rows
// (`scalar_rows`, width 1); `per_row_state`: one state value per row (row-wise Adagrad on
// a 2-D table).
template <Optimizer kOpt, typename T>
void update_segments(T* weight, T* state, int64_t width, bool scalar_rows, bool per_row_state,
                     const RowGroups& groups, const T* grad_rows, int64_t batch, T lr, T eps) {
  constexpr int64_t kGrain = 256;
  constexpr int64_t kPrefetchGroups = 4;
  // Gradient rows are read in group order, at random in the batch: they are prefetched
  // kPrefetchRows occurrences ahead, across group boundaries (most groups of a Zipf batch are
  // one occurrence), as csrc/cpu/embedding_bag.cpp's grouped_step does.
  constexpr int64_t kPrefetchRows = 8;
  const int64_t state_width = per_row_state ? 1 : width;
  at::parallel_for(0, batch, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t first = groups.group_at(begin);
    const int64_t last = groups.group_at(end);
    std::vector<T> acc(static_cast<size_t>(width));
    T* a = acc.data();
    const int32_t* order = groups.order.data();
    const int64_t task_end = groups.starts[last];
    for (int64_t s = first; s < last; ++s) {
      if (s + kPrefetchGroups < groups.num_groups) {
        const int64_t ahead = groups.rows[s + kPrefetchGroups];
        prefetch_row(weight + ahead * width, width, true);
        if (state != nullptr) prefetch_row(state + ahead * state_width, state_width, true);
      }
      const int64_t row = groups.rows[s];
      std::fill(acc.begin(), acc.end(), T(0));
      for (int32_t j = groups.starts[s]; j < groups.starts[s + 1]; ++j) {
        if (j + kPrefetchRows < task_end) {
          prefetch_row(grad_rows + static_cast<int64_t>(order[j + kPrefetchRows]) * width, width,
                       false);
        }
        const T* g = grad_rows + static_cast<int64_t>(order[j]) * width;
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

}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
