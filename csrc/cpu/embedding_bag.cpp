// The embedding_bag family on the CPU: embedding_bag_forward, embedding_bag_backward,
// scatter_rows, unique_bags, sparse_update and embedding_bag_backward_update.
// csrc/cuda/embedding_bag.cu is the same family on the GPU;
// fastmf/ops/reference/embedding_bag.py states what each op computes.
//
// The forward and the plain backward parallelise over bags: every bag writes its own output
// row (forward) or its own gradient rows (backward), summing in index order.
//
// The two steps group the ids by value with the radix grouping of segments.h (stable, so a
// row's occurrences stay in index order), sum each unique row's gradient in that order and
// step the row once. Work is split by cost, not by row: a run of one id longer than
// kHotChunk occurrences (a hot id under Zipf) is first cut into chunks of kHotChunk
// occurrences whose partial sums are formed in parallel, then added in chunk order by the
// task that steps the row. The chunks depend on the run alone, so every sum has one fixed
// order whatever the thread count, and sparse_update(embedding_bag_backward(...)) and
// embedding_bag_backward_update give the same bits. The fused step reads
// grad_output[bag(j)] where sparse_update reads grad_rows[j]: no (L, K) rows are formed, and
// all scratch is O(L) (ids, grouping, bag of each index, the hot chunks' partial sums).
//
// Arithmetic follows the reference operation by operation in the accumulation type A
// (float64 for float64 tables, else float32), with scalars computed in double first as
// Python computes them; float16/bfloat16 tables are read into A and written back rounded to
// nearest or by the counter-based stochastic rounding of the reference (random_bits,
// stochastic_round), bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../args.h"
#include "../checks.h"
#include "../codes.h"
#include "../counter_hash.h"
#include "../ops.h"
#include "common.h"
#include "isa.h"
#include "segments.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTMF_X86_DISPATCH 1
#endif

namespace fastmf {
namespace FASTMF_CPU_NS {
namespace {

// Occurrences per chunk of a hot run (see the file comment). Runs up to this length are
// summed by the task that steps their row.
constexpr int64_t kHotChunk = 2048;
constexpr int64_t kBagGrain = 32;
constexpr int64_t kGatherGrain = 1024;
constexpr int64_t kCostGrain = 512;
// What stepping a row costs the tasks of a fused update, in occurrences summed: tasks split
// the groups by occurrences plus this per group. By occurrences alone, a Hybrid step's item
// side (17,333 ids: 16 feature rows hold 10,262 of them, 5,655 rows hold the rest) gave one
// of two threads 18 groups and the other 5,653 row steps; the update took as long on two
// threads as on one. Timed alone (one thread, 16,384 ids in bags of 4), a row's step cost
// 2.8-3.3 occurrences under Adagrad and 1-1.5 under SGD, widths 1-64; inside Hybrid fits (two
// threads) 4 and 8 gave about the same, 2 less. The split changes no sum: each group is
// summed and stepped by one task, in its fixed order.
constexpr int64_t kRowStepCost = 4;
// How far ahead (in indices, or groups) rows are prefetched.
constexpr int64_t kPrefetchIndices = 8;
constexpr int64_t kPrefetchGroups = 4;
// How far ahead scatter_range prefetches the output row, and gather_rows the table row.
// Scattering 20,480 random rows into 8,500 (an NCF step's items, 1.1 MB at width 32, past
// L2), one thread, in a standalone loop: width 32 179 -> 123-171 us against no prefetch,
// width 8 unchanged (33-49 us); 8 ahead was worse than none (width 8: 55-99 us). Gathering
// 8,576 rows of 32: 129 us without it.
constexpr int64_t kRandomRowPrefetch = 16;

template <typename W>
using acc_t = std::conditional_t<std::is_same_v<W, double>, double, float>;

// ---------------------------------------------------------------------------------------
// Stochastic rounding (fastmf/ops/reference/embedding_bag.py random_bits, stochastic_round)

inline uint64_t rounding_key(int64_t seed, int64_t step) { return hash::step_key(seed, step); }

inline c10::BFloat16 stochastic_round(float v, uint32_t bits, c10::BFloat16*) {
  if (!std::isfinite(v)) return c10::BFloat16(v);
  const uint32_t u = (std::bit_cast<uint32_t>(v) + (bits >> 16)) & ~uint32_t{0xFFFF};
  const float r = std::bit_cast<float>(u);
  return std::isfinite(r) ? c10::BFloat16(r) : c10::BFloat16(v);
}

// ---------------------------------------------------------------------------------------
// Rows of half tables in blocks
//
// The extension is built for baseline x86-64, where c10::Half <-> float is a software bit
// routine per element and the counter-based random bits (three 64-bit products per element)
// stay scalar. Rows are therefore converted and rounded in blocks by loops compiled for the
// CPU's own vector units where it has them (F16C / AVX2 / AVX-512, chosen at run time). Both
// give the same bits: half -> float is exact, float -> half rounds to nearest even either
// way (lanes holding NaN go through c10::Half, so even NaN payloads match), and the random
// bits are integer arithmetic. Only conversions and integer work run there: the optimizer
// arithmetic stays in the baseline code, compiled with -ffp-contract=off.

constexpr int64_t kBlock = 64;  // elements per block of the rounding loops

#if FASTMF_X86_DISPATCH
struct CpuFeatures {
  bool f16c, avx512;
  CpuFeatures() {
    __builtin_cpu_init();
    f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    avx512 = f16c && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
  }
};

inline const CpuFeatures& cpu_features() {
  static const CpuFeatures features;
  return features;
}

__attribute__((target("avx2,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst,
                                                            int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(h));
  }
  for (; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}

__attribute__((target("avx2,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst,
                                                            int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(src + k);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      for (int64_t l = k; l < k + 8; ++l) dst[l] = c10::Half(src[l]);
      continue;
    }
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), h);
  }
  for (; k < n; ++k) dst[k] = c10::Half(src[k]);
}
#endif

// The integer half of stochastic rounding for n <= kBlock values: bits[k] =
// hash::element_bits(row, col + k) (written out here, so it compiles for the vector unit of
// the caller), and the rounded value of each lane where the reference's stochastic_round
// applies its rule. float16: the float, exact in float16, to convert; every other lane (NaN,
// infinity, |v| >= 65504, |v| < 2^-14: FBGEMM's rule rounds those to nearest) keeps its
// value, so converting the block to nearest finishes the rounding. bfloat16: its 16 bits;
// returns whether some lane is left to the scalar stochastic_round (NaN, infinity, a value
// rounded up to infinity).
__attribute__((always_inline)) inline void random_bits_body(uint32_t row, uint32_t col,
                                                            int64_t n, uint32_t* bits) {
  for (int64_t k = 0; k < n; ++k) {
    uint32_t h = row ^ ((col + static_cast<uint32_t>(k)) * 0x9E3779B9u);
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    bits[k] = h ^ (h >> 16);
  }
}

__attribute__((always_inline)) inline void round_block_body(const float* src, uint32_t row,
                                                            uint32_t col, int64_t n,
                                                            uint32_t* bits, float* rounded) {
  random_bits_body(row, col, n, bits);
  // Branch-free (a select as a mask), so it vectorises: with a branch per lane this loop,
  // not the hash, was 90 % of the rounding's time.
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t v = std::bit_cast<uint32_t>(src[k]);
    // In float16's normal range: 2^-14 <= |v| < 65504 (NaN and infinity are not), as one
    // unsigned comparison.
    const uint32_t ok = ((v & 0x7FFFFFFFu) - 0x38800000u) < (0x477FE000u - 0x38800000u);
    const uint32_t u = (v + (bits[k] >> 19)) & ~uint32_t{0x1FFF};
    rounded[k] = std::bit_cast<float>(v ^ ((u ^ v) & (0u - ok)));
  }
}

__attribute__((always_inline)) inline bool round_block_body(const float* src, uint32_t row,
                                                            uint32_t col, int64_t n,
                                                            uint32_t* bits, uint16_t* out) {
  random_bits_body(row, col, n, bits);
  uint32_t plain = 0;  // counted, not branched on, so the loop vectorises as above
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t v = std::bit_cast<uint32_t>(src[k]);
    const uint32_t u = (v + (bits[k] >> 16)) & ~uint32_t{0xFFFF};
    // Exponent all ones before or after: a non-finite value or one rounded up to infinity.
    plain += static_cast<uint32_t>((v & 0x7F800000u) == 0x7F800000u) |
             static_cast<uint32_t>((u & 0x7F800000u) == 0x7F800000u);
    out[k] = static_cast<uint16_t>(u >> 16);
  }
  return plain != 0;
}

#if FASTMF_X86_DISPATCH
template <typename R>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw"))) auto round_block_avx512(
    const float* src, uint32_t row, uint32_t col, int64_t n, uint32_t* bits, R* rounded) {
  return round_block_body(src, row, col, n, bits, rounded);
}
template <typename R>
__attribute__((target("avx2"))) auto round_block_avx2(const float* src, uint32_t row,
                                                      uint32_t col, int64_t n, uint32_t* bits,
                                                      R* rounded) {
  return round_block_body(src, row, col, n, bits, rounded);
}
#endif

template <typename R>
inline auto round_block(const float* src, uint32_t row, uint32_t col, int64_t n,
                        uint32_t* bits, R* rounded) {
#if FASTMF_X86_DISPATCH
  if (cpu_features().avx512) return round_block_avx512(src, row, col, n, bits, rounded);
  if (cpu_features().f16c) return round_block_avx2(src, row, col, n, bits, rounded);
#endif
  return round_block_body(src, row, col, n, bits, rounded);
}

// dst[k] = A(src[k]) for a row of n values.
template <typename W, typename A>
inline void load_row(const W* __restrict src, A* __restrict dst, int64_t n) {
#if FASTMF_X86_DISPATCH
  if constexpr (std::is_same_v<W, c10::Half>) {
    if (cpu_features().f16c) {
      half_to_float_f16c(src, dst, n);
      return;
    }
  }
#endif
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<A>(src[k]);
}

// dst[k] = W(src[k]), rounded to nearest.
template <typename W, typename A>
inline void store_nearest(W* __restrict dst, const A* __restrict src, int64_t n) {
#if FASTMF_X86_DISPATCH
  if constexpr (std::is_same_v<W, c10::Half>) {
    if (cpu_features().f16c) {
      float_to_half_f16c(src, dst, n);
      return;
    }
  }
#endif
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<W>(src[k]);
}

// Stochastic rounding of n <= kBlock values of a row (its hash::row_bits `row`) from column
// `col`, as the reference's stochastic_round element by element. float16: where the rule
// applies the rounded value is exact in float16, and round_block leaves every other lane
// (NaN, infinity, |v| >= 65504, |v| < 2^-14) as it was, so converting the block to nearest
// is the rule for every lane; no scalar pass. (It had one for any block holding such a
// lane: with tables drawn from U(-0.05, 0.05), 7.5 % of 64-wide blocks hold a value under
// 2^-14, and redoing their 64 lanes through c10::Half cost up to 0.4 ms of a 5 ms step.)
// bfloat16: the lanes round_block flags take the scalar path.
inline void stochastic_round_block(c10::Half* dst, const float* src, uint32_t row,
                                   uint32_t col, int64_t n) {
  uint32_t bits[kBlock];
  float rounded[kBlock];
  round_block(src, row, col, n, bits, rounded);
  store_nearest(dst, rounded, n);
}

inline void stochastic_round_block(c10::BFloat16* dst, const float* src, uint32_t row,
                                   uint32_t col, int64_t n) {
  uint32_t bits[kBlock];
  const bool plain = round_block(src, row, col, n, bits, reinterpret_cast<uint16_t*>(dst));
  if (plain) {
    for (int64_t k = 0; k < n; ++k) {
      dst[k] = stochastic_round(src[k], bits[k], static_cast<c10::BFloat16*>(nullptr));
    }
  }
}

// Writes row `row` (values in A) back to a W table.
template <typename W, typename A>
inline void store_row(W* __restrict dst, const A* __restrict src, int64_t dim, int64_t row,
                      bool stochastic, uint64_t key) {
  if constexpr (std::is_same_v<W, c10::Half> || std::is_same_v<W, c10::BFloat16>) {
    if (stochastic) {
      const uint32_t bits = hash::row_bits(key, row);
      for (int64_t k0 = 0; k0 < dim; k0 += kBlock) {
        const int64_t n = std::min<int64_t>(kBlock, dim - k0);
        stochastic_round_block(dst + k0, src + k0, bits, static_cast<uint32_t>(k0), n);
      }
      return;
    }
  }
  store_nearest(dst, src, dim);
}

// ---------------------------------------------------------------------------------------
// The optimizer step of one row

// The step's scalars, computed in double as the reference computes them in Python, then
// used in A.
template <typename A>
struct StepScalars {
  A lr, eps, beta1, one_minus_beta1, beta2, one_minus_beta2;
  A l2;             // weight_decay, when L2 decay is on
  A decoupled;      // lr * weight_decay, when decoupled decay is on
  A adam_step;      // lr * sqrt(1 - beta2^t) / (1 - beta1^t)
  A rowwise_step;   // lr / (1 - beta1^t)
  A bias_correction2;
  bool use_l2, use_decoupled;
  bool stochastic;
  uint64_t key;

  explicit StepScalars(const RowOptimizerArgs& o) {
    lr = static_cast<A>(o.lr);
    eps = static_cast<A>(o.eps);
    beta1 = static_cast<A>(o.beta1);
    beta2 = static_cast<A>(o.beta2);
    one_minus_beta1 = static_cast<A>(1.0 - o.beta1);
    one_minus_beta2 = static_cast<A>(1.0 - o.beta2);
    use_l2 = o.weight_decay_mode == WeightDecay::kL2 && o.weight_decay != 0.0;
    use_decoupled = o.weight_decay_mode == WeightDecay::kDecoupled && o.weight_decay != 0.0;
    l2 = static_cast<A>(o.weight_decay);
    decoupled = static_cast<A>(o.lr * o.weight_decay);
    const double t = static_cast<double>(o.step);
    const double bc1 = 1.0 - std::pow(o.beta1, t);
    const double bc2 = 1.0 - std::pow(o.beta2, t);
    adam_step = static_cast<A>(o.lr * std::sqrt(bc2) / bc1);
    rowwise_step = static_cast<A>(o.lr / bc1);
    bias_correction2 = static_cast<A>(bc2);
    stochastic = o.stochastic_rounding;
    key = rounding_key(o.seed, o.step);
  }
};

