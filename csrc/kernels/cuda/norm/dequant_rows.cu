// CUDA dequantization of per-row int8 activations (dequant.h). Memory-bound: M=8192 K=2560
// to bf16 moves 21 MB in and 42 MB out, ~15 us at 4.25 TB/s; the TensorIterator mul of an
// int8 and an fp32 tensor into bf16 took 91 us. Fast path (K % 16 == 0, 16-byte aligned):
// each thread takes kChunks runs of 16 codes (one 16-byte load each, all in flight before
// the first store) and writes each run as 16-byte stores. Otherwise one element per thread.
#include "cuda/norm/norm_common.cuh"
#include "dequant.h"

namespace mmfree {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunks = 2;  // 16-code runs per thread
constexpr int kRun = 16;

template <class T>
__global__ void __launch_bounds__(kThreads) dequant_vec(const int8_t* __restrict__ q, const float* __restrict__ scale,
                                                        int64_t runs, int64_t k, T* __restrict__ out) {
  constexpr int N = norm::VecOf<T>::N;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kChunks + threadIdx.x;
  uint4 raw[kChunks];
  float s[kChunks];
#pragma unroll
  for (int u = 0; u < kChunks; ++u) {
    const int64_t c = base + u * kThreads;
    if (c < runs) {
      raw[u] = __ldg(reinterpret_cast<const uint4*>(q) + c);
      s[u] = __ldg(scale + (c * kRun) / k);  // K % 16 == 0: a run lies in one row
    }
  }
#pragma unroll
  for (int u = 0; u < kChunks; ++u) {
    const int64_t c = base + u * kThreads;
    if (c >= runs) continue;
    const int8_t* e = reinterpret_cast<const int8_t*>(&raw[u]);
    uint4* o = reinterpret_cast<uint4*>(out) + c * (kRun / N);
#pragma unroll
    for (int w = 0; w < kRun / N; ++w) {
      float f[N];
#pragma unroll
      for (int i = 0; i < N; ++i) f[i] = static_cast<float>(e[w * N + i]) * s[u];
      o[w] = norm::pack<T, N>(f);
    }
  }
}

template <class T>
__global__ void dequant_scalar(const int8_t* __restrict__ q, const float* __restrict__ scale, int64_t n, int64_t k,
                               T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = from_float<T>(static_cast<float>(q[i]) * scale[i / k]);
  }
}

template <class T>
void launch(const DequantRowsParams& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.k;
  T* out = static_cast<T*>(p.out);
  if (p.k % kRun == 0 && norm::aligned16(p.x_q) && norm::aligned16(p.out)) {
    const int64_t runs = n / kRun;
    dequant_vec<T><<<ceil_div(runs, int64_t{kThreads} * kChunks), kThreads, 0, stream>>>(p.x_q, p.x_scale, runs, p.k,
                                                                                           out);
  } else {
    const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads), int64_t{1} << 20);
    dequant_scalar<T><<<static_cast<int>(blocks), kThreads, 0, stream>>>(p.x_q, p.x_scale, n, p.k, out);
  }
}

}  // namespace

cudaError_t dequantize_rows(const DequantRowsParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.k == 0) return cudaSuccess;
  MMFREE_DISPATCH_FLOAT(p.out_dtype, T, launch<T>(p, stream));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmfree
