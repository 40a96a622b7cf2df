// CUDA backward passes of rms_norm and rms_norm_swish_gate. One block handles a fixed group
// of kNormBackwardRowsPerPartial rows one after another, each thread owning the same
// columns for every row, so its dweight partial sums need no atomics; a second kernel adds
// the group partials in group order. Deterministic whatever the grid.
//
// rms_norm's backward has a register path (rms_norm_bwd_vec) for 16-bit / fp32 rows with
// K a multiple of the 16-byte vector and 16-byte aligned tensors, K <= 1024 vectors (8192 16-bit elements): each thread keeps its
// vectors of x, dy and the weight in registers (one read of each per row instead of two
// element-wise passes), loads the next row while the current one reduces, and reduces
// sum(s^2) and sum(dy*w*s) together. M=8192 K=2560 bf16 took 128 us on the element path,
// against ~30 us for its bytes (dy, x in, dx out: 126 MB at 4.25 TB/s).
#include "cuda/norm/norm_common.cuh"
#include "norm.h"

namespace mmfree {
namespace cuda {
namespace {

using namespace norm;

template <class T>
__global__ void rms_norm_bwd(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ res,
                             const T* __restrict__ gres, const void* __restrict__ w, DType wt, int64_t rows,
                             int64_t k, float eps, const float* __restrict__ gscale, T* __restrict__ dx,
                             AccOf<T>* __restrict__ partial) {
  using A = AccOf<T>;
  __shared__ A smem[32];
  const A gs = gscale != nullptr ? static_cast<A>(__ldg(gscale)) : A(1);
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
      dot += (load_as<T, A>(dy + off, i) * gs) * load_any<A>(w, wt, i) * s;
    }
    const A rstd = rstd_of(block_sum(ss, smem), k, eps);
    dot = block_sum(dot, smem);
    const A c = rstd * rstd * rstd * dot / static_cast<A>(k);
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const A s = sum_at(i);
      const A d = load_as<T, A>(dy + off, i) * gs;
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

// Block-wide sums of two values at once (one pair of barriers), fixed order.
__device__ __forceinline__ float2 block_sum2(float2 v, float2* smem) {
  v.x = warp_sum(v.x);
  v.y = warp_sum(v.y);
  __syncthreads();  // smem may still be read by the previous row's reduction
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  float2 t = make_float2(0.f, 0.f);
  const int nw = blockDim.x >> 5;
  for (int w = 0; w < nw; ++w) {
    t.x += smem[w].x;
    t.y += smem[w].y;
  }
  return t;
}

// The register path of rms_norm_bwd: thread t owns vectors t + j * blockDim.x (j < kVec)
// of every row in its block's group; T is fp32 / bf16 / fp16, TW the weight (T or fp32).
// The row stays in registers as loaded (16-bit values unpacked twice, once per pass, rather
// than held as fp32: kVec = 2 took 122 registers that way, 3 blocks per SM).
template <class T, class TW, int kVec, bool kRes>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_bwd_vec(const T* __restrict__ dy, const T* __restrict__ x,
                                                                const T* __restrict__ res, const T* __restrict__ gres,
                                                                const TW* __restrict__ w, int64_t rows, int64_t k,
                                                                float eps, const float* __restrict__ gscale,
                                                                T* __restrict__ dx, float* __restrict__ partial) {
  constexpr int N = VecOf<T>::N;
  const float gs = gscale != nullptr ? __ldg(gscale) : 1.f;
  constexpr int kWVec = N * static_cast<int>(sizeof(TW)) / 16;  // 16-byte weight vectors per row vector
  __shared__ float2 smem[32];
  const int64_t nvec = k / N;
  const int64_t r0 = blockIdx.x * kNormBackwardRowsPerPartial;
  const int64_t r1 = min(rows, r0 + kNormBackwardRowsPerPartial);
  bool own[kVec];
  uint4 wr[kVec][kWVec];
  float acc[kVec][N];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int64_t v = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    own[j] = v < nvec;
#pragma unroll
    for (int e = 0; e < N; ++e) acc[j][e] = 0.f;
#pragma unroll
    for (int q = 0; q < kWVec; ++q) wr[j][q] = own[j] ? __ldg(reinterpret_cast<const uint4*>(w + v * N) + q) : uint4{};
  }
  auto weights = [&](int j, float (&f)[N]) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(TW));
#pragma unroll
    for (int q = 0; q < kWVec; ++q) {
      const TW* e = reinterpret_cast<const TW*>(&wr[j][q]);
#pragma unroll
      for (int i = 0; i < kPer; ++i) f[q * kPer + i] = to_float(e[i]);
    }
  };
  // s = x (+ res) in fp32, as the element path forms it.
  auto sum_of = [&](const uint4& xv, const uint4& rv, float (&f)[N]) {
    unpack<T, N>(xv, f);
    if constexpr (kRes) {
      float r[N];
      unpack<T, N>(rv, r);
#pragma unroll
      for (int e = 0; e < N; ++e) f[e] += r[e];
    }
  };
  // The current row, and the next one (in flight while the current one reduces); the
  // residual's registers exist only with a residual (kRes).
  uint4 xs[kVec], ds[kVec], xn[kVec], dn[kVec];
  uint4 rs[kRes ? kVec : 1], rn[kRes ? kVec : 1];
  auto load_row = [&](int64_t r, uint4 (&xo)[kVec], uint4 (&ro)[kRes ? kVec : 1], uint4 (&d_o)[kVec]) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (!own[j]) continue;
      const int64_t v = r * nvec + threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      xo[j] = __ldg(reinterpret_cast<const uint4*>(x) + v);
      d_o[j] = __ldg(reinterpret_cast<const uint4*>(dy) + v);
      if constexpr (kRes) ro[j] = __ldg(reinterpret_cast<const uint4*>(res) + v);
    }
  };
  if (r0 < r1) load_row(r0, xs, rs, ds);
  for (int64_t r = r0; r < r1; ++r) {
    float2 sd = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (!own[j]) continue;
      float sv[N], d[N], wf[N];
      sum_of(xs[j], rs[kRes ? j : 0], sv);
      unpack<T, N>(ds[j], d);
      weights(j, wf);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        d[e] *= gs;
        sd.x += sv[e] * sv[e];
        sd.y += d[e] * wf[e] * sv[e];
      }
    }
    if (r + 1 < r1) load_row(r + 1, xn, rn, dn);
    sd = block_sum2(sd, smem);
    const float rstd = rstd_of(sd.x, k, eps);
    const float c = rstd * rstd * rstd * sd.y / static_cast<float>(k);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (!own[j]) continue;
      const int64_t v = r * nvec + threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      float sv[N], d[N], wf[N], o[N];
      sum_of(xs[j], rs[kRes ? j : 0], sv);
      unpack<T, N>(ds[j], d);
      weights(j, wf);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        d[e] *= gs;
        o[e] = rstd * (d[e] * wf[e]) - sv[e] * c;
        acc[j][e] += d[e] * (sv[e] * rstd);
      }
      if (gres != nullptr) {
        float gv[N];
        unpack<T, N>(__ldg(reinterpret_cast<const uint4*>(gres) + v), gv);
#pragma unroll
        for (int e = 0; e < N; ++e) o[e] += gv[e];
      }
      reinterpret_cast<uint4*>(dx)[v] = pack<T, N>(o);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      xs[j] = xn[j];
      ds[j] = dn[j];
      if constexpr (kRes) rs[j] = rn[j];
    }
  }
  float* pr = partial + blockIdx.x * k;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (!own[j]) continue;
    const int64_t c0 = (threadIdx.x + static_cast<int64_t>(j) * blockDim.x) * N;