template <typename A>
inline A sum_of_squares(const A* g, int64_t n) {
  A acc[4] = {0, 0, 0, 0};
  int64_t k = 0;
  if constexpr (std::is_same_v<A, float>) {
    // The four partial sums as the lanes of one 4-float vector: each lane's products and
    // sums in the same order, so the same bits, in one multiply and one add per 4 values.
    // GCC kept the four sums in scalars and spread each 8-wide product over them with
    // shuffles; row-wise Adagrad's step of 3,680 rows of 64 spent a quarter of its time
    // there (8,192 Zipf ids into 100k x 64, one thread).
    typedef float Lanes __attribute__((vector_size(16)));
    Lanes sum = {0, 0, 0, 0};
    for (; k + 4 <= n; k += 4) {
      Lanes x;
      std::memcpy(&x, g + k, sizeof(x));
      sum += x * x;
    }
    for (int l = 0; l < 4; ++l) acc[l] = sum[l];
  }
  for (; k + 4 <= n; k += 4) {
    for (int l = 0; l < 4; ++l) acc[l] += g[k + l] * g[k + l];
  }
  A tail = 0;
  for (; k < n; ++k) tail += g[k] * g[k];
  return ((acc[0] + acc[2]) + (acc[1] + acc[3])) + tail;
}

// One step of row `row`: g (dim values, A) is its summed gradient; w and root scratch of
// dim values (the row in A; square roots: sqrt_n vectorises them, std::sqrt stays scalar).
// state1/state2 point at the tables (null where the optimizer has none); a row-wise state
// holds one value per row. A 1-D table has dim 1, and its row-wise states one value
// per element, as the reference's. Width: int64_t, or One where the width is 1 (see
// grouped_step).
template <Optimizer kOpt, typename W, typename A, typename Width>
inline void step_row(W* weight, A* state1, A* state2, Width dim, int64_t row,
                     A* __restrict g, A* __restrict w, A* __restrict root,
                     const StepScalars<A>& s) {
  W* w_row = weight + row * dim;
  // A float table steps its row in place: the copies in and out were two library calls a
  // row (GCC turns the copy loops into memmove calls; 9-14 % of the op's profile at dim 8).
  constexpr bool kInPlace = std::is_same_v<W, A>;
  if constexpr (kInPlace) {
    w = reinterpret_cast<A*>(w_row);
  } else {
    load_row(w_row, w, dim);
  }
  if (s.use_l2) {
    for (int64_t k = 0; k < dim; ++k) g[k] = g[k] + s.l2 * w[k];
  } else if (s.use_decoupled) {
    for (int64_t k = 0; k < dim; ++k) w[k] = w[k] - s.decoupled * w[k];
  }
  if constexpr (kOpt == Optimizer::kSgd) {
    for (int64_t k = 0; k < dim; ++k) w[k] = w[k] - s.lr * g[k];
  } else if constexpr (kOpt == Optimizer::kAdagrad) {
    A* G = state1 + row * dim;
    for (int64_t k = 0; k < dim; ++k) G[k] = G[k] + g[k] * g[k];
    sqrt_n(G, root, dim);
    for (int64_t k = 0; k < dim; ++k) w[k] = w[k] - (s.lr * g[k]) / (root[k] + s.eps);
  } else if constexpr (kOpt == Optimizer::kRowwiseAdagrad) {
    const A mean = sum_of_squares(g, dim) / static_cast<A>(dim);
    const A sum = state1[row] + mean;
    state1[row] = sum;
    const A denom = std::sqrt(sum) + s.eps;
    for (int64_t k = 0; k < dim; ++k) w[k] = w[k] - (s.lr * g[k]) / denom;
  } else if constexpr (kOpt == Optimizer::kAdam) {
    A* m = state1 + row * dim;
    A* v = state2 + row * dim;
    for (int64_t k = 0; k < dim; ++k) {
      m[k] = s.beta1 * m[k] + s.one_minus_beta1 * g[k];
      v[k] = s.beta2 * v[k] + s.one_minus_beta2 * (g[k] * g[k]);
    }
    sqrt_n(v, root, dim);
    for (int64_t k = 0; k < dim; ++k) {
      w[k] = w[k] - (s.adam_step * m[k]) / (root[k] + s.eps);
    }
  } else {  // row-wise Adam
    A* m = state1 + row * dim;
    const A mean = sum_of_squares(g, dim) / static_cast<A>(dim);
    const A exp_avg_sq = s.beta2 * state2[row] + s.one_minus_beta2 * mean;
    state2[row] = exp_avg_sq;
    const A denom = std::sqrt(exp_avg_sq / s.bias_correction2) + s.eps;
    for (int64_t k = 0; k < dim; ++k) {
      const A exp_avg = s.beta1 * m[k] + s.one_minus_beta1 * g[k];
      m[k] = exp_avg;
      w[k] = w[k] - (s.rowwise_step * exp_avg) / denom;
    }
  }
  if constexpr (!kInPlace) store_row(w_row, w, dim, row, s.stochastic, s.key);
}

// ---------------------------------------------------------------------------------------
// Where an occurrence's gradient row comes from

// sparse_update: grad_rows[j], read into A.
template <typename G, typename Width = int64_t>
struct GivenRows {
  const G* rows;
  Width dim;

  void prefetch_index(int32_t) const {}
  void prefetch(int32_t j) const { prefetch_row(rows + static_cast<int64_t>(j) * dim, dim, false); }
  template <typename A>
  void add(A* __restrict acc, int32_t j) const {
    const G* r = rows + static_cast<int64_t>(j) * dim;
    for (int64_t k = 0; k < dim; ++k) acc[k] += static_cast<A>(r[k]);
  }
};

// embedding_bag_backward's row j, computed where it is summed: grad_output[bag(j)] scaled
// by the per-sample weight (or divided by the bag size for MEAN) in grad_output's dtype G,
// exactly as embedding_bag_backward forms it, then read into A.
template <typename G, typename Width = int64_t>
struct BagRows {
  const G* grad_output;
  Width dim;
  const int32_t* bag_of;  // (L,)
  const int64_t* offsets;  // (B + 1,)
  const G* per_sample_weights;  // null: none
  bool mean;

  // Occurrence j's bag (prefetch_index, further ahead: prefetch reads it), then its row.
  void prefetch_index(int32_t j) const { __builtin_prefetch(bag_of + j, 0); }
  void prefetch(int32_t j) const {
    prefetch_row(grad_output + static_cast<int64_t>(bag_of[j]) * dim, dim, false);
    if (per_sample_weights != nullptr) __builtin_prefetch(per_sample_weights + j, 0);
  }
  template <typename A>
  void add(A* __restrict acc, int32_t j) const {
    const int64_t b = bag_of[j];
    const G* src = grad_output + b * dim;
    if (per_sample_weights != nullptr) {
      const G c = per_sample_weights[j];
      for (int64_t k = 0; k < dim; ++k) acc[k] += static_cast<A>(static_cast<G>(src[k] * c));
    } else if (mean) {
      const G size = static_cast<G>(offsets[b + 1] - offsets[b]);
      for (int64_t k = 0; k < dim; ++k) acc[k] += static_cast<A>(static_cast<G>(src[k] / size));
    } else {
      for (int64_t k = 0; k < dim; ++k) acc[k] += static_cast<A>(src[k]);
    }
  }
};

// ---------------------------------------------------------------------------------------
// Scratch and the grouped step

struct Workspace {
  std::vector<int64_t> ids, offsets, cost;
  std::vector<int32_t> bag_of;
  RowGroups groups;
  // Hot runs: group, first chunk; and the chunks' partial sums.
  std::vector<int64_t> hot_group, hot_first_chunk;
  std::vector<float> float_partials;
  std::vector<double> double_partials;
  std::vector<float>& partials(float) { return float_partials; }
  std::vector<double>& partials(double) { return double_partials; }

