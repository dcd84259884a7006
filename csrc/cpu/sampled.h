// The uniform negatives of the sampled steps on the CPU (train_step_pairwise_sampled in
// pairwise.cpp, train_step_sampled in pointwise.cpp): the items of
// fastmf/ops/reference/sampling.py sample_negatives, drawn by csrc/negative_sampling.h's
// counters, split over the threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../negative_sampling.h"
#include "common.h"
#include "fused_step.h"
#include "isa.h"
#include "segments.h"

namespace fastmf {
namespace FASTMF_CPU_NS {

// f(p, b) for each pair p in [p0, p1) with b = p / k its sample (pair p = b * K + j is
// sample b's j-th): the sample counted along, not divided out per pair (k is not known to
// the compiler, so p / k is a 64-bit division). The draws of 4,096 ml-latest-small users
// took 113 against 117 us with K = 1 and 376 against 393 us with K = 4 (one thread, the
// fastest of 1,500 calls, three alternated processes each); the steps' expansions of the
// positives had two more divisions a pair.
// PairSamples counts along from pair p0: next() is the sample of p0, then of p0 + 1, ...
class PairSamples {
 public:
  PairSamples(int64_t p0, int64_t k) : k_(k), b_(p0 / k), j_(p0 - b_ * k) {}
  int64_t next() {
    const int64_t b = b_;
    if (++j_ == k_) {
      j_ = 0;
      ++b_;
    }
    return b;
  }

 private:
  int64_t k_, b_, j_;
};

template <typename F>
inline void for_pairs(int64_t p0, int64_t p1, int64_t k, const F& f) {
  PairSamples samples(p0, k);
  for (int64_t p = p0; p < p1; ++p) f(p, samples.next());
}

// One draw's search: its row's start in `indices`, the row's length and the draw's rank.
// A malformed row or a user with every item is recorded in bad_row / full (its first
// sample), and searches nothing (length 0).
struct DrawLane {
  int64_t start, deg, rank;
};

inline DrawLane lane_of(int64_t pair, int64_t b, const int64_t* users, const int64_t* indptr,
                        int64_t nnz, int64_t num_items, uint64_t key, int64_t& bad_row,
                        int64_t& full) {
  const int64_t u = users[b];
  const int64_t start = indptr[u], stop = indptr[u + 1];
  if (start < 0 || stop < start || stop > nnz) {
    bad_row = std::min(bad_row, b);
    return {0, 0, 0};
  }
  const int64_t deg = stop - start;
  if (deg >= num_items) {
    full = std::min(full, b);
    return {0, 0, 0};
  }
  return {start, deg,
          sampling::draw_rank(key, static_cast<uint64_t>(pair), num_items - deg)};
}

// The searches of pairs [p, p + n), the next n of `samples`, each handed to put(l, lane);
// returns the most rounds any of them needs (the bit width of its row's length). Both
// searches below (vector gathers, scalar lanes) set their lanes up through this.
template <typename F>
inline int draw_lanes(int64_t p, int n, PairSamples& samples, const int64_t* users,
                      const int64_t* indptr, int64_t nnz, int64_t num_items, uint64_t key,
                      int64_t& bad_row, int64_t& full, const F& put) {
  int width = 0;
  for (int l = 0; l < n; ++l) {
    const DrawLane d =
        lane_of(p + l, samples.next(), users, indptr, nnz, num_items, key, bad_row, full);
    put(l, d);
    width = std::max(width, bit_width(static_cast<uint64_t>(d.deg)));
  }
  return width;
}

#if defined(FASTMF_AVX2_BUILD)
// draw_negatives' search with AVX2 gathers, for int32 rows of at most 2^31 - 1 positives in
// all and at most 2^31 - 1 items: 8 draws to a vector, kGroups vectors interleaved, every
// lane the same steps as rank_to_item in 32-bit integers. rank + mid < num_items, so
// row[mid] - mid <= rank compares as row[mid] <= rank + mid without overflow; a lane's
// gather is masked off once its search is done, so it reads nothing past its row.
inline void draw_negatives_gather(int64_t p0, int64_t p1, int64_t k, const int64_t* users,
                                  const int64_t* indptr, const int32_t* indices, int64_t nnz,
                                  int64_t num_items, uint64_t key, int64_t* neg,
                                  int64_t& bad_row, int64_t& full) {
  constexpr int kGroups = 4, kLanes = 8 * kGroups;
  const __m256i zero = _mm256_setzero_si256(), one = _mm256_set1_epi32(1);
  PairSamples samples(p0, k);
  for (int64_t p = p0; p < p1; p += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, p1 - p));
    alignas(32) int32_t start[kLanes] = {}, len[kLanes] = {}, rank[kLanes] = {}, lo[kLanes];
    const int width = draw_lanes(p, n, samples, users, indptr, nnz, num_items, key, bad_row,
                                 full, [&](int l, const DrawLane& d) {
                                   start[l] = static_cast<int32_t>(d.start);
                                   len[l] = static_cast<int32_t>(d.deg);
                                   rank[l] = static_cast<int32_t>(d.rank);
                                 });
    __m256i st[kGroups], ln[kGroups], rk[kGroups], at[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      st[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(start + 8 * g));
      ln[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(len + 8 * g));
      rk[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(rank + 8 * g));
      at[g] = zero;  // lo
    }
    for (int round = 0; round < width; ++round) {
      for (int g = 0; g < kGroups; ++g) {
        const __m256i active = _mm256_cmpgt_epi32(ln[g], zero);
        const __m256i half = _mm256_srli_epi32(ln[g], 1);
        const __m256i mid = _mm256_add_epi32(at[g], half);
        const __m256i v = _mm256_mask_i32gather_epi32(
            zero, indices, _mm256_add_epi32(st[g], mid), active, 4);
        const __m256i below = _mm256_andnot_si256(
            _mm256_cmpgt_epi32(v, _mm256_add_epi32(rk[g], mid)), active);
        const __m256i step = _mm256_add_epi32(half, one);
        at[g] = _mm256_add_epi32(at[g], _mm256_and_si256(step, below));
        // len - half - 1 where below, else half; 0 once done
        ln[g] = _mm256_and_si256(
            _mm256_blendv_epi8(half, _mm256_sub_epi32(ln[g], step), below), active);
      }
    }
    for (int g = 0; g < kGroups; ++g) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(lo + 8 * g), at[g]);
    }
    for (int l = 0; l < n; ++l) neg[p + l] = static_cast<int64_t>(rank[l]) + lo[l];
  }
}
#endif

