// Groups the positions of a batch by id into segments (runs of one id), so that the
// gradient rows of a duplicated id can be summed in a fixed order (ascending batch
// position) and the row updated once. csrc/cuda/segments.cuh does the same on the GPU.
//
// An LSD radix sort on (id, position) keys does it in O(B) passes over the batch, using
// only as many digit bits as the table's id range needs; an id range of at most twice the
// batch is counted instead (group_by_counting). The scratch is O(B) either way and is
// reused between calls, never O(num_rows) for a table larger than that.
//
// A batch of at least kParallelIds ids (csrc/cpu/common.h), outside a parallel region, is
// grouped on the intra-op threads: each pass histograms and scatters contiguous chunks of
// the keys in parallel (chunk c writes after chunks 0..c-1 in every bucket, so the pass
// stays stable), and the runs are found per chunk and numbered by a prefix sum. The keys
// are unique, so the result is the serial one to the bit for any thread count. Serially,
// grouping the 122,880 feature ids of benchmarks/bench_embedding.py's bag step (1M-row
// table) took about 0.6 ms of a 4.6 ms update on 2 threads, with the second thread waiting.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "common.h"
#include "isa.h"

namespace fastmf {
namespace FASTMF_CPU_NS {

struct RowGroups {
  // Batch positions grouped by id, ascending id, ascending position within an id.
  std::vector<int32_t> order;
  // Group g is order[starts[g], starts[g + 1]); num_groups + 1 entries are valid.
  std::vector<int32_t> starts;
  // The id of group g.
  std::vector<int64_t> rows;
  int64_t num_groups = 0;

  std::vector<uint64_t> keys, scratch;
  std::vector<int32_t> histogram;
  // Per chunk of a parallel grouping: bucket counts, then first output position per bucket;
  // and the number of runs that start in each chunk.
  std::vector<int64_t> chunk_histogram, chunk_runs;
  std::vector<std::pair<int64_t, int32_t>> pairs;

  // First group whose start is at or after sorted position `p`: splitting [0, B) into
  // ranges of sorted positions and taking the groups that start in each balances the work
  // by occurrences, so a hot id cannot pile a whole thread's share onto one chunk of ids.
  int64_t group_at(int64_t p) const {
    const int32_t* first = starts.data();
    return std::lower_bound(first, first + num_groups, static_cast<int32_t>(p)) - first;
  }

  size_t bytes() const {
    return order.capacity() * sizeof(int32_t) + starts.capacity() * sizeof(int32_t) +
           rows.capacity() * sizeof(int64_t) + keys.capacity() * sizeof(uint64_t) +
           scratch.capacity() * sizeof(uint64_t) + histogram.capacity() * sizeof(int32_t) +
           (chunk_histogram.capacity() + chunk_runs.capacity()) * sizeof(int64_t) +
           pairs.capacity() * sizeof(std::pair<int64_t, int32_t>);
  }
  void release() { *this = RowGroups(); }
};

inline int bit_width(uint64_t x) { return x == 0 ? 0 : 64 - __builtin_clzll(x); }

// How a radix sort splits `bits` key bits: passes of at most 11-bit digits, as even as can be.
struct RadixDigits {
  int passes, digit;
  int64_t buckets;
  uint64_t mask;
  explicit RadixDigits(int bits)
      : passes((bits + 10) / 11),
        digit((bits + passes - 1) / passes),
        buckets(int64_t{1} << digit),
        mask(static_cast<uint64_t>(buckets - 1)) {}
};

// Sorts keys on bits [low, low + bits). Stable, so positions stay ascending per id.
inline void radix_sort(RowGroups& g, int64_t n, int low, int bits) {
  if (bits == 0) return;
  const auto [passes, digit, buckets, mask] = RadixDigits(bits);
  g.histogram.assign(static_cast<size_t>(passes * buckets), 0);
  uint64_t* src = g.keys.data();
  uint64_t* dst = g.scratch.data();
  int32_t* hist = g.histogram.data();
  for (int64_t b = 0; b < n; ++b) {
    const uint64_t key = src[b] >> low;
    for (int p = 0; p < passes; ++p) ++hist[p * buckets + ((key >> (p * digit)) & mask)];
  }
  for (int p = 0; p < passes; ++p) {
    int32_t* h = hist + p * buckets;
    const int shift = low + p * digit;
    // Every key in one bucket: this pass would only copy.
    if (h[(src[0] >> shift) & mask] == n) continue;
    int32_t sum = 0;
    for (int64_t d = 0; d < buckets; ++d) {
      const int32_t c = h[d];
      h[d] = sum;
      sum += c;
    }
    for (int64_t b = 0; b < n; ++b) {
      const uint64_t key = src[b];
      dst[h[(key >> shift) & mask]++] = key;
    }
    std::swap(src, dst);
  }
  if (src != g.keys.data()) std::copy(src, src + n, g.keys.data());
}

// radix_sort on `chunks` contiguous chunks in parallel: the same sorted keys.
inline void radix_sort_parallel(RowGroups& g, int64_t n, int low, int bits, int64_t chunks) {
  if (bits == 0) return;
  const auto [passes, digit, buckets, mask] = RadixDigits(bits);
  g.chunk_histogram.resize(static_cast<size_t>(chunks * buckets));
  int64_t* hist = g.chunk_histogram.data();
  uint64_t* src = g.keys.data();
  uint64_t* dst = g.scratch.data();
  for (int p = 0; p < passes; ++p) {
    const int shift = low + p * digit;
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        int64_t* h = hist + c * buckets;
        std::fill(h, h + buckets, int64_t{0});
        const int64_t b1 = chunk_begin(c + 1, chunks, n);
        for (int64_t b = chunk_begin(c, chunks, n); b < b1; ++b) ++h[(src[b] >> shift) & mask];
      }
    });
    // Bucket d of chunk c starts after every key of buckets < d and of chunks < c in d.
    int64_t sum = 0;
    bool one_bucket = false;
    for (int64_t d = 0; d < buckets; ++d) {
      int64_t in_bucket = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t count = hist[c * buckets + d];
        hist[c * buckets + d] = sum;
        sum += count;
        in_bucket += count;
      }
      one_bucket = one_bucket || in_bucket == n;
    }
    if (one_bucket) continue;  // this pass would only copy
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        int64_t* h = hist + c * buckets;
        const int64_t b1 = chunk_begin(c + 1, chunks, n);
        for (int64_t b = chunk_begin(c, chunks, n); b < b1; ++b) {
          const uint64_t key = src[b];
          dst[h[(key >> shift) & mask]++] = key;
        }
      }
    });
    std::swap(src, dst);
  }
  if (src != g.keys.data()) std::copy(src, src + n, g.keys.data());
}

