// Registers the CPU kernels of every op family, each family from the build that suits this
// CPU (csrc/cpu/isa.h): the AVX2 one where __builtin_cpu_supports("avx2") says so (which
// also checks that the OS saves the AVX registers), unless the environment variable
// FASTMF_CPU_ISA is "baseline". fastmf/_extension.py warns about any other value than
// "auto" or "avx2", and about "avx2" where the AVX2 build is not used.
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "isa.h"

namespace fastmf {
namespace cpu {
void register_pointwise(torch::Library& m);
void register_pairwise(torch::Library& m);
void register_embedding_bag(torch::Library& m);
void register_topk(torch::Library& m);
void register_sampling(torch::Library& m);
}  // namespace cpu
#if FASTMF_CPU_AVX2
namespace cpu_avx2 {
void register_pointwise(torch::Library& m);
void register_pairwise(torch::Library& m);
void register_embedding_bag(torch::Library& m);
void register_sampling(torch::Library& m);
}  // namespace cpu_avx2
#endif

namespace {

bool use_avx2() {
#if FASTMF_CPU_AVX2
  const char* wanted = std::getenv("FASTMF_CPU_ISA");
  if (wanted != nullptr && std::strcmp(wanted, "baseline") == 0) return false;
  __builtin_cpu_init();  // may run before the runtime's own constructors
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// Decided once, on first use (the registration below, when the library loads).
bool avx2_kernels() {
  static const bool avx2 = use_avx2();
  return avx2;
}

}  // namespace

const char* cpu_isa() { return avx2_kernels() ? "avx2" : "baseline"; }

}  // namespace fastmf

TORCH_LIBRARY_IMPL(fastmf, CPU, m) {
#if FASTMF_CPU_AVX2
  if (fastmf::avx2_kernels()) {
    fastmf::cpu_avx2::register_pointwise(m);
    fastmf::cpu_avx2::register_pairwise(m);
    fastmf::cpu_avx2::register_embedding_bag(m);
    fastmf::cpu_avx2::register_sampling(m);
  } else
#endif
  {
    fastmf::cpu::register_pointwise(m);
    fastmf::cpu::register_pairwise(m);
    fastmf::cpu::register_embedding_bag(m);
    fastmf::cpu::register_sampling(m);
  }
  // Picks its SIMD tiles itself (csrc/cpu/isa.h).
  fastmf::cpu::register_topk(m);
}