// The negatives of pairs [p0, p1) (pair p = b * K + k is sample b's k-th, of user
// users[b]): the same items as sampling::rank_to_item one draw at a time, but kLanes draws
// searched side by side. A draw's binary search is a chain of dependent loads (about 10 in
// a 600-item row), so one at a time it waits on each load in turn: 54 ns a draw on rows
// shaped like ml-latest-small's (mean 167 items), a fifth of a one-thread step at K = 1.
// Eight independent searches interleaved overlap those waits: 25 ns a draw.
// Records the first sample whose row is malformed or holds every item in bad_row / full.
template <typename index_t>
inline void draw_negatives(int64_t p0, int64_t p1, int64_t k, const int64_t* users,
                           const int64_t* indptr, const index_t* indices, int64_t nnz,
                           int64_t num_items, uint64_t key, int64_t* neg, int64_t& bad_row,
                           int64_t& full) {
#if defined(FASTMF_AVX2_BUILD)
  if constexpr (std::is_same_v<index_t, int32_t>) {
    constexpr int64_t kMax32 = 2147483647;
    if (nnz <= kMax32 && num_items <= kMax32) {
      draw_negatives_gather(p0, p1, k, users, indptr, indices, nnz, num_items, key, neg,
                            bad_row, full);
      return;
    }
  }
#endif
  constexpr int kLanes = 8;
  // What an idle lane reads: its load is issued but its result never used.
  static const index_t kIdle[1] = {0};
  // Each pair's sample counted along (for_pairs above says why).
  PairSamples samples(p0, k);
  for (int64_t p = p0; p < p1; p += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, p1 - p));
    const index_t* row[kLanes];
    int64_t lo[kLanes] = {}, len[kLanes] = {}, rank[kLanes] = {};
    for (int l = 0; l < kLanes; ++l) row[l] = kIdle;
    const int width = draw_lanes(p, n, samples, users, indptr, nnz, num_items, key, bad_row,
                                 full, [&](int l, const DrawLane& d) {
                                   rank[l] = d.rank;
                                   if (d.deg > 0) row[l] = indices + d.start;
                                   len[l] = d.deg;
                                 });
    // rank_to_item's loop, every lane in step: a length shrinks to at most half of itself
    // each round, so bit_width(deg) rounds finish a row of deg items; a finished lane
    // (len 0) reads element 0 of its row or of kIdle and keeps its result. The selects are
    // written as masks: with ?: the compiler branched, and the search was no faster than
    // one draw at a time (51 against 54 ns a draw); with masks it takes 25.
    for (int round = 0; round < width; ++round) {
      for (int l = 0; l < kLanes; ++l) {
        const int64_t active = -static_cast<int64_t>(len[l] > 0);
        const int64_t half = len[l] >> 1;
        const int64_t mid = lo[l] + half;
        const int64_t below =
            -static_cast<int64_t>(static_cast<int64_t>(row[l][mid & active]) - mid <= rank[l]) &
            active;
        lo[l] += (half + 1) & below;                                // mid + 1 when below
        len[l] = (half + ((len[l] - 2 * half - 1) & below)) & active;  // len - half - 1
      }
    }
    for (int l = 0; l < n; ++l) neg[p + l] = rank[l] + lo[l];
  }
}

