// Kernels of segment_update.cuh. Included once per scalar type (segment_update_*.cu) so the
// two halves of the template work compile in parallel.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "common.cuh"
#include "segment_update.cuh"

namespace fastmf::cuda {
namespace segment {

// J packs of V scalars: the part of one row that a lane holds.
template <typename scalar_t, int V, int J>
struct Frag {
  Pack<scalar_t, V> p[J];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int f = 0; f < J; ++f) p[f] = zero_pack<scalar_t, V>();
  }
  __device__ __forceinline__ void add(const Frag& o) {
#pragma unroll
    for (int f = 0; f < J; ++f)
#pragma unroll
      for (int v = 0; v < V; ++v) p[f].v[v] += o.p[f].v[v];
  }
};

// First column of pack f of this lane. Packs past the row's end hold zeros and are never
// written to the table (they are written to scratch, which is padded).
template <int V>
__device__ __forceinline__ int64_t column(const Group& g, int f) {
  return (static_cast<int64_t>(f) * g.size + g.lane) * V;
}

// The gradient of the sample at batch position `pos` (a valid sample).
template <typename scalar_t, int V, int J, bool kDerived>
__device__ __forceinline__ void load_gradient(const SegmentArgs<scalar_t>& a, const Group& g,
                                              int32_t pos, Frag<scalar_t, V, J>& r,
                                              scalar_t& rb) {
  if constexpr (kDerived) {
    const scalar_t c = a.coef[pos];
    const int64_t other_row = static_cast<int64_t>(a.other_keys[pos] - a.other_key_offset);
    const scalar_t* src = a.other + other_row * a.dim;
    // Uniform over a launch: the pairwise step's users subtract the negative item's row.
    const scalar_t* minus =
        a.other_keys_minus == nullptr
            ? nullptr
            : a.other + static_cast<int64_t>(a.other_keys_minus[pos] - a.other_key_offset) * a.dim;
#pragma unroll
    for (int f = 0; f < J; ++f) {
      const int64_t col = column<V>(g, f);
      if (col < a.dim) {
        Pack<scalar_t, V> x = load_pack<scalar_t, V>(src + col);
        if (minus != nullptr) {
          const Pack<scalar_t, V> y = load_pack<scalar_t, V>(minus + col);
#pragma unroll
          for (int v = 0; v < V; ++v) x.v[v] = x.v[v] - y.v[v];
        }
#pragma unroll
        for (int v = 0; v < V; ++v) r.p[f].v[v] = c * x.v[v];
      } else {
        r.p[f] = zero_pack<scalar_t, V>();
      }
    }
    rb = c;
  } else {
    // Negating is exact: -(c p) equals (-c) p, as the CPU kernel computes it.
    const bool negated = pos >= a.negated_from;
    const int64_t row = negated ? pos - a.negated_from : pos;
    const scalar_t* src = a.grad_rows + row * a.dim;
#pragma unroll
    for (int f = 0; f < J; ++f) {
      const int64_t col = column<V>(g, f);
      r.p[f] = col < a.dim ? load_pack<scalar_t, V>(src + col) : zero_pack<scalar_t, V>();
      if (negated) {
#pragma unroll
        for (int v = 0; v < V; ++v) r.p[f].v[v] = -r.p[f].v[v];
      }
    }
    rb = a.coef != nullptr ? (negated ? -a.coef[row] : a.coef[row]) : scalar_t(0);
  }
}