// The runs of the sorted keys (order, rows, starts) found on `chunks` chunks in parallel.
// Returns the number of runs.
inline int64_t find_runs_parallel(RowGroups& g, int64_t n, int pos_bits, int64_t chunks) {
  const uint64_t* keys = g.keys.data();
  const uint64_t pos_mask = (uint64_t{1} << pos_bits) - 1;
  auto id_of = [&](int64_t j) { return pos_bits == 0 ? keys[j] : keys[j] >> pos_bits; };
  auto starts_run = [&](int64_t j) { return j == 0 || id_of(j) != id_of(j - 1); };
  g.chunk_runs.resize(static_cast<size_t>(chunks + 1));
  int64_t* runs = g.chunk_runs.data();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      int64_t count = 0;
      const int64_t j1 = chunk_begin(c + 1, chunks, n);
      for (int64_t j = chunk_begin(c, chunks, n); j < j1; ++j) {
        g.order[j] = static_cast<int32_t>(keys[j] & pos_mask);
        count += starts_run(j) ? 1 : 0;
      }
      runs[c + 1] = count;
    }
  });
  runs[0] = 0;
  for (int64_t c = 0; c < chunks; ++c) runs[c + 1] += runs[c];
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      int64_t group = runs[c];
      const int64_t j1 = chunk_begin(c + 1, chunks, n);
      for (int64_t j = chunk_begin(c, chunks, n); j < j1; ++j) {
        if (starts_run(j)) {
          g.rows[group] = static_cast<int64_t>(id_of(j));
          g.starts[group] = static_cast<int32_t>(j);
          ++group;
        }
      }
    }
  });
  return runs[chunks];
}

// Ids whose range is at most this many times the batch are grouped by a counting sort
// (group_by_counting) rather than the radix sort.
constexpr int64_t kCountingRange = 2;

// group_rows by a counting sort on the ids themselves: one pass counts each id, one over
// the id range numbers the groups (in ascending id) and turns the counts into each
// group's next free position, one scatters the positions in batch order (so ascending
// within a group). Where the radix sort passes over the batch to build its keys, to
// count, once per digit to scatter, and to find the runs, this is two passes over the
// batch and one over the id range. In a one-thread `perf` of ml-latest-small's BPR epochs
// (each step 8,192 item positions over 9,742 items: two 7-bit digits; 4,096 user positions
// over 610 users) the grouping fell from 10 % of the op's samples to 5 % (13 % before the
// radix path's run loop lost its branch). Returns the number of groups; rows needs n + 1
// slots (see below).
inline int64_t group_by_counting(const int64_t* ids, int64_t n, int64_t num_rows,
                                 RowGroups& g) {
  g.histogram.assign(static_cast<size_t>(num_rows), 0);
  int32_t* next = g.histogram.data();
  for (int64_t b = 0; b < n; ++b) ++next[ids[b]];
  int64_t* rows = g.rows.data();
  int32_t* starts = g.starts.data();
  int64_t groups = 0;
  int32_t sum = 0;
  // Without a branch, as the radix path's run loop below: every id writes the slot of the
  // next group and only an id that occurs moves past it. That slot is at most n.
  for (int64_t id = 0; id < num_rows; ++id) {
    const int32_t count = next[id];
    rows[groups] = id;
    starts[groups] = sum;
    groups += count != 0 ? 1 : 0;
    next[id] = sum;
    sum += count;
  }
  int32_t* order = g.order.data();
  for (int64_t b = 0; b < n; ++b) order[next[ids[b]]++] = static_cast<int32_t>(b);
  return groups;
}

