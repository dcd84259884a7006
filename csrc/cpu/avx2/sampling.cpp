// csrc/cpu/sampling.cpp built for AVX2, into namespace fastmf::cpu_avx2 (csrc/cpu/isa.h).
#define FASTMF_CPU_NS cpu_avx2
#define FASTMF_AVX2_BUILD 1
#include "../isa.h"

#if FASTMF_CPU_AVX2
#include "prelude.h"

#pragma GCC target("avx2")
#include "../sampling.cpp"
#endif
