// The row math of the v4 fused decode step (decode_kernel_v4.cuh), split across the CTAs of a
// thread-block cluster (sm_90): each CTA of a cluster of `cs` computes 1 / cs of every row and
// the cluster exchanges partial statistics and codes through distributed shared memory, so
// every CTA ends with the full int8 codes in its own planes while doing 1 / cs of the work.
//
// Bit-identity with the op-by-op path (decode_rows.cuh's file comment): a float sum of squares
// keeps the canonical order. Canonical thread t < P sums its vectors t, t + P, ... (fmaf, in
// that order); warp w's partial is the butterfly sum of threads 32 w .. 32 w + 31; the block
// adds the P / 32 warp partials in order from 0. Here rank c of the cluster owns the canonical
// threads [c P / cs, (c + 1) P / cs) (P is a multiple of 32, cs <= 8 divides it), computes their
// thread sums exactly so (one "chain" thread per canonical thread, over the values its slot
// threads left in shared memory), and writes them into every rank's table of P thread sums;
// after the cluster barrier each warp re-does the canonical butterfly on every 32 entries
// (a butterfly leaves the same value in every lane) and the in-order sum. Max and integer
// code-sum reductions are exact in any order. Element-wise math repeats decode_rows_v3.cuh's
// expressions (same operations, same roundings).
//
// Work split: slot thread u (u < P / cs * kVecPerThread) of rank c holds vector
// vi = t + j P of canonical thread t = c P / cs + u % (P / cs), j = u / (P / cs), when vi < nvec,
// in registers from its loads to its codes (each vector lives in one thread, 32-bit indices).
//
// Hazards: each exchange buffer is written by the ranks before one cluster barrier and read
// after it; a phase uses each buffer once (ss1, ss2, the max table, the code-sum table), and
// the next phase's writes come after the grid barrier, which every CTA reaches only after its
// reads. Codes go to the peers' planes before the last barrier of the row math; the planes are
// read by the product only after it.
#pragma once

#include "cuda/decode/decode_gemv.cuh"
#include "cuda/decode/decode_rows.cuh"

namespace mmfree {
namespace cuda {
namespace decode {

constexpr int kMaxCluster = 8;
constexpr int kClusterSlots = kMaxCluster * kWarps;  // per-warp partials of one cluster

// ---- cluster primitives (sm_90; the v4 kernel is never launched below it) -----------------
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return static_cast<int>(r);
#else
  return 0;
#endif
}
__device__ __forceinline__ int cluster_size() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
  return static_cast<int>(r);
#else
  return 1;
#endif
}
// Every thread of every CTA of the cluster; release / acquire: shared-memory writes (local or
// remote) before it are visible to every thread of the cluster after it.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __trap();
#endif
}
// The same shared-memory object in the CTA of cluster rank r (a generic address).
template <class P>
__device__ __forceinline__ P* peer(P* p, int r) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint64_t out;
  asm("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(reinterpret_cast<uint64_t>(p)), "r"(r));  // pure
  return reinterpret_cast<P*>(out);
#else
  (void)r;
  return p;
#endif
}

// Exchange buffers of the v4 row math (static shared memory, the same in every CTA).
struct V4Xchg {
  float ss1[norm::kMaxThreads];  // canonical thread sums, first sum of squares of a phase
  float ss2[norm::kMaxThreads];  // ... the quantization's
  float mx[3 * kClusterSlots];   // per-warp maxima, [weight row][rank * kWarps + warp]
  int cs[3 * kClusterSlots];     // per-warp code sums
};

// This thread's share of a row of nvec vectors (see the file comment).
struct V4Row {
  int P, nvec, PC, t0, vi;  // vi: this thread's vector, -1: none
  int64_t k;
};