// One optimizer step on `row` with the summed gradient of its `count` samples. Formulas
// and their order of operations follow fastmf/ops/reference (torch.optim semantics).
template <typename scalar_t, int V, int J>
__device__ __forceinline__ void apply_update(const SegmentArgs<scalar_t>& a, const Group& g,
                                             int64_t row, int32_t count,
                                             Frag<scalar_t, V, J>& grad, scalar_t bias_grad) {
  scalar_t* w_row = a.weight + row * a.dim;
  const scalar_t decay = a.reg_scale * static_cast<scalar_t>(count);
  Frag<scalar_t, V, J> w;
#pragma unroll
  for (int f = 0; f < J; ++f) {
    const int64_t col = column<V>(g, f);
    w.p[f] = col < a.dim ? load_pack<scalar_t, V>(w_row + col) : zero_pack<scalar_t, V>();
  }
  if (a.reg_scale != scalar_t(0)) {
#pragma unroll
    for (int f = 0; f < J; ++f)
#pragma unroll
      for (int v = 0; v < V; ++v) grad.p[f].v[v] += decay * w.p[f].v[v];
  }
  const scalar_t lr = a.lr, eps = a.eps;
  if (a.optimizer == kSgd) {
#pragma unroll
    for (int f = 0; f < J; ++f)
#pragma unroll
      for (int v = 0; v < V; ++v) w.p[f].v[v] -= lr * grad.p[f].v[v];
  } else if (a.optimizer == kAdagrad) {
    scalar_t* s_row = a.state + row * a.dim;
#pragma unroll
    for (int f = 0; f < J; ++f) {
      const int64_t col = column<V>(g, f);
      if (col >= a.dim) continue;
      Pack<scalar_t, V> s = load_pack<scalar_t, V>(s_row + col);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const scalar_t gv = grad.p[f].v[v];
        s.v[v] += gv * gv;
        w.p[f].v[v] -= lr * gv / (sqrt(s.v[v]) + eps);
      }
      store_pack<scalar_t, V>(s_row + col, s);
    }
  } else {
    scalar_t sum_sq = 0;
#pragma unroll
    for (int f = 0; f < J; ++f)
#pragma unroll
      for (int v = 0; v < V; ++v) sum_sq += grad.p[f].v[v] * grad.p[f].v[v];
    sum_sq = group_sum(g, sum_sq);
    // One lane reads and writes the row's state; the others get it by shuffle, so no lane
    // can read it after it was written.
    scalar_t acc = 0;
    if (g.lane == 0) {
      acc = a.state[row] + sum_sq / static_cast<scalar_t>(a.dim);
      a.state[row] = acc;
    }
    acc = group_broadcast(g, acc, 0);
    const scalar_t denom = sqrt(acc) + eps;
#pragma unroll
    for (int f = 0; f < J; ++f)
#pragma unroll
      for (int v = 0; v < V; ++v) w.p[f].v[v] -= lr * grad.p[f].v[v] / denom;
  }
#pragma unroll
  for (int f = 0; f < J; ++f) {
    const int64_t col = column<V>(g, f);
    if (col < a.dim) store_pack<scalar_t, V>(w_row + col, w.p[f]);
  }
  if (a.bias != nullptr && g.lane == 0) {
    scalar_t b = a.bias[row];
    scalar_t gb = bias_grad;
    if (a.reg_scale != scalar_t(0)) gb += decay * b;
    if (a.optimizer == kSgd) {
      b -= lr * gb;
    } else {  // a bias is 1-D: row-wise and element-wise Adagrad coincide
      const scalar_t s = a.bias_state[row] + gb * gb;
      a.bias_state[row] = s;
      b -= lr * gb / (sqrt(s) + eps);
    }
    a.bias[row] = b;
  }
}

// The end of a run's piece in tile `tile`, at slot `stop`: apply it when the whole run lies
// in the tile, else leave it in the tile's scratch slot for stage 2.
template <typename scalar_t, int V, int J>
__device__ __forceinline__ void close_piece(const SegmentArgs<scalar_t>& a, const Group& g,
                                            int32_t tile, uint32_t key, int32_t start,
                                            int32_t stop, bool from_prev, bool continues,
                                            Frag<scalar_t, V, J>& acc, scalar_t bias_acc) {
  const uint32_t row = key - a.key_offset;
  if (static_cast<int64_t>(row) >= a.num_rows) return;  // bad samples' run (sorted last)
  if (!from_prev && !continues) {
    apply_update(a, g, row, stop - start, acc, bias_acc);
    return;
  }
  const int slot = from_prev ? 0 : 1;
  scalar_t* dst = a.partials + (static_cast<int64_t>(tile) * 2 + slot) * a.padded;
#pragma unroll
  for (int f = 0; f < J; ++f) store_pack<scalar_t, V>(dst + column<V>(g, f), acc.p[f]);
  if (g.lane == 0) {
    if (a.bias != nullptr) a.bias_partials[tile * 2 + slot] = bias_acc;
    if (slot == 0) a.piece_end[tile] = stop;
  }
}

// Rows in flight per group while walking a tile: enough loads to hide latency without
// spilling registers as J grows.
template <int J>
constexpr int rows_in_flight() {
  return J >= 4 ? 1 : 4 / J;
}

