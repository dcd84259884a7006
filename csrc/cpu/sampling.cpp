// The sampling family on the CPU: sample_negatives, the uniform negatives of the sampled
// steps on their own (fastmf.NegativeSampler.sample_step draws them for the models that
// score negatives outside those steps: Hybrid, the NCF family, MF with WARP). The items are
// fastmf/ops/reference/sampling.py sample_negatives', drawn by the sampled steps' own loop
// (sampled.h: eight binary searches interleaved, the pairs split over the threads).
//
// Why a kernel of its own: the Numba kernel searches one draw at a time, and a Hybrid step
// on ml-latest-small (4,096 positives, one negative each, 2 threads) spent about 0.5 ms of
// its 6 ms in NegativeSampler.sample_step (benchmarks/README.md). Built once, not for AVX2
// too: the draws are integer loads and compares.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../checks.h"
#include "common.h"
#include "sampled.h"

namespace fastmf {
namespace cpu {
namespace {

at::Tensor sample_negatives(const at::Tensor& users_in, const at::Tensor& pos_indptr,
                            const at::Tensor& pos_indices, int64_t num_items,
                            int64_t num_negatives, int64_t seed, int64_t step,
                            c10::string_view op_name) {
  const std::string name(op_name);
  const char* op = name.c_str();
  check_sample_negatives(op, users_in, pos_indptr, pos_indices, num_items, num_negatives);
  const int64_t batch = users_in.size(0);
  at::Tensor out = at::empty({batch, num_negatives}, users_in.options().dtype(at::kLong));
  if (batch == 0) return out;
  std::vector<int64_t> users;
  load_ids(op, "users", users_in.contiguous(), pos_indptr.size(0) - 1, users);
  draw_negatives_of(op, users.data(), batch, num_negatives, pos_indptr, pos_indices, num_items,
                    seed, step, out.data_ptr<int64_t>());
  return out;
}

}  // namespace

void register_sampling(torch::Library& m) { m.impl("sample_negatives", &sample_negatives); }

}  // namespace cpu
}  // namespace fastmf