__device__ __forceinline__ V4Row v4_row(int P, int64_t nvec, int64_t k, int rank, int cs) {
  V4Row r;
  r.P = P;
  r.nvec = static_cast<int>(nvec);
  r.k = k;
  r.PC = P / cs;
  r.t0 = rank * r.PC;
  const int u = static_cast<int>(threadIdx.x);
  const int j = u / r.PC;
  const int vi = r.t0 + (u - j * r.PC) + j * P;
  r.vi = j < VPT && vi < r.nvec ? vi : -1;
  return r;
}

// Slot values for the chain threads: slot u's N floats at cbuf + 8 u.
template <int N>
__device__ __forceinline__ void put_slot(float* cbuf, const float (&f)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cbuf[threadIdx.x * 8 + i] = f[i];
}

// The canonical sum of squares of the row whose slot values are in cbuf (every thread calls
// it; the total in every thread). `ssb`: this pass's table of thread sums.
template <int N>
__device__ __forceinline__ float cluster_ss(const V4Row& r, const float* cbuf, float* ssb, int rank, int cs) {
  __syncthreads();  // cbuf complete
  if (static_cast<int>(threadIdx.x) < r.PC) {
    const int t = r.t0 + static_cast<int>(threadIdx.x);
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (t + j * r.P < r.nvec) {
        const float* f = cbuf + (static_cast<int>(threadIdx.x) + j * r.PC) * 8;
#pragma unroll
        for (int i = 0; i < N; ++i) ss = fmaf(f[i], f[i], ss);
      }
    }
    for (int q = 0; q < cs; ++q) peer(ssb, q)[t] = ss;
  }
  (void)rank;
  cluster_sync();
  const int lane = threadIdx.x & 31;
  float tot = 0.f;
  for (int w = 0; w < r.P / 32; ++w) tot += norm::warp_sum(ssb[32 * w + lane]);
  return tot;
}

// Cluster max of NW values per thread (exact in any order); every thread gets the results.
template <int NW>
__device__ __forceinline__ void cluster_max(float (&v)[NW], float* mx, int rank, int cs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < NW; ++i) v[i] = norm::warp_max(v[i]);
  if (lane == 0) {
    for (int q = 0; q < cs; ++q) {
      float* d = peer(mx, q);
#pragma unroll
      for (int i = 0; i < NW; ++i) d[i * kClusterSlots + rank * kWarps + warp] = v[i];
    }
  }
  cluster_sync();
  const int n = cs * kWarps;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    float t = lane < n ? mx[i * kClusterSlots + lane] : 0.f;
    if (lane + 32 < n) t = fmaxf(t, mx[i * kClusterSlots + lane + 32]);
    v[i] = norm::warp_max(t);
  }
}

template <int NW>
__device__ __forceinline__ void cluster_sum_int(int (&v)[NW], int* cs_tab, int rank, int cs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < NW; ++i) v[i] = norm::warp_sum(v[i]);
  if (lane == 0) {
    for (int q = 0; q < cs; ++q) {
      int* d = peer(cs_tab, q);
#pragma unroll
      for (int i = 0; i < NW; ++i) d[i * kClusterSlots + rank * kWarps + warp] = v[i];
    }
  }
  cluster_sync();
  const int n = cs * kWarps;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    int t = lane < n ? cs_tab[i * kClusterSlots + lane] : 0;
    if (lane + 32 < n) t += cs_tab[i * kClusterSlots + lane + 32];
    v[i] = norm::warp_sum(t);
  }
}

__device__ __forceinline__ int plane_offset32(int k, int nch) {
  const int j = (k >> 5) & 3, c = (k >> 7) * 2 + ((k >> 4) & 1);
  return (j * nch + c) * 16 + (k & 15);
}

// N weights (T or fp32) at element `off` of a global row, as fp32 (read-only data).
template <class T, int N>
__device__ __forceinline__ void load_w32(const char* w, bool f32, int off, float (&f)[N]) {
  if (f32) {
    norm::load_weights<float, N>(reinterpret_cast<const float*>(w) + off, f);
  } else {
    norm::load_weights<T, N>(reinterpret_cast<const T*>(w) + off, f);
  }
}

