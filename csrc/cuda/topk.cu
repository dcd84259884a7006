// The topk family on the GPU: topk_scores, the exact top-k of
// item_bias[i] + <queries[b], item_factors[i]> (csrc/cpu/topk.cpp on the CPU).
//
// The meaning (tie order, NaN, exclusion, candidates, padding) is fastmf.ops.reference.
// topk_scores. This file makes it fast without ever
// writing the (queries x items) score matrix, which is what makes `torch.topk(Q @ X.T + b)`
// slow: it moves 4 bytes per score through memory twice, the fused kernel none.
//
// Two kernels and a fixed workspace sized from (splits, B, min(k, items)) on the host, so
// the host never waits on the device and no size depends on the data:
//
// 1. topk_partial_kernel: a block takes a tile of BQ queries and one *split* (a contiguous
//    range) of the items. It walks the split in tiles of BI items: the scores of the
//    (BQ x BI) tile are computed like an SGEMM micro-kernel (queries and items staged in
//    shared memory in chunks of kKChunk dims, each thread accumulating MQ x MI scores in
//    registers, so each item row loaded serves BQ queries), then written to shared memory,
//    where one warp per query compares them with the query's current k-th best and inserts
//    only the few that beat it into that query's sorted list (in the workspace). Small
//    batches use a narrow tile (8 queries x 256 items; bandwidth-bound: the item table is
//    read once) and large ones a wide tile (64 x 128, 64 x 64 for float64; compute-bound).
//    Splits give the GPU enough blocks when there are few query tiles; their number is
//    chosen so that the grid fills the resident block slots in whole waves.
// 2. topk_merge_kernel: one warp per query merges the splits' sorted lists and pads.
//
// Order: every comparison is (score descending, item index ascending), a total order, so
// results do not depend on the split count, the tile or the order insertions happen in:
// they are deterministic and equal to the reference's. A score's dot product is summed in
// dimension order in both tile shapes. NaN scores rank as -inf, as in the reference.
//
// Exclusion: each exclude entry becomes the key query * (I + 1) + item, and the keys are
// sorted once per call (at::sort on the device, nnz elements). A score that beats the
// threshold is then looked up by binary search, so exclusion costs O(log nnz) per
// insertion candidate (a few hundred per query for k = 10), whatever the rows' order.
// Candidates are sorted on the device too; repeats and bad ids are skipped in the kernel.
//
// Large k: the per-query lists live in the workspace and an insertion shifts the tail of
// the list, so filling a list of k entries costs O(k^2 / 32) per (query, split). That is
// nothing for k <= 256 and fine into the thousands; for k in the tens of thousands this
// path is slow (the workspace also grows as splits x B x k), and a full sort of the scores
// would serve better.
//
// Bad exclude/candidate ids and a bad exclude_indptr are recorded in the device error
// record (errors.cu) and never dereferenced: a bad id is left out, and a bad indptr only
// changes which entries exclude what (every entry is read within exclude_indices).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "common.cuh"

namespace fastmf::cuda {
namespace {

constexpr const char* kOp = "topk_scores";
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;
// Dimensions staged in shared memory per step of the score tile.
constexpr int kKChunk = 16;
// The merge keeps kMaxSplits / 32 list heads per lane in registers.
constexpr int kMaxSplits = 16 * kWarp;
constexpr int kHeadsPerLane = kMaxSplits / kWarp;
// A split keeps at least this many item tiles (fewer would make the partial lists and the
// merge cost more than the split saves; at k = 10 a tile of 256 items already dwarfs a list),
constexpr int64_t kMinTilesPerSplit = 2;
// and the partial lists stay under this many bytes.
constexpr int64_t kMaxWorkspaceBytes = int64_t{256} << 20;
// Batches up to this size take the narrow tile.
constexpr int64_t kNarrowBatch = 16;

__device__ __forceinline__ long long min_ll(long long a, long long b) { return a < b ? a : b; }

// The order every backend shares: higher score first, then lower item index.
template <typename T>
__device__ __forceinline__ bool ranks_before(T a, long long a_id, T b, long long b_id) {
  return a > b || (a == b && a_id < b_id);
}

template <typename T>
__device__ __forceinline__ T minus_infinity() {
  return -std::numeric_limits<T>::infinity();
}

// Whether `key` is among the sorted `keys`.
__device__ __forceinline__ bool contains(const int64_t* keys, long long n, long long key) {
  long long lo = 0, hi = n;
  while (lo < hi) {
    const long long mid = lo + (hi - lo) / 2;
    if (static_cast<long long>(keys[mid]) < key) lo = mid + 1;
    else hi = mid;
  }
  return lo < n && static_cast<long long>(keys[lo]) == key;
}

// One key per exclude entry: query * (num_items + 1) + item, or -1 (matches nothing) for
// an entry outside every query's row or with a bad id. Also checks indptr, which the CPU
// kernel checks on the host.
__global__ void __launch_bounds__(kThreads)
    exclude_keys_kernel(const int64_t* __restrict__ indptr, long long batch, IdArray indices,
                        long long nnz, long long num_items, int64_t* __restrict__ keys,
                        ErrorRecord* err) {
  const long long p = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (p == 0 && (indptr[0] < 0 || indptr[batch] > nnz)) {
    record_error(err, kOpTopk, kArgIndptrSpan, indptr[0], indptr[batch], nnz);
  }
  if (p < batch && indptr[p] > indptr[p + 1]) {
    record_error(err, kOpTopk, kArgIndptrOrder, indptr[p], indptr[p + 1], p);
  }
  if (p >= nnz) return;
  // The query whose row holds entry p: one before the first indptr entry above p.
  long long lo = 0, hi = batch + 1;
  while (lo < hi) {
    const long long mid = lo + (hi - lo) / 2;
    if (indptr[mid] <= p) lo = mid + 1;
    else hi = mid;
  }
  const long long row = lo - 1;
  long long key = -1;
  if (row >= 0 && row < batch) {
    const long long id = indices[p];
    if (id < 0 || id >= num_items) record_error(err, kOpTopk, kArgExclude, id, num_items, p);
    else key = row * (num_items + 1) + id;
  }
  keys[p] = key;
}

// Candidate ids as int64, a bad one replaced by num_items (sorted last, then skipped).
__global__ void __launch_bounds__(kThreads)
    candidate_keys_kernel(IdArray candidates, long long n, long long num_items,
                          int64_t* __restrict__ out, ErrorRecord* err) {
  const long long p = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (p >= n) return;
  long long id = candidates[p];
  if (id < 0 || id >= num_items) {
    record_error(err, kOpTopk, kArgCandidates, id, num_items, p);
    id = num_items;
  }
  out[p] = id;
}

template <typename T>
struct Problem {
  const T* queries;  // (batch, dim)
  const T* items;    // (num_items, dim)
  const T* bias;     // (num_items,) or null
  long long batch, dim, num_items;
  const int64_t* candidates;  // sorted candidate ids (bad ones = num_items), or null
  long long positions;        // items scanned: num_items, or the candidate count
  long long split_len;        // positions per split, a multiple of the tile width
  int splits;
  const int64_t* exclude_keys;  // sorted, or null
  long long num_exclude;
  long long capacity;  // min(k, positions): the length of every list
  T* part_scores;      // (splits, batch, capacity): each query's sorted list per split
  int64_t* part_ids;
  int64_t* part_count;  // (splits, batch)
};

// Inserts (score, id) into a sorted list of `count` entries (best first, at most `cap`);
// the whole warp takes part, and all its lanes pass the same arguments.
template <typename T>
__device__ __forceinline__ void insert_sorted(T* scores, int64_t* ids, long long count,
                                              long long cap, T score, long long id, int lane) {
  long long lo = 0, hi = count;
  while (lo < hi) {
    const long long mid = lo + (hi - lo) / 2;
    if (ranks_before(scores[mid], static_cast<long long>(ids[mid]), score, id)) lo = mid + 1;
    else hi = mid;
  }
  const long long pos = lo;
  // Every lane must finish reading before any lane writes: when nothing moves, lane 0's
  // store below would otherwise race with the other lanes' search (and could give them
  // another pos, so that they disagree on the loop below and its __syncwarp).
  __syncwarp();
  // Entries [pos, last) move down by one (the worst falls off a full list), from the end
  // backwards: each step reads its 32 sources before writing over them.
  const long long last = min_ll(count, cap - 1);
  for (long long top = last; top > pos; top -= kWarp) {
    const long long dest = top - lane;
    const bool move = dest > pos;
    T s = T(0);
    long long i = 0;
    if (move) {
      s = scores[dest - 1];
      i = ids[dest - 1];
    }
    __syncwarp();
    if (move) {
      scores[dest] = s;
      ids[dest] = i;
    }
    __syncwarp();
  }
  if (lane == 0) {
    scores[pos] = score;
    ids[pos] = id;
  }
  __syncwarp();
}

// Stages dims [d0, d0 + kKChunk) of kRows table rows, transposed: stage[d * kStride + r].
// row_of(r) is the table row of stage row r, or -1 for zeros. V scalars per load (a Pack)
// when every row start is 16-byte aligned, which also makes dim a multiple of V, so a pack
// is either wholly inside the row or wholly past its end. Consecutive threads read
// consecutive packs of a row.
template <typename T, int V, int kRows, int kStride, typename RowOf>
__device__ __forceinline__ void stage_chunk(T* stage, const T* __restrict__ table,
                                            long long dim, long long d0, RowOf row_of) {
  constexpr int kPacks = kKChunk / V;
  for (int e = static_cast<int>(threadIdx.x); e < kRows * kPacks; e += kThreads) {
    const int r = e / kPacks, d = (e % kPacks) * V;
    const long long row = row_of(r), gd = d0 + d;
    Pack<T, V> x = zero_pack<T, V>();
    if (row >= 0 && gd < dim) x = load_pack<T, V>(table + row * dim + gd);
#pragma unroll
    for (int v = 0; v < V; ++v) stage[(d + v) * kStride + r] = x.v[v];
  }
}

// TQ x TI threads, each computing MQ queries x MI items of a BQ x BI tile: thread (tq, ti)
// takes queries tq * MQ + j (j < MQ) and items (g * TI + ti) * W + w (g < MI / W, w < W),
// runs of MQ queries and W items that it reads from shared memory as packs, so that the
// micro-kernel issues few shared loads per FMA (at float32: 3 loads for 32 FMAs).
template <typename T, int TQ, int MQ, int MI, int V>
__global__ void __launch_bounds__(kThreads) topk_partial_kernel(Problem<T> p) {
  constexpr int TI = kThreads / TQ;
  constexpr int BQ = TQ * MQ, BI = TI * MI;
  constexpr int kPack = static_cast<int>(16 / sizeof(T));
  constexpr int W = MI < kPack ? MI : kPack;   // items per shared-memory pack
  constexpr int QW = MQ < kPack ? MQ : kPack;  // queries per shared-memory pack
  static_assert(MI % W == 0 && MQ % QW == 0, "micro-tiles are whole packs");
  static_assert(BI % kWarp == 0, "a tile row is scanned by whole warps");
  // Staging rows are padded by one pack: rows stay 16-byte aligned and the transposing
  // stores spread over more banks.
  constexpr int kQStride = BQ + kPack, kXStride = BI + kPack;
  constexpr int kStage = kKChunk * (kQStride + kXStride);
  constexpr int kShared = kStage > BQ * BI ? kStage : BQ * BI;
  // The staged operands and the finished score tile are never live at once.
  __shared__ __align__(16) T smem[kShared];
  __shared__ int64_t tile_ids[BI];  // item id of each tile column; -1: none
  __shared__ T tile_bias[BI];
  __shared__ long long list_count[BQ];
  __shared__ T kth_score[BQ];  // each full list's worst entry
  __shared__ long long kth_id[BQ];
  T* q_stage = smem;
  T* x_stage = smem + kKChunk * kQStride;
  T* tile_scores = smem;

  const int t = static_cast<int>(threadIdx.x);
  const int tq = t / TI, ti = t % TI;
  const int warp = t / kWarp, lane = t % kWarp;
  const long long q0 = static_cast<long long>(blockIdx.x / p.splits) * BQ;
  const int split = static_cast<int>(blockIdx.x % p.splits);
  const long long begin = split * p.split_len;
  const long long end = min_ll(p.positions, begin + p.split_len);
  const long long cap = p.capacity;

  for (int q = t; q < BQ; q += kThreads) {
    list_count[q] = 0;
    kth_score[q] = minus_infinity<T>();
    kth_id[q] = -1;
  }
  __syncthreads();

  for (long long pos0 = begin; pos0 < end; pos0 += BI) {
    for (int c = t; c < BI; c += kThreads) {
      const long long pos = pos0 + c;
      long long id = -1;
      if (pos < end) {
        if (p.candidates == nullptr) {
          id = pos;
        } else {
          const long long cand = p.candidates[pos];
          if (cand < p.num_items && (pos == 0 || p.candidates[pos - 1] != cand)) id = cand;
        }
      }
      tile_ids[c] = id;
      tile_bias[c] = (id >= 0 && p.bias != nullptr) ? p.bias[id] : T(0);
    }
    __syncthreads();

    T acc[MQ][MI];
#pragma unroll
    for (int j = 0; j < MQ; ++j) {
#pragma unroll
      for (int m = 0; m < MI; ++m) acc[j][m] = T(0);
    }
    for (long long d0 = 0; d0 < p.dim; d0 += kKChunk) {
      stage_chunk<T, V, BQ, kQStride>(q_stage, p.queries, p.dim, d0, [&](int q) {
        return q0 + q < p.batch ? q0 + q : -1ll;
      });
      stage_chunk<T, V, BI, kXStride>(x_stage, p.items, p.dim, d0,
                                      [&](int c) { return static_cast<long long>(tile_ids[c]); });
      __syncthreads();
#pragma unroll
      for (int d = 0; d < kKChunk; ++d) {
        T qv[MQ], xv[MI];
#pragma unroll
        for (int i = 0; i < MQ / QW; ++i) {
          const Pack<T, QW> a = load_pack<T, QW>(q_stage + d * kQStride + tq * MQ + i * QW);
#pragma unroll
          for (int w = 0; w < QW; ++w) qv[i * QW + w] = a.v[w];
        }
#pragma unroll
        for (int g = 0; g < MI / W; ++g) {
          const Pack<T, W> a = load_pack<T, W>(x_stage + d * kXStride + (g * TI + ti) * W);
#pragma unroll
          for (int w = 0; w < W; ++w) xv[g * W + w] = a.v[w];
        }
#pragma unroll
        for (int j = 0; j < MQ; ++j) {
#pragma unroll
          for (int m = 0; m < MI; ++m) acc[j][m] += qv[j] * xv[m];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < MQ; ++j) {
#pragma unroll
      for (int g = 0; g < MI / W; ++g) {
        Pack<T, W> a;
#pragma unroll
        for (int w = 0; w < W; ++w) a.v[w] = acc[j][g * W + w];
        store_pack<T, W>(tile_scores + (tq * MQ + j) * BI + (g * TI + ti) * W, a);
      }
    }
    __syncthreads();

    // One warp per query: only scores that beat the query's k-th best (or any, while its
    // list is not full) are looked up in the exclusion keys and inserted.
    for (int q = warp; q < BQ; q += kWarps) {
      const long long gq = q0 + q;
      if (gq >= p.batch) break;
      long long count = list_count[q];
      T kth_s = kth_score[q];
      long long kth_i = kth_id[q];
      const long long list = (static_cast<long long>(split) * p.batch + gq) * cap;
      T* scores = p.part_scores + list;
      int64_t* ids = p.part_ids + list;
      const long long key_base = gq * (p.num_items + 1);
      for (int c0 = 0; c0 < BI; c0 += kWarp) {
        const int c = c0 + lane;
        const long long id = tile_ids[c];
        T s = tile_scores[q * BI + c] + tile_bias[c];
        if (s != s) s = minus_infinity<T>();
        bool want = id >= 0 && (count < cap || ranks_before(s, id, kth_s, kth_i));
        if (want && p.exclude_keys != nullptr) {
          want = !contains(p.exclude_keys, p.num_exclude, key_base + id);
        }
        unsigned pending = __ballot_sync(kFullMask, want);
        while (pending != 0) {
          const int src = __ffs(static_cast<int>(pending)) - 1;
          pending &= pending - 1;
          const T cs = __shfl_sync(kFullMask, s, src);
          const long long ci = __shfl_sync(kFullMask, id, src);
          if (count == cap && !ranks_before(cs, ci, kth_s, kth_i)) continue;
          insert_sorted(scores, ids, count, cap, cs, ci, lane);
          if (count < cap) ++count;
          if (count == cap) {
            kth_s = scores[cap - 1];
            kth_i = ids[cap - 1];
          }
        }
      }
      if (lane == 0) {
        list_count[q] = count;
        kth_score[q] = kth_s;
        kth_id[q] = kth_i;
      }
    }
    __syncthreads();
  }

  for (int q = t; q < BQ; q += kThreads) {
    const long long gq = q0 + q;
    if (gq < p.batch) p.part_count[split * p.batch + gq] = list_count[q];
  }
}

// One warp per query: the best `capacity` of the splits' sorted lists, then padding.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_merge_kernel(const T* __restrict__ part_scores, const int64_t* __restrict__ part_ids,
                      const int64_t* __restrict__ part_count, long long batch, int splits,
                      long long cap, long long k, T* __restrict__ out_scores,
                      int64_t* __restrict__ out_ids) {
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const long long b = static_cast<long long>(blockIdx.x) * kWarps + warp;
  if (b >= batch) return;  // uniform over the warp
  // Lane l holds the heads of lists l, l + 32, ...
  long long head[kHeadsPerLane], count[kHeadsPerLane];
#pragma unroll
  for (int j = 0; j < kHeadsPerLane; ++j) {
    const int s = lane + j * kWarp;
    head[j] = 0;
    count[j] = s < splits ? static_cast<long long>(part_count[s * batch + b]) : 0;
  }
  long long r = 0;
  for (; r < cap; ++r) {
    int own = -1;
    T best = T(0);
    long long best_id = 0;
#pragma unroll
    for (int j = 0; j < kHeadsPerLane; ++j) {
      if (head[j] < count[j]) {
        const long long at = (static_cast<long long>(lane + j * kWarp) * batch + b) * cap + head[j];
        const T s = part_scores[at];
        const long long id = part_ids[at];
        if (own < 0 || ranks_before(s, id, best, best_id)) {
          own = j;
          best = s;
          best_id = id;
        }
      }
    }
    // The warp's best; the order is total (an item is in one split only), so every lane
    // agrees on it.
    int has = own >= 0 ? 1 : 0;
    T wbest = best;
    long long wid = best_id;
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const T other = __shfl_xor_sync(kFullMask, wbest, offset);
      const long long other_id = __shfl_xor_sync(kFullMask, wid, offset);
      const int other_has = __shfl_xor_sync(kFullMask, has, offset);
      if (other_has != 0 && (has == 0 || ranks_before(other, other_id, wbest, wid))) {
        wbest = other;
        wid = other_id;
        has = 1;
      }
    }
    if (has == 0) break;  // every list is used up
    if (lane == 0) {
      out_scores[b * k + r] = wbest;
      out_ids[b * k + r] = wid;
    }
    if (own >= 0 && best_id == wid) {
#pragma unroll
      for (int j = 0; j < kHeadsPerLane; ++j) head[j] += j == own ? 1 : 0;
    }
  }
  for (long long j = r + lane; j < k; j += kWarp) {
    out_scores[b * k + j] = minus_infinity<T>();
    out_ids[b * k + j] = -1;
  }
}

// Splits per query tile: the grid should fill the GPU's resident block slots in whole
// waves (a last wave that is mostly empty leaves SMs idle for a whole block's time), with
// as few splits as that takes and never more than two waves' worth.
int64_t choose_splits(int64_t query_tiles, int64_t slots, int64_t max_splits) {
  max_splits = std::min(max_splits, ceil_div(2 * slots, query_tiles));
  int64_t best = 1;
  double best_fill = 0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t blocks = query_tiles * s;
    const double fill = static_cast<double>(blocks) / static_cast<double>(
                                                          ceil_div(blocks, slots) * slots);
    if (fill > best_fill + 1e-9) {
      best = s;
      best_fill = fill;
    }
  }
  return best;
}

template <typename T, int TQ, int MQ, int MI>
void launch_topk(Problem<T> p, int64_t k, bool packed, at::Tensor& scores, at::Tensor& ids,
                 const at::TensorOptions& options) {
  constexpr int64_t BQ = TQ * MQ, BI = (kThreads / TQ) * MI;
  cudaStream_t stream = current_stream();
  const int64_t query_tiles = ceil_div(p.batch, BQ);
  const int64_t item_tiles = ceil_div(p.positions, BI);
  constexpr int kVec = 16 / sizeof(T);
  void (*kernel)(Problem<T>) = packed ? &topk_partial_kernel<T, TQ, MQ, MI, kVec>
                                      : &topk_partial_kernel<T, TQ, MQ, MI, 1>;
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t slots = static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
  const int64_t per_list = p.batch * p.capacity * static_cast<int64_t>(sizeof(T) + 8);
  int64_t splits = choose_splits(
      query_tiles, slots,
      std::min({std::max<int64_t>(1, item_tiles / kMinTilesPerSplit),
                std::max<int64_t>(1, kMaxWorkspaceBytes / per_list),
                static_cast<int64_t>(kMaxSplits)}));
  const int64_t tiles_per_split = ceil_div(item_tiles, splits);
  p.split_len = tiles_per_split * BI;
  splits = ceil_div(item_tiles, tiles_per_split);  // no empty split
  p.splits = static_cast<int>(splits);
  TORCH_CHECK(query_tiles * splits < (int64_t{1} << 31), "fastmf.", kOp, ": batch ",
              p.batch, " is too large for one call; split it");

  at::Tensor part_scores = at::empty({splits, p.batch, p.capacity}, options);
  at::Tensor part_ids = at::empty({splits, p.batch, p.capacity}, options.dtype(at::kLong));
  at::Tensor part_count = at::empty({splits, p.batch}, options.dtype(at::kLong));
  p.part_scores = part_scores.data_ptr<T>();
  p.part_ids = part_ids.data_ptr<int64_t>();
  p.part_count = part_count.data_ptr<int64_t>();

  kernel<<<static_cast<unsigned>(query_tiles * splits), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  topk_merge_kernel<T><<<static_cast<unsigned>(ceil_div(p.batch, kWarps)), kThreads, 0, stream>>>(
      p.part_scores, p.part_ids, p.part_count, p.batch, p.splits, p.capacity, k,
      scores.data_ptr<T>(), ids.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> topk_scores(
    const at::Tensor& queries, const at::Tensor& item_factors,
    const std::optional<at::Tensor>& item_bias, int64_t k,
    const std::optional<at::Tensor>& exclude_indptr,
    const std::optional<at::Tensor>& exclude_indices,
    const std::optional<at::Tensor>& candidates) {
  // The CPU kernel's host checks, in its order and words.
  check_topk_inputs(kOp, queries, item_factors, item_bias, k, exclude_indptr, exclude_indices,
                    candidates);
  const int64_t batch = queries.size(0);
  const int64_t num_items = item_factors.size(0);

  c10::cuda::CUDAGuard guard(queries.device());
  at::Tensor scores = at::empty({batch, k}, queries.options());
  at::Tensor ids = at::empty({batch, k}, queries.options().dtype(at::kLong));
  if (batch == 0) return {scores, ids};
  cudaStream_t stream = current_stream();
  ErrorRecord* err = error_record();
  const auto id_options = queries.options().dtype(at::kLong);

  // Sorted exclusion keys and candidates (both checked for bad ids on the device).
  at::Tensor exclude_keys;
  if (exclude_indptr.has_value()) {
    const at::Tensor indptr = exclude_indptr->to(at::kLong).contiguous();
    const at::Tensor indices = exclude_indices->contiguous();
    const int64_t nnz = indices.size(0);
    at::Tensor keys = at::empty({nnz}, id_options);
    const int64_t threads = std::max(nnz, batch);
    exclude_keys_kernel<<<static_cast<unsigned>(ceil_div(threads, kThreads)), kThreads, 0,
                          stream>>>(indptr.data_ptr<int64_t>(), batch, id_array(indices), nnz,
                                    num_items, keys.data_ptr<int64_t>(), err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (nnz > 0) exclude_keys = std::get<0>(keys.sort());
  }
  at::Tensor candidate_ids;
  if (candidates.has_value()) {
    const at::Tensor c = candidates->contiguous();
    const int64_t n = c.size(0);
    at::Tensor keys = at::empty({n}, id_options);
    if (n > 0) {
      candidate_keys_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0,
                              stream>>>(id_array(c), n, num_items, keys.data_ptr<int64_t>(),
                                        err);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      keys = std::get<0>(keys.sort());
    }
    candidate_ids = keys;
  }

  const int64_t positions = candidates.has_value() ? candidates->size(0) : num_items;
  const int64_t capacity = std::min(k, positions);
  if (capacity == 0) {
    scores.fill_(-std::numeric_limits<double>::infinity());
    ids.fill_(-1);
    return {scores, ids};
  }

  const at::Tensor q = queries.contiguous();
  const at::Tensor items = item_factors.contiguous();
  at::Tensor bias;
  if (item_bias.has_value()) bias = item_bias->contiguous();
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "fastmf.topk_scores", [&] {
    Problem<scalar_t> p{};
    p.queries = q.data_ptr<scalar_t>();
    p.items = items.data_ptr<scalar_t>();
    p.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    p.batch = batch;
    p.dim = q.size(1);
    p.num_items = num_items;
    p.candidates = candidate_ids.defined() ? candidate_ids.data_ptr<int64_t>() : nullptr;
    p.positions = positions;
    p.exclude_keys = exclude_keys.defined() ? exclude_keys.data_ptr<int64_t>() : nullptr;
    p.num_exclude = exclude_keys.defined() ? exclude_keys.size(0) : 0;
    p.capacity = capacity;
    const bool packed = p.dim % (16 / sizeof(scalar_t)) == 0 && aligned16(p.queries) &&
                        aligned16(p.items);
    const auto options = queries.options();
    if (batch <= kNarrowBatch) {
      launch_topk<scalar_t, 4, 2, 4>(p, k, packed, scores, ids, options);  // 8 x 256
    } else if constexpr (sizeof(scalar_t) == 4) {
      launch_topk<scalar_t, 16, 4, 8>(p, k, packed, scores, ids, options);  // 64 x 128
    } else {
      launch_topk<scalar_t, 16, 4, 4>(p, k, packed, scores, ids, options);  // 64 x 64
    }
  });
  return {scores, ids};
}

}  // namespace
}  // namespace fastmf::cuda

TORCH_LIBRARY_IMPL(fastmf, CUDA, m) { m.impl("topk_scores", &fastmf::cuda::topk_scores); }