  size_t bytes() const {
    return scratch_bytes(ids) + scratch_bytes(offsets) + scratch_bytes(cost) +
           scratch_bytes(bag_of) + groups.bytes() + scratch_bytes(hot_group) +
           scratch_bytes(hot_first_chunk) + scratch_bytes(float_partials) +
           scratch_bytes(double_partials);
  }
  void release() { *this = Workspace(); }
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

// The tables a step writes, contiguous (a strided one through a copy written back).
struct StepTablesInPlace {
  InPlace weight;
  std::optional<InPlace> state1, state2;

  explicit StepTablesInPlace(const RowTable& t) : weight(t.weight) {
    if (t.state1.defined()) state1.emplace(t.state1);
    if (t.state2.defined()) state2.emplace(t.state2);
  }
  template <typename A>
  static A* ptr(std::optional<InPlace>& x) {
    return x ? x->get().data_ptr<A>() : nullptr;
  }
  void commit() {
    weight.commit();
    if (state1) state1->commit();
    if (state2) state2->commit();
  }
};

// Prefetches, for writing, the states of row `row` that step_row will update: a row of dim
// values for an element-wise state, one value for a row-wise one.
template <Optimizer kOpt, typename A>
inline void prefetch_states(A* state1, A* state2, int64_t row, int64_t dim) {
  if constexpr (kOpt == Optimizer::kAdagrad || kOpt == Optimizer::kAdam ||
                kOpt == Optimizer::kRowwiseAdam) {
    prefetch_row(state1 + row * dim, dim, true);
  } else if constexpr (kOpt == Optimizer::kRowwiseAdagrad) {
    __builtin_prefetch(state1 + row, 1);
  }
  if constexpr (kOpt == Optimizer::kAdam) {
    prefetch_row(state2 + row * dim, dim, true);
  } else if constexpr (kOpt == Optimizer::kRowwiseAdam) {
    __builtin_prefetch(state2 + row, 1);
  }
}

// Before summing occurrence order[j]: prefetch the bag index of the occurrence
// 2 * kPrefetchIndices ahead and the gradient row of the one kPrefetchIndices ahead (which
// reads that index), within the occurrences [.., end) the caller will sum.
template <typename Source>
inline void prefetch_ahead(const Source& source, const int32_t* order, int64_t j, int64_t end) {
  if (j + 2 * kPrefetchIndices < end) source.prefetch_index(order[j + 2 * kPrefetchIndices]);
  if (j + kPrefetchIndices < end) source.prefetch(order[j + kPrefetchIndices]);
}

// A row width of 1 known at compile time. Bias tables (one column) run the grouped step,
// the bag sums (sum_bag) and scatter_rows with it: their cost is per occurrence and per
// row, not per column, and with a runtime width every occurrence's sum went through a
// vector loop's checks and its one value through memory (a store-to-load chain across
// occurrences), and every row's step through the loops' alias checks. The same operations
// in the same order, so the same bits.
using One = std::integral_constant<int64_t, 1>;

// f(One{}) for a width of 1, else f(dim).
template <typename F>
inline void with_width(int64_t dim, F&& f) {
  if (dim == 1) {
    f(One{});
  } else {
    f(dim);
  }
}

// Groups `n` ids (ws.ids, range-checked) and steps every touched row once with the sum of
// its occurrences' gradient rows from `source`. `group` false: ws.groups already holds
// these ids' groups (a second table over the same bags).
template <typename W, typename A, typename Source, typename Width>
void grouped_step(Workspace& ws, int64_t n, Width dim, W* weight, A* state1, A* state2,
                  int64_t num_rows, const Source& source, const RowOptimizerArgs& opt,
                  bool group = true) {
  if (group) group_rows(ws.ids.data(), n, num_rows, ws.groups);
  const RowGroups& groups = ws.groups;
  const int64_t num_groups = groups.num_groups;
  const int32_t* starts = groups.starts.data();
  const int32_t* order = groups.order.data();

  // Hot runs and the cost of each group: a cold one costs its occurrences; a hot one, once
  // its chunks are summed, the chunks it adds; either, kRowStepCost for its step.
  ws.hot_group.clear();
  ws.hot_first_chunk.clear();
  int64_t* cost = scratch(ws.cost, num_groups + 1);
  int64_t total = 0, chunks = 0;
  for (int64_t s = 0; s < num_groups; ++s) {
    cost[s] = total;
    const int64_t size = starts[s + 1] - starts[s];
    if (size > kHotChunk) {
      ws.hot_group.push_back(s);
      ws.hot_first_chunk.push_back(chunks);
      const int64_t c = (size + kHotChunk - 1) / kHotChunk;
      chunks += c;
      total += c + kRowStepCost;
    } else {
      total += size + kRowStepCost;
    }
  }
  cost[num_groups] = total;
  ws.hot_first_chunk.push_back(chunks);
  A* partials = scratch(ws.partials(A{}), chunks * dim);
  const int64_t* hot_group = ws.hot_group.data();
  const int64_t* hot_first = ws.hot_first_chunk.data();
  const int64_t num_hot = static_cast<int64_t>(ws.hot_group.size());

  if (chunks > 0) {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t h =
            std::upper_bound(hot_first, hot_first + num_hot, c) - hot_first - 1;
        const int64_t s = hot_group[h];
        const int64_t j0 = starts[s] + (c - hot_first[h]) * kHotChunk;
        const int64_t j1 = std::min<int64_t>(j0 + kHotChunk, starts[s + 1]);
        A* acc = partials + c * dim;
        std::fill(acc, acc + dim, A(0));
        for (int64_t j = j0; j < j1; ++j) {
          prefetch_ahead(source, order, j, j1);
          source.add(acc, order[j]);
        }
      }
    });
  }

  const StepScalars<A> scalars(opt);
  dispatch_code_in<RowOptimizerCodes>(opt.optimizer, [&](auto code) {
    constexpr Optimizer kOpt = decltype(code)::value;
    at::parallel_for(0, total, kCostGrain, [&](int64_t begin, int64_t end) {
      const int64_t first = std::lower_bound(cost, cost + num_groups, begin) - cost;
      const int64_t last = std::lower_bound(cost, cost + num_groups, end) - cost;
      std::vector<A> buffers(static_cast<size_t>(3 * dim));
      A* g = buffers.data();
      A* w = g + dim;
      A* root = w + dim;
      // The hot run at or after group `first`, found once per task.
      int64_t h = std::lower_bound(hot_group, hot_group + num_hot, first) - hot_group;
      // The occurrences of this task's groups are order[starts[first], starts[last]), in
      // group order: their gradient rows are prefetched across group boundaries, as most
      // groups are a single occurrence (44,000 rows for 123,000 occurrences in
      // benchmarks/bench_embedding.py's bag workload).
      const int32_t task_end = starts[last];
      for (int64_t s = first; s < last; ++s) {
        if (s + kPrefetchGroups < num_groups) {
          const int64_t ahead = groups.rows[s + kPrefetchGroups];
          prefetch_row(weight + ahead * dim, dim, true);
          prefetch_states<kOpt>(state1, state2, ahead, dim);
        }
        std::fill(g, g + dim, A(0));
        if (h < num_hot && hot_group[h] == s) {
          for (int64_t c = hot_first[h]; c < hot_first[h + 1]; ++c) {
            const A* p = partials + c * dim;
            for (int64_t k = 0; k < dim; ++k) g[k] += p[k];
          }
          ++h;
        } else {
          const int32_t j1 = starts[s + 1];
          for (int32_t j = starts[s]; j < j1; ++j) {
            prefetch_ahead(source, order, j, task_end);
            source.add(g, order[j]);
          }
        }
        step_row<kOpt, W, A>(weight, state1, state2, dim, groups.rows[s], g, w, root, scalars);
      }
    });
  });
}

