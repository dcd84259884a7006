// A CPU stand-in for the parts of the CUDA programming model that csrc/cuda uses, so the
// kernels' own source runs on a machine without a GPU: every CUDA thread of a block is an
// OS thread, __syncthreads is a barrier over the block, and a shuffle is an exchange
// through a barrier over the lanes named in its mask. Blocks run one after another, or
// FASTMF_EMU_BLOCKS at a time.
//
// It checks what a GPU would report or silently get wrong and a CPU would not: a shuffle
// whose mask leaves out the calling or the source lane, a misaligned vector access, and
// dynamic shared memory beyond the default 48 KiB. Combined with
// AddressSanitizer it catches every out-of-bounds access of a kernel.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using std::isfinite;
using std::sqrt;
using std::exp;
using std::log1p;
using std::fabs;
using std::fmax;

inline int min(int a, int b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

struct Block {
  explicit Block(unsigned threads, size_t shared_bytes)
      : barrier(static_cast<std::ptrdiff_t>(threads)), shared(shared_bytes + 16) {}
  std::barrier<> barrier;
  std::vector<unsigned char> shared;
  struct Exchange {
    explicit Exchange(int n) : barrier(n) {}
    std::barrier<> barrier;
    uint64_t slots[32] = {};
  };
  std::mutex mutex;
  std::map<std::pair<unsigned, unsigned>, std::unique_ptr<Exchange>> exchanges;
  // The block's `__shared__` variables, one zeroed buffer per declaration.
  std::map<const void*, std::unique_ptr<unsigned char[]>> statics;

  Exchange& exchange(unsigned warp, unsigned mask) {
    std::lock_guard<std::mutex> lock(mutex);
    auto& e = exchanges[{warp, mask}];
    if (!e) e = std::make_unique<Exchange>(__builtin_popcount(mask));
    return *e;
  }
};

inline thread_local Block* current_block = nullptr;
inline std::mutex atomic_mutex;

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail("misaligned vector access");
}

// A `__shared__ A name;` declaration becomes `auto& name = block_shared<A>(&key)`, with a
// `key` unique to the declaration (and to the template instance it is in).
template <typename A>
A& block_shared(const void* key) {
  Block& blk = *current_block;
  std::lock_guard<std::mutex> lock(blk.mutex);
  auto& slot = blk.statics[key];
  if (!slot) {
    constexpr size_t align = alignof(A) > 16 ? alignof(A) : 16;
    slot.reset(new unsigned char[sizeof(A) + align]());
  }
  auto p = reinterpret_cast<uintptr_t>(slot.get());
  constexpr size_t align = alignof(A) > 16 ? alignof(A) : 16;
  return *reinterpret_cast<A*>(p + (align - p % align) % align);
}

inline unsigned char* dynamic_shared() {
  auto* p = current_block->shared.data();
  return p + (16 - reinterpret_cast<uintptr_t>(p) % 16) % 16;
}

}  // namespace emu

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() { emu::current_block->barrier.arrive_and_wait(); }

namespace emu {
template <typename T>
T exchange(unsigned mask, T value, unsigned src) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (!((mask >> lane) & 1u)) fail("shuffle by a lane outside its mask");
  if (src >= 32 || !((mask >> src) & 1u)) fail("shuffle from a lane outside the mask");
  Block::Exchange& e = current_block->exchange(warp, mask);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  e.slots[lane] = bits;
  e.barrier.arrive_and_wait();
  const uint64_t got = e.slots[src];
  e.barrier.arrive_and_wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}
}  // namespace emu

template <typename T>
T __shfl_sync(unsigned mask, T value, int src, int width = 32) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned base = lane - lane % static_cast<unsigned>(width);
  return emu::exchange(mask, value, base + static_cast<unsigned>(src % width));
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int offset, int width = 32) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned target = lane ^ static_cast<unsigned>(offset);
  const unsigned base = lane - lane % static_cast<unsigned>(width);
  // Outside the caller's segment a lane reads its own value, as on the GPU.
  const unsigned src = (target >= base && target < base + static_cast<unsigned>(width)) ? target : lane;
  return emu::exchange(mask, value, src);
}

namespace emu {
// Every lane of `mask` arrives; a lane reads the others' values only after all have
// written them, so this is also the memory fence __syncwarp is.
inline unsigned ballot(unsigned mask, bool pred) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (!((mask >> lane) & 1u)) fail("warp vote by a lane outside its mask");
  Block::Exchange& e = current_block->exchange(warp, mask);
  e.slots[lane] = pred ? 1 : 0;
  e.barrier.arrive_and_wait();
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (((mask >> l) & 1u) && e.slots[l] != 0) out |= 1u << l;
  }
  e.barrier.arrive_and_wait();
  return out;
}
}  // namespace emu

inline unsigned __ballot_sync(unsigned mask, bool pred) { return emu::ballot(mask, pred); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::ballot(mask, false); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                    unsigned long long value) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  const unsigned long long old = *address;
  if (old == compare) *address = value;
  return old;
}

inline long long __double_as_longlong(double x) {
  long long out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}

namespace emu {

// kernel<<<grid, block, shared, stream>>>(args...) becomes Launch(grid, block, shared,
// stream)(kernel, args...).
struct Launch {
  dim3 grid, block;
  size_t shared;
  template <typename Stream = void*>
  Launch(dim3 g, dim3 b, size_t s = 0, Stream = nullptr) : grid(g), block(b), shared(s) {}

  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, Args... args) const {
    if (shared > 48 * 1024) fail("dynamic shared memory above 48 KiB without opt-in");
    if (block.x % 32 != 0 || block.x > 1024) fail("block size not a multiple of 32");
    const unsigned wave = concurrent_blocks();
    for (unsigned first = 0; first < grid.x; first += wave) {
      const unsigned last = std::min(grid.x, first + wave);
      std::vector<std::unique_ptr<Block>> blocks;
      std::vector<std::thread> threads;
      threads.reserve(static_cast<size_t>(last - first) * block.x);
      for (unsigned bx = first; bx < last; ++bx) {
        blocks.push_back(std::make_unique<Block>(block.x, shared));
        Block* blk = blocks.back().get();
        for (unsigned tx = 0; tx < block.x; ++tx) {
          threads.emplace_back([&, blk, bx, tx] {
            threadIdx = dim3(tx);
            blockIdx = dim3(bx);
            blockDim = block;
            gridDim = grid;
            current_block = blk;
            kernel(args...);
            // An exited thread no longer takes part in __syncthreads.
            blk->barrier.arrive_and_drop();
          });
        }
      }
      for (auto& t : threads) t.join();
    }
  }

  // FASTMF_EMU_BLOCKS (default 1): how many blocks run at once. More than one lets
  // ThreadSanitizer see blocks that touch the same memory, as a GPU's concurrent blocks do.
  static unsigned concurrent_blocks() {
    static const unsigned n = [] {
      const char* env = std::getenv("FASTMF_EMU_BLOCKS");
      const long v = env ? std::strtol(env, nullptr, 10) : 1;
      return static_cast<unsigned>(v < 1 ? 1 : (v > 16 ? 16 : v));
    }();
    return n;
  }
};

}  // namespace emu
