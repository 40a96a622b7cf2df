// The row math of the v3 fused decode step (decode_kernel_v3.cuh) on inputs already staged in
// shared memory: the same arithmetic as decode_rows.cuh (and so as the standalone norm, scan
// and quantization kernels), reorganized for latency.
//
// What must keep the canonical order (decode_rows.cuh's file comment) is only each float sum
// of squares: thread t < P sums its vectors t, t + P, ... with fmaf, the warp partials are
// combined by norm::block_sum. Everything else is either element-wise (any thread may compute
// any element) or an exact reduction (the row max of |x|, the integer code sum: any order
// gives the same value), so here all 256 threads share the element-wise passes, and the max
// and code-sum reductions of the up to 3 weight rows of a quantization go in one block
// reduction each. A quantization of nw rows thus costs 3 block reductions instead of 1 + 2 nw.
#pragma once

#include "cuda/decode/decode_gemv.cuh"
#include "cuda/decode/decode_rows.cuh"

namespace mmfree {
namespace cuda {
namespace decode {

// N norm weights (T or fp32) from element `off` of a weight row staged in shared memory, as
// fp32 (norm::load_weights' conversion, from shared memory).
template <class T, int N>
__device__ __forceinline__ void load_ws(const char* w, bool f32, int64_t off, float (&f)[N]) {
  if (f32) {
    const uint4* q = reinterpret_cast<const uint4*>(reinterpret_cast<const float*>(w) + off);
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      const uint4 u = q[k];
      f[4 * k] = __uint_as_float(u.x);
      f[4 * k + 1] = __uint_as_float(u.y);
      f[4 * k + 2] = __uint_as_float(u.z);
      f[4 * k + 3] = __uint_as_float(u.w);
    }
  } else {
    norm::unpack<T, N>(*reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(w) + off), f);
  }
}

// Block max / integer sum of NW values per thread at once (exact: any order).
template <int NW>
__device__ __forceinline__ void block_max_n(float (&v)[NW], float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < NW; ++i) v[i] = norm::warp_max(v[i]);
  __syncthreads();  // red may still be read by an earlier reduction
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NW; ++i) red[i * kWarps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    float t = red[i * kWarps];
    for (int w = 1; w < kWarps; ++w) t = fmaxf(t, red[i * kWarps + w]);
    v[i] = t;
  }
}

template <int NW>
__device__ __forceinline__ void block_sum_int_n(int (&v)[NW], int* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < NW; ++i) v[i] = norm::warp_sum(v[i]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NW; ++i) red[i * kWarps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    int t = 0;
    for (int w = 0; w < kWarps; ++w) t += red[i * kWarps + w];
    v[i] = t;
  }
}

// rms_norm_quant(_multi) of the row in `sa` with NW weight rows staged at w (row pw at
// w + pw * k weights): codes into the product planes (row pw's at planes + pw * plane_step,
// plane_offset layout for nch chunks), scale amax / 127 and the code sum into sscale[pw],
// sxsum[pw]. As decode_rows.cuh's quant_row (same values: the sum of squares in the canonical
// order, the max and code sums exact).
template <class T, int NW>
__device__ void quant_v3(const uint4* sa, const RowShape& r, float eps, const char* w, bool wf32, int8_t* planes,
                         int64_t plane_step, int nch, float* sscale, int* sxsum, float* red) {
  constexpr int N = norm::VecOf<T>::N;
  const int64_t wrow = r.k * (wf32 ? 4 : static_cast<int64_t>(sizeof(T)));
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    int64_t vi;
    if (r.owns(j, vi)) {
      float f[N];
      norm::unpack<T, N>(sa[vi], f);
#pragma unroll
      for (int i = 0; i < N; ++i) ss = fmaf(f[i], f[i], ss);
    }
  }
  const float rstd = norm::rstd_of(norm::block_sum(ss, red), r.k, eps);
  float amax[NW];
