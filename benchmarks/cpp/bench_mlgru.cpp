// Benchmark of the fused MLGRU scan (CPU and, where built, CUDA), bf16 in/out with a lower
// bound. Napkin: forward moves 3 tensors (i, f in; h out), forward+backward 8 (the backward
// reads i, f, grad_h and writes grad_i, grad_f; its recompute pass reads i, f again: 10 moved).
#include <algorithm>
#include <cmath>
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

#if defined(MMFREE_WITH_CUDA)
template <class T>
std::vector<T> to_host(const T* dev, size_t n) {
  std::vector<T> out(n);
  bench::check_cuda(cudaMemcpy(out.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost), "copy back");
  return out;
}

float value(uint16_t v) { return bf16_bits_to_float(v); }
float value(float v) { return v; }

// Largest |new - old| relative to max(|old|, 1); returns false above `tol` (the variants
// scan with different tile shapes: the fp32 state differs by reassociation only).
template <class T>
bool compare(const char* what, const std::vector<T>& ref, const std::vector<T>& got, double tol) {
  double worst = 0;
  for (size_t k = 0; k < ref.size(); ++k) {
    const double a = value(ref[k]), b = value(got[k]);
    const double e = (a != a || b != b) ? 1e30 : std::fabs(a - b) / std::max(1.0, std::fabs(a));
    worst = std::max(worst, e);
  }
  const bool ok = worst <= tol;
  std::printf("  check %-10s max rel err vs v1 %.3g %s\n", what, worst, ok ? "ok" : "MISMATCH");
  return ok;
}
#endif

}  // namespace

int main() {
  bool all_ok = true;
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
      // Kernel variants side by side (v1 = the first kernels; outputs checked against it).
      std::vector<uint16_t> ref_h, ref_gi, ref_gf;
      std::vector<float> ref_hl, ref_glb, ref_gh0;
      const MlgruVariant variants[] = {MlgruVariant::kV1, MlgruVariant::kBest, MlgruVariant::kV2U4};
      const char* vnames[] = {"v1", "v2", "v2-u4"};
      for (int vi = 0; vi < 3; ++vi) {
        const MlgruVariant var = variants[vi];
        MlgruScanParams p{q, DType::kBFloat16, di, df, dlb, nullptr, nullptr, dh, dhl, MlgruPath::kAuto, nullptr, var};
        MlgruScanBwdParams bp{q,    DType::kBFloat16, di,  df,   dlb,  nullptr,          nullptr, dgh,
                              dghl, dgi,              dgf, dglb, dgh0, MlgruPath::kAuto, ws,      var};
        bench::check_cuda(cudaMemset(dh, 0xff, n * 2), "poison");
        bench::check_cuda(cudaMemset(dgi, 0xff, n * 2), "poison");
        bench::check_cuda(cudaMemset(dgf, 0xff, n * 2), "poison");
        bench::check_cuda(cuda::mlgru_scan(p, nullptr), "mlgru_scan");
        bench::check_cuda(cuda::mlgru_scan_backward(bp, nullptr), "mlgru_scan_backward");
        bench::check_cuda(cudaDeviceSynchronize(), "sync");
        auto h_now = to_host(dh, n), gi_now = to_host(dgi, n), gf_now = to_host(dgf, n);
        auto hl_now = to_host(dhl, h_last.size()), glb_now = to_host(dglb, glb.size()),
             gh0_now = to_host(dgh0, gh0.size());
        if (vi == 0) {
          ref_h = h_now, ref_gi = gi_now, ref_gf = gf_now, ref_hl = hl_now, ref_glb = glb_now, ref_gh0 = gh0_now;
        } else {
          std::printf("%s %s:\n", vnames[vi], shape);
          // 16-bit outputs: 2 bf16 ulps of rounding-boundary flips; fp32 states: reassociation.
          all_ok &= compare("h", ref_h, h_now, 1.6e-2);
          all_ok &= compare("h_last", ref_hl, hl_now, 1e-4);
          all_ok &= compare("grad_i", ref_gi, gi_now, 1.6e-2);
          all_ok &= compare("grad_f", ref_gf, gf_now, 1.6e-2);
          all_ok &= compare("grad_h0", ref_gh0, gh0_now, 1e-4);
          all_ok &= compare("grad_lb", ref_glb, glb_now, 1e-3);
        }
        char name[64];
        std::snprintf(name, sizeof(name), "cuda/mlgru_scan[%s]", vnames[vi]);
        bench::report(bench::time_cuda(name, shape, fwd_bytes, 0,
                                       [&] { bench::check_cuda(cuda::mlgru_scan(p, nullptr), "mlgru_scan"); }));
        std::snprintf(name, sizeof(name), "cuda/mlgru_scan_fwd+bwd[%s]", vnames[vi]);
        bench::report(bench::time_cuda(name, shape, bwd_bytes, 0, [&] {
          bench::check_cuda(cuda::mlgru_scan(p, nullptr), "mlgru_scan");
          bench::check_cuda(cuda::mlgru_scan_backward(bp, nullptr), "mlgru_scan_backward");
        }));
      }
      for (void* ptr : std::vector<void*>{di, df, dgh, dh, dgi, dgf, dlb, dghl, dhl, dglb, dgh0, ws}) cudaFree(ptr);
    }
#endif
  }
  if (!all_ok) std::printf("bench_mlgru: VARIANT MISMATCH (see the check lines)\n");
  return all_ok ? 0 : 1;
}
