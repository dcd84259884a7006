// Kernels that exercise the emulated CUDA runtime itself (include/emu_runtime.h), one case
// per command-line argument; tests/test_cuda_emulation_runtime.py builds and runs them.
// Each case prints what it computed, or the runtime aborts with its message.
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr unsigned kThreads = 128;

// A block sum the way csrc/cuda writes them: shared memory and __syncthreads down to a
// warp, then shuffles; a ballot counts the odd values.
__global__ void block_sum(const int* in, long long* sums, unsigned* odd) {
  static char partial_key;
  auto& partial = ::emu::block_shared<long long[kThreads]>(&partial_key);
  static char votes_key;
  auto& warp_votes = ::emu::block_shared<unsigned[kThreads / 32]>(&votes_key);
  const unsigned t = threadIdx.x;
  const int x = in[blockIdx.x * kThreads + t];
  partial[t] = x;
  const unsigned votes = __ballot_sync(0xffffffffu, x % 2 != 0);
  if (t % 32 == 0) warp_votes[t / 32] = __popc(votes);
  __syncthreads();
  if (t == 0) {
    for (unsigned w = 0; w < kThreads / 32; ++w) odd[blockIdx.x] += warp_votes[w];
  }
  for (unsigned half = kThreads / 2; half >= 32; half /= 2) {
    if (t < half) partial[t] += partial[t + half];
    __syncthreads();
  }
  if (t < 32) {
    long long v = partial[t];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (t == 0) sums[blockIdx.x] = v;
  }
}

// Thread 0 publishes a value that the others read with no __syncthreads in between.
__global__ void read_before_write(int* seen) {
  static char value_key;
  auto& value = ::emu::block_shared<int>(&value_key);
  if (threadIdx.x == 0) value = 42;
  seen[blockIdx.x * kThreads + threadIdx.x] = value;
}

// Every thread writes its slot; thread 0 sums them with no __syncthreads in between.
__global__ void sum_before_writes(long long* sums) {
  static char slots_key;
  auto& slots = ::emu::block_shared<long long[kThreads]>(&slots_key);
  slots[threadIdx.x] = threadIdx.x + 1;
  if (threadIdx.x == 0) {
    long long s = 0;
    for (unsigned i = 0; i < kThreads; ++i) s += slots[i];
    sums[blockIdx.x] = s;
  }
}

// Half the threads leave; the rest still pass two __syncthreads.
__global__ void early_exit(int* out) {
  if (threadIdx.x % 2 == 1) return;
  __syncthreads();
  out[threadIdx.x] = 1;
  __syncthreads();
}

// Lane 0 waits in a shuffle for its warp, which waits at __syncthreads for lane 0.
__global__ void deadlock(int* out) {
  if (threadIdx.x == 0) {
    out[0] = __shfl_sync(0xffffffffu, 1, 1);
  } else {
    __syncthreads();
  }
}

// Lane 3 shuffles with a mask that leaves it out.
__global__ void shuffle_outside_mask(int* out) {
  if (threadIdx.x < 32) out[threadIdx.x] = __shfl_sync(threadIdx.x == 3 ? 0x1u : 0xffffffffu,
                                                       static_cast<int>(threadIdx.x), 0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const char* what = argv[1];
  constexpr unsigned kBlocks = 4;
  if (std::strcmp(what, "sum") == 0) {
    std::vector<int> in(kBlocks * kThreads);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>((i * 7919) % 1000) - 300;
    std::vector<long long> sums(kBlocks, -1);
    std::vector<unsigned> odd(kBlocks, 0);
    ::emu::Launch(dim3(kBlocks), dim3(kThreads))(block_sum, in.data(), sums.data(), odd.data());
    for (unsigned b = 0; b < kBlocks; ++b) {
      long long want = 0;
      unsigned want_odd = 0;
      for (unsigned t = 0; t < kThreads; ++t) {
        want += in[b * kThreads + t];
        want_odd += in[b * kThreads + t] % 2 != 0;
      }
      std::printf("block %u sum %lld want %lld odd %u want %u\n", b, sums[b], want, odd[b],
                  want_odd);
    }
  } else if (std::strcmp(what, "read_before_write") == 0) {
    std::vector<int> seen(kBlocks * kThreads, -1);
    ::emu::Launch(dim3(kBlocks), dim3(kThreads))(read_before_write, seen.data());
    for (unsigned b = 0; b < kBlocks; ++b) {
      unsigned stale = 0;
      for (unsigned t = 0; t < kThreads; ++t) stale += seen[b * kThreads + t] != 42;
      std::printf("block %u stale %u\n", b, stale);
    }
  } else if (std::strcmp(what, "sum_before_writes") == 0) {
    std::vector<long long> sums(kBlocks, -1);
    ::emu::Launch(dim3(kBlocks), dim3(kThreads))(sum_before_writes, sums.data());
    for (unsigned b = 0; b < kBlocks; ++b) {
      std::printf("block %u sum %lld want %u\n", b, sums[b], kThreads * (kThreads + 1) / 2);
    }
  } else if (std::strcmp(what, "early_exit") == 0) {
    std::vector<int> out(kThreads, 0);
    ::emu::Launch(dim3(1), dim3(kThreads))(early_exit, out.data());
    int n = 0;
    for (int v : out) n += v;
    std::printf("wrote %d\n", n);
  } else if (std::strcmp(what, "deadlock") == 0) {
    std::vector<int> out(kThreads, 0);
    ::emu::Launch(dim3(1), dim3(kThreads))(deadlock, out.data());
    std::printf("returned\n");
  } else if (std::strcmp(what, "shuffle_outside_mask") == 0) {
    std::vector<int> out(kThreads, 0);
    ::emu::Launch(dim3(1), dim3(kThreads))(shuffle_outside_mask, out.data());
    std::printf("returned\n");
  } else {
    return 2;
  }
  return 0;
}