#pragma unroll
    for (int e = 0; e < N; e += 4) {
      *reinterpret_cast<float4*>(pr + c0 + e) = make_float4(acc[j][e], acc[j][e + 1], acc[j][e + 2], acc[j][e + 3]);
    }
  }
}

// dweight[i] = sum over groups of partial[group, i], in a fixed order: thread row ty of a
// block sums groups ty, ty + 32, ... of its column (consecutive threads, consecutive
// columns: coalesced), then the 32 row sums are added in ty order. A block per 32 columns
// keeps the whole GPU reading the partials (one thread per column, 10 blocks at K = 2560,
// took ~100 us for the 1024 groups of M = 8192); 32 rows of threads with 8 loads in flight
// each put ~2.6 MB of the 10.5 MB of partials in flight at K = 2560 (8 rows: ~80 KB).
constexpr int kFinishCols = 32;
constexpr int kFinishRows = 32;

template <class A>
__global__ void __launch_bounds__(kFinishCols * kFinishRows)
    finish_dweight(const A* __restrict__ partial, int64_t groups, int64_t k, void* __restrict__ dw, DType wt) {
  __shared__ A sums[kFinishRows][kFinishCols];
  const int tx = threadIdx.x % kFinishCols;
  const int ty = threadIdx.x / kFinishCols;
  const int64_t i = blockIdx.x * static_cast<int64_t>(kFinishCols) + tx;
  A t = 0;
  if (i < k) {
#pragma unroll 8
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

// Threads that cover nvec vectors at kVec per thread, a whole number of warps.
inline int vec_threads_for(int64_t nvec, int kVec) {
  const int64_t t = (nvec + kVec - 1) / kVec;
  return static_cast<int>(((t + 31) / 32) * 32);
}

// The register path when the layout allows: kVec vectors per thread, the fewest that keep
// the block within kMaxThreads (more threads per row, fewer registers per thread).
template <class T, class TW, int kVec>
void launch_bwd_vec(const RmsNormBackwardParams& p, int64_t groups, float* partial, cudaStream_t stream) {
  const int threads = vec_threads_for(p.k / VecOf<T>::N, kVec);
  const auto* dy = static_cast<const T*>(p.grad_y);
  const auto* x = static_cast<const T*>(p.x);
  const auto* res = static_cast<const T*>(p.residual);
  const auto* gres = static_cast<const T*>(p.grad_residual);
  const auto* w = static_cast<const TW*>(p.weight);
  auto* dx = static_cast<T*>(p.dx);
  const int grid = static_cast<int>(groups);
  if (res != nullptr) {
    rms_norm_bwd_vec<T, TW, kVec, true><<<grid, threads, 0, stream>>>(dy, x, res, gres, w, p.rows, p.k, p.eps,
                                                                      p.grad_scale, dx, partial);
  } else {
    rms_norm_bwd_vec<T, TW, kVec, false><<<grid, threads, 0, stream>>>(dy, x, res, gres, w, p.rows, p.k, p.eps,
                                                                       p.grad_scale, dx, partial);
  }
}

template <class T, class TW>
bool try_bwd_vec(const RmsNormBackwardParams& p, int64_t groups, float* partial, cudaStream_t stream) {
  constexpr int N = VecOf<T>::N;
  if (p.k % N != 0 || !aligned16(p.grad_y) || !aligned16(p.x) || !aligned16(p.dx) || !aligned16(p.weight) ||
      !aligned16(partial) || (p.residual != nullptr && !aligned16(p.residual)) ||
      (p.grad_residual != nullptr && !aligned16(p.grad_residual))) {
    return false;
  }
  const int64_t nvec = p.k / N;
  if (nvec <= kMaxThreads) {
    launch_bwd_vec<T, TW, 1>(p, groups, partial, stream);
  } else if (nvec <= 2 * kMaxThreads) {
    launch_bwd_vec<T, TW, 2>(p, groups, partial, stream);
  } else if (nvec <= 4 * kMaxThreads) {
    launch_bwd_vec<T, TW, 4>(p, groups, partial, stream);
  } else {  // 8 vectors per thread spill (x, dy, weight and the dweight sums in registers)
    return false;
  }
  return true;
}

template <class T>
bool try_bwd_vec_any_weight(const RmsNormBackwardParams& p, int64_t groups, void* partial, cudaStream_t stream) {
  if constexpr (std::is_same<T, double>::value) {
    return false;
  } else {
    float* pf = static_cast<float*>(partial);
    if (p.w_dtype == p.dtype) return try_bwd_vec<T, T>(p, groups, pf, stream);
    if (p.w_dtype == DType::kFloat32) return try_bwd_vec<T, float>(p, groups, pf, stream);
    return false;
  }
}

template <class T>
cudaError_t launch_rms_norm_bwd(const RmsNormBackwardParams& p, cudaStream_t stream) {
  using A = AccOf<T>;
  const int64_t groups = norm_backward_partial_rows(p.rows);
  A* partial = static_cast<A*>(p.dweight_partial);
  if (groups > 0 && !try_bwd_vec_any_weight<T>(p, groups, partial, stream)) {
    rms_norm_bwd<T><<<static_cast<int>(groups), kGenericThreads, 0, stream>>>(
        static_cast<const T*>(p.grad_y), static_cast<const T*>(p.x), static_cast<const T*>(p.residual),
        static_cast<const T*>(p.grad_residual), p.weight, p.w_dtype, p.rows, p.k, p.eps, p.grad_scale,
        static_cast<T*>(p.dx), partial);
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