#pragma unroll
  for (int pw = 0; pw < NW; ++pw) amax[pw] = 0.f;
  for (int64_t v = threadIdx.x; v < r.nvec; v += kThreads) {
    float f[N];
    norm::unpack<T, N>(sa[v], f);
#pragma unroll
    for (int pw = 0; pw < NW; ++pw) {
      float wf[N];
      load_ws<T, N>(w + pw * wrow, wf32, v * N, wf);
#pragma unroll
      for (int i = 0; i < N; ++i) amax[pw] = norm::amax_fold(amax[pw], (f[i] * rstd) * wf[i]);  // NaN-sticky
    }
  }
  block_max_n<NW>(amax, red);
  float s[NW];
#pragma unroll
  for (int pw = 0; pw < NW; ++pw) {
    amax[pw] = norm::amax_final(amax[pw]);  // NaN/inf row: codes 0, scale NaN
    s[pw] = 127.0f / amax[pw];
  }
  int csum[NW];
#pragma unroll
  for (int pw = 0; pw < NW; ++pw) csum[pw] = 0;
  for (int64_t v = threadIdx.x; v < r.nvec; v += kThreads) {
    float f[N];
    norm::unpack<T, N>(sa[v], f);
    const int64_t at = plane_offset(v * N, nch);
#pragma unroll
    for (int pw = 0; pw < NW; ++pw) {
      float wf[N];
      int q[N];
      load_ws<T, N>(w + pw * wrow, wf32, v * N, wf);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        q[i] = norm::quant_code((f[i] * rstd) * wf[i], s[pw]);
        csum[pw] += q[i];
      }
      norm::store_codes<N>(planes + pw * plane_step + at, q);
    }
  }
  block_sum_int_n<NW>(csum, reinterpret_cast<int*>(red));
  if (threadIdx.x == 0) {
#pragma unroll
    for (int pw = 0; pw < NW; ++pw) {
      sscale[pw] = amax[pw] / 127.0f;
      sxsum[pw] = csum[pw];
    }
  }
}

// a = rms_norm(x, w, residual=res) into `sa` (sr null: no residual). res_out (global, null:
// not stored) <- round(x + res), or a copy of x without residual. As residual_norm_row.
template <class T>
__device__ void residual_norm_v3(const uint4* sx, const uint4* sr, T* res_out, const char* w, bool wf32,
                                 const RowShape& r, float eps, uint4* sa, float* red) {
  constexpr int N = norm::VecOf<T>::N;
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    int64_t vi;
    if (r.owns(j, vi)) {
      float s[N];
      norm::unpack<T, N>(sx[vi], s);
      if (sr != nullptr) {
        float q[N];
        norm::unpack<T, N>(sr[vi], q);
#pragma unroll
        for (int i = 0; i < N; ++i) s[i] += q[i];
      }
#pragma unroll
      for (int i = 0; i < N; ++i) ss = fmaf(s[i], s[i], ss);
    }
  }
  if (res_out != nullptr) {
    for (int64_t v = threadIdx.x; v < r.nvec; v += kThreads) {
      if (sr != nullptr) {
        float s[N], q[N];
        norm::unpack<T, N>(sx[v], s);
        norm::unpack<T, N>(sr[v], q);
#pragma unroll
        for (int i = 0; i < N; ++i) s[i] += q[i];
        st16(res_out + v * N, norm::pack<T, N>(s));
      } else {
        st16(res_out + v * N, sx[v]);
      }
    }
  }
  const float rstd = norm::rstd_of(norm::block_sum(ss, red), r.k, eps);
  for (int64_t v = threadIdx.x; v < r.nvec; v += kThreads) {
    float s[N], wf[N], o[N];
    norm::unpack<T, N>(sx[v], s);
    if (sr != nullptr) {
      float q[N];
      norm::unpack<T, N>(sr[v], q);
#pragma unroll
      for (int i = 0; i < N; ++i) s[i] += q[i];
    }
    load_ws<T, N>(w, wf32, v * N, wf);
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = (s[i] * rstd) * wf[i];
    sa[v] = norm::pack<T, N>(o);
  }
  __syncthreads();  // sa complete
}

// The MLGRU step of one token and rms_norm_swish_gate(g, h, w_gate) into `sa`, as
// mlgru_gate_row: inputs staged (gi, gf, gg in T; lb null for layer 0; the state fp32); the
// new state to state_out (global, null: not stored); sh: scratch for h (T vectors).
template <class T>
__device__ void mlgru_gate_v3(const uint4* sgi, const uint4* sgf, const uint4* sgg, const float* slb,
                              const float* sstate, float* state_out, const char* w_gate, bool wf32, const RowShape& r,
                              float eps, uint4* sh, uint4* sa, float* red) {
  constexpr int N = norm::VecOf<T>::N;
  constexpr bool kFast = sizeof(T) == 2;
  float ss = 0.f;  // of g: does not depend on the MLGRU step
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    int64_t vi;
    if (r.owns(j, vi)) {
      float f[N];
      norm::unpack<T, N>(sgg[vi], f);
#pragma unroll
      for (int i = 0; i < N; ++i) ss = fmaf(f[i], f[i], ss);
    }
  }
  for (int64_t v = threadIdx.x; v < r.nvec; v += kThreads) {
    float xi[N], xf[N], lbv[N], omlb[N], carry[N], ft[N], c[N], hv[N];
    norm::unpack<T, N>(sgi[v], xi);
    norm::unpack<T, N>(sgf[v], xf);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      lbv[i] = slb != nullptr ? slb[v * N + i] : 0.0f;
      omlb[i] = 1.0f - lbv[i];
      carry[i] = sstate[v * N + i];
    }
    mlgru::gate_token<kFast, N>(xi, xf, lbv, omlb, true, true, ft, c);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      // As mlgru_gate_row: the scan kernel's map of one time-lane, then the carry.
      float b = fmaf(ft[i], 0.0f, c[i]);
      const float A = ft[i] * 1.0f;
      b = fmaf(1.0f, b, 0.0f);
      const float state_in = fmaf(1.0f, carry[i], 0.0f);
      if (state_out != nullptr) state_out[v * N + i] = fmaf(A, carry[i], b);
      hv[i] = fmaf(ft[i], state_in, c[i]);
    }
    sh[v] = norm::pack<T, N>(hv);
  }
  const float rstd = norm::rstd_of(norm::block_sum(ss, red), r.k, eps);  // its barriers publish sh
  for (int64_t v = threadIdx.x; v < r.nvec; v += kThreads) {
    float gf[N], hf[N], wf[N], o[N];
    norm::unpack<T, N>(sgg[v], gf);
    norm::unpack<T, N>(sh[v], hf);
    load_ws<T, N>(w_gate, wf32, v * N, wf);
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = ((gf[i] * rstd) * wf[i]) * (hf[i] * norm::sigmoid(hf[i]));
    sa[v] = norm::pack<T, N>(o);
  }
  __syncthreads();  // sa complete
}

// t = silu(u[:I]) * u[I:] into `sa` (su: the 2I staged elements), as silu_mul_row.
template <class T>
__device__ void silu_mul_v3(const uint4* su, const RowShape& r, uint4* sa) {
  constexpr int N = norm::VecOf<T>::N;
  for (int64_t v = threadIdx.x; v < r.nvec; v += kThreads) {
    float a[N], b[N], o[N];
    norm::unpack<T, N>(su[v], a);
    norm::unpack<T, N>(su[r.nvec + v], b);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float s = norm::round_to<T>(a[i] / (1.0f + expf(-a[i])));
      o[i] = s * b[i];
    }
    sa[v] = norm::pack<T, N>(o);
  }
  __syncthreads();  // sa complete
}

}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