// The positives' CSR as the draws read it: row pointers widened to int64 once (a
// train_steps_pairwise_sampled call draws for every batch of an epoch from one CSR).
struct DrawRows {
  at::Tensor indptr, indices;  // (U + 1,) int64; (nnz,) int32 or int64, contiguous
  DrawRows(const at::Tensor& pos_indptr, const at::Tensor& pos_indices)
      : indptr(pos_indptr.to(at::kLong).contiguous()), indices(pos_indices.contiguous()) {}
  int64_t nnz() const { return indices.size(0); }
};

// The first of users[0, n) whose row is malformed (reported first, as the reference does)
// or holds every item: the errors draw_negatives_of would raise for them, raised before a
// multi-step call writes anything.
inline void check_draw_rows(const char* op, const int64_t* users, int64_t n,
                            const DrawRows& rows, int64_t num_items) {
  const int64_t* indptr = rows.indptr.data_ptr<int64_t>();
  const int64_t nnz = rows.nnz();
  int64_t first_full = -1;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t u = users[b], start = indptr[u], stop = indptr[u + 1];
    if (start < 0 || stop < start || stop > nnz) report_bad_row(op, u, start, stop, nnz);
    if (first_full < 0 && stop - start >= num_items) first_full = b;
  }
  if (first_full >= 0) {
    const int64_t u = users[first_full];
    report_no_negative(op, u, indptr[u + 1] - indptr[u], num_items);
  }
}

// The positives of a multi-step sampled call (train_steps_pairwise_sampled in pairwise.cpp,
// train_steps_sampled in pointwise.cpp): ids widened and range-checked, weights and the
// users' CSR rows checked, so that whatever a bad input can fail fails before the first
// step writes.
struct SampledRun {
  std::vector<int64_t> users, pos;
  at::Tensor weights;  // undefined, or (n,) contiguous and checked
  DrawRows rows;
  int64_t n, batch_size, num_steps, seed, first_step;

  // Step t's positives [lo, lo + batch) and the key of its draws (at step first_step + t):
  // the rule every backend's multi-step op follows (the reference's checked_steps, CUDA's
  // steps_in_turn).
  struct Slice {
    int64_t lo, batch;
    uint64_t key;
  };
  Slice slice(int64_t t) const {
    const int64_t lo = t * batch_size;
    return {lo, std::min(batch_size, n - lo), sampling::step_key(seed, first_step + t)};
  }

