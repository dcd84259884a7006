// Building blocks shared by the fastmf CUDA kernels.
//
// Layout of work: a row of K scalars is spread over a *group* of L lanes (L a power of two,
// 1..32) that each hold one or more packs of V scalars (V = 4 for float, 2 for double when
// every row start is 16-byte aligned, else 1). Small K thus puts several groups (samples,
// tiles) in one warp instead of leaving lanes idle, and large K gives each lane J packs.
// All cross-lane sums are xor-shuffle trees inside the group: a fixed order, so results
// are bit-identical from run to run.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastmf::cuda {

constexpr int kThreads = 256;  // every kernel's block size
constexpr int kWarp = 32;

// ---------------------------------------------------------------------------------------
// Device-side error record (see errors.cu for why errors are recorded, not raised).

enum ErrorOp : int { kOpMfForward = 0, kOpMfBackward, kOpSparseAdagrad, kOpSparseSgd,
                     kOpTrainStep, kOpTrainStepPairwise, kOpTopk, kOpEmbeddingBagForward,
                     kOpEmbeddingBagBackward, kOpSparseUpdate, kOpEmbeddingBagBackwardUpdate,
                     kOpTrainStepPairwiseSampled, kOpTrainStepSampled, kOpSampleNegatives,
                     kNumErrorOps };
// kArgIndptrSpan and kArgIndptrOrder are a bad exclude_indptr (a CSR the kernel cannot
// trust), reported as the ValueErrors of the CPU kernel; kArgOffsets* likewise a bad
// embedding_bag offsets (start: value = offsets[0]; order: value, limit = offsets[b],
// offsets[b + 1], position = b; end: value = offsets[B], limit = the number of indices,
// position = B). The sampled steps' ValueErrors: kArgPosRow a pos_indptr row
// outside [0, len(pos_indices)] (value, limit = its start and end, position = the user),
// kArgNoNegative a user with every item among its positives (value = the user, limit = the
// item count, position = its number of positives).
// kArgWeights is a fused step's weight that is NaN, infinite or negative (value: its bits
// as a double, as for targets).
enum ErrorArg : int { kArgUsers = 0, kArgItems, kArgIds, kArgTargets, kArgNegItems,
                      kArgExclude, kArgCandidates, kArgIndptrSpan, kArgIndptrOrder,
                      kArgIndices, kArgOffsetsStart, kArgOffsetsOrder, kArgOffsetsEnd,
                      kArgPosRow, kArgNoNegative, kArgWeights, kNumErrorArgs };

struct ErrorRecord {
  unsigned long long code;   // 0: no error; else 1 + op * kNumErrorArgs + arg
  long long value;           // the bad id, or the bits of the bad target (a double);
                             // indptr: its first entry (span) or the entry that drops (order)
  long long limit;           // the row count the id was checked against; indptr: its last
                             // entry (span) or the next entry (order)
  long long position;        // where in the batch; indptr: the number of exclude_indices
                             // (span) or the query (order)
};

// Host-side range check of device ids that a host step reads before any kernel does (a run
// read through its order, unique_bags' ids): their smallest and largest in one aminmax and
// one copy to the host, one synchronisation where two .item() reads made two, and the
// error of csrc/checks.h's report_id_range.
void check_device_id_range(const char* op, const char* name, const at::Tensor& ids,
                           int64_t num_rows);

// The record of the current device; the first call on a device resolves its address
// (warm an op up once before capturing it in a CUDA graph, as for any new kernel).
ErrorRecord* error_record();

// First error wins; the atomic only arbitrates which one is kept and never touches results.
__device__ __forceinline__ void record_error(ErrorRecord* rec, int op, int arg, long long value,
                                             long long limit, long long position) {
  const unsigned long long code = 1ull + static_cast<unsigned long long>(op * kNumErrorArgs + arg);
  if (atomicCAS(&rec->code, 0ull, code) == 0ull) {
    rec->value = value;
    rec->limit = limit;
    rec->position = position;
  }
}

