// The uniform negatives of the sampled steps on the GPU (train_step_pairwise_sampled in
// pairwise.cu, train_step_sampled in pointwise.cu; on their own, sample_negatives in
// sampling.cu): the items of fastmf/ops/reference/sampling.py sample_negatives
// (csrc/cpu/sampled.h on the CPU).
#pragma once

#include <cstdint>

#include "../negative_sampling.h"
#include "common.cuh"

namespace fastmf::cuda {
namespace {

// Pair p's negative for user u (a valid id): the item of sampling::rank_to_item at pair p's
// rank, or -1 after recording under `op` a row outside [0, nnz] or a user with every item.
__device__ __forceinline__ int64_t draw_for_user(IdArray indptr, IdArray indices, int64_t nnz,
                                                 int64_t num_items, long long u, uint64_t key,
                                                 int64_t p, ErrorRecord* err, int op) {
  const long long start = indptr[u], stop = indptr[u + 1];
  if (start < 0 || stop < start || stop > nnz) {
    record_error(err, op, kArgPosRow, start, stop, u);
    return -1;
  }
  const int64_t deg = stop - start;
  if (deg >= num_items) {
    record_error(err, op, kArgNoNegative, u, num_items, deg);
    return -1;
  }
  const int64_t rank = sampling::draw_rank(key, static_cast<uint64_t>(p), num_items - deg);
  int64_t lo = 0, hi = deg;  // sampling::rank_to_item over an IdArray
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(indices[start + mid]) - mid <= rank) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return rank + lo;
}

// One thread per pair p = b * K + k: the user (and, unless pos_rep is null, the positive)
// expanded and the negative drawn (negative_sampling.h). A bad user or positive id, row or
// saturated user is recorded under `op` and its negative set to -1, so the step that
// follows leaves the pair out (its own record of that -1 comes second and is dropped).
__global__ void __launch_bounds__(kThreads)
    sample_pairs(IdArray users, IdArray pos_items, IdArray indptr, IdArray indices,
                 int64_t nnz, int64_t num_users, int64_t num_items, int64_t batch, int64_t k,
                 uint64_t key, int64_t* __restrict__ users_rep, int64_t* __restrict__ pos_rep,
                 int64_t* __restrict__ neg, ErrorRecord* err, int op) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (p >= batch * k) return;
  const int64_t b = p / k;
  const long long u = users[b], i = pos_items[b];
  users_rep[p] = u;
  if (pos_rep != nullptr) pos_rep[p] = i;
  neg[p] = -1;
  if (u < 0 || u >= num_users) {
    record_error(err, op, kArgUsers, u, num_users, b);
    return;
  }
  if (i < 0 || i >= num_items) {
    record_error(err, op, kArgItems, i, num_items, b);
    return;
  }
  neg[p] = draw_for_user(indptr, indices, nnz, num_items, u, key, p, err, op);
}

// sample_negatives: one thread per pair p = b * K + k, users[b]'s negative drawn as
// sample_pairs draws it. A bad user id, row or saturated user is recorded under
// kOpSampleNegatives and its negative set to -1.
__global__ void __launch_bounds__(kThreads)
    sample_user_negatives(IdArray users, IdArray indptr, IdArray indices, int64_t nnz,
                          int64_t num_users, int64_t num_items, int64_t batch, int64_t k,
                          uint64_t key, int64_t* __restrict__ neg, ErrorRecord* err) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (p >= batch * k) return;
  const int64_t b = p / k;
  const long long u = users[b];
  neg[p] = -1;
  if (u < 0 || u >= num_users) {
    record_error(err, kOpSampleNegatives, kArgUsers, u, num_users, b);
    return;
  }
  neg[p] = draw_for_user(indptr, indices, nnz, num_items, u, key, p, err, kOpSampleNegatives);
}

}  // namespace
}  // namespace fastmf::cuda