// Calls f(W{}, G{}) with the table's type W and the gradient's type G (W's own or float32).
template <typename F>
void dispatch_weight_and_grad(at::ScalarType weight, at::ScalarType grad, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight, "fastmf.embedding_bag", [&] {
    using W = scalar_t;
    if (grad == weight) {
      f(W{}, W{});
    } else {
      f(W{}, float{});
    }
  });
}

#if FASTMF_X86_DISPATCH
// gather_rows for float16 tables on F16C: 8 conversions an instruction, exact as the
// software routine of the baseline build is, then the same 0 + w_b x (a product, then a
// sum: no FMA). In a training step (mf workload, 8,192 Zipf ids into 100k x 64, one thread)
// the baseline's scalar conversion loop took 2.4x the perf samples of the float32 gather.
__attribute__((target("avx2,f16c"))) void gather_half_rows_f16c(
    const c10::Half* __restrict table, const int64_t* __restrict ids,
    const float* __restrict p, int64_t begin, int64_t end, int64_t dim,
    float* __restrict out) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t b = begin; b < end; ++b) {
    if (b + kRandomRowPrefetch < end) {
      prefetch_row(table + ids[b + kRandomRowPrefetch] * dim, dim, false);
    }
    const c10::Half* row = table + ids[b] * dim;
    float* acc = out + b * dim;
    int64_t k = 0;
    if (p != nullptr) {
      const float c = p[b];
      const __m256 cv = _mm256_set1_ps(c);
      for (; k + 8 <= dim; k += 8) {
        const __m256 x =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
        _mm256_storeu_ps(acc + k, _mm256_add_ps(zero, _mm256_mul_ps(x, cv)));
      }
      for (; k < dim; ++k) acc[k] = 0.0f + static_cast<float>(row[k]) * c;
    } else {
      for (; k + 8 <= dim; k += 8) {
        const __m256 x =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
        _mm256_storeu_ps(acc + k, _mm256_add_ps(zero, x));
      }
      for (; k < dim; ++k) acc[k] = 0.0f + static_cast<float>(row[k]);
    }
  }
}
#endif

#if FASTMF_X86_DISPATCH
// acc[k] += w x[k] (w = *p, or x[k] alone without a weight) for one float16 row on F16C:
// load_row's conversion and the bag loop's sum in one pass, the same operations.
__attribute__((target("avx2,f16c"))) void add_half_row_f16c(float* __restrict acc,
                                                            const c10::Half* __restrict row,
                                                            const float* p, int64_t dim) {
  int64_t k = 0;
  if (p != nullptr) {
    const __m256 c = _mm256_set1_ps(*p);
    for (; k + 8 <= dim; k += 8) {
      const __m256 x =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
      _mm256_storeu_ps(acc + k, _mm256_add_ps(_mm256_loadu_ps(acc + k), _mm256_mul_ps(x, c)));
    }
    for (; k < dim; ++k) acc[k] += static_cast<float>(row[k]) * *p;
  } else {
    for (; k + 8 <= dim; k += 8) {
      const __m256 x =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
      _mm256_storeu_ps(acc + k, _mm256_add_ps(_mm256_loadu_ps(acc + k), x));
    }
    for (; k < dim; ++k) acc[k] += static_cast<float>(row[k]);
  }
}
#endif

// add_half_row_f16c where it applies (a float16 row, F16C); false where it does not.
template <typename W, typename A>
inline bool add_half_row(A* acc, const W* row, const A* p, int64_t dim) {
#if FASTMF_X86_DISPATCH
  if constexpr (std::is_same_v<W, c10::Half> && std::is_same_v<A, float>) {
    if (cpu_features().f16c) {
      add_half_row_f16c(acc, row, p, dim);
      return true;
    }
  }
#endif
  return false;
}

// Bags of one id: out[b] = 0 + w_b weight[ids[b]] for b in [begin, end) (w_b = p[b], or 1
// without per-sample weights), the bag loop's values. Its own function with arguments by
// value, so the compiler keeps the pointers in registers across the stores.
template <typename W, typename A>
void gather_rows(const W* __restrict table, const int64_t* __restrict ids,
                 const A* __restrict p, int64_t begin, int64_t end, int64_t dim,
                 A* __restrict out) {
#if FASTMF_X86_DISPATCH
  if constexpr (std::is_same_v<W, c10::Half>) {
    if (cpu_features().f16c) {
      gather_half_rows_f16c(table, ids, p, begin, end, dim, out);
      return;
    }
  }
#endif
  for (int64_t b = begin; b < end; ++b) {
    if (b + kRandomRowPrefetch < end) {
      prefetch_row(table + ids[b + kRandomRowPrefetch] * dim, dim, false);
    }
    const W* row = table + ids[b] * dim;
    A* acc = out + b * dim;
    if (p != nullptr) {
      const A c = p[b];
      for (int64_t k = 0; k < dim; ++k) acc[k] = A(0) + static_cast<A>(row[k]) * c;
    } else {
      for (int64_t k = 0; k < dim; ++k) acc[k] = A(0) + static_cast<A>(row[k]);
    }
  }
}

// Columns of a bag's sum that sum_bag holds in registers across the bag's rows.
constexpr int64_t kBagBlock = 16;

// The AVX2 build's bag sum as one vector loop over a block's columns: left to itself, GCC
// vectorised it under AVX2 with scalar adds and spills, and the forward took 263-366 us
// against the baseline build's 160-169 (4,042 bags of 16,457 ids, 7,733 x 64 table, one
// thread); with the pragma 180-183. The baseline build is better without it (198 against
// 160-169 us). Each column's sum is the same operations in the same order either way.
#if defined(FASTMF_AVX2_BUILD)
#define FASTMF_BAG_SIMD _Pragma("omp simd")
#else
#define FASTMF_BAG_SIMD
#endif

// One bag's ids [j0, j1) summed into `acc` (zeroed by the caller), in order: acc += w_j x_j
// (w_j = p[j], or 1 without per-sample weights), the same operations per element as adding
// each row into `acc` in turn. kBagBlock columns at a time are summed in registers over all
// the bag's rows and stored once: adding each row into `acc` loaded and stored the whole
// accumulator per row, and 4,000 bags of 3.9 ids at width 64 took 0.64 ms against 0.16 for
// torch's embedding_bag (one thread). Rows are prefetched kPrefetchIndices ids ahead
// while the first block is summed.
template <typename W, typename A, typename Width>
void sum_bag(const W* __restrict table, const int64_t* __restrict ids, const A* __restrict p,
             int64_t j0, int64_t j1, int64_t num_indices, Width dim, A* __restrict acc) {
  int64_t k0 = 0;
  for (; k0 + kBagBlock <= dim; k0 += kBagBlock) {
    A block[kBagBlock];
    for (int64_t k = 0; k < kBagBlock; ++k) block[k] = acc[k0 + k];
    for (int64_t j = j0; j < j1; ++j) {
      if (k0 == 0 && j + kPrefetchIndices < num_indices) {
        prefetch_row(table + ids[j + kPrefetchIndices] * dim, dim, false);
      }
      const W* row = table + ids[j] * dim + k0;
      if (p != nullptr) {
        const A c = p[j];
        FASTMF_BAG_SIMD
        for (int64_t k = 0; k < kBagBlock; ++k) block[k] += static_cast<A>(row[k]) * c;
      } else {
        FASTMF_BAG_SIMD
        for (int64_t k = 0; k < kBagBlock; ++k) block[k] += static_cast<A>(row[k]);
      }
    }
    for (int64_t k = 0; k < kBagBlock; ++k) acc[k0 + k] = block[k];
  }
  if (k0 == dim) return;
  for (int64_t j = j0; j < j1; ++j) {
    if (k0 == 0 && j + kPrefetchIndices < num_indices) {
      prefetch_row(table + ids[j + kPrefetchIndices] * dim, dim, false);
    }
    const W* row = table + ids[j] * dim;
    if (p != nullptr) {
      const A c = p[j];
      for (int64_t k = k0; k < dim; ++k) acc[k] += static_cast<A>(row[k]) * c;
    } else {
      for (int64_t k = k0; k < dim; ++k) acc[k] += static_cast<A>(row[k]);
    }
  }
}

