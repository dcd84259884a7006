// The SIMD dot-product tile of csrc/cpu/topk.cpp, written once against a `Lanes<T>` traits
// struct. topk.cpp includes this file once per instruction set, inside a namespace that
// defines `Lanes<float>` and `Lanes<double>` and under a `#pragma GCC target` for that
// set, so every function here is compiled for it (no include guard on purpose).
//
// Every score is computed the same way wherever it falls in a tile: lane l accumulates
// the products of the dimensions d ≡ l (mod W) in order with FMAs (a zero-padded load
// covers the last W), then Lanes<T>::reduce sums the lanes with one fixed tree. So a
// score depends only on its query row and item row, never on the batch, the tiling or the
// number of threads. Blocks that run past the last query or item repeat the last row and
// their extra results are dropped, which keeps that true at the edges too.

// scores[r * NR + c] = <queries[r], items[c]> for an MR × NR block, MR * NR == W.
template <typename T, int MR, int NR>
__attribute__((always_inline)) inline void dot_block(const T* const* queries,
                                                     const T* const* items, int64_t dim,
                                                     T* scores) {
  using L = Lanes<T>;
  static_assert(MR * NR == L::W, "one register of lanes per block");
  typename L::V acc[L::W];
  for (int a = 0; a < L::W; ++a) acc[a] = L::zero();
  int64_t d = 0;
  for (; d + L::W <= dim; d += L::W) {
    typename L::V q[MR], it[NR];
    for (int r = 0; r < MR; ++r) q[r] = L::load(queries[r] + d);
    for (int c = 0; c < NR; ++c) it[c] = L::load(items[c] + d);
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < NR; ++c) {
        typename L::V& a = acc[L::slot(r * NR + c)];
        a = L::fmadd(q[r], it[c], a);
      }
    }
  }
  if (d < dim) {
    const int rest = static_cast<int>(dim - d);
    typename L::V q[MR], it[NR];
    for (int r = 0; r < MR; ++r) q[r] = L::load_first(queries[r] + d, rest);
    for (int c = 0; c < NR; ++c) it[c] = L::load_first(items[c] + d, rest);
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < NR; ++c) {
        typename L::V& a = acc[L::slot(r * NR + c)];
        a = L::fmadd(q[r], it[c], a);
      }
    }
  }
  L::reduce(acc, scores);
}

// out[r * cols + c] = <queries[r], item(c)> for a tile of `rows` consecutive query rows
// and `cols` items: item(c) is row ids[c] of `items`, or row first + c when ids is null.
template <typename T, int MR, int NR>
inline void dot_tile_blocked(const T* queries, int64_t rows, const T* items,
                             const int64_t* ids, int64_t first, int64_t cols, int64_t dim,
                             T* out) {
  T block[MR * NR];
  for (int64_t c0 = 0; c0 < cols; c0 += NR) {
    const T* it[NR];
    for (int c = 0; c < NR; ++c) {
      const int64_t col = std::min<int64_t>(c0 + c, cols - 1);
      it[c] = items + (ids != nullptr ? ids[col] : first + col) * dim;
    }
    const int valid_cols = static_cast<int>(std::min<int64_t>(NR, cols - c0));
    for (int64_t r0 = 0; r0 < rows; r0 += MR) {
      const T* q[MR];
      for (int r = 0; r < MR; ++r) q[r] = queries + std::min<int64_t>(r0 + r, rows - 1) * dim;
      dot_block<T, MR, NR>(q, it, dim, block);
      const int valid_rows = static_cast<int>(std::min<int64_t>(MR, rows - r0));
      for (int r = 0; r < valid_rows; ++r) {
        for (int c = 0; c < valid_cols; ++c) out[(r0 + r) * cols + c0 + c] = block[r * NR + c];
      }
    }
  }
}

template <typename T>
void dot_tile(const T* queries, int64_t rows, const T* items, const int64_t* ids,
              int64_t first, int64_t cols, int64_t dim, T* out) {
  using L = Lanes<T>;
  // A few queries (small batches) use one query × W items per block instead of padding
  // the block with copies of the query: same arithmetic per score, no wasted lanes.
  if (rows < L::MR) {
    dot_tile_blocked<T, 1, L::W>(queries, rows, items, ids, first, cols, dim, out);
  } else {
    dot_tile_blocked<T, L::MR, L::W / L::MR>(queries, rows, items, ids, first, cols, dim, out);
  }
}

// The first column at or after `from` whose score (plus bias) is above `threshold`, or n.
// Whole chunks of kChunk columns are tested with one branch; ordered compares, so NaN
// never passes.
template <typename T, bool kHasBias>
int64_t next_above(const T* s, const T* b, int64_t from, int64_t n, T threshold) {
  using L = Lanes<T>;
  static_assert(kChunk % L::W == 0, "whole registers per chunk");
  const typename L::V t = L::broadcast(threshold);
  auto scores_at = [&](int64_t j) {
    typename L::V v = L::load(s + j);
    if constexpr (kHasBias) v = L::add(v, L::load(b + j));
    return v;
  };
  int64_t j = from;
  for (; j + kChunk <= n; j += kChunk) {
    typename L::Mask hit = L::none();
    for (int64_t c = 0; c < kChunk; c += L::W) {
      hit = L::either(hit, L::greater(scores_at(j + c), t));
    }
    if (!L::any(hit)) continue;
    for (int64_t c = 0;; c += L::W) {
      const typename L::Mask lanes = L::greater(scores_at(j + c), t);
      if (L::any(lanes)) return j + c + L::first(lanes);
    }
  }
  for (; j < n; ++j) {
    const T v = kHasBias ? s[j] + b[j] : s[j];
    if (v > threshold) return j;
  }
  return n;
}
