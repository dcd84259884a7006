// The embedding_bag family on the GPU: embedding_bag_forward, embedding_bag_backward,
// scatter_rows, unique_bags, sparse_update and embedding_bag_backward_update.
// csrc/cpu/embedding_bag.cpp is the same family on the CPU;
// fastmf/ops/reference/embedding_bag.py states what each op computes.
//
// Every sum has the order of the CPU kernel, so the two devices give the same bits:
//
//   * forward: one group of lanes per bag (lanes over columns), summing in index order;
//   * backward: one group per index j, its bag found by a binary search of the offsets;
//   * the two steps sort the ids (segments.cuh: a stable CUB radix sort, so a row's
//     occurrences stay in index order) and step every unique row once, from the group at
//     the head of its run of equal keys. A run longer than kHotChunk occurrences (a hot id
//     under Zipf) is cut into chunks of kHotChunk that other groups sum first (stage 1);
//     the head adds the chunks in chunk order (stage 2): the chunking of the CPU kernel.
//
// The tiled machinery of segment_update.cuh (the MF steps) balances hot rows better, but
// sums in another order; the embedding_bag steps keep the CPU's order instead, since a
// half table's stochastic rounding turns any difference in the float32 value into a
// different rounded value. Products go through mul_rn so that nvcc contracts no a * b + c
// into a fused multiply-add the CPU kernel (built with -ffp-contract=off) does not form;
// division and square root are IEEE-rounded in nvcc's default mode on both devices.
//
// Bad input never stops a kernel (errors.cu): a bad id is recorded and (forward) turns its
// bag's output into NaN or (steps) is left out of the update; bad offsets are recorded and
// turn the whole forward output into NaN, the backward's rows into zeros, and make a step
// write nothing. No host synchronisation, no atomics on the tables, scratch from PyTorch's
// caching allocator: every op can be captured in a CUDA graph (after one warm-up call).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_unique2.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../args.h"
#include "../checks.h"
#include "../codes.h"
#include "../counter_hash.h"
#include "../ops.h"
#include "common.cuh"
#include "segments.cuh"

namespace fastmf::cuda {
namespace {

// Occurrences per chunk of a hot run: must equal kHotChunk of csrc/cpu/embedding_bag.cpp,
// or hot rows' sums (and so their bits) differ between the devices.
constexpr int32_t kHotChunk = 2048;
// Columns a lane holds per pass over a row; a row wider than lanes * kCols is processed in
// several passes.
constexpr int kCols = 4;

template <typename W>
using acc_t = std::conditional_t<std::is_same_v<W, double>, double, float>;

// ---------------------------------------------------------------------------------------
// Arithmetic rounded as the CPU kernel rounds it

template <typename T>
__device__ __forceinline__ T mul_rn(T a, T b) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>) return __fmul_rn(a, b);
  else if constexpr (std::is_same_v<T, double>) return __dmul_rn(a, b);
  else return static_cast<T>(a * b);  // half types: the product is rounded to T
#else
  return static_cast<T>(a * b);
#endif
}

__device__ __forceinline__ uint32_t float_bits(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

__device__ __forceinline__ float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#endif
}

// ---------------------------------------------------------------------------------------
// Stochastic rounding (fastmf/ops/reference/embedding_bag.py random_bits, stochastic_round;
// the CPU kernel's functions of the same names)

inline uint64_t rounding_key(int64_t seed, int64_t step) { return hash::step_key(seed, step); }

__device__ __forceinline__ c10::Half stochastic_round(float v, uint32_t bits, c10::Half*) {
  const float magnitude = fabs(v);
  // No stochastic rounding where float16 is not normal: FBGEMM's rule.
  if (!isfinite(v) || magnitude >= 65504.0f || magnitude < 0x1p-14f) return c10::Half(v);
  return c10::Half(bits_float((float_bits(v) + (bits >> 19)) & ~uint32_t{0x1FFF}));
}

__device__ __forceinline__ c10::BFloat16 stochastic_round(float v, uint32_t bits,
                                                          c10::BFloat16*) {
  if (!isfinite(v)) return c10::BFloat16(v);
  const float r = bits_float((float_bits(v) + (bits >> 16)) & ~uint32_t{0xFFFF});
  return isfinite(r) ? c10::BFloat16(r) : c10::BFloat16(v);
}

// Element (row, col) of a W table, from its value in A.
template <typename W, typename A>
__device__ __forceinline__ W store_value(A v, int64_t row, int64_t col, bool stochastic,
                                         uint64_t key) {
  if constexpr (std::is_same_v<W, c10::Half> || std::is_same_v<W, c10::BFloat16>) {
    if (stochastic) {
      const uint32_t bits = hash::element_bits(hash::row_bits(key, row), col);
      return stochastic_round(v, bits, static_cast<W*>(nullptr));
    }
  }
  return static_cast<W>(v);
}

// ---------------------------------------------------------------------------------------
// Offsets and ids on the device

// offsets[0] == 0, non-decreasing, offsets[B] == num_indices (csrc/checks.h
// check_offsets_values); a bad one is recorded and sets *bad, which every later kernel of
// the op reads (stream order) instead of trusting the bags.
__global__ void __launch_bounds__(kThreads)
    check_offsets_kernel(IdArray offsets, int64_t num_offsets, int64_t num_indices, int op,
                         int32_t* __restrict__ bad, ErrorRecord* err) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= num_offsets) return;
  const long long o = offsets[b];
  bool ok = true;
  if (b == 0 && o != 0) {
    record_error(err, op, kArgOffsetsStart, o, 0, 0);
    ok = false;
  }
  if (b + 1 < num_offsets) {
    const long long next = offsets[b + 1];
    if (next < o) {
      record_error(err, op, kArgOffsetsOrder, o, next, b);
      ok = false;
    }
  } else if (o != num_indices) {
    record_error(err, op, kArgOffsetsEnd, o, num_indices, b);
    ok = false;
  }
  if (!ok) *bad = 1;  // every writer writes 1: no atomic needed
}

// The bag of index j: the first b with offsets[b + 1] > j (empty bags are skipped), as the
// reference's searchsorted. Only called with checked offsets.
__device__ __forceinline__ int64_t bag_of_index(const IdArray& offsets, int64_t num_bags,
                                                int64_t j) {
  int64_t lo = 0, hi = num_bags - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid + 1] > j) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

void launch_check_offsets(const at::Tensor& offsets, int64_t num_indices, int op,
                          const at::Tensor& bad, cudaStream_t stream) {
  const int64_t n = offsets.numel();
  check_offsets_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      id_array(offsets), n, num_indices, op, bad.data_ptr<int32_t>(), error_record());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Lanes per row: enough that each holds at most kCols columns, up to a warp.
inline int lanes_for(int64_t dim) {
  const int64_t per = ceil_div(dim, kCols);
  return per >= kWarp ? kWarp : next_pow2(per < 1 ? 1 : per);
}

// Passes over a row of `dim` columns with `lanes` lanes.
__device__ __forceinline__ int64_t num_passes(int64_t dim, int lanes) {
  const int64_t width = static_cast<int64_t>(kCols) * lanes;
  return (dim + width - 1) / width;
}

// Column i of this lane in pass c of a row (lanes L): columns in (c, i, lane) order are
// increasing, the order the row-wise sums walk them.
__device__ __forceinline__ int64_t column(const Group& g, int64_t pass, int i) {
  return (pass * kCols + i) * g.size + g.lane;
}

// ---------------------------------------------------------------------------------------
// embedding_bag_forward

template <typename W, typename A>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const W* __restrict__ weight, int64_t num_rows, int64_t dim, IdArray indices,
                   IdArray offsets, int64_t num_bags, const A* __restrict__ psw, bool mean,
                   const int32_t* __restrict__ bad_offsets, int lanes, A* __restrict__ out,
                   ErrorRecord* err) {
  const Group g = make_group(lanes);
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  if (b >= num_bags) return;  // uniform over the group
  A* o = out + b * dim;
  if (*bad_offsets != 0) {
    for (int64_t k = g.lane; k < dim; k += lanes) o[k] = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  const int64_t j0 = offsets[b], j1 = offsets[b + 1];
  // Every id of the bag checked before any row is read through one.
  int ok = 1;
  for (int64_t j = j0 + g.lane; j < j1; j += lanes) {
    const long long id = indices[j];
    if (id < 0 || id >= num_rows) {
      record_error(err, kOpEmbeddingBagForward, kArgIndices, id, num_rows, j);
      ok = 0;
    }
  }
  for (int offset = lanes / 2; offset > 0; offset /= 2)
    ok &= __shfl_xor_sync(g.mask, ok, offset, lanes);
  if (!ok) {
    for (int64_t k = g.lane; k < dim; k += lanes) o[k] = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  const int64_t passes = num_passes(dim, lanes);
  for (int64_t pass = 0; pass < passes; ++pass) {
    A acc[kCols];
#pragma unroll
    for (int i = 0; i < kCols; ++i) acc[i] = A(0);
    for (int64_t j = j0; j < j1; ++j) {
      const W* row = weight + indices[j] * dim;
      const A c = psw != nullptr ? psw[j] : A(1);
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        const int64_t k = column(g, pass, i);
        if (k < dim) {
          const A x = static_cast<A>(row[k]);
          acc[i] += psw != nullptr ? mul_rn(x, c) : x;
        }
      }
    }
    const A size = static_cast<A>(j1 - j0);
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int64_t k = column(g, pass, i);
      if (k < dim) o[k] = (mean && j1 > j0) ? acc[i] / size : acc[i];
    }
  }
}

at::Tensor embedding_bag_forward(const at::Tensor& weight_in, const at::Tensor& indices_in,
                                 const at::Tensor& offsets_in,
                                 const std::optional<at::Tensor>& per_sample_weights,
                                 int64_t pooling) {
  constexpr const char* op = "embedding_bag_forward";
  check_embedding_bag_forward(op, weight_in, indices_in, offsets_in, per_sample_weights,
                              pooling);
  c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor indices = indices_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t num_bags = offsets.size(0) - 1, dim = weight.size(1);
  const auto acc_type = accumulation_type(weight.scalar_type());
  at::Tensor out = at::empty({num_bags, dim}, weight.options().dtype(acc_type));
  const at::Tensor psw =
      per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  cudaStream_t stream = current_stream();
  at::Tensor bad = at::zeros({1}, weight.options().dtype(at::kInt));
  launch_check_offsets(offsets, indices.size(0), kOpEmbeddingBagForward, bad, stream);
  if (num_bags == 0) return out;
  const int lanes = lanes_for(dim);
  const dim3 grid(static_cast<unsigned>(ceil_div(num_bags, kThreads / lanes)));
  const bool mean = static_cast<Pooling>(pooling) == Pooling::kMean;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "fastmf.embedding_bag_forward", [&] {
    using W = scalar_t;
    using A = acc_t<W>;
    forward_kernel<W, A><<<grid, kThreads, 0, stream>>>(
        weight.data_ptr<W>(), weight.size(0), dim, id_array(indices), id_array(offsets),
        num_bags, psw.defined() ? psw.data_ptr<A>() : nullptr, mean, bad.data_ptr<int32_t>(),
        lanes, out.data_ptr<A>(), error_record());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// embedding_bag_backward

template <typename G>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const G* __restrict__ grad_output, int64_t dim, int64_t num_indices,
                    IdArray offsets, int64_t num_bags, const G* __restrict__ psw, bool mean,
                    const int32_t* __restrict__ bad_offsets, int lanes, G* __restrict__ rows) {
  const Group g = make_group(lanes);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  if (j >= num_indices) return;
  G* dst = rows + j * dim;
  if (*bad_offsets != 0) {
    for (int64_t k = g.lane; k < dim; k += lanes) dst[k] = G(0);
    return;
  }
  const int64_t b = bag_of_index(offsets, num_bags, j);
  const G* src = grad_output + b * dim;
  const G size = static_cast<G>(offsets[b + 1] - offsets[b]);
  const G c = psw != nullptr ? psw[j] : G(1);
  for (int64_t k = g.lane; k < dim; k += lanes) {
    if (psw != nullptr) dst[k] = mul_rn(src[k], c);
    else if (mean) dst[k] = static_cast<G>(src[k] / size);
    else dst[k] = src[k];
  }
}

at::Tensor embedding_bag_backward(const at::Tensor& grad_output_in, const at::Tensor& indices,
                                  const at::Tensor& offsets_in,
                                  const std::optional<at::Tensor>& per_sample_weights,
                                  int64_t pooling) {
  constexpr const char* op = "embedding_bag_backward";
  check_embedding_bag_backward(op, grad_output_in, indices, offsets_in, per_sample_weights,
                               pooling);
  c10::cuda::CUDAGuard guard(grad_output_in.device());
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t num_indices = indices.size(0), num_bags = offsets.size(0) - 1;
  const int64_t dim = grad_output.size(1);
  at::Tensor rows = at::empty({num_indices, dim}, grad_output.options());
  const at::Tensor psw =
      per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  cudaStream_t stream = current_stream();
  at::Tensor bad = at::zeros({1}, grad_output.options().dtype(at::kInt));
  launch_check_offsets(offsets, num_indices, kOpEmbeddingBagBackward, bad, stream);
  if (num_indices == 0 || dim == 0) return rows;
  const int lanes = lanes_for(dim);
  const dim3 grid(static_cast<unsigned>(ceil_div(num_indices, kThreads / lanes)));
  const bool mean = static_cast<Pooling>(pooling) == Pooling::kMean;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "fastmf.embedding_bag_backward", [&] {
    using G = scalar_t;
    backward_kernel<G><<<grid, kThreads, 0, stream>>>(
        grad_output.data_ptr<G>(), dim, num_indices, id_array(offsets), num_bags,
        psw.defined() ? psw.data_ptr<G>() : nullptr, mean, bad.data_ptr<int32_t>(), lanes,
        rows.data_ptr<G>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return rows;
}

// ---------------------------------------------------------------------------------------
// The steps: where an occurrence's gradient row comes from

// sparse_update: grad_rows[j].
template <typename G>
struct GivenRows {
  const G* rows;
  int64_t dim;

  struct Occurrence {
    const G* row;
  };
  __device__ __forceinline__ Occurrence at(int32_t j) const {
    return Occurrence{rows + static_cast<int64_t>(j) * dim};
  }
  template <typename A>
  __device__ __forceinline__ A value(const Occurrence& o, int64_t k) const {
    return static_cast<A>(o.row[k]);
  }
};

// embedding_bag_backward's row j, formed where it is summed, in G as that op forms it.
template <typename G>
struct BagRows {
  const G* grad_output;
  int64_t dim;
  const int32_t* bag_of;  // (L,)
  IdArray offsets;
  const G* per_sample_weights;  // null: none
  bool mean;

  struct Occurrence {
    const G* row;
    G c;
  };
  __device__ __forceinline__ Occurrence at(int32_t j) const {
    const int64_t b = bag_of[j];
    G c = G(1);
    if (per_sample_weights != nullptr) c = per_sample_weights[j];
    else if (mean) c = static_cast<G>(offsets[b + 1] - offsets[b]);
    return Occurrence{grad_output + b * dim, c};
  }
  template <typename A>
  __device__ __forceinline__ A value(const Occurrence& o, int64_t k) const {
    if (per_sample_weights != nullptr) return static_cast<A>(mul_rn(o.row[k], o.c));
    if (mean) return static_cast<A>(static_cast<G>(o.row[k] / o.c));
    return static_cast<A>(o.row[k]);
  }
};

// ---------------------------------------------------------------------------------------
// The steps: scalars, the sorted runs, the step of one row

// The step's scalars, computed in double on the host as the CPU kernel (and the reference)
// computes them, then used in A.
template <typename A>
struct StepScalars {
  A lr, eps, beta1, one_minus_beta1, beta2, one_minus_beta2;
  A l2, decoupled, adam_step, rowwise_step, bias_correction2;
  bool use_l2, use_decoupled, stochastic;
  int optimizer;
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
    optimizer = static_cast<int>(o.optimizer);
    key = rounding_key(o.seed, o.step);
  }
};

template <typename W, typename A, typename Source>
struct StepArgs {
  // The sorted occurrences (segments.cuh): keys ascending (num_rows for a left-out one),
  // the index of each, stable.
  const uint32_t* keys;
  const int32_t* order;
  const int32_t* run_start;
  int32_t n;
  int64_t num_rows;
  int64_t dim;
  int lanes;
  W* weight;
  A* state1;  // null where the optimizer has none
  A* state2;
  Source source;
  StepScalars<A> s;
  // Partial sums of hot chunks: two rows per window of kHotChunk sorted slots (hot_slot).
  A* partials;
};

// The partial-sum row of the hot chunk that starts at sorted slot `start`, in the run that
// starts at `head`. A window of kHotChunk slots meets at most two runs longer than
// kHotChunk: one that began before the window (slot 0) and one that begins in it (slot 1),
// and each has at most one chunk start in the window.
__device__ __forceinline__ int64_t hot_slot(int32_t start, int32_t head) {
  const int64_t window = start / kHotChunk;
  return window * 2 + (head < window * kHotChunk ? 0 : 1);
}

__device__ __forceinline__ bool is_hot(const uint32_t* keys, int32_t n, int32_t head) {
  return static_cast<int64_t>(head) + kHotChunk < n && keys[head + kHotChunk] == keys[head];
}

// This lane's columns of pass `pass` of the summed gradient of the run at `head`.
template <typename W, typename A, typename Source>
__device__ __forceinline__ void run_gradient(const StepArgs<W, A, Source>& a, const Group& g,
                                             int32_t head, bool hot, int64_t pass,
                                             A (&grad)[kCols]) {
#pragma unroll
  for (int i = 0; i < kCols; ++i) grad[i] = A(0);
  const uint32_t key = a.keys[head];
  if (hot) {
    for (int32_t start = head; start < a.n && a.keys[start] == key; start += kHotChunk) {
      const A* p = a.partials + hot_slot(start, head) * a.dim;
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        const int64_t k = column(g, pass, i);
        if (k < a.dim) grad[i] += p[k];
      }
    }
    return;
  }
  for (int32_t j = head; j < a.n && a.keys[j] == key; ++j) {
    const auto occ = a.source.at(a.order[j]);
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int64_t k = column(g, pass, i);
      if (k < a.dim) grad[i] += a.source.template value<A>(occ, k);
    }
  }
}

// The summed gradient with the L2 term added (g + weight_decay * w), as the step uses it.
template <typename W, typename A, typename Source>
__device__ __forceinline__ void step_gradient(const StepArgs<W, A, Source>& a, const Group& g,
                                              int32_t head, bool hot, int64_t row,
                                              int64_t pass, A (&grad)[kCols]) {
  run_gradient(a, g, head, hot, pass, grad);
  if (!a.s.use_l2) return;
  const W* w_row = a.weight + row * a.dim;
#pragma unroll
  for (int i = 0; i < kCols; ++i) {
    const int64_t k = column(g, pass, i);
    if (k < a.dim) grad[i] = grad[i] + mul_rn(a.s.l2, static_cast<A>(w_row[k]));
  }
}

// Stage 1: the partial sum of every hot chunk, one group per chunk (a group per sorted slot;
// those that start no hot chunk return at once).
template <typename W, typename A, typename Source>
__global__ void __launch_bounds__(kThreads) hot_chunks_kernel(const StepArgs<W, A, Source> a) {
  const Group g = make_group(a.lanes);
  const int64_t slot =
      static_cast<int64_t>(blockIdx.x) * (kThreads / a.lanes) + threadIdx.x / a.lanes;
  if (slot >= a.n) return;
  const int32_t start = static_cast<int32_t>(slot);
  const uint32_t key = a.keys[start];
  if (static_cast<int64_t>(key) >= a.num_rows) return;  // left-out occurrences
  const int32_t head = a.run_start[start];
  if ((start - head) % kHotChunk != 0 || !is_hot(a.keys, a.n, head)) return;
  const int32_t end = static_cast<int32_t>(
      min(static_cast<long long>(start) + kHotChunk, static_cast<long long>(a.n)));
  A* p = a.partials + hot_slot(start, head) * a.dim;
  const int64_t passes = num_passes(a.dim, a.lanes);
  for (int64_t pass = 0; pass < passes; ++pass) {
    A acc[kCols];
#pragma unroll
    for (int i = 0; i < kCols; ++i) acc[i] = A(0);
    for (int32_t j = start; j < end && a.keys[j] == key; ++j) {
      const auto occ = a.source.at(a.order[j]);
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        const int64_t k = column(g, pass, i);
        if (k < a.dim) acc[i] += a.source.template value<A>(occ, k);
      }
    }
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int64_t k = column(g, pass, i);
      if (k < a.dim) p[k] = acc[i];
    }
  }
}

// The CPU kernel's sum_of_squares of a row (four interleaved sums over the columns below a
// multiple of four, then the tail, combined as ((s0 + s2) + (s1 + s3)) + tail): every
// lane receives every square by shuffle, in column order, so all lanes end with the sum.
template <typename A>
__device__ __forceinline__ void add_squares(const Group& g, int64_t pass, int64_t dim,
                                            const A (&grad)[kCols], A (&sums)[4], A& tail) {
  const int64_t body = dim - dim % 4;
#pragma unroll
  for (int i = 0; i < kCols; ++i) {
    const A square = mul_rn(grad[i], grad[i]);
    for (int src = 0; src < g.size; ++src) {
      const A x = group_broadcast(g, square, src);
      const int64_t k = (pass * kCols + i) * g.size + src;
      if (k < body) sums[k % 4] += x;
      else if (k < dim) tail += x;
    }
  }
}

// Stage 2: one step of every touched row, from the group at the head of its run.
template <typename W, typename A, typename Source>
__global__ void __launch_bounds__(kThreads) step_rows_kernel(const StepArgs<W, A, Source> a) {
  const Group g = make_group(a.lanes);
  const int64_t slot =
      static_cast<int64_t>(blockIdx.x) * (kThreads / a.lanes) + threadIdx.x / a.lanes;
  if (slot >= a.n) return;
  const int32_t head = static_cast<int32_t>(slot);
  const uint32_t key = a.keys[head];
  if (head > 0 && a.keys[head - 1] == key) return;  // not a run's head
  if (static_cast<int64_t>(key) >= a.num_rows) return;
  const int64_t row = key, dim = a.dim;
  const bool hot = is_hot(a.keys, a.n, head);
  const StepScalars<A>& s = a.s;
  const auto opt = static_cast<Optimizer>(s.optimizer);
  const bool rowwise = opt == Optimizer::kRowwiseAdagrad || opt == Optimizer::kRowwiseAdam;
  const int64_t passes = num_passes(dim, a.lanes);

  // The row-wise optimizers need the mean square of the whole gradient (L2 term included)
  // first; its columns are summed again in the update pass (the same bits) rather than kept,
  // and the weights it read are only written in that pass.
  A row_value = A(0);  // row-wise: the denominator of the step
  if (rowwise) {
    A sums[4] = {A(0), A(0), A(0), A(0)}, tail = A(0);
    for (int64_t pass = 0; pass < passes; ++pass) {
      A grad[kCols];
      step_gradient(a, g, head, hot, row, pass, grad);
      add_squares(g, pass, dim, grad, sums, tail);
    }
    const A mean = (((sums[0] + sums[2]) + (sums[1] + sums[3])) + tail) / static_cast<A>(dim);
    // One lane reads and writes the row's state; the others get the result by shuffle, so
    // no lane reads it after it was written.
    A denom = A(0);
    if (g.lane == 0) {
      if (opt == Optimizer::kRowwiseAdagrad) {
        const A sum = a.state1[row] + mean;
        a.state1[row] = sum;
        denom = sqrt(sum) + s.eps;
      } else {
        const A exp_avg_sq = mul_rn(s.beta2, a.state2[row]) + mul_rn(s.one_minus_beta2, mean);
        a.state2[row] = exp_avg_sq;
        denom = sqrt(exp_avg_sq / s.bias_correction2) + s.eps;
      }
    }
    row_value = group_broadcast(g, denom, 0);
  }

  W* w_row = a.weight + row * dim;
  for (int64_t pass = 0; pass < passes; ++pass) {
    A grad[kCols];
    step_gradient(a, g, head, hot, row, pass, grad);
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int64_t k = column(g, pass, i);
      if (k >= dim) continue;
      const A gk = grad[i];
      A w = static_cast<A>(w_row[k]);
      if (s.use_decoupled) w = w - mul_rn(s.decoupled, w);
      const int64_t e = row * dim + k;
      switch (opt) {
        case Optimizer::kSgd:
          w = w - mul_rn(s.lr, gk);
          break;
        case Optimizer::kAdagrad: {
          const A sum = a.state1[e] + mul_rn(gk, gk);
          a.state1[e] = sum;
          w = w - mul_rn(s.lr, gk) / (sqrt(sum) + s.eps);
          break;
        }
        case Optimizer::kRowwiseAdagrad:
          w = w - mul_rn(s.lr, gk) / row_value;
          break;
        case Optimizer::kAdam: {
          const A m = mul_rn(s.beta1, a.state1[e]) + mul_rn(s.one_minus_beta1, gk);
          const A v = mul_rn(s.beta2, a.state2[e]) + mul_rn(s.one_minus_beta2, mul_rn(gk, gk));
          a.state1[e] = m;
          a.state2[e] = v;
          w = w - mul_rn(s.adam_step, m) / (sqrt(v) + s.eps);
          break;
        }
        default: {  // row-wise Adam
          const A m = mul_rn(s.beta1, a.state1[e]) + mul_rn(s.one_minus_beta1, gk);
          a.state1[e] = m;
          w = w - mul_rn(s.rowwise_step, m) / row_value;
          break;
        }
      }
      w_row[k] = store_value<W, A>(w, row, k, s.stochastic, s.key);
    }
  }
}

// Sort keys of the occurrences: the id, or num_rows (past every row) for a bad id and for
// every occurrence when the offsets are bad (nothing is then written); for the fused step
// also the bag of each occurrence.
__global__ void __launch_bounds__(kThreads)
    prepare_kernel(IdArray ids, int32_t n, int64_t num_rows, int op, int arg,
                   const int32_t* __restrict__ bad_offsets, IdArray offsets, int64_t num_bags,
                   uint32_t* __restrict__ keys, int32_t* __restrict__ positions,
                   int32_t* __restrict__ bag_of, ErrorRecord* err) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n) return;
  const long long id = ids[j];
  bool ok = id >= 0 && id < num_rows;
  if (!ok) record_error(err, op, arg, id, num_rows, j);
  if (bad_offsets != nullptr) {
    if (*bad_offsets != 0) ok = false;
    else bag_of[j] = static_cast<int32_t>(bag_of_index(offsets, num_bags, j));
  }
  keys[j] = ok ? static_cast<uint32_t>(id) : static_cast<uint32_t>(num_rows);
  positions[j] = static_cast<int32_t>(j);
}

// What the CUDA steps need beyond the shared checks, before any launch: tables and states
// updated in place through their own storage, and 32-bit sort keys and positions.
void check_step_layout(const char* op, const RowTable& table, int64_t n) {
  check_contiguous(op, "weight", table.weight);
  if (table.state1.defined()) check_contiguous(op, "state1", table.state1);
  if (table.state2.defined()) check_contiguous(op, "state2", table.state2);
  check_fits_32bit(op, "weight row count", table.weight.size(0));
  check_fits_32bit(op, "batch size", n);
}

// Calls f(W{}, G{}) with the table's type W and the gradient's type G (W's own or float32).
template <typename F>
void dispatch_weight_and_grad(at::ScalarType weight, at::ScalarType grad, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight, "fastmf.embedding_bag", [&] {
    using W = scalar_t;
    if constexpr (std::is_same_v<W, c10::Half> || std::is_same_v<W, c10::BFloat16>) {
      if (grad != weight) {
        f(W{}, float{});
        return;
      }
    }
    f(W{}, W{});
  });
}

// Sorts the prepared keys and runs both stages.
template <typename W, typename A, typename Source>
void grouped_step(const RowTable& table, const at::Tensor& keys, const at::Tensor& positions,
                  const Source& source, const RowOptimizerArgs& opt) {
  const int64_t n = keys.numel();
  const int64_t num_rows = table.weight.size(0);
  const int64_t dim = table.weight.dim() == 2 ? table.weight.size(1) : 1;
  const SortedRuns sorted = sort_runs(keys, positions, static_cast<uint64_t>(num_rows));
  const int lanes = lanes_for(dim);
  const auto acc_type = c10::CppTypeToScalarType<A>::value;
  at::Tensor partials =
      at::empty({2 * ceil_div(n, kHotChunk) * dim}, table.weight.options().dtype(acc_type));
  StepArgs<W, A, Source> a{
      reinterpret_cast<const uint32_t*>(sorted.keys.data_ptr<int32_t>()),
      sorted.positions.data_ptr<int32_t>(),
      sorted.run_start.data_ptr<int32_t>(),
      static_cast<int32_t>(n),
      num_rows,
      dim,
      lanes,
      table.weight.data_ptr<W>(),
      table.state1.defined() ? table.state1.data_ptr<A>() : nullptr,
      table.state2.defined() ? table.state2.data_ptr<A>() : nullptr,
      source,
      StepScalars<A>(opt),
      partials.data_ptr<A>()};
  cudaStream_t stream = current_stream();
  const dim3 grid(static_cast<unsigned>(ceil_div(n, kThreads / lanes)));
  hot_chunks_kernel<W, A, Source><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  step_rows_kernel<W, A, Source><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// After the checks of the op boundary (csrc/ops.h).
void sparse_update(const RowTable& table, const at::Tensor& ids_in,
                   const at::Tensor& grad_rows_in, const RowOptimizerArgs& opt) {
  constexpr const char* op = "sparse_update";
  const int64_t n = ids_in.size(0);
  check_step_layout(op, table, n);
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(table.weight.device());
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor grad_rows = grad_rows_in.contiguous();
  const int64_t num_rows = table.weight.size(0);
  const int64_t dim = table.weight.dim() == 2 ? table.weight.size(1) : 1;
  at::Tensor keys = at::empty({n}, table.weight.options().dtype(at::kInt));
  at::Tensor positions = at::empty({n}, table.weight.options().dtype(at::kInt));
  cudaStream_t stream = current_stream();
  prepare_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      id_array(ids), static_cast<int32_t>(n), num_rows, kOpSparseUpdate, kArgIds, nullptr,
      IdArray{nullptr, false}, 0, reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()),
      positions.data_ptr<int32_t>(), nullptr, error_record());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dispatch_weight_and_grad(table.weight.scalar_type(), grad_rows.scalar_type(),
                           [&](auto w_tag, auto g_tag) {
    using W = decltype(w_tag);
    using G = decltype(g_tag);
    using A = acc_t<W>;
    grouped_step<W, A>(table, keys, positions, GivenRows<G>{grad_rows.data_ptr<G>(), dim},
                       opt);
  });
}

void embedding_bag_backward_update(const RowTable& table, const at::Tensor& grad_output_in,
                                   const Bags& bags, const RowOptimizerArgs& opt) {
  constexpr const char* op = "embedding_bag_backward_update";
  const int64_t n = bags.indices.size(0);
  check_step_layout(op, table, n);
  c10::cuda::CUDAGuard guard(table.weight.device());
  const at::Tensor offsets = bags.offsets.contiguous();
  cudaStream_t stream = current_stream();
  at::Tensor bad = at::zeros({1}, table.weight.options().dtype(at::kInt));
  // Checked even for no indices, as the CPU kernel reads them.
  launch_check_offsets(offsets, n, kOpEmbeddingBagBackwardUpdate, bad, stream);
  if (n == 0) return;
  const at::Tensor indices = bags.indices.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor psw =
      bags.per_sample_weights.defined() ? bags.per_sample_weights.contiguous() : at::Tensor();
  const int64_t num_rows = table.weight.size(0), num_bags = offsets.size(0) - 1;
  const int64_t dim = table.weight.size(1);
  at::Tensor keys = at::empty({n}, table.weight.options().dtype(at::kInt));
  at::Tensor positions = at::empty({n}, table.weight.options().dtype(at::kInt));
  at::Tensor bag_of = at::empty({n}, table.weight.options().dtype(at::kInt));
  prepare_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      id_array(indices), static_cast<int32_t>(n), num_rows, kOpEmbeddingBagBackwardUpdate,
      kArgIndices, bad.data_ptr<int32_t>(), id_array(offsets), num_bags,
      reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()), positions.data_ptr<int32_t>(),
      bag_of.data_ptr<int32_t>(), error_record());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dispatch_weight_and_grad(table.weight.scalar_type(), grad_output.scalar_type(),
                           [&](auto w_tag, auto g_tag) {
    using W = decltype(w_tag);
    using G = decltype(g_tag);
    using A = acc_t<W>;
    const BagRows<G> source{grad_output.data_ptr<G>(), dim, bag_of.data_ptr<int32_t>(),
                            id_array(offsets), psw.defined() ? psw.data_ptr<G>() : nullptr,
                            bags.pooling == Pooling::kMean};
    grouped_step<W, A>(table, keys, positions, source, opt);
  });
}

// Two tables' updates over the same bags: each table's layout checked before either is
// written, then embedding_bag_backward_update on each in turn (the CPU kernel groups the
// bags once for both; here the grouping is a device sort per table, and the pair saves a
// launch sequence's host work at most).
void embedding_bag_backward_update_pair(const RowTable& table, const at::Tensor& grad_output,
                                        const RowOptimizerArgs& opt, const RowTable& table_b,
                                        const at::Tensor& grad_output_b,
                                        const RowOptimizerArgs& opt_b, const Bags& bags) {
  constexpr const char* op = "embedding_bag_backward_update_pair";
  check_step_layout(op, table, bags.indices.size(0));
  check_step_layout(op, table_b, bags.indices.size(0));
  embedding_bag_backward_update(table, grad_output, bags, opt);
  embedding_bag_backward_update(table_b, grad_output_b, bags, opt_b);
}