// N floats of a produced-in-launch fp32 row (L2; 16-byte aligned).
template <int N>
__device__ __forceinline__ void load_f32_cg(const float* p, float (&f)[N]) {
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(p) + q);
    f[4 * q] = v.x;
    f[4 * q + 1] = v.y;
    f[4 * q + 2] = v.z;
    f[4 * q + 3] = v.w;
  }
}

// rms_norm_quant(_multi) of the row whose slot values `a` (this thread's vector, rounded to T
// as the standalone path stores it) the cluster holds, with NW weight rows (this thread's N
// weights of each in wq[0 .. NW - 1]): codes into the planes of every rank, scale and code sum into
// sscale / sxsum (thread 0 writes them; the caller's barrier publishes them). As quant_v3.
template <class T, int NW>
__device__ __forceinline__ void quant_v4(const V4Row& r, const float (&a)[norm::VecOf<T>::N],
                         const float (*wq)[norm::VecOf<T>::N], float eps, float* cbuf, V4Xchg& x,
                         int8_t* planes, int plane_step, int nch, float* sscale, int* sxsum, int rank, int cs) {
  constexpr int N = norm::VecOf<T>::N;
  const bool has = r.vi >= 0;
  if (has) put_slot<N>(cbuf, a);
  const float rstd = norm::rstd_of(cluster_ss<N>(r, cbuf, x.ss2, rank, cs), r.k, eps);
  float amax[NW];
#pragma unroll
  for (int pw = 0; pw < NW; ++pw) {
    amax[pw] = 0.f;
    if (has) {
#pragma unroll
      for (int i = 0; i < N; ++i) amax[pw] = norm::amax_fold(amax[pw], (a[i] * rstd) * wq[pw][i]);  // NaN-sticky
    }
  }
  cluster_max<NW>(amax, x.mx, rank, cs);
  int csum[NW];
#pragma unroll
  for (int pw = 0; pw < NW; ++pw) {
    amax[pw] = norm::amax_final(amax[pw]);  // NaN/inf row: codes 0, scale NaN
    const float s = 127.0f / amax[pw];
    csum[pw] = 0;
    if (has) {
      int q[N];
#pragma unroll
      for (int i = 0; i < N; ++i) {
        q[i] = norm::quant_code((a[i] * rstd) * wq[pw][i], s);
        csum[pw] += q[i];
      }
      int8_t* dst = planes + pw * plane_step + plane_offset32(r.vi * N, nch);
      for (int c = 0; c < cs; ++c) norm::store_codes<N>(peer(dst, c), q);
    }
  }
  cluster_sum_int<NW>(csum, x.cs, rank, cs);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int pw = 0; pw < NW; ++pw) {
      sscale[pw] = amax[pw] / 127.0f;
      sxsum[pw] = csum[pw];
    }
  }
}

// a = rms_norm(x, w, residual=res) for this thread's vector: sx / sr its vectors of x and res
// (has_res false: no residual), wn its norm weights; res_out (global, null: not stored) <-
// round(x + res) or a copy of x; a rounded to T. As residual_norm_v3.
template <class T>
__device__ __forceinline__ void residual_norm_v4(const V4Row& r, const uint4& sx, const uint4& sr, bool has_res,
                                                 T* res_out, const float (&wn)[norm::VecOf<T>::N], float eps,
                                                 float* cbuf, V4Xchg& x, int rank, int cs,
                                                 float (&a)[norm::VecOf<T>::N]) {
  constexpr int N = norm::VecOf<T>::N;
  const bool has = r.vi >= 0;
  float s[N];
  if (has) {
    norm::unpack<T, N>(sx, s);
    if (has_res) {
      float q[N];
      norm::unpack<T, N>(sr, q);
#pragma unroll
      for (int i = 0; i < N; ++i) s[i] += q[i];
      if (res_out != nullptr) st16(res_out + r.vi * N, norm::pack<T, N>(s));
    } else if (res_out != nullptr) {
      st16(res_out + r.vi * N, sx);
    }
    put_slot<N>(cbuf, s);
  }
  const float rstd = norm::rstd_of(cluster_ss<N>(r, cbuf, x.ss1, rank, cs), r.k, eps);
  if (has) {
    float o[N];
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = (s[i] * rstd) * wn[i];
    norm::unpack<T, N>(norm::pack<T, N>(o), a);  // the stored (rounded) normalized row
  }
}

