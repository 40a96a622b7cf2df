// Timing helpers for the torch-free C++ benchmarks: median of repeated runs after a
// warm-up, CPU wall clock or CUDA events with the L2 flushed before each run, and one
// JSON line per case with bytes and FLOPs so every result prints GB/s.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mmfree {
namespace bench {

struct Result {
  std::string name;
  std::string shape;
  double median_us = 0;
  double min_us = 0;
  double bytes = 0;
  double flops = 0;
};

// Installs the OpenMP parallel backend for the CPU kernels (serial without OpenMP).
void init_cpu_threads();
int cpu_threads();

// Median wall time of fn over `reps` runs after `warmup` runs.
Result time_cpu(const std::string& name, const std::string& shape, double bytes, double flops,
                const std::function<void()>& fn, int warmup = 3, int reps = 20);

#if defined(MMFREE_WITH_CUDA)
// Median CUDA-event time of fn on the default stream, L2 flushed before each run.
Result time_cuda(const std::string& name, const std::string& shape, double bytes, double flops,
                 const std::function<void()>& fn, int warmup = 5, int reps = 50);
void check_cuda(cudaError_t err, const char* what);

// cudaMalloc for n elements of T, exiting with a message on failure.
template <class T>
T* device_alloc(size_t n) {
  void* p = nullptr;
  check_cuda(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  return static_cast<T*>(p);
}
#endif

// Prints "name shape median_us GB/s GFLOP/s" and a JSON line.
void report(const Result& r);

// Ternary weights w [n, k] in {-1, 0, 1} packed in the canonical format (common/ternary_format.h).
std::vector<uint8_t> pack_ternary_host(const std::vector<int8_t>& w, int64_t n, int64_t k);

// Deterministic pseudo-random fill.
void fill_uniform(std::vector<float>& v, uint64_t seed, float lo, float hi);

}  // namespace bench
}  // namespace mmfree
