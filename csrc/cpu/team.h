// A team of threads that runs many steps inside one OpenMP region (the multi-step ops,
// train_steps_pairwise_sampled in pairwise.cpp), and the parallel loop the steps' phases
// use: inside a team, the threads take the range's pieces, each its own share first, and
// the team meets at a barrier; outside one, it is at::parallel_for.
//
// Why: a step opens several parallel regions (draws, grouping, the two phases), and with
// OMP_WAIT_POLICY=PASSIVE (what many batch systems and fastmf's own benchmark scripts set)
// every region end puts the workers to sleep and every start wakes them: on
// ml-latest-small (BPR, batch 4,096, 2 threads) an epoch took 18-22 ms that way against
// 12-13 ms with spinning workers, and 21 ms on one thread. The team's barrier spins a while
// (Team::spin: shorter under PASSIVE), then sleeps until the team arrives.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "isa.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastmf {
namespace FASTMF_CPU_NS {

class Team {
 public:
  // capacity: the most threads whose shares parallel_for below hands out piece by piece
  // (a team of more splits its ranges statically, as before).
  explicit Team(int size, int capacity = 1)
      : size_(size), capacity_(capacity), cursors_(new Cursor[2 * capacity]) {}
  int size() const { return size_.load(std::memory_order_relaxed); }
  bool shares() const { return size() <= capacity_; }

  // The next `piece` of rank r's share in the phase now open (parallel_for below): the
  // offset claimed from that share's start. The barrier that opens a phase resets the
  // cursors of the phase after it; no thread uses those until that barrier opens.
  int64_t claim(int r, int64_t piece) {
    const int parity = generation_.load(std::memory_order_relaxed) & 1;
    return cursors_[parity * capacity_ + r].next.fetch_add(piece, std::memory_order_relaxed);
  }

  // Sets the size from inside the region: every thread of it calls this with the same
  // value before it first reaches the team.
  void join(int size) { size_.store(size, std::memory_order_relaxed); }

  // Runs part() on this thread (an exception is recorded, not thrown; once the team has
  // stopped, parts are skipped), then waits for the whole team. Every thread of the team
  // makes the same sequence of calls.
  template <typename F>
  void sync(const F& part) {
    if (!stop_.load(std::memory_order_acquire)) {
      try {
        part();
      } catch (...) {
        if (!failed_.exchange(true, std::memory_order_acq_rel)) error_ = std::current_exception();
      }
    }
    wait();
  }

  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

  // Whether the team stopped at its last barrier (a thread failed before it): fixed when
  // the barrier opens, so read between barriers it is the same on every thread, and the
  // threads leave their loop together.
  bool stopped() const { return stop_.load(std::memory_order_acquire); }

 private:
  void wait() {
    const int team_size = size();
    if (team_size == 1) {
      stop_.store(failed_.load(std::memory_order_acquire), std::memory_order_release);
      return;
    }
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == team_size - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      stop_.store(failed_.load(std::memory_order_acquire), std::memory_order_release);
      // The phase after the one this opens claims from these; the last used them two
      // phases ago, and every thread has left it.
      if (team_size <= capacity_) {
        Cursor* next = cursors_.get() + ((generation + 1) & 1) * capacity_;
        for (int r = 0; r < team_size; ++r) next[r].next.store(0, std::memory_order_relaxed);
      }
      // seq_cst, paired with the sleeper's count and load below: either the sleeper sees
      // the new generation, or this thread sees the sleeper and wakes it.
      generation_.fetch_add(1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        opened_.notify_all();
      }
      return;
    }
    // Spin a while (a phase's imbalance is microseconds on a quiet machine), then sleep
    // until the barrier opens: a thread that spun or yielded for as long as it took kept
    // its core from the one it waits for whenever the machine had more runnable threads
    // than cores. With two compiler processes on the 2 cores, an epoch of BPR on
    // ml-latest-small took 160-210 ms that way (spinning 2^16 pauses, then yielding)
    // against 12 ms on the quiet machine.
    const auto deadline = std::chrono::steady_clock::now() + spin();
    for (int64_t spins = 1; generation_.load(std::memory_order_acquire) == generation;
         ++spins) {
      pause();
      if (spins % 64 == 0 && std::chrono::steady_clock::now() >= deadline) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        opened_.wait(lock, [&] {
          return generation_.load(std::memory_order_seq_cst) != generation;
        });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        break;
      }
    }
  }

  // How long a thread spins at the barrier before it sleeps. With OMP_WAIT_POLICY=PASSIVE
  // (the user asks threads not to spin), 50 us: about what a sleep and a wake-up cost,
  // the classic spin-then-block rule, never worse than twice the better of the two for any
  // wait. Otherwise 200 us, as OpenMP's own waits spin longer unless told PASSIVE.
  // Measured on the 2-core machine, per one-call BPR epoch of ml-latest-small, against
  // 0-1,000 us (benchmarks/README.md): with PASSIVE, 50 us within 10 % of the best both
  // quiet and with two busy processes on the 2 cores, where 200 us was 1.5x slower; with
  // the policy unset, 200 us as fast as 1,000 quiet and 1.45x faster than 50 when busy.
  static std::chrono::microseconds spin() {
    static const std::chrono::microseconds value = [] {
      const char* policy = std::getenv("OMP_WAIT_POLICY");
      std::string name = policy == nullptr ? "" : policy;
      for (char& c : name) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      return std::chrono::microseconds(name == "PASSIVE" ? 50 : 200);
    }();
    return value;
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }

  struct alignas(64) Cursor {  // a cache line each: two ranks' claims do not collide
    std::atomic<int64_t> next{0};
  };

  std::atomic<int> size_;
  const int capacity_;
  std::unique_ptr<Cursor[]> cursors_;  // [phase parity][rank]
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
  std::atomic<bool> failed_{false};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable opened_;
  std::exception_ptr error_;
};

