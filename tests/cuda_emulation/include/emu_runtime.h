// A CPU stand-in for the parts of the CUDA programming model that csrc/cuda uses, so the
// kernels' own source runs on a machine without a GPU. Every CUDA thread of a block is a
// fiber (its own stack, switched with swapcontext) on one OS thread: a thread runs until it
// waits at __syncthreads or a shuffle, then the next one runs, and a barrier opens when
// every thread it waits for has arrived. Blocks run one after another, or FASTMF_EMU_BLOCKS
// at a time, each on its own OS thread. Built with FASTMF_EMU_OS_THREADS (the sanitizer
// builds), every CUDA thread is an OS thread instead and the barriers are std::barrier:
// ThreadSanitizer sees races only between OS threads, and the sanitizers do not follow
// hand-switched stacks. Fibers are what make the emulated suite affordable: creating and
// waking 256 OS threads per block cost most of its time (390 s of a 672 s pytest run on 2
// cores, against 50 s with fibers).
//
// It checks what a GPU would report or silently get wrong and a CPU would not: a shuffle
// whose mask leaves out the calling or the source lane, a misaligned vector access, dynamic
// shared memory beyond the default 48 KiB, and (fibers) a barrier that can never open, a
// deadlock a GPU would hang on. Combined with AddressSanitizer it catches every
// out-of-bounds access of a kernel.
#pragma once

#include <algorithm>
#include <atomic>
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

#ifndef FASTMF_EMU_OS_THREADS
#include <sys/mman.h>
#include <ucontext.h>

#include <functional>
#endif

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

inline void set_thread_index(unsigned x);

#ifdef FASTMF_EMU_OS_THREADS
using Barrier = std::barrier<>;
#else
// The CUDA threads of one block, as fibers on the OS thread that runs the block.
struct Scheduler {
  struct Fiber {
    ucontext_t context;
    bool done = false;
  };
  std::vector<Fiber> fibers;
  ucontext_t launcher;  // the OS thread's own context: resumed when every fiber is done
  size_t current = 0;
  size_t live = 0;
  // +1: threads run in index order, 0 first; -1: the last thread first. Successive blocks
  // (of a launch and across launches) alternate, so a missing __syncthreads between a
  // write and another thread's read shows in one order or the other, whichever writes.
  int direction = 1;
  // Counts arrivals at barriers and exits. A waiting thread that gets the CPU back twice
  // with no change in between has seen every other thread wait too: a deadlock.
  uint64_t progress = 0;
  std::function<void()> body;

  void switch_to(size_t next) {
    const size_t from = current;
    current = next;
    ::emu::set_thread_index(static_cast<unsigned>(next));
    if (swapcontext(&fibers[from].context, &fibers[next].context) != 0) fail("swapcontext");
  }
  size_t next_live() const {
    const size_t n = fibers.size();
    size_t i = current;
    do {
      i = direction > 0 ? (i + 1) % n : (i + n - 1) % n;
    } while (fibers[i].done && i != current);
    return i;
  }
  template <typename Pred>
  void wait_until(Pred ready) {
    uint64_t seen = progress;
    int idle = 0;
    while (!ready()) {
      const size_t next = next_live();
      if (next != current) switch_to(next);
      if (progress != seen) {
        seen = progress;
        idle = 0;
      } else if (++idle > 2) {
        fail("deadlock: every thread of the block waits at a barrier or a shuffle that "
             "cannot complete");
      }
    }
  }
};
inline thread_local Scheduler* scheduler = nullptr;

// std::barrier's arrive_and_wait / arrive_and_drop, for fibers.
struct Barrier {
  explicit Barrier(std::ptrdiff_t n) : expected(n) {}
  std::ptrdiff_t expected;
  std::ptrdiff_t arrived = 0;
  uint64_t generation = 0;