// Reads offsets (B + 1,) to the host as int64, checking their values.
void load_offsets(const char* op, const at::Tensor& offsets_in, int64_t num_indices,
                  std::vector<int64_t>& out) {
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t n = offsets.numel();
  int64_t* dst = scratch(out, n);
  if (offsets.scalar_type() == at::kInt) {
    const int32_t* o = offsets.data_ptr<int32_t>();
    check_offsets_values(op, o, n, num_indices);
    for (int64_t b = 0; b < n; ++b) dst[b] = o[b];
  } else {
    const int64_t* o = offsets.data_ptr<int64_t>();
    check_offsets_values(op, o, n, num_indices);
    std::copy(o, o + n, dst);
  }
}

// ---------------------------------------------------------------------------------------
// The ops

at::Tensor embedding_bag_forward(const at::Tensor& weight_in, const at::Tensor& indices,
                                 const at::Tensor& offsets_in,
                                 const std::optional<at::Tensor>& per_sample_weights,
                                 int64_t pooling) {
  const char* op = "embedding_bag_forward";
  check_embedding_bag_forward(op, weight_in, indices, offsets_in, per_sample_weights, pooling);
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  const int64_t num_indices = indices.size(0);
  load_offsets(op, offsets_in, num_indices, ws.offsets);
  load_ids(op, "indices", indices.contiguous(), weight_in.size(0), ws.ids);
  const at::Tensor weight = weight_in.contiguous();
  const int64_t num_bags = offsets_in.size(0) - 1;
  const int64_t dim = weight.size(1);
  const auto acc_type = accumulation_type(weight.scalar_type());
  at::Tensor out = at::empty({num_bags, dim}, weight.options().dtype(acc_type));
  const at::Tensor psw =
      per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  const bool mean = static_cast<Pooling>(pooling) == Pooling::kMean;
  const int64_t* ids = ws.ids.data();
  const int64_t* offsets = ws.offsets.data();
  const auto weight_type = weight.scalar_type();
  // One id per bag (offsets 0, 1, ..., B: every fastmf.nn.Embedding lookup) is a row gather.
  // The bag loop below zeroes and accumulates per bag, 148 us for 8,576 rows of 32 against
  // 52 us for index_select (one thread); the gather forms the same values, 0 + w_j x_j
  // (a mean over one id divides by 1).
  bool unit_bags = num_bags == num_indices;
  for (int64_t b = 0; unit_bags && b <= num_bags; ++b) unit_bags = offsets[b] == b;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight_type, "fastmf.forward", [&] {
    using W = scalar_t;
    using A = acc_t<W>;
    const W* table = weight.data_ptr<W>();
    const A* p = psw.defined() ? psw.data_ptr<A>() : nullptr;
    A* o = out.data_ptr<A>();
    if (unit_bags) {
      at::parallel_for(0, num_bags, kGatherGrain, [&](int64_t begin, int64_t end) {
        gather_rows(table, ids, p, begin, end, dim, o);
      });
      return;
    }
    at::parallel_for(0, num_bags, kBagGrain, [&](int64_t begin, int64_t end) {
      // float16 rows: converted and added in one pass on F16C (add_half_row_f16c), else
      // converted a row at a time (see load_row), then summed.
      std::vector<A> converted(std::is_same_v<W, c10::Half> ? dim : 0);
      for (int64_t b = begin; b < end; ++b) {
        A* acc = o + b * dim;
        std::fill(acc, acc + dim, A(0));
        const int64_t j0 = offsets[b], j1 = offsets[b + 1];
        if constexpr (std::is_same_v<W, c10::Half>) {
          for (int64_t j = j0; j < j1; ++j) {
            if (j + kPrefetchIndices < num_indices) {
              prefetch_row(table + ids[j + kPrefetchIndices] * dim, dim, false);
            }
            if (add_half_row(acc, table + ids[j] * dim, p != nullptr ? p + j : nullptr, dim)) {
              continue;
            }
            load_row(table + ids[j] * dim, converted.data(), dim);
            const A* row = converted.data();
            if (p != nullptr) {
              const A c = p[j];
              for (int64_t k = 0; k < dim; ++k) acc[k] += row[k] * c;
            } else {
              for (int64_t k = 0; k < dim; ++k) acc[k] += row[k];
            }
          }
        } else {
          // A bias table takes the width known at compile time (see One), so the bag's one
          // sum stays in a register across its rows.
          with_width(dim, [&](auto width) {
            sum_bag(table, ids, p, j0, j1, num_indices, width, acc);
          });
        }
        if (mean && j1 > j0) {
          const A size = static_cast<A>(j1 - j0);
          for (int64_t k = 0; k < dim; ++k) acc[k] = acc[k] / size;
        }
      }
    });
  });
  return out;
}

at::Tensor embedding_bag_backward(const at::Tensor& grad_output_in, const at::Tensor& indices,
                                  const at::Tensor& offsets_in,
                                  const std::optional<at::Tensor>& per_sample_weights,
                                  int64_t pooling) {
  const char* op = "embedding_bag_backward";
  check_embedding_bag_backward(op, grad_output_in, indices, offsets_in, per_sample_weights,
                               pooling);
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  const int64_t num_indices = indices.size(0);
  load_offsets(op, offsets_in, num_indices, ws.offsets);
  const at::Tensor grad_output = grad_output_in.contiguous();
  const int64_t num_bags = offsets_in.size(0) - 1;
  const int64_t dim = grad_output.size(1);
  at::Tensor rows = at::empty({num_indices, dim}, grad_output.options());
  const at::Tensor psw =
      per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  const bool mean = static_cast<Pooling>(pooling) == Pooling::kMean;
  const int64_t* offsets = ws.offsets.data();
  const auto grad_type = grad_output.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_type, "fastmf.backward", [&] {
    using G = scalar_t;
    const G* go = grad_output.data_ptr<G>();
    const G* p = psw.defined() ? psw.data_ptr<G>() : nullptr;
    G* out = rows.data_ptr<G>();
    at::parallel_for(0, num_bags, kBagGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const G* src = go + b * dim;
        const int64_t j0 = offsets[b], j1 = offsets[b + 1];
        const G size = static_cast<G>(j1 - j0);
        for (int64_t j = j0; j < j1; ++j) {
          G* dst = out + j * dim;
          if (p != nullptr) {
            const G c = p[j];
            for (int64_t k = 0; k < dim; ++k) dst[k] = static_cast<G>(src[k] * c);
          } else if (mean) {
            for (int64_t k = 0; k < dim; ++k) dst[k] = static_cast<G>(src[k] / size);
          } else {
            std::copy(src, src + dim, dst);
          }
        }
      }
    });
  });
  return rows;
}

