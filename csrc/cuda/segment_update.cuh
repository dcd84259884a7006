// The fused sparse optimizer step on one table, after its samples were sorted by row
// (segments.cuh): sum the gradient rows of each row's run of samples, then update the row
// once. The same code serves sparse_adagrad_update / sparse_sgd_update (pointwise.cu) and
// both tables of train_step (pointwise.cu) and train_step_pairwise (pairwise.cu).
// csrc/cpu/segment_update.h is the CPU counterpart. The kernels are compiled once per
// dtype (segment_update_float.cu, segment_update_double.cu) so the two halves of this,
// the slowest template work of the build, compile in parallel.
//
// Why tiles rather than one warp per run: under Zipf the run lengths range from 1 to
// thousands (the hottest item of a 262144-sample batch occurs ~20000 times), so a warp per
// run leaves most of the GPU waiting for the few hot rows. Instead the sorted slots are cut
// into tiles of C consecutive slots, one group of lanes per tile, so every group does the
// same work whatever the runs look like:
//
//   stage 1: a group walks its tile's slots in order, summing gradient rows in registers.
//            A run that starts and ends inside the tile (most of them) is applied right
//            there. A run cut by the tile's edges leaves its piece in a scratch slot:
//            slot 0 for the piece that continues a run from an earlier tile (with the slot
//            where that piece ends), slot 1 for the piece that starts the tile's last run
//            when that run goes on into the next tile.
//   stage 2: the tile where a cut run ends owns it: it adds slot 1 of the run's first tile
//            and slot 0 of every later tile in tile order, then applies the update. Runs
//            spanning more than kSuperTile tiles (hot rows) are summed by a whole block:
//            each group takes every G-th piece, and the G group sums are added in group
//            order through shared memory.
//
// Every sum has a fixed order (slot order inside a tile, tile order or a fixed tree across
// tiles), no atomics are used, and the launch shapes depend only on the batch size and the
// row width, so the result is bit-identical from run to run. Gradients are never
// materialised per row of the table: scratch is 2 rows per tile.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <limits>

#include "../checks.h"
#include "../codes.h"
#include "common.cuh"
#include "segments.cuh"

namespace fastmf::cuda {

constexpr Optimizer kSgd = Optimizer::kSgd;
constexpr Optimizer kAdagrad = Optimizer::kAdagrad;
constexpr Optimizer kRowwiseAdagrad = Optimizer::kRowwiseAdagrad;

// Tiles per stage-2 block. A run spanning more tiles than this is a "long" run; at most one
// long run can end in any kSuperTile consecutive tiles, so one block per kSuperTile tiles
// handles it.
constexpr int kSuperTile = 32;

template <typename scalar_t>
struct SegmentArgs {
  // This table's part of the sorted batch (segments.cuh), already offset to its first slot.
  const uint32_t* keys = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* run_start = nullptr;
  int32_t run_start_base = 0;  // run_start holds slots of the whole sorted array
  int32_t n = 0;               // slots of this table
  uint32_t key_offset = 0;     // row = key - key_offset; a key past the table is a bad sample
  int64_t num_rows = 0;
  int64_t dim = 0;

  // The table: weight (N, dim); state (N, dim) for adagrad, (N,) for row-wise adagrad.
  scalar_t* weight = nullptr;
  scalar_t* state = nullptr;
  scalar_t* bias = nullptr;  // optional (N,) bias updated with the same runs
  scalar_t* bias_state = nullptr;

  // The gradient of the slot at batch position b, one of:
  //   given:   grad_rows[b, :]                                      (grad_rows != nullptr)
  //            and, for b >= negated_from, -grad_rows[b - negated_from, :]
  //            (train_step_pairwise's negative items: their rows are the positives' negated)
  //   derived: coef[b] * other[other_keys[b] - other_key_offset, :] (train_step's users)
  //            or, with other_keys_minus, coef[b] * (other[i, :] - other[j, :]) with
  //            i, j the rows of other_keys[b], other_keys_minus[b] (train_step_pairwise's)
  // and, with a bias, coef[b] (negated likewise) as the bias gradient.
  const scalar_t* grad_rows = nullptr;
  int32_t negated_from = std::numeric_limits<int32_t>::max();
  const scalar_t* coef = nullptr;
  const scalar_t* other = nullptr;
  const uint32_t* other_keys = nullptr;
  const uint32_t* other_keys_minus = nullptr;
  uint32_t other_key_offset = 0;

  Optimizer optimizer = kSgd;  // row-wise Adagrad here means a 2-D table's (N,) state
  scalar_t lr = 0;
  scalar_t eps = 0;
  // L2 term: a row seen n times in the batch also gets n * reg_scale * w (pre-step w).
  scalar_t reg_scale = 0;

  // Launch shape and scratch (set by run_segment_update).
  int tile = 0;
  int lanes = 1;
  int64_t padded = 0;  // row width in scratch: lanes * packs * vec
  int32_t num_tiles = 0;
  scalar_t* partials = nullptr;       // (num_tiles, 2, padded)
  scalar_t* bias_partials = nullptr;  // (num_tiles, 2)
  int32_t* piece_end = nullptr;       // (num_tiles,) slot after a tile's slot-0 piece
};

// Runs stage 1 and stage 2 for one table on the current stream. `packed`: 16-byte packs
// (the caller checked dim and the alignment of every row it reads or writes, and the row
// width against max_update_dim with check_row_width, before writing any table).
template <typename scalar_t>
void run_segment_update(SegmentArgs<scalar_t> args, bool packed, const at::Tensor& like);

// Largest row width the update kernels hold in registers: 8 packs per lane of a warp, so
// 1024 float32 / 512 float64 values in 16-byte packs, 256 one value at a time. (The CPU
// kernels have no limit.)
inline int64_t max_update_dim(int64_t element_size, bool packed) {
  return (packed ? 16 / element_size : 1) * kWarp * 8;
}

// Whether rows of `dim` values at every base in `bases` (null: not read) can move as
// 16-byte packs.
inline bool packed_rows(int64_t dim, int64_t element_size,
                        std::initializer_list<const void*> bases) {
  if (dim % (16 / element_size) != 0) return false;
  for (const void* p : bases) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return true;
}

// The CUDA width limit of one table's update (csrc/checks.h check_row_width).
inline void check_update_width(const char* op, const char* name, int64_t dim,
                               int64_t element_size, bool packed) {
  check_row_width(op, name, dim, max_update_dim(element_size, packed),
                  max_update_dim(element_size, true));
}

}  // namespace fastmf::cuda
