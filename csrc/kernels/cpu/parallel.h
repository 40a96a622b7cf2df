// The CPU kernels' only threading primitive. Kernels stay torch-free: the torch
// extension installs a backend built on at::parallel_for (torch's own thread pool and
// its thread count), and the C++ benchmarks install an OpenMP one. With no backend the
// loop runs serially.
#pragma once

#include <cstdint>

namespace mmfree {
namespace cpu {

using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
using ParallelBackend = void (*)(int64_t begin, int64_t end, int64_t grain, RangeFn fn, void* ctx);
using ThreadCountFn = int (*)();

void set_parallel_backend(ParallelBackend backend, ThreadCountFn thread_count);
void parallel_for_raw(int64_t begin, int64_t end, int64_t grain, RangeFn fn, void* ctx);
// Threads the backend will use (1 without a backend); kernels use it to size work splits.
int max_threads();

// A team: fn(ctx, tid, nthreads) runs once on each of nthreads threads that run at the same
// time (so they may wait for each other at a TeamBarrier). The torch backend builds it from
// one at::parallel_for over OpenMP threads; without a team backend (or inside another
// parallel region) it is one call with nthreads = 1. Kernels that call parallel_for from
// inside a team get the serial loop (torch runs nested regions inline).
using TeamFn = void (*)(void* ctx, int tid, int nthreads);
using TeamBackend = void (*)(TeamFn fn, void* ctx);
void set_team_backend(TeamBackend backend);
void parallel_team_raw(TeamFn fn, void* ctx);

template <class F>
void parallel_team(const F& f) {
  parallel_team_raw([](void* ctx, int tid, int n) { (*static_cast<const F*>(ctx))(tid, n); },
                    const_cast<void*>(static_cast<const void*>(&f)));
}

// Sense-reversing spin barrier for the nthreads threads of one team (every caller passes
// the same count; spins with pause, then yields: on a loaded machine a partner thread may be
// descheduled).
class TeamBarrier {
 public:
  void wait(int nthreads);

 private:
  alignas(64) int count_ = 0;
  alignas(64) int sense_ = 0;
};

// Calls f(b, e) on disjoint sub-ranges covering [begin, end), each at least `grain`
// long except the last. f must be safe to call concurrently.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for_raw(
      begin, end, grain,
      [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace cpu
}  // namespace mmfree
