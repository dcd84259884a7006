// The topk family on the CPU: topk_scores, the fused exact top-k of
// score[b, i] = item_bias[i] + <queries[b], item_factors[i]> (csrc/cuda/topk.cu on the GPU).
//
// The meaning (tie order, exclusion, candidates, padding) is fastmf.ops.reference.
// topk_scores; this file only makes it fast:
//
// - Scores are produced one tile at a time (a block of queries × a tile of items) into a
//   buffer that stays in L2, and each row of the tile is folded into that query's bounded
//   heap right away, so the (B × I) score matrix is never written to memory. Writing it
//   is what makes `torch.topk(X @ Q.T)` slow: on the 2-core test machine that GEMM runs
//   at ~55 GFLOP/s against ~150 for the same GEMM on tiles that stay in cache.
// - Each score is computed the same way wherever it falls (csrc/cpu/topk_simd.h): a
//   query's top-k does not depend on the batch it came in, the tiling or the thread
//   count. (A BLAS call per tile was as fast but not that: it picks other kernels, with
//   other rounding, for one query than for sixty-four.)
// - Items are scanned in ascending index order within a work unit, so once a heap is full
//   a new item can only enter with a strictly greater score than the heap's worst (an
//   equal score loses on index). That makes the filter one vector compare per score,
//   branching once per chunk; exclusion is looked up only for the few items that pass.
// - Parallel over query blocks; when there are too few blocks to occupy every thread
//   (small batches), the item range is split too and the partial heaps are merged with
//   the full (score, index) order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// The AVX2/AVX-512 kernels need GCC's target pragmas; other compilers and CPUs get the
// portable ones.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTMF_X86_SIMD 1
#include <immintrin.h>
#endif

#include "../checks.h"
#include "isa.h"

namespace fastmf {
namespace FASTMF_CPU_NS {
namespace {

constexpr const char* kOp = "topk_scores";

// A block of queries (32 KB of fp32 at K=64: L1) meets item tiles sized so that the
// block's scores take kTileBytes (L2).
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kTileBytes = 256 * 1024;
// Small batches split the item range into segments until each thread has this many units.
constexpr int64_t kUnitsPerThread = 4;
// Splitting a small batch's item range pays once a segment has this many items.
constexpr int64_t kMinSegment = 8192;
// Above this k the per-segment partial heaps of a split would cost more than they save.
constexpr int64_t kMaxSplitK = 4096;
// Columns per filter chunk: vector compares, one branch per chunk.
constexpr int64_t kChunk = 64;
// Work below this many entries runs on the calling thread: starting a parallel region
// costs more than it saves there (and much more on a busy machine).
constexpr int64_t kSerialEntries = 1 << 16;

template <typename T>
struct Entry {
  T score;
  int64_t id;
};

// The order every backend shares: higher score first, then lower item index.
template <typename T>
inline bool ranks_before(const Entry<T>& a, const Entry<T>& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// Keeps the best `capacity` entries seen; std heap order with ranks_before puts the worst
// kept entry at the front.
template <typename T>
class BoundedHeap {
 public:
  BoundedHeap(Entry<T>* storage, int64_t capacity) : data_(storage), capacity_(capacity) {}

  bool full() const { return size_ == capacity_; }
  int64_t size() const { return size_; }
  T worst_score() const { return data_[0].score; }

  void push(Entry<T> e) {
    data_[size_++] = e;
    std::push_heap(data_, data_ + size_, ranks_before<T>);
  }

  void replace_worst(Entry<T> e) {
    std::pop_heap(data_, data_ + size_, ranks_before<T>);
    data_[size_ - 1] = e;
    std::push_heap(data_, data_ + size_, ranks_before<T>);
  }

  // Best first; the heap is consumed.
  const Entry<T>* ranked() {
    std::sort_heap(data_, data_ + size_, ranks_before<T>);
    return data_;
  }

 private:
  Entry<T>* data_;
  int64_t capacity_;
  int64_t size_ = 0;
};

// Membership in one query's sorted exclude row, for ids asked in ascending order.
struct ExcludeCursor {
  const int64_t* cur = nullptr;
  const int64_t* end = nullptr;

  bool excludes(int64_t id) {
    while (cur != end && *cur < id) ++cur;
    return cur != end && *cur == id;
  }
};

template <typename T, bool kHasBias>
inline T score_at(const T* s, const T* b, int64_t j) {
  if constexpr (kHasBias) {
    return s[j] + b[j];
  } else {
    return s[j];
  }
}

// Per-instruction-set kernels: the dot-product tile and the threshold scan (a compare per
// score, most of the work besides the dot products). The portable versions vectorise
// only to SSE, if at all, so x86-64 also gets AVX2 and AVX-512 builds of
// csrc/cpu/topk_simd.h, picked once at run time.
template <typename T>
using DotTile = void (*)(const T*, int64_t, const T*, const int64_t*, int64_t, int64_t, int64_t,
                         T*);
template <typename T>
using ChunkScan = int64_t (*)(const T*, const T*, int64_t, int64_t, T);

namespace portable {

template <typename T>
void dot_tile(const T* queries, int64_t rows, const T* items, const int64_t* ids,
              int64_t first, int64_t cols, int64_t dim, T* out) {
  for (int64_t c = 0; c < cols; ++c) {
    const T* item = items + (ids != nullptr ? ids[c] : first + c) * dim;
    for (int64_t r = 0; r < rows; ++r) {
      const T* query = queries + r * dim;
      T acc = 0;
      for (int64_t d = 0; d < dim; ++d) acc += query[d] * item[d];
      out[r * cols + c] = acc;
    }
  }
}

template <typename T, bool kHasBias>
int64_t next_above(const T* s, const T* b, int64_t from, int64_t n, T threshold) {
  int64_t j = from;
  for (; j + kChunk <= n; j += kChunk) {
    int any = 0;
    for (int64_t c = 0; c < kChunk; ++c) {
      any |= score_at<T, kHasBias>(s + j, kHasBias ? b + j : b, c) > threshold;
    }
    if (any != 0) break;
  }
  for (; j < n; ++j) {
    if (score_at<T, kHasBias>(s, b, j) > threshold) return j;
  }
  return n;
}

}  // namespace portable

#ifdef FASTMF_X86_SIMD

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_*().
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {

template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int W = 16;
  static constexpr int MR = 4;
  // reduce() leaves the sum of acc[slot(lane)] in `lane`.
  static constexpr int slot(int lane) { return lane / 4 + 4 * (lane % 4); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_first(const float* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V broadcast(float x) { return _mm512_set1_ps(x); }
  static Mask none() { return 0; }
  static Mask greater(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static Mask either(Mask a, Mask b) { return a | b; }
  static bool any(Mask m) { return m != 0; }
  static int first(Mask m) { return __builtin_ctz(m); }
  // Sixteen horizontal sums at once: halves (lane l + lane l+8), then l+4, l+2, l+1.
  static void reduce(const V* a, float* out) {
    V s[8], u[4], w[2];
    for (int i = 0; i < 8; ++i) {
      s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    }
    for (int i = 0; i < 4; ++i) {
      u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
    }
    for (int i = 0; i < 2; ++i) {
      w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1))));
  }
};

template <>
struct Lanes<double> {
  using V = __m512d;
  using Mask = __mmask8;
  static constexpr int W = 8;
  static constexpr int MR = 2;
  static constexpr int slot(int lane) { return lane / 2 + 4 * (lane % 2); }
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V load_first(const double* p, int n) {
    return _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
  }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V broadcast(double x) { return _mm512_set1_pd(x); }
  static Mask none() { return 0; }
  static Mask greater(V a, V b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
  static Mask either(Mask a, Mask b) { return a | b; }
  static bool any(Mask m) { return m != 0; }
  static int first(Mask m) { return __builtin_ctz(m); }
  static void reduce(const V* a, double* out) {
    V s[4], u[2];
    for (int i = 0; i < 4; ++i) {
      s[i] = _mm512_add_pd(_mm512_shuffle_f64x2(a[2 * i], a[2 * i + 1], 0x44),
                           _mm512_shuffle_f64x2(a[2 * i], a[2 * i + 1], 0xEE));
    }
    for (int i = 0; i < 2; ++i) {
      u[i] = _mm512_add_pd(_mm512_shuffle_f64x2(s[2 * i], s[2 * i + 1], 0x88),
                           _mm512_shuffle_f64x2(s[2 * i], s[2 * i + 1], 0xDD));
    }
    _mm512_storeu_pd(out, _mm512_add_pd(_mm512_unpacklo_pd(u[0], u[1]),
                                        _mm512_unpackhi_pd(u[0], u[1])));
  }
};

#include "topk_simd.h"

}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  using V = __m256;
  using Mask = __m256;
  static constexpr int W = 8;
  static constexpr int MR = 2;
  static constexpr int slot(int lane) { return lane / 4 + 2 * (lane % 4); }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_first(const float* p, int n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes));
  }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V broadcast(float x) { return _mm256_set1_ps(x); }
  static Mask none() { return _mm256_setzero_ps(); }
  static Mask greater(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static Mask either(Mask a, Mask b) { return _mm256_or_ps(a, b); }
  static bool any(Mask m) { return _mm256_movemask_ps(m) != 0; }
  static int first(Mask m) { return __builtin_ctz(_mm256_movemask_ps(m)); }
  static void reduce(const V* a, float* out) {
    V s[4], u[2];
    for (int i = 0; i < 4; ++i) {
      s[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                           _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
    }
    for (int i = 0; i < 2; ++i) {
      u[i] = _mm256_add_ps(_mm256_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm256_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1))));
  }
};

template <>
struct Lanes<double> {
  using V = __m256d;
  using Mask = __m256d;
  static constexpr int W = 4;
  static constexpr int MR = 2;
  static constexpr int slot(int lane) { return lane / 2 + 2 * (lane % 2); }
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V load_first(const double* p, int n) {
    const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 3);
    return _mm256_maskload_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), lanes));
  }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V broadcast(double x) { return _mm256_set1_pd(x); }
  static Mask none() { return _mm256_setzero_pd(); }
  static Mask greater(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
  static Mask either(Mask a, Mask b) { return _mm256_or_pd(a, b); }
  static bool any(Mask m) { return _mm256_movemask_pd(m) != 0; }
  static int first(Mask m) { return __builtin_ctz(_mm256_movemask_pd(m)); }
  static void reduce(const V* a, double* out) {
    const V s0 = _mm256_add_pd(_mm256_permute2f128_pd(a[0], a[1], 0x20),
                               _mm256_permute2f128_pd(a[0], a[1], 0x31));
    const V s1 = _mm256_add_pd(_mm256_permute2f128_pd(a[2], a[3], 0x20),
                               _mm256_permute2f128_pd(a[2], a[3], 0x31));
    _mm256_storeu_pd(out, _mm256_add_pd(_mm256_unpacklo_pd(s0, s1), _mm256_unpackhi_pd(s0, s1)));
  }
};

#include "topk_simd.h"

}  // namespace avx2
#pragma GCC pop_options

#pragma GCC diagnostic pop

#endif  // FASTMF_X86_SIMD

template <typename T>
struct Kernels {
  DotTile<T> dot_tile;
  ChunkScan<T> scan_with_bias;
  ChunkScan<T> scan;
};

// The best kernels this CPU runs, chosen on first use. FASTMF_CPU_KERNELS=avx2|portable
// picks a lesser set instead, so the tests can check every set on one machine.
template <typename T>
const Kernels<T>& kernels() {
  static const Kernels<T> chosen = [] {
    const char* env = std::getenv("FASTMF_CPU_KERNELS");
    const std::string wanted = env != nullptr ? env : "";
    TORCH_CHECK_VALUE(wanted.empty() || wanted == "avx512" || wanted == "avx2" ||
                          wanted == "portable",
                      "fastmf.", kOp, ": FASTMF_CPU_KERNELS must be avx512, avx2 or portable, "
                      "got '", wanted, "'");
#ifdef FASTMF_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && (wanted.empty() || wanted == "avx512")) {
      return Kernels<T>{&avx512::dot_tile<T>, &avx512::next_above<T, true>,
                        &avx512::next_above<T, false>};
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        wanted != "portable") {
      return Kernels<T>{&avx2::dot_tile<T>, &avx2::next_above<T, true>,
                        &avx2::next_above<T, false>};
    }
#endif
    return Kernels<T>{&portable::dot_tile<T>, &portable::next_above<T, true>,
                      &portable::next_above<T, false>};
  }();
  return chosen;
}