template <typename scalar_t, int V, int J, bool kDerived>
__global__ void __launch_bounds__(kThreads) stage1_kernel(const SegmentArgs<scalar_t> a) {
  constexpr int U = rows_in_flight<J>();
  const Group g = make_group(a.lanes);
  const int32_t tile = static_cast<int32_t>(blockIdx.x) * (kThreads / a.lanes) +
                       static_cast<int32_t>(threadIdx.x) / a.lanes;
  if (tile >= a.num_tiles) return;  // uniform over the group
  const int32_t begin = tile * a.tile;
  const int32_t end = min(begin + a.tile, a.n);
  const uint32_t prev = begin > 0 ? a.keys[begin - 1] : kNoKey;
  const uint32_t next = end < a.n ? a.keys[end] : kNoKey;

  uint32_t cur = a.keys[begin];
  int32_t cur_start = begin;
  bool from_prev = cur == prev;
  Frag<scalar_t, V, J> acc;
  acc.zero();
  scalar_t bias_acc = 0;

  for (int32_t j0 = begin; j0 < end; j0 += U) {
    // Every lane of the group reads the same key and position (one broadcast access);
    // the U rows are then all requested before any is summed.
    uint32_t keys[U];
    int32_t pos[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t j = j0 + u;
      keys[u] = j < end ? a.keys[j] : kNoKey;
      pos[u] = j < end ? a.positions[j] : 0;
    }
    Frag<scalar_t, V, J> rows[U];
    scalar_t bias_rows[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      // kNoKey and bad samples' keys both land past the table.
      if (static_cast<int64_t>(keys[u] - a.key_offset) < a.num_rows) {
        load_gradient<scalar_t, V, J, kDerived>(a, g, pos[u], rows[u], bias_rows[u]);
      } else {
        rows[u].zero();
        bias_rows[u] = 0;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t j = j0 + u;
      if (j >= end) break;
      if (keys[u] != cur) {
        close_piece(a, g, tile, cur, cur_start, j, from_prev, false, acc, bias_acc);
        cur = keys[u];
        cur_start = j;
        from_prev = false;
        acc.zero();
        bias_acc = 0;
      }
      acc.add(rows[u]);
      bias_acc += bias_rows[u];
    }
  }
  close_piece(a, g, tile, cur, cur_start, end, from_prev, next == cur, acc, bias_acc);
}

// Whether tile t is where a run cut by tile edges ends; if so its row, first tile and
// sample count.
template <typename scalar_t>
__device__ __forceinline__ bool owns_cut_run(const SegmentArgs<scalar_t>& a, int32_t t,
                                             int64_t& row, int32_t& first_tile,
                                             int32_t& count) {
  const int32_t begin = t * a.tile;
  if (begin == 0) return false;
  const uint32_t key = a.keys[begin];
  if (a.keys[begin - 1] != key) return false;  // the tile's first run starts here
  const int32_t end = min(begin + a.tile, a.n);
  if (end < a.n && a.keys[end] == key) return false;  // goes on: a later tile owns it
  const uint32_t r = key - a.key_offset;
  if (static_cast<int64_t>(r) >= a.num_rows) return false;
  const int32_t start = a.run_start[begin] - a.run_start_base;
  row = r;
  first_tile = start / a.tile;
  count = a.piece_end[t] - start;
  return true;
}

// Piece m of a cut run that starts in tile t0: slot 1 of t0, then slot 0 of t0 + m.
template <typename scalar_t, int V, int J>
__device__ __forceinline__ void add_piece(const SegmentArgs<scalar_t>& a, const Group& g,
                                          int32_t t0, int32_t m, Frag<scalar_t, V, J>& acc,
                                          scalar_t& bias_acc) {
  const int64_t slot = m == 0 ? static_cast<int64_t>(t0) * 2 + 1
                              : static_cast<int64_t>(t0 + m) * 2;
  const scalar_t* src = a.partials + slot * a.padded;
#pragma unroll
  for (int f = 0; f < J; ++f) {
    const Pack<scalar_t, V> x = load_pack<scalar_t, V>(src + column<V>(g, f));
#pragma unroll
    for (int v = 0; v < V; ++v) acc.p[f].v[v] += x.v[v];
  }
  if (a.bias != nullptr) bias_acc += a.bias_partials[slot];
}

template <typename scalar_t, int V, int J>
__global__ void __launch_bounds__(kThreads) stage2_kernel(const SegmentArgs<scalar_t> a) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ int32_t long_tile;
  const Group g = make_group(a.lanes);
  const int groups = kThreads / a.lanes;
  const int gi = static_cast<int>(threadIdx.x) / a.lanes;
  const int32_t first = static_cast<int32_t>(blockIdx.x) * kSuperTile;
  const int32_t last = min(first + kSuperTile, a.num_tiles);
  if (threadIdx.x == 0) long_tile = -1;
  __syncthreads();

  for (int32_t t = first + gi; t < last; t += groups) {
    int64_t row;
    int32_t t0, count;
    if (!owns_cut_run(a, t, row, t0, count)) continue;
    if (t - t0 + 1 > kSuperTile) {
      if (g.lane == 0) long_tile = t;  // at most one per block (see kSuperTile)
      continue;
    }
    Frag<scalar_t, V, J> acc;
    acc.zero();
    scalar_t bias_acc = 0;
#pragma unroll 4
    for (int32_t m = 0; m <= t - t0; ++m) add_piece(a, g, t0, m, acc, bias_acc);
    apply_update(a, g, row, count, acc, bias_acc);
  }
  __syncthreads();

  const int32_t t = long_tile;
  if (t < 0) return;  // uniform over the block
  int64_t row;
  int32_t t0, count;
  owns_cut_run(a, t, row, t0, count);
  const int32_t pieces = t - t0 + 1;
  Frag<scalar_t, V, J> acc;
  acc.zero();
  scalar_t bias_acc = 0;
  for (int32_t m = gi; m < pieces; m += groups) add_piece(a, g, t0, m, acc, bias_acc);
  scalar_t* group_sums = reinterpret_cast<scalar_t*>(shared_raw);  // (groups, padded)
  scalar_t* group_bias = group_sums + groups * a.padded;           // (groups,)
#pragma unroll
  for (int f = 0; f < J; ++f)
    store_pack<scalar_t, V>(group_sums + gi * a.padded + column<V>(g, f), acc.p[f]);
  if (g.lane == 0) group_bias[gi] = bias_acc;
  __syncthreads();
  if (gi != 0) return;
  acc.zero();
  bias_acc = 0;
  for (int h = 0; h < groups; ++h) {
#pragma unroll
    for (int f = 0; f < J; ++f) {
      const Pack<scalar_t, V> x =
          load_pack<scalar_t, V>(group_sums + h * a.padded + column<V>(g, f));
#pragma unroll
      for (int v = 0; v < V; ++v) acc.p[f].v[v] += x.v[v];
    }
    bias_acc += group_bias[h];
  }
  apply_update(a, g, row, count, acc, bias_acc);
}

