// Groups a batch's samples by table row into segments (runs of one row): a stable radix
// sort of (row key, sample position) and, for every sorted slot, the slot where its run of
// equal keys begins. Everything is sized from the batch alone, so no host synchronisation
// is needed (graph-capturable). csrc/cpu/segments.h is the CPU counterpart; the CUB part
// is compiled in segments.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastmf::cuda {

// Keys are unsigned 32-bit values stored in int32 tensors; a key that is not a table row
// (a bad sample's sentinel) sorts after every row of its table.
constexpr uint32_t kNoKey = 0xffffffffu;

struct SortedRuns {
  at::Tensor keys;       // (n,) sorted keys
  at::Tensor positions;  // (n,) sample position of each sorted slot (ties keep batch order)
  at::Tensor run_start;  // (n,) first slot of the run each slot belongs to
};

// Number of low key bits the sort must look at for keys up to max_key.
int key_bits(uint64_t max_key);

SortedRuns sort_runs(const at::Tensor& keys, const at::Tensor& positions, uint64_t max_key);

}  // namespace fastmf::cuda
