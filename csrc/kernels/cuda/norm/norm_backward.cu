// CUDA backward passes of rms_norm and rms_norm_swish_gate. One block handles a fixed group
// of kNormBackwardRowsPerPartial rows one after another, each thread owning the same
// columns for every row, so its dweight partial sums need no atomics; a second kernel adds
// the group partials in group order. Deterministic whatever the grid.
#include "cuda/norm/norm_common.cuh"
#include "norm.h"

namespace mmfree {
namespace cuda {
namespace {

using namespace norm;

template <class T>
__global__ void rms_norm_bwd(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ res,
                             const T* __restrict__ gres, const void* __restrict__ w, DType wt, int64_t rows,
                             int64_t k, float eps, T* __restrict__ dx, AccOf<T>* __restrict__ partial) {
  using A = AccOf<T>;
  __shared__ A smem[32];
  const int64_t r0 = blockIdx.x * kNormBackwardRowsPerPartial;
  const int64_t r1 = min(rows, r0 + kNormBackwardRowsPerPartial);
  A* pr = partial + blockIdx.x * k;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * k;
    auto sum_at = [&](int64_t i) {
      A s = load_as<T, A>(x + off, i);
      if (res != nullptr) s += load_as<T, A>(res + off, i);
      return s;
    };
    A ss = 0, dot = 0;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const A s = sum_at(i);
      ss += s * s;
      dot += load_as<T, A>(dy + off, i) * load_any<A>(w, wt, i) * s;
    }
    const A rstd = rstd_of(block_sum(ss, smem), k, eps);
    dot = block_sum(dot, smem);
    const A c = rstd * rstd * rstd * dot / static_cast<A>(k);
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const A s = sum_at(i);
      const A d = load_as<T, A>(dy + off, i);
      A v = rstd * (d * load_any<A>(w, wt, i)) - s * c;
      if (gres != nullptr) v += load_as<T, A>(gres + off, i);
      dx[off + i] = store_as<T, A>(v);
      pr[i] = (r == r0 ? A(0) : pr[i]) + d * (s * rstd);
    }
  }
}

template <class T>
__global__ void swish_gate_bwd(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ h,
                               const void* __restrict__ w, DType wt, int64_t rows, int64_t k, float eps,
                               T* __restrict__ dg, T* __restrict__ dh, AccOf<T>* __restrict__ partial) {
  using A = AccOf<T>;
  __shared__ A smem[32];
  const int64_t r0 = blockIdx.x * kNormBackwardRowsPerPartial;
  const int64_t r1 = min(rows, r0 + kNormBackwardRowsPerPartial);
  A* pr = partial + blockIdx.x * k;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * k;
    A ss = 0;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const A gv = load_as<T, A>(g + off, i);
      ss += gv * gv;
    }
    const A rstd = rstd_of(block_sum(ss, smem), k, eps);
    // dot = sum(gg * g) with gg = dy * silu(h) * w, the gradient on the normalized g.
    A dot = 0;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const A hv = load_as<T, A>(h + off, i);
      dot += load_as<T, A>(dy + off, i) * (hv * sigmoid(hv)) * load_any<A>(w, wt, i) * load_as<T, A>(g + off, i);
    }
    dot = block_sum(dot, smem);
    const A c = rstd * rstd * rstd * dot / static_cast<A>(k);
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const A hv = load_as<T, A>(h + off, i);
      const A gv = load_as<T, A>(g + off, i);
      const A d = load_as<T, A>(dy + off, i);
      const A wv = load_any<A>(w, wt, i);
      const A sig = sigmoid(hv);
      const A sl = hv * sig;
      const A gn = gv * rstd;
      dh[off + i] = store_as<T, A>(d * (gn * wv) * (sig * (A(1) + hv * (A(1) - sig))));
      dg[off + i] = store_as<T, A>(rstd * (d * sl * wv) - gv * c);
      pr[i] = (r == r0 ? A(0) : pr[i]) + d * sl * gn;
    }
  }
}