  // With in.order, every id and weight is checked, then the run is gathered through it.
  template <typename Batch>
  SampledRun(const char* op, const char* pos_name, const Batch& in, int64_t num_users,
             int64_t num_items, int64_t batch_size_)
      : rows(in.pos_indptr, in.pos_indices),
        n(in.order.defined() ? in.order.size(0) : in.users.size(0)),
        batch_size(batch_size_),
        num_steps(n / batch_size + (n % batch_size != 0 ? 1 : 0)),
        seed(in.seed),
        first_step(in.step) {
    if (!in.order.defined()) {
      load_ids(op, "users", in.users.contiguous(), num_users, users);
      load_ids(op, pos_name, in.pos_items.contiguous(), num_items, pos);
      weights = fused::checked_weights(op, in.weights, n);
    } else {
      const int64_t b = in.users.size(0);
      check_ids_in_range(op, "users", in.users, num_users);
      check_ids_in_range(op, pos_name, in.pos_items, num_items);
      weights = fused::checked_weights(op, in.weights, b);
      check_ids_in_range(op, "order", in.order, b);
      gather_ids(in.users, in.order, users);
      gather_ids(in.pos_items, in.order, pos);
      if (weights.defined()) weights = weights.index_select(0, in.order).contiguous();
    }
    check_draw_rows(op, users.data(), n, rows, num_items);
  }

  // The negatives of pairs [p0, p1) (pair p = b * K + k, of user sample_users[b]), at key,
  // into neg[p]: draw_negatives on rows this run has checked, so nothing to report.
  void draw(int64_t p0, int64_t p1, int64_t k, const int64_t* sample_users, int64_t num_items,
            uint64_t key, int64_t* neg) const {
    const int64_t* indptr = rows.indptr.data_ptr<int64_t>();
    int64_t bad_row = 0, full = 0;
    AT_DISPATCH_INDEX_TYPES(rows.indices.scalar_type(), "fastmf.draw_negatives", [&] {
      draw_negatives(p0, p1, k, sample_users, indptr, rows.indices.data_ptr<index_t>(),
                     rows.nnz(), num_items, key, neg, bad_row, full);
    });
  }
};

// The negatives of the B * K pairs of the B samples whose users are users[0, B) (pair
// p = b * K + k), written to neg[0, B * K). Each pair's draw depends only on (seed, step,
// p), so nothing depends on the thread count. A malformed row or a user with every item is
// reported for the first sample that has one, as the reference reports them (bad rows
// first).
inline void draw_negatives_of(const char* op, const int64_t* users, int64_t batch, int64_t k,
                              const DrawRows& rows, int64_t num_items, int64_t seed,
                              int64_t step, int64_t* neg) {
  const int64_t pairs = batch * k;
  const at::Tensor& indices_t = rows.indices;
  const int64_t* indptr = rows.indptr.data_ptr<int64_t>();
  const int64_t nnz = rows.nnz();
  const uint64_t key = sampling::step_key(seed, step);
  int64_t first_bad_row = batch, first_full = batch;
  AT_DISPATCH_INDEX_TYPES(indices_t.scalar_type(), "fastmf.draw_negatives", [&] {
    const index_t* indices = indices_t.data_ptr<index_t>();
    const int num_chunks = at::get_num_threads();
    std::vector<int64_t> bad(static_cast<size_t>(num_chunks), batch);
    std::vector<int64_t> fulls(static_cast<size_t>(num_chunks), batch);
    at::parallel_for(0, pairs, fused::kGrain, [&](int64_t begin, int64_t end) {
      const int t = std::min(at::get_thread_num(), num_chunks - 1);
      int64_t bad_row = batch, full = batch;
      draw_negatives(begin, end, k, users, indptr, indices, nnz, num_items, key, neg, bad_row,
                     full);
      bad[t] = std::min(bad[t], bad_row);
      fulls[t] = std::min(fulls[t], full);
    });
    first_bad_row = *std::min_element(bad.begin(), bad.end());
    first_full = *std::min_element(fulls.begin(), fulls.end());
  });
  if (first_bad_row < batch) {
    const int64_t u = users[first_bad_row];
    report_bad_row(op, u, indptr[u], indptr[u + 1], nnz);
  }
  if (first_full < batch) {
    const int64_t u = users[first_full];
    report_no_negative(op, u, indptr[u + 1] - indptr[u], num_items);
  }
}

inline void draw_negatives_of(const char* op, const int64_t* users, int64_t batch, int64_t k,
                              const at::Tensor& pos_indptr, const at::Tensor& pos_indices,
                              int64_t num_items, int64_t seed, int64_t step, int64_t* neg) {
  draw_negatives_of(op, users, batch, k, DrawRows(pos_indptr, pos_indices), num_items, seed,
                    step, neg);
}

}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
