// Check and benchmark of the CUDA ternary matmul kernels (torch-free).
//
//   bench_ternary_cuda               full check (shape grid + 2.7B shapes), then timings
//   bench_ternary_cuda --check-only  small shapes, no timing (for compute-sanitizer)
//
// Every output of every kernel (simple, gemv, gemm and the dispatching ternary_matmul) is
// compared with a CPU int64 reference: exactly with scales 1 and fp32 output (float(acc)
// is exact for |acc| < 2^24), and bit for bit with random scales in fp32/bf16/fp16, where
// the expected value is (float(acc) * x_scale) * w_scale rounded once, as in the reference.
// Outputs are poisoned with NaN before each run. Activations come contiguous, with an
// aligned padded row stride, and with an odd stride from a misaligned pointer.
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

#if defined(MMFREE_WITH_CUDA)
#include "cuda/ternary/launch.h"
#endif

using namespace mmfree;

#if defined(MMFREE_WITH_CUDA)
namespace {

struct Problem {
  int64_t M, N, K, stride;
  int x_offset;                 // bytes between the allocation and x_q (misalignment)
  std::vector<int8_t> x;        // [M, stride] from x_offset
  std::vector<int8_t> w;        // [N, K]
  std::vector<uint8_t> packed;  // [N, row_bytes(K)]
  std::vector<int64_t> acc;     // [M, N] reference
};

// layout: 0 contiguous, 1 padded aligned stride, 2 odd stride + misaligned pointer.
Problem make_problem(int64_t M, int64_t N, int64_t K, int layout, uint64_t seed) {
  Problem pr;
  pr.M = M; pr.N = N; pr.K = K;
  pr.stride = layout == 0 ? K : layout == 1 ? (K + 15) / 16 * 16 + 16 : K + 3;
  pr.x_offset = layout == 2 ? 1 : 0;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> dx(-128, 127), dw(-1, 1);
  pr.x.assign(static_cast<size_t>(M * pr.stride), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < pr.stride; ++k) pr.x[m * pr.stride + k] = static_cast<int8_t>(dx(rng));  // padding too
  pr.w.resize(static_cast<size_t>(N * K));
  for (auto& v : pr.w) v = static_cast<int8_t>(dw(rng));
  pr.packed = bench::pack_ternary_host(pr.w, N, K);
  pr.acc.assign(static_cast<size_t>(M * N), 0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* wr = &pr.w[n * K];
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xr = &pr.x[m * pr.stride];
      int64_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<int64_t>(xr[k]) * wr[k];
      pr.acc[m * N + n] = s;
    }
  }
  return pr;
}

struct Device {
  int8_t* x = nullptr;  // allocation; x_q = x + x_offset
  uint8_t* packed = nullptr;
  float* x_scale = nullptr;
  float* w_scale = nullptr;
  void* out = nullptr;
  void* workspace = nullptr;  // the int8-weight GEMM's expanded weights (every kernel gets it)
  size_t workspace_bytes = 0;
  void release() {
    cudaFree(x); cudaFree(packed); cudaFree(x_scale); cudaFree(w_scale); cudaFree(out); cudaFree(workspace);
  }
};

Device upload(const Problem& pr) {
  Device d;
  d.x = bench::device_alloc<int8_t>(pr.x.size() + 16);
  d.packed = bench::device_alloc<uint8_t>(std::max<size_t>(pr.packed.size(), 1));
  d.x_scale = bench::device_alloc<float>(std::max<int64_t>(pr.M, 1));
  d.w_scale = bench::device_alloc<float>(1);
  d.out = bench::device_alloc<float>(std::max<int64_t>(pr.M * pr.N, 1));
  d.workspace_bytes = std::max<size_t>(cuda::ternary_kernels::sm90_int8_workspace_bytes(pr.N, pr.K), 16);
  d.workspace = bench::device_alloc<uint8_t>(d.workspace_bytes);
  bench::check_cuda(cudaMemcpy(d.x + pr.x_offset, pr.x.data(), pr.x.size(), cudaMemcpyHostToDevice), "copy x");
  bench::check_cuda(cudaMemcpy(d.packed, pr.packed.data(), pr.packed.size(), cudaMemcpyHostToDevice), "copy w");
  return d;
}

using Launcher = cudaError_t (*)(const TernaryMatmulParams&, cudaStream_t);
struct Kernel {
  const char* name;
  Launcher fn;
};
// Indices into kKernels used by the timing tables and the misaligned-pointer check.
enum KernelIndex { kSimple = 0, kGemvV1 = 1, kGemm = 2, kDispatch = 3, kGemmSm90 = 4, kGemmSm90Int8 = 6 };
cudaError_t dispatch(const TernaryMatmulParams& p, cudaStream_t stream) { return cuda::ternary_matmul(p, stream); }
#if defined(MMFREE_HAVE_SM90_GEMM)
// The cluster split-K GEMM at 3 CTAs per cluster (uneven slices of K); needs an sm_90 GPU.
cudaError_t split_k3(const TernaryMatmulParams& p, cudaStream_t stream) {
  return cuda::ternary_kernels::launch_gemm_split_k(p, 3, stream);
}
#endif
const Kernel kKernels[] = {
    {"simple", &cuda::ternary_kernels::launch_simple},
    {"gemv", &cuda::ternary_kernels::launch_gemv},
    {"gemm", &cuda::ternary_kernels::launch_gemm},
    {"dispatch", &dispatch},
#if defined(MMFREE_HAVE_SM90_GEMM)
    {"gemm_sm90", &cuda::ternary_kernels::launch_gemm_sm90},  // needs an sm_90 GPU
    {"split_k3", &split_k3},
    {"gemm_sm90_int8", &cuda::ternary_kernels::launch_gemm_sm90_int8},  // weights expanded first; sm_90
#endif
};

uint32_t expected_bits(int64_t acc, float xs, float ws, DType t) {
  const float y = (static_cast<float>(acc) * xs) * ws;
  uint32_t u;
  std::memcpy(&u, &y, 4);
  if (t == DType::kBFloat16) return float_to_bf16_bits(y);
  if (t == DType::kFloat16) return float_to_fp16_bits(y);
  return u;
}

// Runs one kernel on one problem and compares every output; returns the mismatch count.
int64_t run_check(const Kernel& kern, const Problem& pr, Device& d, bool scaled, DType t, uint64_t seed) {
  std::vector<float> xs(static_cast<size_t>(std::max<int64_t>(pr.M, 1)), 1.f);
  float ws = 1.f;
  if (scaled) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(1e-3f, 2e-2f);
    for (auto& v : xs) v = u(rng);
    ws = u(rng) * 5;
  }
  bench::check_cuda(cudaMemcpy(d.x_scale, xs.data(), xs.size() * 4, cudaMemcpyHostToDevice), "copy xs");
  bench::check_cuda(cudaMemcpy(d.w_scale, &ws, 4, cudaMemcpyHostToDevice), "copy ws");
  const size_t esize = static_cast<size_t>(dtype_size(t));
  bench::check_cuda(cudaMemset(d.out, 0xff, std::max<int64_t>(pr.M * pr.N, 1) * esize), "poison");
  TernaryMatmulParams p{d.x + pr.x_offset, pr.stride, d.x_scale, d.packed, d.w_scale, d.out, t, pr.M, pr.N, pr.K};
  p.workspace = d.workspace;
  p.workspace_bytes = d.workspace_bytes;
  bench::check_cuda(kern.fn(p, nullptr), kern.name);
  bench::check_cuda(cudaDeviceSynchronize(), kern.name);
  std::vector<uint8_t> out(static_cast<size_t>(pr.M * pr.N) * esize);
  bench::check_cuda(cudaMemcpy(out.data(), d.out, out.size(), cudaMemcpyDeviceToHost), "copy out");
  int64_t bad = 0;
  for (int64_t m = 0; m < pr.M; ++m) {
    for (int64_t n = 0; n < pr.N; ++n) {
      const int64_t i = m * pr.N + n;
      const uint32_t want = expected_bits(pr.acc[i], xs[m], ws, t);
      uint32_t got = 0;
      std::memcpy(&got, &out[static_cast<size_t>(i) * esize], esize);
      if (got != want) {
        if (bad < 3) {
          std::printf("    mismatch %s m=%lld n=%lld: got 0x%08x want 0x%08x (acc %lld)\n", kern.name,
                      static_cast<long long>(m), static_cast<long long>(n), got, want,
                      static_cast<long long>(pr.acc[i]));
        }
        ++bad;
      }
    }
  }
  return bad;
}

