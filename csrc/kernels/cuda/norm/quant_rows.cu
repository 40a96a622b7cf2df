// CUDA per-row absmax int8 quantization (quant_rows.h): one 256-thread block per row, a
// block max over the row, then the codes from a second read of the row (L2-resident: the
// blocks in flight, 8 per SM, hold ~29 MB of 13824-wide bf16 rows: within the 60 MB L2). M=8192 N=13824 bf16 moves 226 MB in and 113 MB
// out, ~80 us at 4.25 TB/s; the chain of generic torch ops it replaces (abs, amax, where,
// div, round, clamp, copy over fp32 temporaries) took ~1 ms. Vector path (cols a multiple of
// the 16-byte vector, 16-byte aligned rows): 16-byte loads, 4/8-byte code stores; otherwise
// one element per thread.
#include "cuda/norm/norm_common.cuh"
#include "quant_rows.h"

namespace mmfree {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// s = amax / 127, 1 where that is 0 (a zero row, or an fp32 row of subnormals below
// 127 * 2^-149, whose codes then round to 0); NaN when the row held a NaN or an inf
// (amax_fold turns a NaN into inf, and the block max keeps it).
__device__ __forceinline__ float row_scale(float amax) {
  if (!(amax < INFINITY)) return __int_as_float(0x7fc00000);
  const float s = __fdiv_rn(amax, 127.0f);
  return s > 0.f ? s : 1.0f;
}

// round half to even, clamped to +-127; every code of a non-finite row is 0.
__device__ __forceinline__ int code(float g, float s) {
  if (s != s) return 0;
  return static_cast<int>(fminf(fmaxf(rintf(__fdiv_rn(g, s)), -127.0f), 127.0f));
}

template <class T>
__global__ void __launch_bounds__(kThreads) quant_rows_vec(const T* __restrict__ in, int64_t cols,
                                                           int8_t* __restrict__ q, float* __restrict__ scale) {
  constexpr int N = norm::VecOf<T>::N;
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const uint4* src = reinterpret_cast<const uint4*>(in + row * cols);
  const int64_t nv = cols / N;
  float amax = 0.f;
  for (int64_t v = threadIdx.x; v < nv; v += kThreads) {
    float f[N];
    norm::unpack<T, N>(__ldg(src + v), f);
#pragma unroll
    for (int i = 0; i < N; ++i) amax = norm::amax_fold(amax, f[i]);
  }
  const float s = row_scale(norm::block_max(amax, red));
  if (threadIdx.x == 0) scale[row] = s;
  int8_t* dst = q + row * cols;
  for (int64_t v = threadIdx.x; v < nv; v += kThreads) {
    float f[N];
    norm::unpack<T, N>(__ldg(src + v), f);
    int c[N];
#pragma unroll
    for (int i = 0; i < N; ++i) c[i] = code(f[i], s);
    norm::store_codes<N>(dst + v * N, c);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) quant_rows_scalar(const T* __restrict__ in, int64_t cols,
                                                              int8_t* __restrict__ q, float* __restrict__ scale) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* src = in + row * cols;
  float amax = 0.f;
  for (int64_t i = threadIdx.x; i < cols; i += kThreads) amax = norm::amax_fold(amax, to_float(src[i]));
  const float s = row_scale(norm::block_max(amax, red));
  if (threadIdx.x == 0) scale[row] = s;
  for (int64_t i = threadIdx.x; i < cols; i += kThreads) q[row * cols + i] = static_cast<int8_t>(code(to_float(src[i]), s));
}

template <class T>
void launch(const QuantRowsParams& p, cudaStream_t stream) {
  constexpr int N = norm::VecOf<T>::N;
  const T* in = static_cast<const T*>(p.in);
  // One block per row: rows <= 2^31 - 1 (the torch layer checks).
  const unsigned grid = static_cast<unsigned>(p.rows);
  if (p.cols % N == 0 && norm::aligned16(p.in) && (reinterpret_cast<uintptr_t>(p.q) % N) == 0) {
    quant_rows_vec<T><<<grid, kThreads, 0, stream>>>(in, p.cols, p.q, p.scale);
  } else {
    quant_rows_scalar<T><<<grid, kThreads, 0, stream>>>(in, p.cols, p.q, p.scale);
  }
}

__global__ void fill_ones(float* p, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) p[i] = 1.0f;
}

}  // namespace

cudaError_t quantize_rows_int8(const QuantRowsParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.cols == 0) {  // every row is an all-zero row
    fill_ones<<<static_cast<unsigned>(ceil_div(p.rows, int64_t{kThreads})), kThreads, 0, stream>>>(p.scale, p.rows);
    return cudaGetLastError();
  }
  switch (p.in_dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmfree
