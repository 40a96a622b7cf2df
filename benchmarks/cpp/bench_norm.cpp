// Benchmark of the fused RMSNorm kernels (CPU and, where built, CUDA), torch-free.
// Napkin: rms_norm_quant reads M*N inputs and writes M*N int8 codes + M scales; every op
// is memory-bound, so each case reports GB/s of the bytes it must move.
//   bench_norm            all cases
//   bench_norm cpu|cuda   one device only
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench_common.h"
#include "common/float_convert.h"
#include "cpu/cpu_features.h"
#include "norm.h"

using namespace mmfree;

namespace {

struct Buffers {
  std::vector<uint16_t> x, res, h;  // bf16 bits
  std::vector<uint16_t> w;
  std::vector<uint16_t> y, res_out;
  std::vector<int8_t> q;
  std::vector<float> scale;
};

std::vector<uint16_t> bf16_random(size_t n, uint64_t seed, float lo, float hi) {
  std::vector<float> f(n);
  bench::fill_uniform(f, seed, lo, hi);
  std::vector<uint16_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = float_to_bf16_bits(f[i]);
  return out;
}

Buffers make_buffers(int64_t m, int64_t n) {
  const size_t mn = static_cast<size_t>(m * n);
  Buffers b;
  b.x = bf16_random(mn, 1, -2.f, 2.f);
  b.res = bf16_random(mn, 2, -2.f, 2.f);
  b.h = bf16_random(mn, 3, -4.f, 4.f);
  b.w = bf16_random(static_cast<size_t>(n), 4, 0.5f, 1.5f);
  b.y.resize(mn);
  b.res_out.resize(mn);
  b.q.resize(3 * mn);
  b.scale.resize(static_cast<size_t>(3 * m));
  return b;
}

std::string shape_of(int64_t m, int64_t n) {
  return "M=" + std::to_string(m) + " N=" + std::to_string(n) + " bf16";
}

void bench_cpu(int64_t m, int64_t n) {
  Buffers b = make_buffers(m, n);
  std::vector<uint16_t> w3(static_cast<size_t>(3 * n));
  for (int p = 0; p < 3; ++p) std::memcpy(w3.data() + p * n, b.w.data(), n * sizeof(uint16_t));
  const double mn = static_cast<double>(m) * n;
  const std::string shape = shape_of(m, n);
  const int reps = m == 1 ? 2000 : 20;
  RmsNormQuantParams q{b.x.data(), DType::kBFloat16, b.w.data(), DType::kBFloat16, 1, m, n, 1e-6f,
                       b.q.data(), b.scale.data()};
  bench::report(bench::time_cpu("cpu/rms_norm_quant", shape, mn * 3 + 4 * m, 0, [&] { cpu::rms_norm_quant(q); }, 3, reps));
  RmsNormQuantParams q3 = q;
  q3.weights = w3.data();
  q3.num_weights = 3;
  bench::report(bench::time_cpu("cpu/rms_norm_quant_multi3", shape, mn * 5 + 12 * m, 0, [&] { cpu::rms_norm_quant(q3); },
                                3, reps));
  RmsNormParams r{b.x.data(), b.res.data(), DType::kBFloat16, b.w.data(), DType::kBFloat16, m, n, 1e-6f,
                  b.y.data(), b.res_out.data()};
  bench::report(bench::time_cpu("cpu/rms_norm_residual", shape, mn * 8, 0, [&] { cpu::rms_norm(r); }, 3, reps));
  RmsNormSwishGateParams g{};
  g.g = b.x.data();
  g.h = b.h.data();
  g.dtype = DType::kBFloat16;
  g.weight = b.w.data();
  g.w_dtype = DType::kBFloat16;
  g.rows = m;
  g.k = n;
  g.eps = 1e-6f;
  g.y = b.y.data();
  g.norm_weight = b.w.data();
  g.norm_w_dtype = DType::kBFloat16;
  g.norm_eps = 1e-6f;
  g.x_q = b.q.data();
  g.x_scale = b.scale.data();
  bench::report(bench::time_cpu("cpu/rms_norm_swish_gate", shape, mn * 6, 0, [&] { cpu::rms_norm_swish_gate(g); }, 3, reps));
  bench::report(bench::time_cpu("cpu/rms_norm_swish_gate_quant", shape, mn * 5 + 4 * m, 0,
                                [&] { cpu::rms_norm_swish_gate_quant(g); }, 3, reps));
}

#if defined(MMFREE_WITH_CUDA)
template <class T>
T* upload(const std::vector<T>& v) {
  T* d = bench::device_alloc<T>(v.size());
  bench::check_cuda(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return d;
}

void bench_cuda(int64_t m, int64_t n) {
  Buffers b = make_buffers(m, n);
  const size_t mn = static_cast<size_t>(m * n);
  uint16_t* x = upload(b.x);
  uint16_t* res = upload(b.res);
  uint16_t* h = upload(b.h);
  uint16_t* w = upload(b.w);
  std::vector<uint16_t> w3_host(static_cast<size_t>(3 * n));
  for (int p = 0; p < 3; ++p) std::memcpy(w3_host.data() + p * n, b.w.data(), n * sizeof(uint16_t));
  uint16_t* w3 = upload(w3_host);
  uint16_t* y = bench::device_alloc<uint16_t>(mn);
  uint16_t* ro = bench::device_alloc<uint16_t>(mn);
  int8_t* q = bench::device_alloc<int8_t>(3 * mn);
  float* s = bench::device_alloc<float>(static_cast<size_t>(3 * m));
  const double dmn = static_cast<double>(mn);
  const std::string shape = shape_of(m, n);
  RmsNormQuantParams qp{x, DType::kBFloat16, w, DType::kBFloat16, 1, m, n, 1e-6f, q, s};
  RmsNormQuantParams q3 = qp;
  q3.weights = w3;
  q3.num_weights = 3;
  bench::report(bench::time_cuda("cuda/rms_norm_quant", shape, dmn * 3 + 4 * m, 0,
                                 [&] { bench::check_cuda(cuda::rms_norm_quant(qp, nullptr), "quant"); }));
  bench::report(bench::time_cuda("cuda/rms_norm_quant_multi3", shape, dmn * 5 + 12 * m, 0,
                                 [&] { bench::check_cuda(cuda::rms_norm_quant(q3, nullptr), "multi"); }));
  RmsNormParams rp{x, res, DType::kBFloat16, w, DType::kBFloat16, m, n, 1e-6f, y, ro};
  bench::report(bench::time_cuda("cuda/rms_norm_residual", shape, dmn * 8, 0,
                                 [&] { bench::check_cuda(cuda::rms_norm(rp, nullptr), "rms_norm"); }));
  RmsNormSwishGateParams g{};
  g.g = x;
  g.h = h;
  g.dtype = DType::kBFloat16;
  g.weight = w;
  g.w_dtype = DType::kBFloat16;
  g.rows = m;
  g.k = n;
  g.eps = 1e-6f;
  g.y = y;
  g.norm_weight = w;
  g.norm_w_dtype = DType::kBFloat16;
  g.norm_eps = 1e-6f;
  g.x_q = q;
  g.x_scale = s;
  bench::report(bench::time_cuda("cuda/rms_norm_swish_gate", shape, dmn * 6, 0,
                                 [&] { bench::check_cuda(cuda::rms_norm_swish_gate(g, nullptr), "gate"); }));
  bench::report(bench::time_cuda("cuda/rms_norm_swish_gate_quant", shape, dmn * 5 + 4 * m, 0,
                                 [&] { bench::check_cuda(cuda::rms_norm_swish_gate_quant(g, nullptr), "gate_quant"); }));
  // Device-to-device copy of the same input bytes: the ceiling the targets refer to.
  bench::report(bench::time_cuda("cuda/copy (ceiling)", shape, dmn * 4, 0, [&] {
    bench::check_cuda(cudaMemcpyAsync(y, x, mn * 2, cudaMemcpyDeviceToDevice, nullptr), "copy");
  }));
  for (void* p : {static_cast<void*>(x), static_cast<void*>(res), static_cast<void*>(h), static_cast<void*>(w),
                  static_cast<void*>(w3), static_cast<void*>(y), static_cast<void*>(ro), static_cast<void*>(q),
                  static_cast<void*>(s)}) {
    cudaFree(p);
  }
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  bench::init_cpu_threads();
  if (only.empty() || only == "cpu") {
    std::printf("bench_norm: %d CPU thread(s), path %s\n", bench::cpu_threads(), cpu::isa_name(cpu::active_isa()));
    for (int64_t m : {1, 512}) bench_cpu(m, 2560);
  }
#if defined(MMFREE_WITH_CUDA)
  int count = 0;
  if ((only.empty() || only == "cuda") && cudaGetDeviceCount(&count) == cudaSuccess && count > 0) {
    const int64_t shapes[][2] = {{8192, 2560}, {8192, 6912}, {1, 2560}};
    for (const auto& sh : shapes) bench_cuda(sh[0], sh[1]);
  }
#endif
  return 0;
}
