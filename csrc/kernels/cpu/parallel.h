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
