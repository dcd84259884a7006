// The instruction sets of the CPU kernels. The fused-step families (pointwise.cpp,
// pairwise.cpp), the embedding_bag family and the sampling family are compiled twice: as they are, for the
// x86-64 baseline (SSE2), into namespace fastmf::cpu, and once more by
// csrc/cpu/avx2/<family>.cpp under GCC's target("avx2") into fastmf::cpu_avx2.
// csrc/cpu/register.cpp registers one of the two when the library loads: AVX2 where the CPU
// has it, unless FASTMF_CPU_ISA=baseline says otherwise. topk.cpp picks its own SIMD tiles
// at run time. The embedding_bag family was built once at first: its AVX2 build made no
// difference to the embedding layer's step on a 1M-row table (memory-bound); on Hybrid's
// tables, which stay in cache, its fused Adagrad update runs 1.3x faster (benchmarks/README.md,
// "Hybrid's bag kernels built for AVX2"), for about 45 s more compile time per build. The
// sampling family too was built once until its draws' searches took AVX2 gathers
// (sampled.h draw_negatives_gather).
//
// Both builds compute the same numbers to the bit: the same source, so the same order of
// operations; -ffp-contract=off, so no fused multiply-adds in either; no reassociation. The
// AVX2 build only does the work in wider registers: on 2 threads the BPR op ran 1.12-1.17x
// and a BPR fit 1.24-1.27x faster (benchmarks/README.md, "AVX2 builds of the CPU kernels").
//
// Each csrc/cpu/avx2/<family>.cpp also defines FASTMF_AVX2_BUILD: GCC's target pragma does
// not define __AVX__ or __AVX2__, so code that writes 256-bit intrinsics (common.h sqrt_n)
// or tunes a loop for the AVX2 build asks that macro.
//
// Only fastmf's CPU code is compiled for AVX2: each csrc/cpu/avx2/<family>.cpp includes every
// outside header (ATen, torch, the standard library, csrc/*.h; avx2/prelude.h) before its
// target pragma, and everything after it lives in namespace cpu_avx2 or in the file's
// anonymous namespace. So the inline functions both builds emit under one name (which the
// linker merges, keeping either copy) are baseline code in both, and no code that can run
// before the CPU check (static initialisers) holds an AVX instruction;
// tests/test_cpu_isa.py disassembles the library to check that.
#pragma once

#ifndef FASTMF_CPU_NS
#define FASTMF_CPU_NS cpu
#endif

// Whether csrc/cpu/avx2/*.cpp build anything: GCC's target pragma on x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTMF_CPU_AVX2 1
#else
#define FASTMF_CPU_AVX2 0
#endif

namespace fastmf {
// "avx2" or "baseline": which build of the kernels register.cpp registered.
const char* cpu_isa();
}  // namespace fastmf