// The team this thread belongs to while it runs one, and its rank in it.
struct TeamSeat {
  Team* team = nullptr;
  int rank = 0;
};
inline TeamSeat& team_seat() {
  thread_local TeamSeat seat;
  return seat;
}

// f(begin, end) over [begin, end) split as at::parallel_for splits it: outside a team, that
// call; inside one, the same shares, each handed out in pieces of `grain`: a thread runs the
// pieces of its own share, then takes what is left of the others', then the team meets at
// its barrier. So a thread that arrives late, is descheduled, or draws the costlier share
// no longer keeps the others waiting at the barrier for all of it. Every piece is a range
// f handles whole, wherever it runs, so results do not depend on which thread runs it.
// Measured: see benchmarks/README.md, "Shares handed out in pieces".
// first(): this thread's own work before it takes pieces (outside a team: run once, before
// the loop).
template <typename F, typename First>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f, const First& first) {
  const TeamSeat& seat = team_seat();
  if (seat.team == nullptr) {
    first();
    at::parallel_for(begin, end, grain, f);
    return;
  }
  Team& team = *seat.team;
  team.sync([&] {
    first();
    if (end <= begin) return;
    const int64_t n = end - begin;
    const int64_t size = team.size();
    if (size == 1) {
      f(begin, end);
      return;
    }
    int64_t workers = size;
    if (grain > 0) workers = std::min<int64_t>(workers, (n + grain - 1) / grain);
    const int64_t chunk = (n + workers - 1) / workers;
    if (!team.shares()) {
      const int64_t own = begin + seat.rank * chunk;
      if (own < end) f(own, std::min(end, own + chunk));
      return;
    }
    const int64_t piece = std::max<int64_t>(grain, 1);
    for (int64_t i = 0; i < workers; ++i) {
      const int r = static_cast<int>((seat.rank + i) % workers);  // its own share first
      const int64_t share = begin + r * chunk, share_end = std::min(end, share + chunk);
      for (;;) {
        const int64_t lo = share + team.claim(r, piece);
        if (lo >= share_end) break;
        f(lo, std::min(share_end, lo + piece));
      }
    }
  });
}

// No work of a thread's own before its pieces (the default `first` of the phases).
struct NoWork {
  void operator()() const {}
};

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for(begin, end, grain, f, NoWork{});
}

// Runs body(team, rank) on every thread of one OpenMP region, each seated in the team (so
// parallel_for above splits work instead of opening regions). The body must reach the
// team only through sync() and parallel_for(), and leave its loop once stopped(). Rethrows
// the first exception after the region.
template <typename Body>
void run_team(const Body& body) {
  auto seated = [&](Team& team, int rank) {
    struct Seated {  // restores the thread's seat however the body leaves
      TeamSeat saved;
      Seated(Team* team, int rank) : saved(team_seat()) { team_seat() = TeamSeat{team, rank}; }
      ~Seated() { team_seat() = saved; }
    } seated_here(&team, rank);
    body(team, rank);
  };
#ifdef _OPENMP
  const bool one = at::in_parallel_region() || at::get_num_threads() <= 1;
#else
  const bool one = true;  // a build without OpenMP: at::parallel_for is serial too
#endif
  if (one) {
    Team team(1);
    seated(team, 0);
    team.rethrow();
    return;
  }
  // The team's size is what OpenMP gives the region (at::parallel_for avoids the
  // num_threads clause for a GOMP pool bug, pytorch#32008; so does this). Every thread
  // sets it, to the same value, before it first reaches the team, so no thread waits for
  // another to start (a handshake there kept the others yielding whenever the machine
  // had more runnable threads than cores and the first thread was descheduled).
#ifdef _OPENMP
  Team team(0, omp_get_max_threads());
#pragma omp parallel
  {
    const int rank = omp_get_thread_num();
    team.join(omp_get_num_threads());
    at::internal::ThreadIdGuard tid_guard(rank);
    seated(team, rank);
  }
  team.rethrow();
#endif
}

}  // namespace FASTMF_CPU_NS
}  // namespace fastmf