// Folds one query's row of a score tile into its heap. `ids` maps tile columns to item
// ids (candidates) or is null for the contiguous range starting at `base`.
template <typename T, bool kHasBias>
void scan_row(const T* s, const T* b, const int64_t* ids, int64_t base, int64_t n,
              BoundedHeap<T>& heap, ExcludeCursor& exclude) {
  auto id_at = [&](int64_t j) { return ids != nullptr ? ids[j] : base + j; };
  int64_t j = 0;
  // Filling: every item that is not excluded goes in. NaN ranks as -inf, as in the spec.
  for (; j < n && !heap.full(); ++j) {
    T score = score_at<T, kHasBias>(s, b, j);
    if (std::isnan(score)) score = -std::numeric_limits<T>::infinity();
    const int64_t id = id_at(j);
    if (!exclude.excludes(id)) heap.push({score, id});
  }
  if (!heap.full()) return;
  // Full: an item enters only with a score strictly above the worst kept one (its index
  // is larger than every kept index). NaN fails every compare, as -inf would.
  auto consider = [&](int64_t c) {
    const T score = score_at<T, kHasBias>(s, b, c);
    if (!(score > heap.worst_score())) return;
    const int64_t id = id_at(c);
    if (!exclude.excludes(id)) heap.replace_worst({score, id});
  };
  const ChunkScan<T> next_above = kHasBias ? kernels<T>().scan_with_bias : kernels<T>().scan;
  for (j = next_above(s, b, j, n, heap.worst_score()); j < n;
       j = next_above(s, b, j + 1, n, heap.worst_score())) {
    consider(j);
  }
}

template <typename T>
void write_ranked(const Entry<T>* ranked, int64_t count, int64_t k, T* out_scores,
                  int64_t* out_ids) {
  for (int64_t j = 0; j < count; ++j) {
    out_scores[j] = ranked[j].score;
    out_ids[j] = ranked[j].id;
  }
  for (int64_t j = count; j < k; ++j) {
    out_scores[j] = -std::numeric_limits<T>::infinity();
    out_ids[j] = -1;
  }
}

struct Problem {
  int64_t batch, dim, k;
  int64_t capacity;            // min(k, number of candidate items): the heap size
  int64_t num_positions;       // items scanned: all items, or the unique candidates
  const int64_t* candidates;   // sorted unique item ids, or null for 0..I-1
  const int64_t* exclude_indptr;   // (B + 1,) or null
  const int64_t* exclude_indices;  // rows sorted ascending
};

