// CUDA scale_cast (dequant.h): out = in * scale[0], fp32 product rounded once to out's dtype.
// The decoded-panel dX writes an fp32 [M, K] product that w_scale then scales into x's dtype;
// at::mul_out did that pass with TensorIterator's casting loop (~48 us for M=8192 K=1024 into
// bf16, 50 MB: 1 TB/s; 176 calls, 8.5 ms of a 70 ms 370M training step). Here: each thread
// reads kUnroll runs of N floats as 16-byte loads (all in flight before the first store) and
// writes each run as one 16-byte store of N values of T (N = 16 / sizeof(T); fp64 output and
// the last n % N elements: one element per thread). Since session 8 the training step (dY in
// x's dtype) skips this pass: the norm backward scales the unscaled product as it reads it.
#include "cuda/norm/norm_common.cuh"
#include "dequant.h"

namespace mmfree {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;

template <class T>
__global__ void __launch_bounds__(kThreads) scale_cast_vec(const float* __restrict__ in,
                                                           const float* __restrict__ scale, int64_t runs,
                                                           T* __restrict__ out) {
  constexpr int N = norm::VecOf<T>::N;  // 4 (fp32) or 8 (16-bit)
  constexpr int kLoads = N / 4;
  const float s = __ldg(scale);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
  float4 v[kUnroll][kLoads];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t r = base + u * kThreads;
    if (r < runs) {
#pragma unroll
      for (int l = 0; l < kLoads; ++l) v[u][l] = __ldg(reinterpret_cast<const float4*>(in) + r * kLoads + l);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t r = base + u * kThreads;
    if (r >= runs) continue;
    float f[N];
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      f[4 * l] = v[u][l].x * s;
      f[4 * l + 1] = v[u][l].y * s;
      f[4 * l + 2] = v[u][l].z * s;
      f[4 * l + 3] = v[u][l].w * s;
    }
    reinterpret_cast<uint4*>(out)[r] = norm::pack<T, N>(f);
  }
}

template <class T>
__global__ void scale_cast_scalar(const float* __restrict__ in, const float* __restrict__ scale, int64_t begin,
                                  int64_t n, T* __restrict__ out) {
  const float s = __ldg(scale);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = from_float<T>(in[i] * s);
  }
}

template <class T>
void launch(const ScaleCastParams& p, cudaStream_t stream) {
  T* out = static_cast<T*>(p.out);
  int64_t done = 0;
  if constexpr (sizeof(T) <= 4) {
    constexpr int N = norm::VecOf<T>::N;
    if (norm::aligned16(p.in) && norm::aligned16(p.out)) {
      const int64_t runs = p.n / N;
      if (runs > 0) {
        scale_cast_vec<T><<<ceil_div(runs, int64_t{kThreads} * kUnroll), kThreads, 0, stream>>>(p.in, p.scale, runs,
                                                                                                  out);
      }
      done = runs * N;
    }
  }
  if (done < p.n) {
    const int64_t blocks = std::min<int64_t>(ceil_div(p.n - done, kThreads), int64_t{1} << 20);
    scale_cast_scalar<T><<<static_cast<int>(blocks), kThreads, 0, stream>>>(p.in, p.scale, done, p.n, out);
  }
}

}  // namespace

cudaError_t scale_cast(const ScaleCastParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  MMFREE_DISPATCH_FLOAT(p.out_dtype, T, launch<T>(p, stream));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmfree
