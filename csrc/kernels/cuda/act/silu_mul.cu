// CUDA silu_mul (act.h): a memory-bound elementwise pair of kernels. Each thread moves one
// 16-byte vector of gate, of v and of dy/y (8 bf16/fp16, 4 fp32 or 2 fp64 values) with
// 128-bit loads and stores, grid-stride over the rows x (I / vector) vectors. Rows whose I
// is not a multiple of the vector width, or unaligned buffers, take the scalar kernel.
// Bytes: forward reads 2I and writes I elements per row; backward reads 3I, writes 2I.
#include <cstdint>

#include "act.h"
#include "cuda/common.cuh"

namespace mmfree {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <class T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <class T> __device__ __forceinline__ typename Acc<T>::type load_acc(T v) { return to_float(v); }
template <> __device__ __forceinline__ double load_acc<double>(double v) { return v; }
template <class T> __device__ __forceinline__ T store_acc(typename Acc<T>::type v) { return from_float<T>(v); }
template <> __device__ __forceinline__ double store_acc<double>(double v) { return v; }

__device__ __forceinline__ float exp_neg(float a) { return expf(-a); }  // full precision: the op is memory bound
__device__ __forceinline__ double exp_neg(double a) { return exp(-a); }

// silu(a) rounded to T (as F.silu's output), then times v, rounded to T.
template <class T> __device__ __forceinline__ T silu_mul_one(T g, T v) {
  using A = typename Acc<T>::type;
  const A a = load_acc(g);
  const T s = store_acc<T>(a / (A(1) + exp_neg(a)));
  return store_acc<T>(load_acc(s) * load_acc(v));
}

template <class T> __device__ __forceinline__ void silu_mul_grad_one(T d, T g, T v, T* dg, T* dv) {
  using A = typename Acc<T>::type;
  const A a = load_acc(g), b = load_acc(v), gy = load_acc(d);
  const A sig = A(1) / (A(1) + exp_neg(a));
  *dg = store_acc<T>(gy * b * sig * (A(1) + a * (A(1) - sig)));
  *dv = store_acc<T>(gy * a * sig);
}

template <class T> union Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  uint4 raw;
  T v[kN];
};

template <class T>
__global__ void __launch_bounds__(kThreads) silu_mul_vec_kernel(const T* __restrict__ u, T* __restrict__ y,
                                                                int64_t rows, int64_t inter) {
  constexpr int kN = Vec16<T>::kN;
  const int64_t per_row = inter / kN, total = rows * per_row;
  for (int64_t t = blockIdx.x * int64_t{kThreads} + threadIdx.x; t < total; t += int64_t{gridDim.x} * kThreads) {
    const int64_t r = t / per_row, c = (t - r * per_row) * kN;
    Vec16<T> g, v, out;
    g.raw = __ldg(reinterpret_cast<const uint4*>(u + r * 2 * inter + c));
    v.raw = __ldg(reinterpret_cast<const uint4*>(u + r * 2 * inter + inter + c));
#pragma unroll
    for (int i = 0; i < kN; ++i) out.v[i] = silu_mul_one(g.v[i], v.v[i]);
    *reinterpret_cast<uint4*>(y + r * inter + c) = out.raw;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) silu_mul_backward_vec_kernel(const T* __restrict__ dy, const T* __restrict__ u,
                                                                         T* __restrict__ du, int64_t rows, int64_t inter) {
  constexpr int kN = Vec16<T>::kN;
  const int64_t per_row = inter / kN, total = rows * per_row;
  for (int64_t t = blockIdx.x * int64_t{kThreads} + threadIdx.x; t < total; t += int64_t{gridDim.x} * kThreads) {
    const int64_t r = t / per_row, c = (t - r * per_row) * kN;
    Vec16<T> d, g, v, dg, dv;
    d.raw = __ldg(reinterpret_cast<const uint4*>(dy + r * inter + c));
    g.raw = __ldg(reinterpret_cast<const uint4*>(u + r * 2 * inter + c));
    v.raw = __ldg(reinterpret_cast<const uint4*>(u + r * 2 * inter + inter + c));
#pragma unroll
    for (int i = 0; i < kN; ++i) silu_mul_grad_one(d.v[i], g.v[i], v.v[i], &dg.v[i], &dv.v[i]);
    *reinterpret_cast<uint4*>(du + r * 2 * inter + c) = dg.raw;
    *reinterpret_cast<uint4*>(du + r * 2 * inter + inter + c) = dv.raw;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) silu_mul_scalar_kernel(const T* __restrict__ u, T* __restrict__ y,
                                                                   int64_t rows, int64_t inter) {
  const int64_t total = rows * inter;
  for (int64_t t = blockIdx.x * int64_t{kThreads} + threadIdx.x; t < total; t += int64_t{gridDim.x} * kThreads) {
    const int64_t r = t / inter, c = t - r * inter;
    y[t] = silu_mul_one(u[r * 2 * inter + c], u[r * 2 * inter + inter + c]);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) silu_mul_backward_scalar_kernel(const T* __restrict__ dy,
                                                                            const T* __restrict__ u,
                                                                            T* __restrict__ du, int64_t rows,
                                                                            int64_t inter) {
  const int64_t total = rows * inter;
  for (int64_t t = blockIdx.x * int64_t{kThreads} + threadIdx.x; t < total; t += int64_t{gridDim.x} * kThreads) {
    const int64_t r = t / inter, c = t - r * inter;
    const int64_t gi = r * 2 * inter + c;
    silu_mul_grad_one(dy[t], u[gi], u[gi + inter], &du[gi], &du[gi + inter]);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Enough blocks to fill the GPU several times over; the grid-stride loop covers the rest.
int grid_for(int64_t work) {
  constexpr int64_t kMaxBlocks = 132 * 16;
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace

cudaError_t silu_mul(const SiluMulParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.inter == 0) return cudaSuccess;
  MMFREE_DISPATCH_FLOAT(p.dtype, T, {
    constexpr int kN = Vec16<T>::kN;
    const T* u = static_cast<const T*>(p.u);
    T* y = static_cast<T*>(p.y);
    if (p.inter % kN == 0 && aligned16(u) && aligned16(y)) {
      silu_mul_vec_kernel<T><<<grid_for(p.rows * (p.inter / kN)), kThreads, 0, stream>>>(u, y, p.rows, p.inter);
    } else {
      silu_mul_scalar_kernel<T><<<grid_for(p.rows * p.inter), kThreads, 0, stream>>>(u, y, p.rows, p.inter);
    }
  });
  return cudaGetLastError();
}

cudaError_t silu_mul_backward(const SiluMulBackwardParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.inter == 0) return cudaSuccess;
  MMFREE_DISPATCH_FLOAT(p.dtype, T, {
    constexpr int kN = Vec16<T>::kN;
    const T* dy = static_cast<const T*>(p.dy);
    const T* u = static_cast<const T*>(p.u);
    T* du = static_cast<T*>(p.du);
    if (p.inter % kN == 0 && aligned16(dy) && aligned16(u) && aligned16(du)) {
      silu_mul_backward_vec_kernel<T>
          <<<grid_for(p.rows * (p.inter / kN)), kThreads, 0, stream>>>(dy, u, du, p.rows, p.inter);
    } else {
      silu_mul_backward_scalar_kernel<T><<<grid_for(p.rows * p.inter), kThreads, 0, stream>>>(dy, u, du, p.rows, p.inter);
    }
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmfree
