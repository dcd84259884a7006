// sparse_adagrad_update and sparse_sgd_update on the GPU: sort the ids, sum each row's
// gradient rows, update each row once (segment_update.cuh). Bad ids are left out of the
// update and recorded on the device (errors.cu).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "common.cuh"
#include "inputs.h"
#include "segment_update.cuh"
#include "sort.h"

namespace fastmf::cuda {
namespace {

// Sort keys: the id, or num_rows (past every row) for a bad id.
__global__ void __launch_bounds__(kThreads)
    prepare_ids(IdArray ids, int32_t n, int64_t num_rows, int op, uint32_t* __restrict__ keys,
                int32_t* __restrict__ positions, ErrorRecord* err) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= n) return;
  const long long id = ids[b];
  const bool ok = id >= 0 && id < num_rows;
  if (!ok) record_error(err, op, kArgIds, id, num_rows, b);
  keys[b] = ok ? static_cast<uint32_t>(id) : static_cast<uint32_t>(num_rows);
  positions[b] = static_cast<int32_t>(b);
}

void check_update_inputs(const char* op, const at::Tensor& weight, const at::Tensor& ids,
                         const at::Tensor& grad_rows) {
  TORCH_CHECK_VALUE(weight.dim() == 1 || weight.dim() == 2, "fastmf.", op,
                    ": weight must be 1-D or 2-D, got shape ", weight.sizes());
  check_weight(op, "weight", weight, weight.dim());
  check_contiguous(op, "weight", weight);
  check_id_dtype(op, "ids", ids);
  check_like_device(op, "ids", ids, "weight", weight);
  check_like(op, "grad_rows", grad_rows, "weight", weight);
  std::vector<int64_t> expected{ids.size(0)};
  if (weight.dim() == 2) expected.push_back(weight.size(1));
  check_shape(op, "grad_rows", grad_rows, expected);
  check_fits_32bit(op, "weight row count", weight.size(0));
  check_fits_32bit(op, "batch size", ids.size(0));
}

void run_update(const char* op, int op_code, const at::Tensor& weight,
                const std::optional<at::Tensor>& state, const at::Tensor& ids,
                const at::Tensor& grad_rows, int optimizer, double lr, double eps) {
  const int64_t n = ids.size(0);
  if (n == 0) return;
  const int64_t num_rows = weight.size(0);
  const int64_t dim = weight.dim() == 2 ? weight.size(1) : 1;
  const at::Tensor id_tensor = ids.contiguous();
  const at::Tensor grads = grad_rows.contiguous();
  at::Tensor keys = at::empty({n}, weight.options().dtype(at::kInt));
  at::Tensor positions = at::empty({n}, weight.options().dtype(at::kInt));
  cudaStream_t stream = current_stream();
  prepare_ids<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      id_array(id_tensor), static_cast<int32_t>(n), num_rows, op_code,
      reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()), positions.data_ptr<int32_t>(),
      error_record());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const SortedRuns sorted = sort_runs(keys, positions, static_cast<uint64_t>(num_rows));
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "fastmf_sparse_update_cuda", [&] {
    SegmentArgs<scalar_t> a;
    a.keys = reinterpret_cast<const uint32_t*>(sorted.keys.data_ptr<int32_t>());
    a.positions = sorted.positions.data_ptr<int32_t>();
    a.run_start = sorted.run_start.data_ptr<int32_t>();
    a.n = static_cast<int32_t>(n);
    a.num_rows = num_rows;
    a.dim = dim;
    a.weight = weight.data_ptr<scalar_t>();
    a.state = state.has_value() ? state->data_ptr<scalar_t>() : nullptr;
    a.grad_rows = grads.data_ptr<scalar_t>();
    a.optimizer = optimizer;
    a.lr = static_cast<scalar_t>(lr);
    a.eps = static_cast<scalar_t>(eps);
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool elementwise_state = optimizer == kAdagrad;
    const bool packed = dim % kVec == 0 && aligned16(a.weight) && aligned16(a.grad_rows) &&
                        (!elementwise_state || aligned16(a.state));
    run_segment_update<scalar_t>(a, packed, weight);
  });
}

// The C++ signatures must equal the CPU kernels' (const references), or the dispatcher
// refuses to register both for one op; the tensor handles are copied (cheaply) inside.
void sparse_adagrad_update_cuda(const at::Tensor& weight_arg, const at::Tensor& state_arg,
                                const at::Tensor& ids, const at::Tensor& grad_rows, double lr,
                                double eps, bool rowwise) {
  at::Tensor weight = weight_arg;
  at::Tensor state = state_arg;
  constexpr const char* op = "sparse_adagrad_update";
  check_update_inputs(op, weight, ids, grad_rows);
  check_like(op, "state", state, "weight", weight);
  // A 1-D table has one value per row, so row-wise and element-wise Adagrad coincide.
  const bool rowwise_2d = rowwise && weight.dim() == 2;
  if (rowwise_2d) {
    check_shape(op, "state", state, {weight.size(0)});
  } else {
    check_shape(op, "state", state, weight.sizes());
  }
  check_contiguous(op, "state", state);
  c10::cuda::CUDAGuard guard(weight.device());
  run_update(op, kOpSparseAdagrad, weight, state, ids, grad_rows,
             rowwise_2d ? kRowwiseAdagrad : kAdagrad, lr, eps);
}

void sparse_sgd_update_cuda(const at::Tensor& weight_arg, const at::Tensor& ids,
                            const at::Tensor& grad_rows, double lr) {
  at::Tensor weight = weight_arg;
  constexpr const char* op = "sparse_sgd_update";
  check_update_inputs(op, weight, ids, grad_rows);
  c10::cuda::CUDAGuard guard(weight.device());
  run_update(op, kOpSparseSgd, weight, std::nullopt, ids, grad_rows, kSgd, lr, 0.0);
}

}  // namespace
}  // namespace fastmf::cuda

TORCH_LIBRARY_IMPL(fastmf, CUDA, m) {
  m.impl("sparse_adagrad_update", &fastmf::cuda::sparse_adagrad_update_cuda);
  m.impl("sparse_sgd_update", &fastmf::cuda::sparse_sgd_update_cuda);
}
