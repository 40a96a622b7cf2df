// Check and benchmark of the CUDA transposed ternary product (the STE backward dX = dY @ W_q
// on 16-bit tensor cores, read from the packed codes), torch-free.
//
//   bench_ternary_t_cuda               full check, then timings at the training shapes
//   bench_ternary_t_cuda --check-only  small shapes, no timing (for compute-sanitizer)
//
// Checks are exact: integer-valued grads (|g| <= 256 for one bf16 term, <= 2047 for two, as
// an fp16 grad is passed, <= 65535 for three, as an fp32 grad is) keep every product and
// every fp32 partial sum
// an integer below 2^24, so each output must equal the int64 reference bit for bit, with
// w_scale = 1. Outputs are poisoned with NaN bits first.
// Exit status: 0 all PASS, 1 a FAIL, 77 no CUDA device (nothing checked).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "common/float_convert.h"
#include "common/ternary_format.h"
#include "ternary.h"

using namespace mmfree;

#if defined(MMFREE_WITH_CUDA)
namespace {

// The grad as the kernel reads it: bf16 terms summing to g exactly, [splits, M, N].
std::vector<uint16_t> grad_terms(const std::vector<int32_t>& g, int splits) {
  std::vector<uint16_t> out(g.size() * splits);
  for (size_t i = 0; i < g.size(); ++i) {
    float rest = static_cast<float>(g[i]);
    for (int s = 0; s < splits; ++s) {
      const uint16_t h = float_to_bf16_bits(rest);
      out[s * g.size() + i] = h;
      rest -= bf16_bits_to_float(h);
    }
  }
  return out;
}

int64_t check_one(int64_t M, int64_t N, int64_t K, int splits, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int bound_t = splits == 3 ? 65535 : splits == 2 ? 2047 : 256;
  const int bound = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(bound_t, (int64_t{1} << 23) / std::max<int64_t>(N, 1))));
  std::uniform_int_distribution<int> dg(-bound, bound), dw(-1, 1);
  std::vector<int32_t> g(static_cast<size_t>(M * N));
  for (auto& v : g) v = dg(rng);
  std::vector<int8_t> w(static_cast<size_t>(N * K));
  for (auto& v : w) v = static_cast<int8_t>(dw(rng));
  const std::vector<uint8_t> packed = bench::pack_ternary_host(w, N, K);
  const std::vector<uint16_t> terms = grad_terms(g, splits);

  uint16_t* d_g = bench::device_alloc<uint16_t>(std::max<size_t>(terms.size(), 1));
  uint8_t* d_p = bench::device_alloc<uint8_t>(std::max<size_t>(packed.size(), 1));
  float* d_ws = bench::device_alloc<float>(1);
  float* d_out = bench::device_alloc<float>(std::max<int64_t>(M * K, 1));
  const float one = 1.f;
  bench::check_cuda(cudaMemcpy(d_g, terms.data(), terms.size() * 2, cudaMemcpyHostToDevice), "copy g");
  bench::check_cuda(cudaMemcpy(d_p, packed.data(), packed.size(), cudaMemcpyHostToDevice), "copy w");
  bench::check_cuda(cudaMemcpy(d_ws, &one, 4, cudaMemcpyHostToDevice), "copy ws");
  bench::check_cuda(cudaMemset(d_out, 0xff, std::max<int64_t>(M * K, 1) * 4), "poison");
  TernaryMatmulTCudaParams p{d_g, DType::kBFloat16, splits, d_p, d_ws, d_out, M, N, K};
  bench::check_cuda(cuda::ternary_matmul_t(p, nullptr), "ternary_matmul_t");
  bench::check_cuda(cudaDeviceSynchronize(), "ternary_matmul_t");
  std::vector<float> out(static_cast<size_t>(M * K));
  bench::check_cuda(cudaMemcpy(out.data(), d_out, out.size() * 4, cudaMemcpyDeviceToHost), "copy out");
  cudaFree(d_g); cudaFree(d_p); cudaFree(d_ws); cudaFree(d_out);

  std::vector<int64_t> ref(static_cast<size_t>(M * K), 0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t gv = g[m * N + n];
      const int8_t* wr = &w[n * K];
      int64_t* rr = &ref[m * K];
      for (int64_t k = 0; k < K; ++k) rr[k] += gv * wr[k];
    }
  int64_t bad = 0;
  for (int64_t i = 0; i < M * K; ++i) {
    if (out[i] != static_cast<float>(ref[i])) {
      if (bad < 3) std::printf("    mismatch i=%lld got %g want %lld\n", static_cast<long long>(i), out[i],
                               static_cast<long long>(ref[i]));
      ++bad;
    }
  }
  return bad;
}

int check_all(bool small) {
  struct Shape { int64_t M, N, K; };
  std::vector<Shape> shapes = {{1, 1, 1}, {1, 5, 3}, {7, 300, 100}, {15, 64, 128}, {17, 67, 130}, {130, 200, 300}};
  if (!small) {
    for (Shape s : {Shape{300, 2560, 2560}, Shape{129, 6912, 2560}, Shape{256, 13824, 2560}, Shape{64, 2560, 6912},
                    Shape{200, 37, 6913}, Shape{33, 2560, 20000}, Shape{2048, 320, 2560}})
      shapes.push_back(s);
  }
  const int modes[] = {1, 2, 3};  // bf16 terms per grad value
  int failures = 0, checks = 0;
  uint64_t seed = 1;
  for (const Shape& s : shapes) {
    for (const int splits : modes) {
      const int64_t bad = check_one(s.M, s.N, s.K, splits, seed++);
      ++checks;
      if (bad || !small) {
        std::printf("%s matmul_t M=%-5lld N=%-6lld K=%-6lld bf16 terms=%d bad=%lld\n", bad ? "FAIL" : "PASS",
                    static_cast<long long>(s.M), static_cast<long long>(s.N), static_cast<long long>(s.K), splits,
                    static_cast<long long>(bad));
      }
      failures += bad != 0;
    }
  }
  std::printf("%s: %d of %d matmul_t checks failed\n", failures ? "FAIL" : "PASS", failures, checks);
  return failures;
}

void time_all() {
  // dX = dY @ W for the 2.7B projections at a training batch of 8192 tokens: (N, K) of the
  // weight, the reduction runs over N. FLOPs = 2*M*N*K (tensor-core products by +-1).
  struct NK { int64_t n, k; };
  const NK shapes[] = {{13824, 2560}, {2560, 6912}, {2560, 2560}};
  std::printf("\n# ternary_matmul_t (bf16 grad -> fp32 dX); TFLOPS = 2*M*N*K / time\n");
  for (int splits : {1, 3}) {
    for (int64_t M : {2048, 8192}) {
      for (const NK& s : shapes) {
        const int64_t N = s.n, K = s.k;
        uint16_t* g = bench::device_alloc<uint16_t>(static_cast<size_t>(splits * M * N));
        bench::check_cuda(cudaMemset(g, 0x3c, static_cast<size_t>(splits * M * N) * 2), "g");
        uint8_t* pk = bench::device_alloc<uint8_t>(static_cast<size_t>(N * ternary::row_bytes(K)));
        bench::check_cuda(cudaMemset(pk, 0x96, static_cast<size_t>(N * ternary::row_bytes(K))), "w");
        float* ws = bench::device_alloc<float>(1);
        float* out = bench::device_alloc<float>(static_cast<size_t>(M * K));
        const float one = 1.f;
        bench::check_cuda(cudaMemcpy(ws, &one, 4, cudaMemcpyHostToDevice), "ws");
        TernaryMatmulTCudaParams p{g, DType::kBFloat16, splits, pk, ws, out, M, N, K};
        const double bytes = 2.0 * splits * M * N + N * ternary::row_bytes(K) + 4.0 * M * K;
        char shape[96];
        std::snprintf(shape, sizeof(shape), "M=%lld N=%lld K=%lld x%d", static_cast<long long>(M),
                      static_cast<long long>(N), static_cast<long long>(K), splits);
        const bench::Result r = bench::time_cuda("cuda/ternary_matmul_t", shape, bytes, 2.0 * splits * M * N * K,
                                                 [&] { bench::check_cuda(cuda::ternary_matmul_t(p, nullptr), "t"); },
                                                 3, 20);
        bench::report(r);
        std::printf("    -> %.0f TFLOPS (16-bit mma)\n", r.flops / (r.median_us * 1e-6) / 1e12);
        cudaFree(g); cudaFree(pk); cudaFree(ws); cudaFree(out);
      }
    }
  }
}

}  // namespace
#endif

int main(int argc, char** argv) {
  bool check_only = false;
  for (int i = 1; i < argc; ++i) check_only |= std::strcmp(argv[i], "--check-only") == 0;
#if defined(MMFREE_WITH_CUDA)
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("SKIP: no CUDA device; nothing checked\n");
    return 77;
  }
  bench::init_cpu_threads();
  const int failures = check_all(check_only);
  if (failures) return 1;
  if (!check_only) time_all();
  return 0;
#else
  (void)check_only;
  std::printf("SKIP: built without CUDA; nothing checked\n");
  return 77;
#endif
}
