// mf_forward and mf_backward on the CPU. Both are gathers plus one K-length dot product
// or scale per sample, so they parallelise over the batch with no shared writes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace fastmf {
namespace cpu {
namespace {

constexpr int64_t kGrain = 512;

at::Tensor mf_forward(const at::Tensor& users, const at::Tensor& items,
                      const at::Tensor& user_factors, const at::Tensor& item_factors,
                      const std::optional<at::Tensor>& user_bias,
                      const std::optional<at::Tensor>& item_bias, double global_mean) {
  const char* op = "mf_forward";
  check_mf_tables(op, users, items, user_factors, item_factors, user_bias, item_bias);
  std::vector<int64_t> u, i;
  load_ids(op, "users", users.contiguous(), user_factors.size(0), u);
  load_ids(op, "items", items.contiguous(), item_factors.size(0), i);
  const int64_t batch = users.size(0);
  const int64_t dim = user_factors.size(1);
  const at::Tensor P = user_factors.contiguous();
  const at::Tensor Q = item_factors.contiguous();
  const bool has_bias = user_bias.has_value();
  const at::Tensor bu = has_bias ? user_bias->contiguous() : at::Tensor();
  const at::Tensor bi = has_bias ? item_bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({batch}, P.options());
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "fastmf.mf_forward", [&] {
    const scalar_t* p = P.data_ptr<scalar_t>();
    const scalar_t* q = Q.data_ptr<scalar_t>();
    const scalar_t* bu_ = has_bias ? bu.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bi_ = has_bias ? bi.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t mu = static_cast<scalar_t>(global_mean);
    at::parallel_for(0, batch, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        // Same association as the reference: ((dot + mu) + b_u) + b_i.
        scalar_t pred = dot(p + u[b] * dim, q + i[b] * dim, dim) + mu;
        if (bu_ != nullptr) pred = pred + bu_[u[b]] + bi_[i[b]];
        o[b] = pred;
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mf_backward(const at::Tensor& grad_out,
                                               const at::Tensor& users,
                                               const at::Tensor& items,
                                               const at::Tensor& user_factors,
                                               const at::Tensor& item_factors) {
  const char* op = "mf_backward";
  check_mf_tables(op, users, items, user_factors, item_factors, std::nullopt, std::nullopt);
  check_weight(op, "grad_out", grad_out, 1);
  check_like(op, "grad_out", grad_out, "user_factors", user_factors);
  check_same_length(op, "grad_out", grad_out, "users", users);
  std::vector<int64_t> u, i;
  load_ids(op, "users", users.contiguous(), user_factors.size(0), u);
  load_ids(op, "items", items.contiguous(), item_factors.size(0), i);
  const int64_t batch = users.size(0);
  const int64_t dim = user_factors.size(1);
  const at::Tensor P = user_factors.contiguous();
  const at::Tensor Q = item_factors.contiguous();
  const at::Tensor G = grad_out.contiguous();
  at::Tensor grad_p = at::empty({batch, dim}, P.options());
  at::Tensor grad_q = at::empty({batch, dim}, P.options());
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "fastmf.mf_backward", [&] {
    const scalar_t* p = P.data_ptr<scalar_t>();
    const scalar_t* q = Q.data_ptr<scalar_t>();
    const scalar_t* g = G.data_ptr<scalar_t>();
    scalar_t* gp = grad_p.data_ptr<scalar_t>();
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    at::parallel_for(0, batch, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t gb = g[b];
        const scalar_t* qi = q + i[b] * dim;
        const scalar_t* pu = p + u[b] * dim;
        scalar_t* out_p = gp + b * dim;
        scalar_t* out_q = gq + b * dim;
        for (int64_t k = 0; k < dim; ++k) out_p[k] = gb * qi[k];
        for (int64_t k = 0; k < dim; ++k) out_q[k] = gb * pu[k];
      }
    });
  });
  return {grad_p, grad_q};
}

}  // namespace
}  // namespace cpu
}  // namespace fastmf

TORCH_LIBRARY_IMPL(fastmf, CPU, m) {
  m.impl("mf_forward", &fastmf::cpu::mf_forward);
  m.impl("mf_backward", &fastmf::cpu::mf_backward);
}