template <typename T>
void topk_kernel(const Problem& p, const at::Tensor& queries, const at::Tensor& items,
                 const T* bias, at::Tensor& out_scores, at::Tensor& out_ids) {
  const int64_t num_blocks = (p.batch + kQueryBlock - 1) / kQueryBlock;
  // Fewer queries than a block get a longer tile: the same bytes, less per-tile overhead.
  const int64_t block_rows = std::min(kQueryBlock, p.batch);
  const int64_t tile = std::max<int64_t>(kChunk, kTileBytes / (block_rows * sizeof(T)));
  const int64_t threads = at::get_num_threads();
  int64_t segments = 1;
  if (num_blocks < kUnitsPerThread * threads && p.capacity <= kMaxSplitK) {
    const int64_t wanted = (kUnitsPerThread * threads + num_blocks - 1) / num_blocks;
    segments = std::max<int64_t>(1, std::min(wanted, p.num_positions / kMinSegment));
  }
  const int64_t seg_len = (p.num_positions + segments - 1) / segments;
  const int64_t num_units = num_blocks * segments;

  // Each segment's heaps, merged after the parallel pass (only when segments > 1).
  std::vector<Entry<T>> partial;
  std::vector<int64_t> partial_count;
  if (segments > 1) {
    partial.resize(static_cast<size_t>(segments * p.batch * p.capacity));
    partial_count.resize(static_cast<size_t>(segments * p.batch));
  }

  T* scores_out = out_scores.data_ptr<T>();
  int64_t* ids_out = out_ids.data_ptr<int64_t>();
  const T* query_ptr = queries.const_data_ptr<T>();
  const T* item_ptr = items.const_data_ptr<T>();
  const DotTile<T> dot_tile = kernels<T>().dot_tile;

  // Units are handed out one at a time rather than split evenly up front: a thread that
  // starts late (a busy machine) or draws the heavy exclusion rows does not hold up the
  // others.
  std::atomic<int64_t> next_unit{0};
  at::parallel_for(0, std::min(threads, num_units), 1, [&](int64_t, int64_t) {
    std::vector<T> score_tile(static_cast<size_t>(block_rows * tile));
    std::vector<T> gathered_bias;
    if (p.candidates != nullptr && bias != nullptr) {
      gathered_bias.resize(static_cast<size_t>(tile));
    }
    std::vector<Entry<T>> own_heaps;
    std::vector<BoundedHeap<T>> heaps;
    std::vector<ExcludeCursor> cursors(static_cast<size_t>(kQueryBlock));

    for (int64_t unit = next_unit++; unit < num_units; unit = next_unit++) {
      const int64_t block = unit / segments, segment = unit % segments;
      const int64_t q0 = block * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, p.batch - q0);
      const int64_t pos0 = segment * seg_len;
      const int64_t pos1 = std::min(p.num_positions, pos0 + seg_len);

      Entry<T>* heap_storage;
      if (segments > 1) {
        heap_storage = partial.data() + (segment * p.batch + q0) * p.capacity;
      } else {
        own_heaps.resize(static_cast<size_t>(rows * p.capacity));
        heap_storage = own_heaps.data();
      }
      heaps.clear();
      for (int64_t r = 0; r < rows; ++r) {
        heaps.emplace_back(heap_storage + r * p.capacity, p.capacity);
        ExcludeCursor& cursor = cursors[static_cast<size_t>(r)];
        if (p.exclude_indptr != nullptr) {
          cursor.cur = p.exclude_indices + p.exclude_indptr[q0 + r];
          cursor.end = p.exclude_indices + p.exclude_indptr[q0 + r + 1];
        } else {
          cursor.cur = cursor.end = nullptr;
        }
      }

      for (int64_t t0 = pos0; t0 < pos1; t0 += tile) {
        const int64_t cols = std::min(tile, pos1 - t0);
        const int64_t* ids = p.candidates != nullptr ? p.candidates + t0 : nullptr;
        const T* tile_bias = bias != nullptr ? bias + t0 : nullptr;
        if (p.dim == 0) {
          std::fill_n(score_tile.begin(), rows * cols, T(0));
        } else {
          dot_tile(query_ptr + q0 * p.dim, rows, item_ptr, ids, t0, cols, p.dim,
                   score_tile.data());
        }
        if (ids != nullptr && bias != nullptr) {
          for (int64_t c = 0; c < cols; ++c) gathered_bias[c] = bias[ids[c]];
          tile_bias = gathered_bias.data();
        }
        const T* s = score_tile.data();
        for (int64_t r = 0; r < rows; ++r) {
          auto& heap = heaps[static_cast<size_t>(r)];
          auto& cursor = cursors[static_cast<size_t>(r)];
          if (tile_bias != nullptr) {
            scan_row<T, true>(s + r * cols, tile_bias, ids, t0, cols, heap, cursor);
          } else {
            scan_row<T, false>(s + r * cols, nullptr, ids, t0, cols, heap, cursor);
          }
        }
      }

      for (int64_t r = 0; r < rows; ++r) {
        auto& heap = heaps[static_cast<size_t>(r)];
        if (segments > 1) {
          partial_count[static_cast<size_t>(segment * p.batch + q0 + r)] = heap.size();
        } else {
          write_ranked(heap.ranked(), heap.size(), p.k, scores_out + (q0 + r) * p.k,
                       ids_out + (q0 + r) * p.k);
        }
      }
    }
  });

  if (segments == 1) return;
  const int64_t merge_grain = std::max<int64_t>(1, kSerialEntries / (segments * p.capacity));
  at::parallel_for(0, p.batch, merge_grain, [&](int64_t begin, int64_t end) {
    std::vector<Entry<T>> merged;
    for (int64_t b = begin; b < end; ++b) {
      merged.clear();
      for (int64_t seg = 0; seg < segments; ++seg) {
        const Entry<T>* part = partial.data() + (seg * p.batch + b) * p.capacity;
        merged.insert(merged.end(), part,
                      part + partial_count[static_cast<size_t>(seg * p.batch + b)]);
      }
      const int64_t count = std::min<int64_t>(p.capacity, merged.size());
      std::partial_sort(merged.begin(), merged.begin() + count, merged.end(), ranks_before<T>);
      write_ranked(merged.data(), count, p.k, scores_out + b * p.k, ids_out + b * p.k);
    }
  });
}

// The exclude rows the batch refers to, as int64 with every row sorted, and indptr made
// relative to them. Copies only that span, and only when it must be converted or sorted;
// the caller's tensors are never changed.
std::pair<at::Tensor, at::Tensor> sorted_exclude_rows(const at::Tensor& indptr,
                                                      const at::Tensor& indices,
                                                      int64_t num_items) {
  const int64_t rows = indptr.size(0) - 1;
  const int64_t start = indptr.const_data_ptr<int64_t>()[0];
  const int64_t stop = indptr.const_data_ptr<int64_t>()[rows];
  at::Tensor span = indices.narrow(0, start, stop - start).to(at::kLong).contiguous();
  check_id_range(kOp, "exclude", span.const_data_ptr<int64_t>(), span.size(0), num_items);
  at::Tensor relative = start == 0 ? indptr : indptr - start;
  const int64_t* ptr = relative.const_data_ptr<int64_t>();
  bool all_sorted = true;
  for (int64_t r = 0; r < rows && all_sorted; ++r) {
    const int64_t* row = span.const_data_ptr<int64_t>();
    all_sorted = std::is_sorted(row + ptr[r], row + ptr[r + 1]);
  }
  if (all_sorted) return {relative, span};
  if (indices.scalar_type() == at::kLong) span = span.clone();
  int64_t* row = span.data_ptr<int64_t>();
  const int64_t grain =
      std::max<int64_t>(1, kSerialEntries * rows / std::max<int64_t>(1, stop - start));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::sort(row + ptr[r], row + ptr[r + 1]);
  });
  return {relative, span};
}

