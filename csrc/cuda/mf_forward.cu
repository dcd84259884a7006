// mf_forward and mf_backward on the GPU: one group of lanes per sample (see common.cuh), so
// a warp serves 32/L samples at small K and every load is a full 16-byte pack when the rows
// are aligned. Both are pure gathers: the row reads dominate, nothing is reused.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

#include "common.cuh"
#include "inputs.h"

namespace fastmf::cuda {
namespace {

// Reads both ids of sample b and checks them against the tables; records (once per
// sample) and returns false for a bad one so no row is read through it.
__device__ __forceinline__ bool load_pair(const IdArray& users, const IdArray& items,
                                          long long b, long long num_users, long long num_items,
                                          int op, ErrorRecord* err, const Group& g,
                                          long long& u, long long& i) {
  u = users[b];
  i = items[b];
  const bool ok_u = u >= 0 && u < num_users;
  const bool ok_i = i >= 0 && i < num_items;
  if (g.lane == 0) {
    if (!ok_u) record_error(err, op, kArgUsers, u, num_users, b);
    if (!ok_i) record_error(err, op, kArgItems, i, num_items, b);
  }
  return ok_u && ok_i;
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    mf_forward_kernel(IdArray users, IdArray items, const scalar_t* __restrict__ user_factors,
                      const scalar_t* __restrict__ item_factors,
                      const scalar_t* __restrict__ user_bias,
                      const scalar_t* __restrict__ item_bias, scalar_t global_mean,
                      long long batch, long long num_users, long long num_items, long long dim,
                      int lanes, scalar_t* __restrict__ out, ErrorRecord* err) {
  const Group g = make_group(lanes);
  const long long b =
      static_cast<long long>(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  if (b >= batch) return;  // uniform over the group
  long long u, i;
  if (!load_pair(users, items, b, num_users, num_items, kOpMfForward, err, g, u, i)) {
    if (g.lane == 0) out[b] = std::numeric_limits<scalar_t>::quiet_NaN();
    return;
  }
  const scalar_t* p = user_factors + u * dim;
  const scalar_t* q = item_factors + i * dim;
  scalar_t dot = 0;
  for (long long e = static_cast<long long>(g.lane) * V; e < dim; e += static_cast<long long>(lanes) * V) {
    const Pack<scalar_t, V> pp = load_pack<scalar_t, V>(p + e);
    const Pack<scalar_t, V> qq = load_pack<scalar_t, V>(q + e);
#pragma unroll
    for (int v = 0; v < V; ++v) dot += pp.v[v] * qq.v[v];
  }
  dot = group_sum(g, dot);
  if (g.lane == 0) {
    scalar_t pred = dot + global_mean;
    if (user_bias != nullptr) pred = pred + user_bias[u] + item_bias[i];
    out[b] = pred;
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    mf_backward_kernel(const scalar_t* __restrict__ grad_out, IdArray users, IdArray items,
                       const scalar_t* __restrict__ user_factors,
                       const scalar_t* __restrict__ item_factors, long long batch,
                       long long num_users, long long num_items, long long dim, int lanes,
                       scalar_t* __restrict__ grad_user_rows,
                       scalar_t* __restrict__ grad_item_rows, ErrorRecord* err) {
  const Group g = make_group(lanes);
  const long long b =
      static_cast<long long>(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  if (b >= batch) return;
  long long u, i;
  const bool ok = load_pair(users, items, b, num_users, num_items, kOpMfBackward, err, g, u, i);
  const scalar_t go = grad_out[b];
  scalar_t* gp = grad_user_rows + b * dim;
  scalar_t* gq = grad_item_rows + b * dim;
  for (long long e = static_cast<long long>(g.lane) * V; e < dim; e += static_cast<long long>(lanes) * V) {
    Pack<scalar_t, V> rp = zero_pack<scalar_t, V>(), rq = zero_pack<scalar_t, V>();
    if (ok) {
      const Pack<scalar_t, V> pp = load_pack<scalar_t, V>(user_factors + u * dim + e);
      const Pack<scalar_t, V> qq = load_pack<scalar_t, V>(item_factors + i * dim + e);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        rp.v[v] = go * qq.v[v];
        rq.v[v] = go * pp.v[v];
      }
    }
    store_pack<scalar_t, V>(gp + e, rp);
    store_pack<scalar_t, V>(gq + e, rq);
  }
}

// 16-byte packs when every row start is 16-byte aligned.
template <typename scalar_t>
bool can_pack(int64_t dim, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (dim % V != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

at::Tensor mf_forward_cuda(const at::Tensor& users, const at::Tensor& items,
                           const at::Tensor& user_factors, const at::Tensor& item_factors,
                           const std::optional<at::Tensor>& user_bias,
                           const std::optional<at::Tensor>& item_bias, double global_mean) {
  constexpr const char* op = "mf_forward";
  check_tables(op, users, items, user_factors, item_factors, user_bias, item_bias);
  c10::cuda::CUDAGuard guard(user_factors.device());
  const int64_t batch = users.size(0), dim = user_factors.size(1);
  at::Tensor out = at::empty({batch}, user_factors.options());
  if (batch == 0) return out;
  const at::Tensor u = users.contiguous(), i = items.contiguous();
  const at::Tensor p = user_factors.contiguous(), q = item_factors.contiguous();
  at::Tensor bu, bi;
  if (user_bias.has_value()) {
    bu = user_bias->contiguous();
    bi = item_bias->contiguous();
  }
  ErrorRecord* err = error_record();
  cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "fastmf_mf_forward_cuda", [&] {
    const scalar_t* bu_ptr = bu.defined() ? bu.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bi_ptr = bi.defined() ? bi.data_ptr<scalar_t>() : nullptr;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool packed = can_pack<scalar_t>(dim, {p.data_ptr(), q.data_ptr()});
    const RowLayout layout = row_layout(dim, packed ? kVec : 1);
    const int64_t per_block = kThreads / layout.lanes;
    const dim3 grid(static_cast<unsigned>(ceil_div(batch, per_block)));
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(
          id_array(u), id_array(i), p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), bu_ptr,
          bi_ptr, static_cast<scalar_t>(global_mean), batch, p.size(0), q.size(0), dim,
          layout.lanes, out.data_ptr<scalar_t>(), err);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) launch(mf_forward_kernel<scalar_t, kVec>);
    else launch(mf_forward_kernel<scalar_t, 1>);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mf_backward_cuda(const at::Tensor& grad_out,
                                                     const at::Tensor& users,
                                                     const at::Tensor& items,
                                                     const at::Tensor& user_factors,
                                                     const at::Tensor& item_factors) {
  constexpr const char* op = "mf_backward";
  check_tables(op, users, items, user_factors, item_factors, std::nullopt, std::nullopt);
  check_like(op, "grad_out", grad_out, "user_factors", user_factors);
  TORCH_CHECK_VALUE(grad_out.dim() == 1, "fastmf.", op, ": grad_out must be 1-D, got shape ",
                    grad_out.sizes());
  check_same_length(op, "grad_out", grad_out, "users", users);
  c10::cuda::CUDAGuard guard(user_factors.device());
  const int64_t batch = users.size(0), dim = user_factors.size(1);
  at::Tensor grad_p = at::empty({batch, dim}, user_factors.options());
  at::Tensor grad_q = at::empty({batch, dim}, user_factors.options());
  if (batch == 0 || dim == 0) return {grad_p, grad_q};
  const at::Tensor go = grad_out.contiguous();
  const at::Tensor u = users.contiguous(), i = items.contiguous();
  const at::Tensor p = user_factors.contiguous(), q = item_factors.contiguous();
  ErrorRecord* err = error_record();
  cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "fastmf_mf_backward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool packed = can_pack<scalar_t>(
        dim, {p.data_ptr(), q.data_ptr(), grad_p.data_ptr(), grad_q.data_ptr()});
    const RowLayout layout = row_layout(dim, packed ? kVec : 1);
    const int64_t per_block = kThreads / layout.lanes;
    const dim3 grid(static_cast<unsigned>(ceil_div(batch, per_block)));
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(
          go.data_ptr<scalar_t>(), id_array(u), id_array(i), p.data_ptr<scalar_t>(),
          q.data_ptr<scalar_t>(), batch, p.size(0), q.size(0), dim, layout.lanes,
          grad_p.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(), err);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) launch(mf_backward_kernel<scalar_t, kVec>);
    else launch(mf_backward_kernel<scalar_t, 1>);
  });
  return {grad_p, grad_q};
}

}  // namespace
}  // namespace fastmf::cuda

TORCH_LIBRARY_IMPL(fastmf, CUDA, m) {
  m.impl("mf_forward", &fastmf::cuda::mf_forward_cuda);
  m.impl("mf_backward", &fastmf::cuda::mf_backward_cuda);
}
