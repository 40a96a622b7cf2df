// Benchmark of ternary quantize+pack (CPU and, where built, CUDA). Napkin: reads N*K
// floats, writes N*K/4 bytes; memory-bound.
#include <cstdio>
#include <vector>

#include "bench_common.h"
#include "common/ternary_format.h"
#include "pack.h"

using namespace mmfree;

int main() {
  bench::init_cpu_threads();
  std::printf("bench_pack: %d CPU thread(s)\n", bench::cpu_threads());
  const int64_t shapes[][2] = {{2560, 2560}, {13824, 2560}, {2560, 6912}};
  for (const auto& s : shapes) {
    const int64_t n = s[0], k = s[1];
    std::vector<float> w(static_cast<size_t>(n * k));
    bench::fill_uniform(w, 1, -1.f, 1.f);
    std::vector<uint8_t> packed(static_cast<size_t>(n * ternary::row_bytes(k)));
    float scale = 0;
    TernaryQuantizeParams p{w.data(), DType::kFloat32, n, k, packed.data(), &scale, nullptr};
    const double bytes = 4.0 * n * k + static_cast<double>(packed.size());
    char shape[64];
    std::snprintf(shape, sizeof(shape), "N=%lld K=%lld", static_cast<long long>(n), static_cast<long long>(k));
    bench::report(bench::time_cpu("cpu/quantize_ternary", shape, bytes, 0, [&] { cpu::ternary_quantize(p); }, 1, 5));
#if defined(MMFREE_WITH_CUDA)
    int count = 0;
    if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0) {
      float* dw = bench::device_alloc<float>(w.size());
      uint8_t* dp = bench::device_alloc<uint8_t>(packed.size());
      float* ds = bench::device_alloc<float>(1);
      double* ws = bench::device_alloc<double>(kTernaryQuantizeWorkspace);
      bench::check_cuda(cudaMemcpy(dw, w.data(), w.size() * 4, cudaMemcpyHostToDevice), "copy");
      TernaryQuantizeParams dpar{dw, DType::kFloat32, n, k, dp, ds, ws};
      bench::report(bench::time_cuda("cuda/quantize_ternary", shape, bytes, 0,
                                     [&] { bench::check_cuda(cuda::ternary_quantize(dpar, nullptr), "quantize"); }));
      cudaFree(dw); cudaFree(dp); cudaFree(ds); cudaFree(ws);
    }
#endif
  }
  return 0;
}