// The output rows [lo, hi) of scatter_into, one pass over the ids. Its own function with
// arguments by value: inside parallel_for's lambda the compiler reloaded dim and the
// pointers through the captures after every store (104 against 55-69 us for 20,480 rows of
// 8 in a standalone loop). One-column rows (Width One) took 65 us for 20,480 ids into
// 6,000 rows with a runtime width, 2.5x index_add_; 30 us with it (1M rows: 97-192 ->
// 65-72 us; two threads, three alternated builds, the same bits in 80 cases). Keeping the
// prefetch costs ~6 us in cache and saves ~30 us on a table that is not.
template <typename W, typename A, typename index_t, typename Width>
void scatter_range(const index_t* __restrict ids, const W* __restrict rows, int64_t n,
                   Width dim, int64_t lo, int64_t hi, A* __restrict out) {
  for (int64_t j = 0; j < n; ++j) {
    if (j + kRandomRowPrefetch < n) {
      const int64_t ahead = static_cast<int64_t>(ids[j + kRandomRowPrefetch]);
      if (ahead >= lo && ahead < hi) prefetch_row(out + ahead * dim, dim, true);
    }
    const int64_t r = static_cast<int64_t>(ids[j]);
    if (r < lo || r >= hi) continue;
    A* dst = out + r * dim;
    const W* src = rows + j * dim;
    for (int64_t k = 0; k < dim; ++k) dst[k] += static_cast<A>(src[k]);
  }
}

// out[ids[j]] += rows[j] in index order, out in the accumulation type A. Rows of W (a half
// type) are widened to A one value at a time, exactly. With tasks > 1, task t owns the output
// rows [t N / tasks, (t + 1) N / tasks) and scans every id, skipping the others': each row
// still sums its terms in index order, so the bits do not depend on the thread count.
template <typename W, typename A, typename index_t>
void scatter_into(const index_t* ids, const W* rows, int64_t n, int64_t dim, int64_t num_rows,
                  int64_t tasks, A* out) {
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      with_width(dim, [&](auto width) {
        scatter_range(ids, rows, n, width, chunk_begin(t, tasks, num_rows),
                      chunk_begin(t + 1, tasks, num_rows), out);
      });
    }
  });
}

// Below this many values added (L K) one thread scatters alone: NCF's largest call, 20,480
// rows of 32, takes 120-180 us on one, bound by the output rows' cache misses, which a
// second thread scanning every id again would not halve.
constexpr int64_t kScatterParallelValues = int64_t{1} << 21;

at::Tensor scatter_rows(const at::Tensor& ids_in, const at::Tensor& rows_in, int64_t num_rows) {
  const char* op = "scatter_rows";
  check_scatter_rows(op, ids_in, rows_in, num_rows);
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = ids.size(0);
  const int64_t dim = rows.dim() == 2 ? rows.size(1) : 1;
  std::vector<int64_t> sizes = rows.sizes().vec();
  sizes[0] = num_rows;
  const auto acc_type = accumulation_type(rows.scalar_type());
  at::Tensor out = at::zeros(sizes, rows.options().dtype(acc_type));
  if (n > 0) {
    if (ids.scalar_type() == at::kInt) {
      check_id_range(op, "ids", ids.data_ptr<int32_t>(), n, num_rows);
    } else {
      check_id_range(op, "ids", ids.data_ptr<int64_t>(), n, num_rows);
    }
  }
  if (n == 0 || dim == 0) return out.to(rows.scalar_type());
  const int64_t tasks =
      n * dim >= kScatterParallelValues ? std::min<int64_t>(at::get_num_threads(), num_rows) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "fastmf.scatter",
                                  [&] {
    using W = scalar_t;
    using A = acc_t<W>;
    A* o = out.data_ptr<A>();
    if (ids.scalar_type() == at::kInt) {
      scatter_into<W, A>(ids.data_ptr<int32_t>(), rows.data_ptr<W>(), n, dim, num_rows, tasks, o);
    } else {
      scatter_into<W, A>(ids.data_ptr<int64_t>(), rows.data_ptr<W>(), n, dim, num_rows, tasks, o);
    }
  });
  return out.to(rows.scalar_type());
}