std::tuple<at::Tensor, at::Tensor> topk_scores(
    const at::Tensor& queries, const at::Tensor& item_factors,
    const std::optional<at::Tensor>& item_bias, int64_t k,
    const std::optional<at::Tensor>& exclude_indptr,
    const std::optional<at::Tensor>& exclude_indices,
    const std::optional<at::Tensor>& candidates) {
  check_topk_inputs(kOp, queries, item_factors, item_bias, k, exclude_indptr, exclude_indices,
                    candidates);
  const int64_t batch = queries.size(0);
  const int64_t num_items = item_factors.size(0);

  at::Tensor indptr, exclude_rows;
  if (exclude_indptr.has_value()) {
    indptr = exclude_indptr->to(at::kLong).contiguous();
    const int64_t* ptr = indptr.const_data_ptr<int64_t>();
    const int64_t nnz = exclude_indices->size(0);
    TORCH_CHECK_VALUE(ptr[0] >= 0 && ptr[batch] <= nnz, "fastmf.", kOp,
                      ": exclude_indptr spans [", ptr[0], ", ", ptr[batch],
                      ") but exclude_indices has ", nnz, " entries");
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK_VALUE(ptr[b] <= ptr[b + 1], "fastmf.", kOp,
                        ": exclude_indptr must be non-decreasing, got ", ptr[b], " then ",
                        ptr[b + 1], " at query ", b);
    }
    std::tie(indptr, exclude_rows) = sorted_exclude_rows(indptr, *exclude_indices, num_items);
  }

  std::vector<int64_t> candidate_ids;
  if (candidates.has_value()) {
    at::Tensor c = candidates->to(at::kLong).contiguous();
    const int64_t* cp = c.const_data_ptr<int64_t>();
    check_id_range(kOp, "candidates", cp, c.size(0), num_items);
    candidate_ids.assign(cp, cp + c.size(0));
    std::sort(candidate_ids.begin(), candidate_ids.end());
    candidate_ids.erase(std::unique(candidate_ids.begin(), candidate_ids.end()),
                        candidate_ids.end());
  }

  at::Tensor scores = at::empty({batch, k}, queries.options());
  at::Tensor ids = at::empty({batch, k}, queries.options().dtype(at::kLong));
  if (batch == 0) return {scores, ids};

  Problem p{};
  p.batch = batch;
  p.dim = queries.size(1);
  p.k = k;
  p.num_positions = candidates.has_value() ? static_cast<int64_t>(candidate_ids.size())
                                           : num_items;
  p.capacity = std::min(k, p.num_positions);
  p.candidates = candidates.has_value() ? candidate_ids.data() : nullptr;
  p.exclude_indptr = indptr.defined() ? indptr.const_data_ptr<int64_t>() : nullptr;
  p.exclude_indices = exclude_rows.defined() ? exclude_rows.const_data_ptr<int64_t>() : nullptr;
  if (p.capacity == 0) {
    scores.fill_(-std::numeric_limits<double>::infinity());
    ids.fill_(-1);
    return {scores, ids};
  }

  const at::Tensor q = queries.contiguous();
  const at::Tensor items = item_factors.contiguous();
  at::Tensor bias;
  if (item_bias.has_value()) bias = item_bias->contiguous();
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "fastmf.topk_scores", [&] {
    topk_kernel<scalar_t>(p, q, items, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                          scores, ids);
  });
  return {scores, ids};
}

}  // namespace
}  // namespace FASTMF_CPU_NS
}  // namespace fastmf

namespace fastmf {
namespace FASTMF_CPU_NS {

// The family's CPU kernels, registered by csrc/cpu/register.cpp (one build only: see
// csrc/cpu/isa.h).
void register_topk(torch::Library& m) { m.impl("topk_scores", &topk_scores); }

}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