template <typename scalar_t, int V, int J>
void launch_stages(const SegmentArgs<scalar_t>& a, bool derived, cudaStream_t stream) {
  const int groups = kThreads / a.lanes;
  const dim3 grid1(static_cast<unsigned>(ceil_div(a.num_tiles, groups)));
  if (derived) {
    stage1_kernel<scalar_t, V, J, true><<<grid1, kThreads, 0, stream>>>(a);
  } else {
    stage1_kernel<scalar_t, V, J, false><<<grid1, kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid2(static_cast<unsigned>(ceil_div(a.num_tiles, kSuperTile)));
  const size_t shared = static_cast<size_t>(groups) * (a.padded + 1) * sizeof(scalar_t);
  stage2_kernel<scalar_t, V, J><<<grid2, kThreads, shared, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int V>
void launch_for_packs(const SegmentArgs<scalar_t>& a, int packs, bool derived,
                      cudaStream_t stream) {
  switch (packs) {
    case 1: launch_stages<scalar_t, V, 1>(a, derived, stream); break;
    case 2: launch_stages<scalar_t, V, 2>(a, derived, stream); break;
    case 4: launch_stages<scalar_t, V, 4>(a, derived, stream); break;
    case 8: launch_stages<scalar_t, V, 8>(a, derived, stream); break;
    default: TORCH_INTERNAL_ASSERT(false, "fastmf: unexpected pack count ", packs);
  }
}

// Tiles of 4..32 slots: about 8192 tiles at large batches (enough groups to fill an H100
// many times over), shorter tiles at small batches so that there are still many groups.
inline int tile_size(int64_t n) {
  const int64_t want = ceil_div(n, 8192);
  return static_cast<int>(std::clamp<int64_t>(next_pow2(want), 4, 32));
}

}  // namespace segment

template <typename scalar_t>
void run_segment_update(SegmentArgs<scalar_t> a, bool packed, const at::Tensor& like) {
  if (a.n == 0) return;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const RowLayout layout = row_layout(a.dim, packed ? kVec : 1);
  // The ops checked the width (check_update_width) before writing any table.
  TORCH_INTERNAL_ASSERT(layout.packs <= 8, "fastmf: rows of ", a.dim,
                        " values are too wide for the CUDA update kernels (at most ",
                        max_update_dim(sizeof(scalar_t), packed), " here)");
  a.tile = segment::tile_size(a.n);
  a.lanes = layout.lanes;
  a.padded = layout.padded();
  a.num_tiles = static_cast<int32_t>(ceil_div(a.n, a.tile));
  // Scratch sized from the batch alone; PyTorch's caching allocator makes it free after the
  // first step and graph-safe.
  at::Tensor partials = at::empty({a.num_tiles * 2 * a.padded}, like.options());
  at::Tensor bias_partials = at::empty({a.num_tiles * 2}, like.options());
  at::Tensor piece_end = at::empty({a.num_tiles}, like.options().dtype(at::kInt));
  a.partials = partials.data_ptr<scalar_t>();
  a.bias_partials = bias_partials.data_ptr<scalar_t>();
  a.piece_end = piece_end.data_ptr<int32_t>();
  cudaStream_t stream = current_stream();
  if (packed) {
    segment::launch_for_packs<scalar_t, kVec>(a, layout.packs, a.grad_rows == nullptr, stream);
  } else {
    segment::launch_for_packs<scalar_t, 1>(a, layout.packs, a.grad_rows == nullptr, stream);
  }
}

}  // namespace fastmf::cuda