// dweight[i] = sum over groups of partial[group, i], in a fixed order: thread row ty of a
// block sums groups ty, ty + 8, ... of its column (consecutive threads, consecutive
// columns: coalesced), then the 8 row sums are added in ty order. A block per 32 columns
// keeps the whole GPU reading the partials (one thread per column, 10 blocks at K = 2560,
// took ~100 us for the 1024 groups of M = 8192).
constexpr int kFinishCols = 32;
constexpr int kFinishRows = 8;

template <class A>
__global__ void finish_dweight(const A* __restrict__ partial, int64_t groups, int64_t k, void* __restrict__ dw,
                               DType wt) {
  __shared__ A sums[kFinishRows][kFinishCols];
  const int tx = threadIdx.x % kFinishCols;
  const int ty = threadIdx.x / kFinishCols;
  const int64_t i = blockIdx.x * static_cast<int64_t>(kFinishCols) + tx;
  A t = 0;
  if (i < k) {
    for (int64_t b = ty; b < groups; b += kFinishRows) t += partial[b * k + i];
  }
  sums[ty][tx] = t;
  __syncthreads();
  if (ty == 0 && i < k) {
    A total = 0;
#pragma unroll
    for (int r = 0; r < kFinishRows; ++r) total += sums[r][tx];
    store_any<A>(dw, wt, i, total);
  }
}

template <class A>
void launch_finish_dweight(const A* partial, int64_t groups, int64_t k, void* dw, DType wt, cudaStream_t stream) {
  finish_dweight<A><<<ceil_div(k, kFinishCols), kFinishCols * kFinishRows, 0, stream>>>(partial, groups, k, dw, wt);
}

template <class T>
cudaError_t launch_rms_norm_bwd(const RmsNormBackwardParams& p, cudaStream_t stream) {
  using A = AccOf<T>;
  const int64_t groups = norm_backward_partial_rows(p.rows);
  A* partial = static_cast<A*>(p.dweight_partial);
  if (groups > 0) {
    rms_norm_bwd<T><<<static_cast<int>(groups), kGenericThreads, 0, stream>>>(
        static_cast<const T*>(p.grad_y), static_cast<const T*>(p.x), static_cast<const T*>(p.residual),
        static_cast<const T*>(p.grad_residual), p.weight, p.w_dtype, p.rows, p.k, p.eps, static_cast<T*>(p.dx), partial);
  }
  launch_finish_dweight<A>(partial, groups, p.k, p.dweight, p.w_dtype, stream);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_swish_gate_bwd(const RmsNormSwishGateBackwardParams& p, cudaStream_t stream) {
  using A = AccOf<T>;
  const int64_t groups = norm_backward_partial_rows(p.rows);
  A* partial = static_cast<A*>(p.dweight_partial);
  if (groups > 0) {
    swish_gate_bwd<T><<<static_cast<int>(groups), kGenericThreads, 0, stream>>>(
        static_cast<const T*>(p.grad_y), static_cast<const T*>(p.g), static_cast<const T*>(p.h), p.weight, p.w_dtype,
        p.rows, p.k, p.eps, static_cast<T*>(p.dg), static_cast<T*>(p.dh), partial);
  }
  launch_finish_dweight<A>(partial, groups, p.k, p.dweight, p.w_dtype, stream);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_backward(const RmsNormBackwardParams& p, cudaStream_t stream) {
  if (p.k == 0) return cudaSuccess;
  MMFREE_DISPATCH_FLOAT(p.dtype, T, return launch_rms_norm_bwd<T>(p, stream));
  return cudaSuccess;
}

cudaError_t rms_norm_swish_gate_backward(const RmsNormSwishGateBackwardParams& p, cudaStream_t stream) {
  if (p.k == 0) return cudaSuccess;
  MMFREE_DISPATCH_FLOAT(p.dtype, T, return launch_swish_gate_bwd<T>(p, stream));
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mmfree