// A fused step's per-sample weight (csrc/checks.h check_weight_values): finite and >= 0
// (NaN fails w >= 0). `weights` null: every weight is 1.
template <typename T>
__device__ __forceinline__ bool weight_ok(const T* weights, long long b, ErrorRecord* rec,
                                          int op) {
  if (weights == nullptr) return true;
  const T w = weights[b];
  const bool ok = w >= T(0) && isfinite(w);
  if (!ok) record_error(rec, op, kArgWeights, __double_as_longlong(static_cast<double>(w)), 0, b);
  return ok;
}

// The sampled steps check their positives' weights under their own op before the step they
// expand to records the same fault under its op (the first record wins).
template <typename T>
__global__ void check_weights(const T* __restrict__ weights, long long n, ErrorRecord* rec,
                              int op) {
  const long long b = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < n) weight_ok(weights, b, rec, op);
}

// ---------------------------------------------------------------------------------------
// Ids of either dtype, read through one code path (the branch is uniform per launch).

struct IdArray {
  const void* data;
  bool is64;
  __device__ __forceinline__ long long operator[](long long i) const {
    return is64 ? static_cast<long long>(static_cast<const int64_t*>(data)[i])
                : static_cast<long long>(static_cast<const int32_t*>(data)[i]);
  }
};

inline IdArray id_array(const at::Tensor& ids) {
  return IdArray{ids.data_ptr(), ids.scalar_type() == at::kLong};
}

// ---------------------------------------------------------------------------------------
// Packs: V scalars moved as one aligned 16-byte (or scalar) access.

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& x) {
  *reinterpret_cast<Pack<T, V>*>(p) = x;
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> zero_pack() {
  Pack<T, V> x;
#pragma unroll
  for (int v = 0; v < V; ++v) x.v[v] = T(0);
  return x;
}

// ---------------------------------------------------------------------------------------
// Groups of L lanes inside a warp.

struct Group {
  int lane;       // 0..L-1
  int size;       // L
  unsigned mask;  // the group's lanes within the warp
};

__device__ __forceinline__ Group make_group(int lanes) {
  const int warp_lane = static_cast<int>(threadIdx.x) % kWarp;
  const unsigned base = lanes == kWarp ? 0xffffffffu : ((1u << lanes) - 1u);
  const int first = warp_lane - warp_lane % lanes;
  return Group{warp_lane % lanes, lanes, base << first};
}

template <typename T>
__device__ __forceinline__ T group_sum(const Group& g, T x) {
  for (int offset = g.size / 2; offset > 0; offset /= 2)
    x += __shfl_xor_sync(g.mask, x, offset, g.size);
  return x;
}

template <typename T>
__device__ __forceinline__ T group_broadcast(const Group& g, T x, int src) {
  return __shfl_sync(g.mask, x, src, g.size);
}

// ---------------------------------------------------------------------------------------
// Host helpers.

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

// How a row of `dim` scalars is spread over a group: V scalars per pack, L lanes, J packs
// per lane (J is a compile-time constant in the kernels, rounded up to 1, 2, 4 or 8).
struct RowLayout {
  int vec;
  int lanes;
  int packs;
  int64_t padded() const { return static_cast<int64_t>(vec) * lanes * packs; }
};

inline RowLayout row_layout(int64_t dim, int vec) {
  const int64_t num_packs = (dim + vec - 1) / vec;
  const int lanes = num_packs >= kWarp ? kWarp : next_pow2(num_packs < 1 ? 1 : num_packs);
  const int64_t per_lane = (num_packs + lanes - 1) / lanes;
  const int packs = per_lane <= 1 ? 1 : next_pow2(per_lane);
  return RowLayout{vec, lanes, packs};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// scatter_rows (csrc/cuda/embedding_bag.cu) for the other families' kernels: pointwise.cu's
// mf_backward_dense sums mf_backward's rows with it.
at::Tensor scatter_rows_for(const at::Tensor& ids, const at::Tensor& rows, int64_t num_rows);

}  // namespace fastmf::cuda