// The MLGRU step of this thread's vector and rms_norm_swish_gate(g, h, w_gate), rounded to T,
// into a. As mlgru_gate_v3: gi, gf, gg its gate vectors, lbv its lower bounds (zeros for layer
// 0), carry its old state; the new state to state_out + vi * N (null: not stored).
template <class T>
__device__ __forceinline__ void mlgru_gate_v4(const V4Row& r, const uint4& gi, const uint4& gf, const uint4& gg,
                                              const float (&lbv)[norm::VecOf<T>::N],
                                              const float (&carry)[norm::VecOf<T>::N], float* state_out,
                                              const float (&wg)[norm::VecOf<T>::N], float eps, float* cbuf,
                                              V4Xchg& x, int rank, int cs, float (&a)[norm::VecOf<T>::N]) {
  constexpr int N = norm::VecOf<T>::N;
  constexpr bool kFast = sizeof(T) == 2;
  const bool has = r.vi >= 0;
  float gv[N], hf[N];
  if (has) {
    norm::unpack<T, N>(gg, gv);
    put_slot<N>(cbuf, gv);  // the sum of squares of g does not depend on the MLGRU step
    float xi[N], xf[N], omlb[N], ft[N], c[N], hv[N];
    norm::unpack<T, N>(gi, xi);
    norm::unpack<T, N>(gf, xf);
#pragma unroll
    for (int i = 0; i < N; ++i) omlb[i] = 1.0f - lbv[i];
    mlgru::gate_token<kFast, N>(xi, xf, lbv, omlb, true, true, ft, c);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      // As mlgru_gate_row: the scan kernel's map of one time-lane, then the carry.
      float b = fmaf(ft[i], 0.0f, c[i]);
      const float A = ft[i] * 1.0f;
      b = fmaf(1.0f, b, 0.0f);
      const float state_in = fmaf(1.0f, carry[i], 0.0f);
      if (state_out != nullptr) state_out[r.vi * N + i] = fmaf(A, carry[i], b);
      hv[i] = fmaf(ft[i], state_in, c[i]);
    }
    norm::unpack<T, N>(norm::pack<T, N>(hv), hf);  // h as stored in T
  }
  const float rstd = norm::rstd_of(cluster_ss<N>(r, cbuf, x.ss1, rank, cs), r.k, eps);
  if (has) {
    float o[N];
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = ((gv[i] * rstd) * wg[i]) * (hf[i] * norm::sigmoid(hf[i]));
    norm::unpack<T, N>(norm::pack<T, N>(o), a);
  }
}

// t = silu(u[:I]) * u[I:] for this thread's vector (ua, ub), rounded to T, into a. As
// silu_mul_v3.
template <class T>
__device__ __forceinline__ void silu_mul_v4(const uint4& ua, const uint4& ub, float (&a)[norm::VecOf<T>::N]) {
  constexpr int N = norm::VecOf<T>::N;
  float x[N], y[N], o[N];
  norm::unpack<T, N>(ua, x);
  norm::unpack<T, N>(ub, y);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float s = norm::round_to<T>(x[i] / (1.0f + expf(-x[i])));
    o[i] = s * y[i];
  }
  norm::unpack<T, N>(norm::pack<T, N>(o), a);
}

}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
