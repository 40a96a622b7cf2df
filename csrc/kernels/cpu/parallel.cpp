#include "cpu/parallel.h"

#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MMFREE_PAUSE() _mm_pause()
#else
#define MMFREE_PAUSE() ((void)0)
#endif

namespace mmfree {
namespace cpu {
namespace {
ParallelBackend g_backend = nullptr;
ThreadCountFn g_thread_count = nullptr;
TeamBackend g_team = nullptr;
}  // namespace

void set_team_backend(TeamBackend backend) { g_team = backend; }

void parallel_team_raw(TeamFn fn, void* ctx) {
  if (g_team == nullptr) {
    fn(ctx, 0, 1);
    return;
  }
  g_team(fn, ctx);
}

void TeamBarrier::wait(int nthreads) {
  if (nthreads <= 1) return;
  const int sense = __atomic_load_n(&sense_, __ATOMIC_RELAXED);
  if (__atomic_add_fetch(&count_, 1, __ATOMIC_ACQ_REL) == nthreads) {
    __atomic_store_n(&count_, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&sense_, sense ^ 1, __ATOMIC_RELEASE);
    return;
  }
  for (int spin = 0; __atomic_load_n(&sense_, __ATOMIC_ACQUIRE) == sense; ++spin) {
    if (spin < 4096) {
      MMFREE_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
}

void set_parallel_backend(ParallelBackend backend, ThreadCountFn thread_count) {
  g_backend = backend;
  g_thread_count = thread_count;
}

void parallel_for_raw(int64_t begin, int64_t end, int64_t grain, RangeFn fn, void* ctx) {
  if (begin >= end) return;
  if (g_backend == nullptr || end - begin <= grain) {
    fn(ctx, begin, end);
    return;
  }
  g_backend(begin, end, grain, fn, ctx);
}

int max_threads() { return g_thread_count ? g_thread_count() : 1; }

}  // namespace cpu
}  // namespace mmfree