// scatter_rows, with no kernel of its own: sparse_update's SGD step on a zero table of the
// accumulation type with lr = -1, so each touched row becomes 0 - (-1) g = g exactly, the
// sum of its rows in index order (the grouping is stable). Runs longer than kHotChunk are
// summed chunk by chunk, as every step of this family sums them; the CPU's scatter_rows
// adds such a run in one pass, so a row hit more than kHotChunk times may differ from it in
// the last bits. A bad id is recorded under sparse_update's name and left out, as in the
// step: no host synchronisation.
at::Tensor scatter_rows(const at::Tensor& ids, const at::Tensor& rows, int64_t num_rows) {
  check_scatter_rows("scatter_rows", ids, rows, num_rows);
  c10::cuda::CUDAGuard guard(rows.device());
  const int64_t n = ids.size(0);
  const int64_t dim = rows.dim() == 2 ? rows.size(1) : 1;
  const auto acc_type = accumulation_type(rows.scalar_type());
  at::Tensor table = at::zeros({num_rows, dim}, rows.options().dtype(acc_type));
  const RowOptimizerArgs opt{Optimizer::kSgd, -1.0, 0.0, 0.0, 0.0, 0.0, WeightDecay::kNone,
                             1, 0, false};
  sparse_update(RowTable{table, at::Tensor(), at::Tensor()}, ids,
                rows.reshape({n, dim}).to(acc_type), opt);
  std::vector<int64_t> sizes = rows.sizes().vec();
  sizes[0] = num_rows;
  return table.view(sizes).to(rows.scalar_type());
}

// unique_bags, with no kernel of its own: the reference's composition (a sorted unique,
// gathers of the row pointers, a cumulative sum, the entries gathered). Its output sizes
// depend on the ids, so it synchronises with the host as torch.unique does; the ids' range
// and the named rows' pointers are checked on the host on the way, so a bad one raises
// the CPU's error here rather than being recorded on the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unique_bags(
    const at::Tensor& ids, const at::Tensor& indptr, const at::Tensor& indices,
    const at::Tensor& weights) {
  constexpr const char* op = "unique_bags";
  check_unique_bags(op, ids, indptr, indices, weights);
  c10::cuda::CUDAGuard guard(ids.device());
  const int64_t num_rows = indptr.size(0) - 1;
  const int64_t nnz = indices.size(0);
  const at::Tensor flat = ids.to(at::kLong);
  check_device_id_range(op, "ids", flat, num_rows);
  const auto unique = at::_unique2(flat, /*sorted=*/true, /*return_inverse=*/true,
                                   /*return_counts=*/false);
  const at::Tensor& distinct = std::get<0>(unique);
  const at::Tensor& inverse = std::get<1>(unique);
  const at::Tensor ptr = indptr.to(at::kLong);
  const at::Tensor starts = ptr.index_select(0, distinct);
  const at::Tensor ends = ptr.index_select(0, distinct.add(1));
  const at::Tensor bad =
      starts.lt(0).logical_or_(starts.gt(ends)).logical_or_(ends.gt(nnz)).nonzero();
  if (bad.size(0) > 0) {
    const int64_t g = bad[0][0].item<int64_t>();
    check_bag_row(op, distinct[g].item<int64_t>(), starts[g].item<int64_t>(),
                  ends[g].item<int64_t>(), nnz);
  }
  const at::Tensor lengths = ends.sub(starts);
  const at::Tensor offsets = at::cat({lengths.new_zeros({1}), lengths.cumsum(0)});
  const int64_t total = offsets[offsets.size(0) - 1].item<int64_t>();
  check_bag_total(op, total, indices.scalar_type());
  // Entry t of bag g is row distinct[g]'s entry starts[g] + (t - offsets[g]).
  const at::Tensor pos =
      at::arange(total, ptr.options())
          .add_(at::repeat_interleave(starts.sub(offsets.narrow(0, 0, distinct.size(0))),
                                      lengths, /*dim=*/0, /*output_size=*/total));
  return {distinct, inverse, indices.index_select(0, pos), offsets.to(indices.scalar_type()),
          weights.index_select(0, pos)};
}

}  // namespace

at::Tensor scatter_rows_for(const at::Tensor& ids, const at::Tensor& rows, int64_t num_rows) {
  return scatter_rows(ids, rows, num_rows);
}

}  // namespace fastmf::cuda

TORCH_LIBRARY_IMPL(fastmf, CUDA, m) {
  m.impl("embedding_bag_forward", &fastmf::cuda::embedding_bag_forward);
  m.impl("embedding_bag_backward", &fastmf::cuda::embedding_bag_backward);
  m.impl("scatter_rows", &fastmf::cuda::scatter_rows);
  m.impl("unique_bags", &fastmf::cuda::unique_bags);
  m.impl("sparse_update", &fastmf::sparse_update_op<fastmf::cuda::sparse_update>);
  m.impl("embedding_bag_backward_update",
         &fastmf::embedding_bag_backward_update_op<fastmf::cuda::embedding_bag_backward_update>);
  m.impl("embedding_bag_backward_update_pair",
         &fastmf::embedding_bag_backward_update_pair_op<
             fastmf::cuda::embedding_bag_backward_update_pair>);
}