int check_all(bool small) {
  std::vector<int64_t> Ms = {1, 2, 4, 8, 15, 16, 17, 32, 33, 300};
  std::vector<int64_t> Ks = {1, 3, 64, 100, 128, 2560, 6913};
  std::vector<int64_t> Ns = {1, 5, 2560};
  if (small) {
    Ms = {1, 2, 5, 16, 17, 33, 70};
    Ks = {1, 3, 100, 128, 300};
    Ns = {1, 5, 67, 130};
  }
  struct Shape { int64_t M, N, K; };
  std::vector<Shape> shapes;
  for (int64_t m : Ms) for (int64_t k : Ks) for (int64_t n : Ns) shapes.push_back({m, n, k});
  // Long rows (several shared-memory slabs of the GEMV, K beyond the grid above).
  for (Shape s : {Shape{1, 37, 9000}, Shape{3, 5, 8193}, Shape{16, 67, 8192}, Shape{9, 130, 16500}})
    shapes.push_back(s);
  if (!small) {
    for (Shape s : {Shape{2, 2560, 20000}, Shape{17, 300, 12345}}) shapes.push_back(s);
    for (int64_t m : {1, 4, 16, 64}) {
      for (auto nk : {std::pair<int64_t, int64_t>{2560, 2560}, {13824, 2560}, {2560, 6912}, {32000, 2560}})
        shapes.push_back({m, nk.first, nk.second});
    }
  }
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  int failures = 0, checks = 0;
  uint64_t seed = 1;
  for (size_t si = 0; si < shapes.size(); ++si) {
    const Shape s = shapes[si];
    const int layout = static_cast<int>(si % 3);
    Problem pr = make_problem(s.M, s.N, s.K, layout, seed++);
    Device d = upload(pr);
    const DType t = dtypes[si % 3];
    for (const Kernel& kern : kKernels) {
      // The one-thread-per-output baseline is too slow for the largest shapes.
      if (std::string(kern.name) == "simple" && s.M * s.N * s.K > (int64_t{1} << 31)) continue;
      const int64_t bad_exact = run_check(kern, pr, d, false, DType::kFloat32, seed);
      const int64_t bad_scaled = run_check(kern, pr, d, true, t, seed + 1000);
      ++checks;
      const bool ok = bad_exact == 0 && bad_scaled == 0;
      if (!ok || !small) {
        std::printf("%s %-8s M=%-5lld N=%-6lld K=%-5lld layout=%d out=%-8s exact_bad=%lld scaled_bad=%lld\n",
                    ok ? "PASS" : "FAIL", kern.name, static_cast<long long>(s.M), static_cast<long long>(s.N),
                    static_cast<long long>(s.K), layout, dtype_name(t), static_cast<long long>(bad_exact),
                    static_cast<long long>(bad_scaled));
      }
      failures += !ok;
    }
    d.release();
  }
  // A weight pointer off 16-byte alignment must still work (dispatch falls back).
  {
    Problem pr = make_problem(3, 37, 300, 0, seed++);
    Device d = upload(pr);
    uint8_t* shifted = bench::device_alloc<uint8_t>(pr.packed.size() + 1);
    bench::check_cuda(cudaMemcpy(shifted + 1, pr.packed.data(), pr.packed.size(), cudaMemcpyHostToDevice), "copy");
    cudaFree(d.packed);
    d.packed = shifted + 1;
    const int64_t bad = run_check(kKernels[kDispatch], pr, d, true, DType::kBFloat16, seed);
    std::printf("%s dispatch misaligned packed pointer: bad=%lld\n", bad ? "FAIL" : "PASS", static_cast<long long>(bad));
    failures += bad != 0;
    ++checks;
    d.packed = shifted;
    d.release();
  }
  std::printf("%s: %d of %d kernel checks failed\n", failures ? "FAIL" : "PASS", failures, checks);
  return failures;
}