// ids: n ids in [0, num_rows), already range-checked. n < 2^31.
inline void group_rows(const int64_t* ids, int64_t n, int64_t num_rows, RowGroups& g) {
  if (static_cast<int64_t>(g.order.size()) < n) {
    g.order.resize(n);
    g.starts.resize(n + 1);
  }
  // group_by_counting writes one slot past the last group.
  if (static_cast<int64_t>(g.rows.size()) < n + 1) g.rows.resize(n + 1);
  if (g.starts.empty()) g.starts.resize(1);
  g.num_groups = 0;
  g.starts[0] = 0;
  if (n == 0) return;
  // Ids already strictly increasing (callers that looked up each distinct id once, such
  // as the NCF models' training step) are their own groups, in the order a sort would
  // give: no sort. The check stops at the first id that does not increase, within a few
  // ids for a shuffled batch.
  int64_t increasing = 1;
  while (increasing < n && ids[increasing] > ids[increasing - 1]) ++increasing;
  if (increasing == n) {
    for (int64_t j = 0; j < n; ++j) {
      g.order[j] = static_cast<int32_t>(j);
      g.rows[j] = ids[j];
      g.starts[j] = static_cast<int32_t>(j);
    }
    g.num_groups = n;
    g.starts[n] = static_cast<int32_t>(n);
    return;
  }
  // Chunks of a parallel grouping (1: group on this thread), for either sort below.
  const int64_t chunks = parallel_chunks(n);
  if (num_rows <= kCountingRange * n && chunks == 1) {
    g.num_groups = group_by_counting(ids, n, num_rows, g);
    g.starts[g.num_groups] = static_cast<int32_t>(n);
    return;
  }
  const int pos_bits = bit_width(static_cast<uint64_t>(n - 1));
  const int id_bits = bit_width(static_cast<uint64_t>(num_rows - 1));
  int64_t groups = 0;
  if (pos_bits + id_bits <= 64) {
    if (static_cast<int64_t>(g.keys.size()) < n) {
      g.keys.resize(n);
      g.scratch.resize(n);
    }
    uint64_t* keys = g.keys.data();
    if (chunks > 1) {
      at::parallel_for(0, n, kParallelIds / 2, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          keys[b] = (static_cast<uint64_t>(ids[b]) << pos_bits) | static_cast<uint64_t>(b);
        }
      });
      radix_sort_parallel(g, n, pos_bits, id_bits, chunks);
      g.num_groups = find_runs_parallel(g, n, pos_bits, chunks);
      g.starts[g.num_groups] = static_cast<int32_t>(n);
      return;
    }
    for (int64_t b = 0; b < n; ++b) {
      keys[b] = (static_cast<uint64_t>(ids[b]) << pos_bits) | static_cast<uint64_t>(b);
    }
    // Keys are unique (they hold the position), so any sort gives the same order; for
    // tiny batches a comparison sort beats clearing the histograms.
    if (n <= 64) {
      std::sort(keys, keys + n);
    } else {
      radix_sort(g, n, pos_bits, id_bits);
      keys = g.keys.data();
    }
    const uint64_t pos_mask = (uint64_t{1} << pos_bits) - 1;
    int32_t* order = g.order.data();
    int64_t* rows = g.rows.data();
    int32_t* starts = g.starts.data();
    // Without a branch: every position writes its id and start to the slot of the next
    // group, and only a new id moves past that slot (a later group overwrites it
    // otherwise; the slot is at most j, so inside rows and starts). On a shuffled batch's
    // item ids, about two positions a group, the branch mispredicted often enough to be
    // half of group_rows' samples.
    uint64_t previous = ~uint64_t{0};
    for (int64_t j = 0; j < n; ++j) {
      const uint64_t key = keys[j];
      const uint64_t id = pos_bits == 0 ? key : key >> pos_bits;
      order[j] = static_cast<int32_t>(key & pos_mask);
      rows[groups] = static_cast<int64_t>(id);
      starts[groups] = static_cast<int32_t>(j);
      groups += id != previous ? 1 : 0;
      previous = id;
    }
  } else {
    // Ids too wide to pack with a position into 64 bits: tables this large are rare.
    g.pairs.resize(n);
    for (int64_t b = 0; b < n; ++b) g.pairs[b] = {ids[b], static_cast<int32_t>(b)};
    std::sort(g.pairs.begin(), g.pairs.begin() + n);
    int64_t previous = -1;
    for (int64_t j = 0; j < n; ++j) {
      g.order[j] = g.pairs[j].second;
      if (g.pairs[j].first != previous) {
        g.rows[groups] = g.pairs[j].first;
        g.starts[groups] = static_cast<int32_t>(j);
        ++groups;
        previous = g.pairs[j].first;
      }
    }
  }
  g.num_groups = groups;
  g.starts[groups] = static_cast<int32_t>(n);
}

}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