// unique_bags: the distinct ids and each id's number among them, by marking the rows where
// the id range is at most twice the batch, else by grouping the ids as the fused updates
// do (group_rows: groups ascend by id); then each distinct row's entries copied in turn.
// Serial: in Hybrid's BPR step on ml-latest-small (8,192 item ids over 9,742 items, 4,096
// user ids over 610 users) the two calls replace about fifteen torch calls a side (unique,
// gathers, cumsum, repeat_interleave), which took 0.37 ms of a 2.0 ms step on two threads.
template <typename I, typename V>
void copy_bags(const int64_t* indptr, const I* indices, const V* weights, const int64_t* distinct,
               int64_t num_distinct, I* bag_indices, I* bag_offsets, V* bag_weights) {
  for (int64_t g = 0; g < num_distinct; ++g) {
    const int64_t start = indptr[distinct[g]], end = indptr[distinct[g] + 1];
    const int64_t at = bag_offsets[g];
    std::copy(indices + start, indices + end, bag_indices + at);
    std::copy(weights + start, weights + end, bag_weights + at);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unique_bags(
    const at::Tensor& ids_in, const at::Tensor& indptr_in, const at::Tensor& indices_in,
    const at::Tensor& weights_in) {
  const char* op = "unique_bags";
  check_unique_bags(op, ids_in, indptr_in, indices_in, weights_in);
  const int64_t n = ids_in.size(0);
  const int64_t num_rows = indptr_in.size(0) - 1;
  const int64_t nnz = indices_in.size(0);
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  load_ids(op, "ids", ids_in.contiguous(), num_rows, ws.ids);
  const int64_t* id = ws.ids.data();
  const auto long_options = ids_in.options().dtype(at::kLong);
  at::Tensor inverse = at::empty({n}, long_options);
  int64_t* inv = inverse.data_ptr<int64_t>();
  at::Tensor distinct;
  if (num_rows <= kCountingRange * n && parallel_chunks(n) == 1) {
    // An id range of at most twice the batch (both of Hybrid's sides on ml-latest-small):
    // mark the ids, number the marked rows in one pass over the range, and read each id's
    // number: three passes and no grouping of positions. With group_rows' counting sort
    // and the inverse written from its groups the whole op took 49-54 us instead of 38-41
    // for 8,192 Zipf ids over 9,742 rows of 2-4 entries (one thread, alternated builds).
    int32_t* number = scratch(ws.groups.histogram, num_rows);
    std::fill(number, number + num_rows, 0);
    for (int64_t b = 0; b < n; ++b) number[id[b]] = 1;
    // Without a branch: every row writes the next distinct slot, and only a marked one
    // moves past it (so the slots need num_rows + 1 entries).
    int64_t* rows = scratch(ws.groups.rows, num_rows + 1);
    int32_t count = 0;
    for (int64_t r = 0; r < num_rows; ++r) {
      const int32_t marked = number[r];
      rows[count] = r;
      number[r] = count;
      count += marked;
    }
    for (int64_t b = 0; b < n; ++b) inv[b] = number[id[b]];
    distinct = at::empty({count}, long_options);
    std::copy(rows, rows + count, distinct.data_ptr<int64_t>());
  } else {
    group_rows(id, n, num_rows, ws.groups);
    const RowGroups& groups = ws.groups;
    distinct = at::empty({groups.num_groups}, long_options);
    int64_t* d = distinct.data_ptr<int64_t>();
    const int32_t* starts = groups.starts.data();
    const int32_t* order = groups.order.data();
    for (int64_t g = 0; g < groups.num_groups; ++g) {
      d[g] = groups.rows[g];
      for (int32_t j = starts[g]; j < starts[g + 1]; ++j) inv[order[j]] = g;
    }
  }
  const int64_t num_distinct = distinct.size(0);
  const int64_t* d = distinct.data_ptr<int64_t>();
  // Read as int64 whatever its type (Hybrid's is int64 already: no copy).
  const at::Tensor indptr = indptr_in.contiguous().to(at::kLong);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor bag_offsets = at::empty({num_distinct + 1}, indices.options());
  at::Tensor bag_indices, bag_weights;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "fastmf.unique_bags", [&] {
    const int64_t* ptr = indptr.data_ptr<int64_t>();
    index_t* offsets = bag_offsets.data_ptr<index_t>();
    int64_t total = 0;
    for (int64_t g = 0; g < num_distinct; ++g) {
      offsets[g] = static_cast<index_t>(total);
      const int64_t start = ptr[d[g]], end = ptr[d[g] + 1];
      check_bag_row(op, d[g], start, end, nnz);
      total += end - start;
    }
    check_bag_total(op, total, indices.scalar_type());
    offsets[num_distinct] = static_cast<index_t>(total);
    bag_indices = at::empty({total}, indices.options());
    bag_weights = at::empty({total}, weights.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(),
                                    "fastmf.unique_bags", [&] {
      copy_bags(ptr, indices.data_ptr<index_t>(), weights.data_ptr<scalar_t>(), d,
                num_distinct, bag_indices.data_ptr<index_t>(), offsets,
                bag_weights.data_ptr<scalar_t>());
    });
  });
  return {distinct, inverse, bag_indices, bag_offsets, bag_weights};
}

// One table's grouped_step on `n` loaded ids (ws.ids), its weight and gradient types
// dispatched: `make_source(grad rows as const G*, width)` gives the step its gradient rows
// (GivenRows for sparse_update, BagRows for the fused backward-update); the table and its
// states are written back after. `group` as in grouped_step.
template <typename MakeSource>
void step_table(Workspace& ws, int64_t n, const RowTable& table, const at::Tensor& grad,
                const RowOptimizerArgs& opt, bool group, const MakeSource& make_source) {
  const int64_t num_rows = table.weight.size(0);
  const int64_t dim = table.weight.dim() == 2 ? table.weight.size(1) : 1;
  StepTablesInPlace tables(table);
  dispatch_weight_and_grad(table.weight.scalar_type(), grad.scalar_type(),
                           [&](auto w_tag, auto g_tag) {
    using W = decltype(w_tag);
    using G = decltype(g_tag);
    using A = acc_t<W>;
    with_width(dim, [&](auto width) {
      grouped_step<W, A>(ws, n, width, tables.weight.get().data_ptr<W>(),
                         StepTablesInPlace::ptr<A>(tables.state1),
                         StepTablesInPlace::ptr<A>(tables.state2), num_rows,
                         make_source(static_cast<const G*>(grad.data_ptr<G>()), width), opt,
                         group);
    });
  });
  tables.commit();
}

// After the checks of the op boundary (csrc/ops.h).
void sparse_update(const RowTable& table, const at::Tensor& ids, const at::Tensor& grad_rows_in,
                   const RowOptimizerArgs& opt) {
  const char* op = "sparse_update";
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  const int64_t num_rows = table.weight.size(0);
  load_ids(op, "ids", ids.contiguous(), num_rows, ws.ids);
  const int64_t n = ids.size(0);
  if (n == 0) return;
  step_table(ws, n, table, grad_rows_in.contiguous(), opt, /*group=*/true,
             [](const auto* rows, auto width) {
               return GivenRows<std::remove_cv_t<std::remove_pointer_t<decltype(rows)>>,
                                decltype(width)>{rows, width};
             });
}

// One table's update of backward_update_tables.
struct TableUpdate {
  const RowTable& table;
  const at::Tensor& grad_output;
  const RowOptimizerArgs& opt;
};

// The fused backward-update of each of `updates` (tables with the same rows) over the same
// bags: the offsets and ids are loaded and checked, each occurrence's bag found and the ids
// grouped once, then each table is stepped in turn. A table and its bias column share their
// bags in Hybrid's step, where grouping and loading were about half of the bias update's
// time (114 us for 16,457 ids into 7,733 rows, two threads).
template <size_t kCount>
void backward_update_tables(const char* op, const std::array<TableUpdate, kCount>& updates,
                            const Bags& bags) {
  Workspace& ws = workspace();
  const TrimOnExit<Workspace> trim(ws);
  const int64_t n = bags.indices.size(0);
  load_offsets(op, bags.offsets, n, ws.offsets);
  const int64_t num_rows = updates[0].table.weight.size(0);
  load_ids(op, "indices", bags.indices.contiguous(), num_rows, ws.ids);
  if (n == 0) return;
  const at::Tensor psw =
      bags.per_sample_weights.defined() ? bags.per_sample_weights.contiguous() : at::Tensor();
  const int64_t num_bags = bags.offsets.size(0) - 1;
  const int64_t* offsets = ws.offsets.data();
  int32_t* bag_of = scratch(ws.bag_of, n);
  at::parallel_for(0, num_bags, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      std::fill(bag_of + offsets[b], bag_of + offsets[b + 1], static_cast<int32_t>(b));
    }
  });
  for (size_t u = 0; u < kCount; ++u) {
    step_table(ws, n, updates[u].table, updates[u].grad_output.contiguous(), updates[u].opt,
               /*group=*/u == 0, [&](const auto* grad_output, auto width) {
                 using G = std::remove_cv_t<std::remove_pointer_t<decltype(grad_output)>>;
                 return BagRows<G, decltype(width)>{
                     grad_output, width, bag_of, offsets,
                     psw.defined() ? psw.data_ptr<G>() : nullptr,
                     bags.pooling == Pooling::kMean};
               });
  }
}

void embedding_bag_backward_update(const RowTable& table, const at::Tensor& grad_output,
                                   const Bags& bags, const RowOptimizerArgs& opt) {
  backward_update_tables<1>("embedding_bag_backward_update",
                            {TableUpdate{table, grad_output, opt}}, bags);
}

void embedding_bag_backward_update_pair(const RowTable& table, const at::Tensor& grad_output,
                                        const RowOptimizerArgs& opt, const RowTable& table_b,
                                        const at::Tensor& grad_output_b,
                                        const RowOptimizerArgs& opt_b, const Bags& bags) {
  backward_update_tables<2>("embedding_bag_backward_update_pair",
                            {TableUpdate{table, grad_output, opt},
                             TableUpdate{table_b, grad_output_b, opt_b}},
                            bags);
}

}  // namespace
}  // namespace FASTMF_CPU_NS
}  // namespace fastmf

namespace fastmf {
namespace FASTMF_CPU_NS {

// The family's CPU kernels, registered by csrc/cpu/register.cpp from the baseline or the
// AVX2 build (csrc/cpu/isa.h).
void register_embedding_bag(torch::Library& m) {
  m.impl("embedding_bag_forward", &embedding_bag_forward);
  m.impl("embedding_bag_backward", &embedding_bag_backward);
  m.impl("scatter_rows", &scatter_rows);
  m.impl("unique_bags", &unique_bags);
  m.impl("sparse_update", &sparse_update_op<sparse_update>);
  m.impl("embedding_bag_backward_update",
         &embedding_bag_backward_update_op<embedding_bag_backward_update>);
  m.impl("embedding_bag_backward_update_pair",
         &embedding_bag_backward_update_pair_op<embedding_bag_backward_update_pair>);
}

}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