  void arrive_and_wait() {
    const uint64_t g = generation;
    ++scheduler->progress;
    if (++arrived == expected) {
      open();
      return;
    }
    scheduler->wait_until([&] { return generation != g; });
  }
  void arrive_and_drop() {
    ++scheduler->progress;
    --expected;
    if (arrived > 0 && arrived == expected) open();
  }
  void open() {
    arrived = 0;
    ++generation;
  }
};
#endif

struct Block {
  explicit Block(unsigned threads, size_t shared_bytes)
      : barrier(static_cast<std::ptrdiff_t>(threads)), shared(shared_bytes + 16) {}
  Barrier barrier;
  std::vector<unsigned char> shared;
  struct Exchange {
    explicit Exchange(int n) : barrier(n) {}
    Barrier barrier;
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

inline void emu::set_thread_index(unsigned x) { threadIdx = dim3(x); }

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
#ifdef FASTMF_EMU_OS_THREADS
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
#else
      for (unsigned bx = first; bx < last; ++bx) {
        blocks.push_back(std::make_unique<Block>(block.x, shared));
        Block* blk = blocks.back().get();
        auto run = [&, blk, bx] { run_block(blk, bx, [&] { kernel(args...); }); };
        if (last - first == 1) {
          run();
        } else {
          threads.emplace_back(run);
        }
      }
#endif
      for (auto& t : threads) t.join();
    }
  }

#ifndef FASTMF_EMU_OS_THREADS
  // One fiber stack: 128 KiB (the kernels keep a few hundred bytes of locals; fail()'s
  // fprintf needs a few KiB) above a guard page, so an overflow faults instead of
  // writing into the next stack. Kept per OS thread and reused by every block it runs.
  static constexpr size_t kStack = 128 * 1024;
  struct Stacks {
    std::vector<unsigned char*> free;
    ~Stacks() {
      for (auto* p : free) munmap(p - 4096, kStack + 4096);
    }
    unsigned char* get(size_t i) {
      while (free.size() <= i) {
        void* p = mmap(nullptr, kStack + 4096, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) fail("mmap of a fiber stack");
        if (mprotect(p, 4096, PROT_NONE) != 0) fail("mprotect of a stack guard page");
        free.push_back(static_cast<unsigned char*>(p) + 4096);
      }
      return free[i];
    }
  };

  static void fiber_main() {
    Scheduler& s = *scheduler;
    s.body();
    // An exited thread no longer takes part in __syncthreads.
    current_block->barrier.arrive_and_drop();
    s.fibers[s.current].done = true;
    if (--s.live == 0) {
      setcontext(&s.launcher);
    } else {
      const size_t next = s.next_live();
      s.current = next;
      ::emu::set_thread_index(static_cast<unsigned>(next));
      setcontext(&s.fibers[next].context);
    }
    fail("setcontext returned");
  }

  void run_block(Block* blk, unsigned bx, std::function<void()> body) const {
    static thread_local Stacks stacks;
    static std::atomic<unsigned> launches{0};
    Scheduler s;
    s.direction = (launches++ & 1u) ? -1 : 1;
    s.fibers.resize(block.x);
    s.live = block.x;
    s.body = std::move(body);
    for (unsigned tx = 0; tx < block.x; ++tx) {
      ucontext_t& c = s.fibers[tx].context;
      if (getcontext(&c) != 0) fail("getcontext");
      c.uc_stack.ss_sp = stacks.get(tx);
      c.uc_stack.ss_size = kStack;
      c.uc_link = nullptr;
      makecontext(&c, &Launch::fiber_main, 0);
    }
    blockIdx = dim3(bx);
    blockDim = block;
    gridDim = grid;
    current_block = blk;
    scheduler = &s;
    s.current = s.direction > 0 ? 0 : block.x - 1;
    threadIdx = dim3(static_cast<unsigned>(s.current));
    if (swapcontext(&s.launcher, &s.fibers[s.current].context) != 0) fail("swapcontext");
    scheduler = nullptr;
    current_block = nullptr;
  }
#endif

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
