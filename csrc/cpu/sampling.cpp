// The sampling family on the CPU: sample_negatives, the uniform negatives of the sampled
// steps on their own (fastmf.NegativeSampler.sample_step draws them for the models that
// score negatives outside those steps: Hybrid, the NCF family, MF with WARP). The items are
// fastmf/ops/reference/sampling.py sample_negatives', drawn by the sampled steps' own loop
// (sampled.h: eight binary searches interleaved, the pairs split over the threads).
//
// Why a kernel of its own: the Numba kernel searches one draw at a time, and a Hybrid step
// on ml-latest-small (4,096 positives, one negative each, 2 threads) spent about 0.5 ms of
// its 6 ms in NegativeSampler.sample_step (benchmarks/README.md). Built for AVX2 too
// (csrc/cpu/avx2/sampling.cpp), where the draws' searches run on vector gathers
// (sampled.h draw_negatives_gather).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../counter_hash.h"
#include "../ops.h"
#include "common.h"
#include "isa.h"
#include "sampled.h"

namespace fastmf {
namespace FASTMF_CPU_NS {
namespace {

// The users' ids read and range-checked, then every draw (sampled.h), raising for the first
// user in batch order with a bad row or no item left.
void sample_negatives(const at::Tensor& users_in, const at::Tensor& pos_indptr,
                      const at::Tensor& pos_indices, int64_t num_items, int64_t seed,
                      int64_t step, const char* op, at::Tensor& out) {
  std::vector<int64_t> users;
  load_ids(op, "users", users_in, pos_indptr.size(0) - 1, users);
  draw_negatives_of(op, users.data(), users_in.size(0), out.size(1), pos_indptr, pos_indices,
                    num_items, seed, step, out.data_ptr<int64_t>());
}

// permutation: the swaps of Fisher-Yates (counter_hash.h permutation_draw). The draws do
// not depend on the swaps, so the core runs ahead on them: prefetching each swap's position
// 16 steps ahead was slower (248 against 184 us for 100,226 positions).
template <typename index_t>
void permute(index_t* out, int64_t n, uint64_t key) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<index_t>(i);
  for (int64_t i = 0; i + 1 < n; ++i) {
    const uint64_t j = hash::permutation_draw(key, i, n);
    const index_t t = out[i];
    out[i] = out[j];
    out[j] = t;
  }
}

void permutation(const at::Tensor& out, int64_t seed) {
  const uint64_t key = hash::permutation_key(seed);
  if (out.scalar_type() == at::kInt) {
    permute(out.data_ptr<int32_t>(), out.numel(), key);
  } else {
    permute(out.data_ptr<int64_t>(), out.numel(), key);
  }
}

}  // namespace

void register_sampling(torch::Library& m) {
  m.impl("sample_negatives", &sample_negatives_op<sample_negatives>);
  m.impl("permutation", &permutation_op<permutation>);
}

}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
