#include "cpu/parallel.h"

namespace mmfree {
namespace cpu {
namespace {
ParallelBackend g_backend = nullptr;
ThreadCountFn g_thread_count = nullptr;
}  // namespace

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