void report_bw(const bench::Result& r) {
  bench::report(r);
  const double gbs = r.bytes / (r.median_us * 1e-6) / 1e9;
  std::printf("    -> %.1f%% of 3.0 TB/s copy bandwidth, %.1f TOPS\n", 100.0 * gbs / 3000.0,
              r.flops / (r.median_us * 1e-6) / 1e12);
}

void time_all() {
  struct NK { int64_t n, k; };
  const NK gemv_shapes[] = {{13824, 2560}, {2560, 6912}, {2560, 2560}, {32000, 2560}};
  const NK gemm_shapes[] = {{2560, 2560}, {13824, 2560}, {2560, 6912}, {32000, 2560}};
  auto time_one = [](const Kernel& kern, int64_t M, int64_t N, int64_t K) {
    Problem pr;  // random bytes are enough for timing; no reference needed
    pr.M = M; pr.N = N; pr.K = K; pr.stride = K; pr.x_offset = 0;
    pr.x.assign(static_cast<size_t>(M * K), 3);
    pr.packed.assign(static_cast<size_t>(N * ternary::row_bytes(K)), 0x96);
    Device d = upload(pr);
    const float one = 1.f;
    std::vector<float> xs(static_cast<size_t>(M), 1.f);
    bench::check_cuda(cudaMemcpy(d.x_scale, xs.data(), xs.size() * 4, cudaMemcpyHostToDevice), "xs");
    bench::check_cuda(cudaMemcpy(d.w_scale, &one, 4, cudaMemcpyHostToDevice), "ws");
    cudaFree(d.out);
    d.out = bench::device_alloc<uint16_t>(static_cast<size_t>(M * N));
    TernaryMatmulParams p{d.x, K, d.x_scale, d.packed, d.w_scale, d.out, DType::kBFloat16, M, N, K};
    p.workspace = d.workspace;
    p.workspace_bytes = d.workspace_bytes;
    const double bytes = static_cast<double>(pr.packed.size()) + static_cast<double>(M * K) + 2.0 * M * N;
    char shape[96];
    std::snprintf(shape, sizeof(shape), "M=%lld %lld->%lld", static_cast<long long>(M), static_cast<long long>(K),
                  static_cast<long long>(N));
    report_bw(bench::time_cuda(std::string("cuda/ternary_") + kern.name, shape, bytes, 2.0 * M * N * K,
                               [&] { bench::check_cuda(kern.fn(p, nullptr), kern.name); }));
    d.release();
  };
  std::printf("\n# decode GEMV (bf16 out); bytes = packed weights + activations + output\n");
  for (int64_t M : {1, 2, 4, 8, 16}) {
    for (const NK& s : gemv_shapes) time_one(kKernels[kGemvV1], M, s.n, s.k);
  }
  std::printf("\n# dispatch (ternary_matmul) at decode sizes: the GEMV below M = %d\n",
              cuda::ternary_kernels::kGemmMinRows);
  for (int64_t M : {1, 16}) {
    for (const NK& s : gemv_shapes) time_one(kKernels[kDispatch], M, s.n, s.k);
  }
  std::printf("\n# GEMV vs tensor-core GEMM at the crossover (the op switches at M = %d)\n",
              cuda::ternary_kernels::kGemmMinRows);
  for (int64_t M : {8, 16, 32}) {
    for (const NK& s : gemv_shapes) {
      time_one(kKernels[kGemvV1], M, s.n, s.k);
      time_one(kKernels[kGemm], M, s.n, s.k);
    }
  }
  std::printf("\n# prefill GEMM (bf16 out); TOPS = 2*M*N*K / time\n");
  for (int64_t M : {128, 512, 2048, 4096, 8192}) {
    for (const NK& s : gemm_shapes) {
      time_one(kKernels[kGemm], M, s.n, s.k);
#if defined(MMFREE_HAVE_SM90_GEMM)
      time_one(kKernels[kGemmSm90], M, s.n, s.k);
      time_one(kKernels[kGemmSm90Int8], M, s.n, s.k);
#endif
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
