#include "bench_common.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

#include "common/ternary_format.h"
#include "cpu/parallel.h"

#if defined(MMFREE_BENCH_OPENMP)
#include <omp.h>
#endif

namespace mmfree {
namespace bench {
namespace {

#if defined(MMFREE_BENCH_OPENMP)
void omp_backend(int64_t begin, int64_t end, int64_t grain, cpu::RangeFn fn, void* ctx) {
  const int64_t n = end - begin;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), (n + grain - 1) / grain));
  const int64_t chunk = (n + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t b = begin + t * chunk;
    const int64_t e = std::min(end, b + chunk);
    if (b < e) fn(ctx, b, e);
  }
}
int omp_threads() { return omp_get_max_threads(); }
#endif

Result summarize(const std::string& name, const std::string& shape, double bytes, double flops,
                 std::vector<double>& us) {
  std::sort(us.begin(), us.end());
  Result r;
  r.name = name;
  r.shape = shape;
  r.median_us = us[us.size() / 2];
  r.min_us = us.front();
  r.bytes = bytes;
  r.flops = flops;
  return r;
}

}  // namespace

void init_cpu_threads() {
#if defined(MMFREE_BENCH_OPENMP)
  cpu::set_parallel_backend(&omp_backend, &omp_threads);
#endif
}

int cpu_threads() { return cpu::max_threads(); }

Result time_cpu(const std::string& name, const std::string& shape, double bytes, double flops,
                const std::function<void()>& fn, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> us;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  return summarize(name, shape, bytes, flops, us);
}

#if defined(MMFREE_WITH_CUDA)
void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

Result time_cuda(const std::string& name, const std::string& shape, double bytes, double flops,
                 const std::function<void()>& fn, int warmup, int reps) {
  // Flush L2 by writing a buffer larger than it, so every run reads from HBM.
  static void* flush = nullptr;
  static size_t flush_bytes = 0;
  if (flush == nullptr) {
    int dev = 0, l2 = 0;
    check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev), "L2 size");
    flush_bytes = static_cast<size_t>(std::max(l2, 1 << 20)) * 2;
    check_cuda(cudaMalloc(&flush, flush_bytes), "cudaMalloc flush");
  }
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), "event");
  check_cuda(cudaEventCreate(&stop), "event");
  for (int i = 0; i < warmup; ++i) fn();
  check_cuda(cudaDeviceSynchronize(), "warmup");
  std::vector<double> us;
  for (int i = 0; i < reps; ++i) {
    check_cuda(cudaMemsetAsync(flush, i & 0xff, flush_bytes), "flush");
    check_cuda(cudaEventRecord(start), "record");
    fn();
    check_cuda(cudaEventRecord(stop), "record");
    check_cuda(cudaEventSynchronize(stop), "sync");
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, start, stop), "elapsed");
    us.push_back(ms * 1e3);
  }
  check_cuda(cudaGetLastError(), name.c_str());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return summarize(name, shape, bytes, flops, us);
}
#endif

void report(const Result& r) {
  const double gbs = r.bytes / (r.median_us * 1e-6) / 1e9;
  const double gflops = r.flops / (r.median_us * 1e-6) / 1e9;
  std::printf("%-28s %-26s %10.2f us %9.1f GB/s %10.1f GFLOP/s\n", r.name.c_str(), r.shape.c_str(), r.median_us,
              gbs, gflops);
  std::printf("JSON {\"name\":\"%s\",\"shape\":\"%s\",\"median_us\":%.3f,\"min_us\":%.3f,\"bytes\":%.0f,\"flops\":%.0f}\n",
              r.name.c_str(), r.shape.c_str(), r.median_us, r.min_us, r.bytes, r.flops);
}

std::vector<uint8_t> pack_ternary_host(const std::vector<int8_t>& w, int64_t n, int64_t k) {
  const int64_t rb = ternary::row_bytes(k);
  std::vector<uint8_t> p(static_cast<size_t>(n * rb), ternary::kZeroByte);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < k; ++i) {
      uint8_t& b = p[r * rb + ternary::byte_of(i)];
      const int s = ternary::shift_of(i);
      b = static_cast<uint8_t>((b & ~(3 << s)) | (ternary::encode(w[r * k + i]) << s));
    }
  }
  return p;
}

void fill_uniform(std::vector<float>& v, uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  for (float& x : v) x = d(rng);
}

}  // namespace bench
}  // namespace mmfree
