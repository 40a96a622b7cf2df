// Device helpers shared by the norm kernels: 16-byte vector I/O with fp32 conversion,
// deterministic block reductions, the rounding rule, and weights of any dtype.
#pragma once

#include <type_traits>

#include "cuda/common.cuh"

namespace mmfree {
namespace cuda {
namespace norm {

// Elements per 16-byte vector, and vectors each thread keeps in registers on the fast path.
template <class T> struct VecOf { static constexpr int N = 16 / static_cast<int>(sizeof(T)); };
// kMaxThreads caps the register path's block (and lets the compiler give each thread up to
// 255 registers: the row, up to kVecPerThread*16 bytes per input, stays in registers without
// spilling). Rows beyond 256*8 vectors (16K bf16 / 8K fp32 elements) take the generic path.
constexpr int kVecPerThread = 8;
constexpr int kMaxThreads = 256;
constexpr int kGenericThreads = 256;

// Statistics type: fp64 inputs of rms_norm / swish_gate compute in fp64, all else in fp32.
template <class T> using AccOf = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

template <class T, int N>
__device__ __forceinline__ void unpack(const uint4& u, float (&f)[N]) {
  static_assert(N * sizeof(T) == 16, "one 16-byte vector");
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = to_float(e[i]);
}

template <class T, int N>
__device__ __forceinline__ uint4 pack(const float (&f)[N]) {
  static_assert(N * sizeof(T) == 16, "one 16-byte vector");
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int i = 0; i < N; ++i) e[i] = from_float<T>(f[i]);
  return u;
}

// N weights of type TW (N*sizeof(TW) is 16 or 32 bytes; p 16-byte aligned).
template <class TW, int N>
__device__ __forceinline__ void load_weights(const TW* p, float (&f)[N]) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(TW));
  constexpr int kWords = N / kPer;
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + w);
    const TW* e = reinterpret_cast<const TW*>(&u);
#pragma unroll
    for (int i = 0; i < kPer; ++i) f[w * kPer + i] = to_float(e[i]);
  }
}

// Round to T's precision and back (the fused gate stores nothing: it rounds in registers).
template <class T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// round half away from zero (CUDA roundf), clamped to int8; a NaN (a row with a NaN or
// inf, where amax_final gave s = NaN) codes as 0 (docs/numerics.md).
__device__ __forceinline__ int quant_code(float xn, float s) {
  const float r = roundf(xn * s);
  return r != r ? 0 : static_cast<int>(fminf(fmaxf(r, -128.0f), 127.0f));
}

// One |v| into a row max. fminf(NaN, inf) is inf, and max keeps an inf: a NaN anywhere in
// the row survives the reduction (fmaxf alone returns the non-NaN operand and drops it).
__device__ __forceinline__ float amax_fold(float amax, float v) { return fmaxf(amax, fminf(fabsf(v), INFINITY)); }

// The reduced row max as the quantization uses it: clamped to 1e-5, or NaN for a row that
// held a NaN or inf (then every code is 0 and x_scale = NaN, as in the reference).
__device__ __forceinline__ float amax_final(float amax) { return amax < INFINITY ? fmaxf(amax, 1e-5f) : __int_as_float(0x7fc00000); }

template <int N>
__device__ __forceinline__ void store_codes(int8_t* p, const int (&q)[N]) {
  static_assert(N == 4 || N == 8, "4 or 8 codes");
  uint32_t w[N / 4];
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    w[j] = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) w[j] |= (static_cast<uint32_t>(q[4 * j + i]) & 0xffu) << (8 * i);
  }
  if constexpr (N == 8) {
    *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  } else {
    *reinterpret_cast<uint32_t*>(p) = w[0];
  }
}

template <class A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum / max, same fixed order everywhere (deterministic); every thread gets the
// result. smem holds 32 values; blockDim.x is a multiple of 32.
template <class A> __device__ __forceinline__ A block_sum(A v, A* smem) {
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by an earlier reduction
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  A t = 0;
  const int nw = blockDim.x >> 5;
  for (int w = 0; w < nw; ++w) t += smem[w];
  return t;
}

template <class A> __device__ __forceinline__ A block_max(A v, A* smem) {
  v = warp_max(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  A t = smem[0];
  const int nw = blockDim.x >> 5;
  for (int w = 1; w < nw; ++w) t = fmax(t, smem[w]);
  return t;
}

// Element i of a weight of any float dtype (generic kernels; the branch is uniform).
template <class A> __device__ __forceinline__ A load_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<A>(static_cast<const float*>(p)[i]);
    case DType::kBFloat16: return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case DType::kFloat16: return static_cast<A>(__half2float(static_cast<const __half*>(p)[i]));
    case DType::kFloat64: return static_cast<A>(static_cast<const double*>(p)[i]);
  }
  return A(0);
}

template <class A> __device__ __forceinline__ void store_any(void* p, DType t, int64_t i, A v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    case DType::kFloat64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
  }
}

template <class T, class A> __device__ __forceinline__ A load_as(const T* p, int64_t i) {
  if constexpr (std::is_same<T, double>::value) {
    return static_cast<A>(p[i]);
  } else {
    return static_cast<A>(to_float(p[i]));
  }
}

template <class T, class A> __device__ __forceinline__ T store_as(A v) {
  if constexpr (std::is_same<T, double>::value) {
    return static_cast<double>(v);
  } else {
    return from_float<T>(static_cast<float>(v));
  }
}

// rstd = 1/sqrt(sum/K + eps) with IEEE sqrt and division (no rsqrtf), as on the CPU.
__device__ __forceinline__ float rstd_of(float ss, int64_t k, float eps) {
  return 1.0f / sqrtf(ss / static_cast<float>(k) + eps);
}
__device__ __forceinline__ double rstd_of(double ss, int64_t k, float eps) {
  return 1.0 / sqrt(ss / static_cast<double>(k) + static_cast<double>(eps));
}

__device__ __forceinline__ float sigmoid(float h) { return 1.0f / (1.0f + expf(-h)); }
__device__ __forceinline__ double sigmoid(double h) { return 1.0 / (1.0 + exp(-h)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Threads for the register path: enough that kVecPerThread vectors cover the row.
inline int vec_threads(int64_t nvec) {
  const int64_t t = (nvec + kVecPerThread - 1) / kVecPerThread;
  return static_cast<int>(((t + 31) / 32) * 32);
}

inline int grid_for(int64_t rows) { return static_cast<int>(rows < (1 << 30) ? rows : (1 << 30)); }

}  // namespace norm
}  // namespace cuda
}  // namespace mmfree
