// Benchmark of the fused MLGRU scan (CPU and, where built, CUDA), bf16 in/out with a lower
// bound. Napkin: forward moves 3 tensors (i, f in; h out), forward+backward 8 (the backward
// reads i, f, grad_h and writes grad_i, grad_f; its recompute pass reads i, f again: 10 moved).
#include <cstdio>
#include <vector>

#include "bench_common.h"
#include "common/float_convert.h"
#include "mlgru.h"

using namespace mmfree;

namespace {

std::vector<uint16_t> bf16_random(size_t n, uint64_t seed, float lo, float hi) {
  std::vector<float> v(n);
  bench::fill_uniform(v, seed, lo, hi);
  std::vector<uint16_t> out(n);
  for (size_t k = 0; k < n; ++k) out[k] = float_to_bf16_bits(v[k]);
  return out;
}

}  // namespace

int main() {
  bench::init_cpu_threads();
  std::printf("bench_mlgru: %d CPU thread(s)\n", bench::cpu_threads());
  struct Shape { int64_t b, t, d; bool cpu; };
  const Shape shapes[] = {{1, 512, 1024, true}, {4, 2048, 2560, false}, {16, 2048, 2048, false},
                          {1, 8192, 2560, false}, {1, 1, 2560, true}};
  for (const Shape& s : shapes) {
    const size_t n = static_cast<size_t>(s.b * s.t * s.d);
    auto i = bf16_random(n, 1, -3.f, 3.f), f = bf16_random(n, 2, -1.f, 5.f), gh = bf16_random(n, 3, -1.f, 1.f);
    std::vector<float> lb(static_cast<size_t>(s.d), 0.25f), ghl(static_cast<size_t>(s.b * s.d), 0.f);
    std::vector<uint16_t> h(n), gi(n), gf(n);
    std::vector<float> h_last(static_cast<size_t>(s.b * s.d)), glb(static_cast<size_t>(s.d)), gh0(h_last.size());
    MlgruSeqs q{s.b, s.t, nullptr, s.b * s.t, s.d};
    char shape[64];
    std::snprintf(shape, sizeof(shape), "B=%lld T=%lld D=%lld", static_cast<long long>(s.b),
                  static_cast<long long>(s.t), static_cast<long long>(s.d));
    const double fwd_bytes = 3.0 * 2 * n, bwd_bytes = 8.0 * 2 * n;
    if (s.cpu) {
      MlgruScanParams p{q, DType::kBFloat16, i.data(), f.data(), lb.data(), nullptr, nullptr, h.data(), h_last.data()};
      bench::report(bench::time_cpu("cpu/mlgru_scan", shape, fwd_bytes, 0, [&] { cpu::mlgru_scan(p); }));
      MlgruScanBwdParams bp{q, DType::kBFloat16, i.data(), f.data(), lb.data(), nullptr, nullptr, gh.data(),
                            ghl.data(), gi.data(), gf.data(), glb.data(), gh0.data()};
      bench::report(bench::time_cpu("cpu/mlgru_scan_fwd+bwd", shape, bwd_bytes, 0, [&] {
        cpu::mlgru_scan(p);
        cpu::mlgru_scan_backward(bp);
      }));
    }
#if defined(MMFREE_WITH_CUDA)
    int count = 0;
    if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0) {
      auto* di = bench::device_alloc<uint16_t>(n);
      auto* df = bench::device_alloc<uint16_t>(n);
      auto* dgh = bench::device_alloc<uint16_t>(n);
      auto* dh = bench::device_alloc<uint16_t>(n);
      auto* dgi = bench::device_alloc<uint16_t>(n);
      auto* dgf = bench::device_alloc<uint16_t>(n);
      auto* dlb = bench::device_alloc<float>(lb.size());
      auto* dghl = bench::device_alloc<float>(ghl.size());
      auto* dhl = bench::device_alloc<float>(h_last.size());
      auto* dglb = bench::device_alloc<float>(glb.size());
      auto* dgh0 = bench::device_alloc<float>(gh0.size());
      const int64_t ws_n = cuda::mlgru_bwd_workspace_floats(q, DType::kBFloat16, MlgruPath::kAuto);
      auto* ws = bench::device_alloc<float>(static_cast<size_t>(ws_n));
      bench::check_cuda(cudaMemcpy(di, i.data(), n * 2, cudaMemcpyHostToDevice), "copy");
      bench::check_cuda(cudaMemcpy(df, f.data(), n * 2, cudaMemcpyHostToDevice), "copy");
      bench::check_cuda(cudaMemcpy(dgh, gh.data(), n * 2, cudaMemcpyHostToDevice), "copy");
      bench::check_cuda(cudaMemcpy(dlb, lb.data(), lb.size() * 4, cudaMemcpyHostToDevice), "copy");
      bench::check_cuda(cudaMemset(dghl, 0, ghl.size() * 4), "memset");
      for (MlgruPath path : {MlgruPath::kAuto, MlgruPath::kSequential, MlgruPath::kChunked}) {
        const char* name = path == MlgruPath::kAuto ? "cuda/mlgru_scan"
                           : path == MlgruPath::kSequential ? "cuda/mlgru_scan[sequential]"
                                                            : "cuda/mlgru_scan[chunked]";
        MlgruScanParams p{q, DType::kBFloat16, di, df, dlb, nullptr, nullptr, dh, dhl, path};
        bench::report(bench::time_cuda(name, shape, fwd_bytes, 0,
                                       [&] { bench::check_cuda(cuda::mlgru_scan(p, nullptr), "mlgru_scan"); }));
      }
      MlgruScanParams p{q, DType::kBFloat16, di, df, dlb, nullptr, nullptr, dh, dhl, MlgruPath::kAuto};
      MlgruScanBwdParams bp{q,    DType::kBFloat16, di,  df,   dlb,  nullptr,          nullptr, dgh,
                            dghl, dgi,              dgf, dglb, dgh0, MlgruPath::kAuto, ws};
      bench::report(bench::time_cuda("cuda/mlgru_scan_fwd+bwd", shape, bwd_bytes, 0, [&] {
        bench::check_cuda(cuda::mlgru_scan(p, nullptr), "mlgru_scan");
        bench::check_cuda(cuda::mlgru_scan_backward(bp, nullptr), "mlgru_scan_backward");
      }));
      for (void* ptr : std::vector<void*>{di, df, dgh, dh, dgi, dgf, dlb, dghl, dhl, dglb, dgh0, ws}) cudaFree(ptr);
    }
#endif
  }
  return 0;
}
