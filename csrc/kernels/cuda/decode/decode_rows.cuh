// The row phases of the fused decode step (decode_step.cu): RMSNorm (+ residual), the MLGRU
// state update with the output gate, silu * mul, and the int8 quantization of the next
// product's input, one batch row per CTA.
//
// Bit-identity with the standalone kernels (norm/norm_forward.cu, mlgru/mlgru_scan.cu, the
// torch silu/mul): a row of k elements is reduced in the canonical order of the norm kernels'
// register path. With N = 16 / sizeof(T) elements per vector and P = norm::vec_threads(k / N)
// threads, thread t < P owns vectors t, t + P, t + 2P, ... (at most kVecPerThread) and sums
// their squares in that order with fmaf; the P / 32 warp partials are combined by
// norm::block_sum (butterfly in the warp, then warps in order). The CTA here has more
// threads than P: the others hold no vector and add exact zeros after the last warp, which
// leaves every partial sum unchanged. Max reductions are exact in any order. Element-wise
// math repeats the standalone kernels' expressions (same operation order, explicit fmaf
// where those kernels' a * b + c contracts).
//
// Data written earlier in the same launch by other CTAs is read with ld.global.cg (L2): L1 is
// not coherent across SMs. Each thread only re-reads the shared-memory vectors it wrote.
#pragma once

#include "cuda/mlgru/mlgru_gate.cuh"
#include "cuda/norm/norm_common.cuh"

namespace mmfree {
namespace cuda {
namespace decode {

constexpr int VPT = norm::kVecPerThread;

// 16-byte loads: data produced in this launch (L2, coherent) / read-only inputs.
__device__ __forceinline__ uint4 ld_cg(const void* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint4 ld_ro(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ void st16(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

// The vectors a thread owns in a row of k elements (see the file comment).
struct RowShape {
  int P;         // threads of the canonical reduction
  int64_t k;     // elements
  int64_t nvec;  // k / N
  __device__ __forceinline__ bool owns(int j, int64_t& vi) const {
    vi = static_cast<int64_t>(j) * P + threadIdx.x;
    return static_cast<int>(threadIdx.x) < P && vi < nvec;
  }
};

// N norm weights (activation dtype T or fp32) from element `off`, as fp32.
template <class T, int N>
__device__ __forceinline__ void load_w(const void* w, bool f32, int64_t off, float (&f)[N]) {
  if (f32) {
    norm::load_weights<float, N>(static_cast<const float*>(w) + off, f);
  } else {
    norm::load_weights<T, N>(static_cast<const T*>(w) + off, f);
  }
}

// rms_norm_quant(_multi) of the row held in `sa` (T vectors) with `nw` weight rows (w, w + k,
// ...): codes to codes + i * code_step, scale amax / 127 and the code sum (the GEMV's offset
// term) to scale[i * meta_step], xsum[i * meta_step]. As norm_forward.cu's quant_vec.
// Byte offset of code k in the GEMV's shared-memory "planes" of one batch row (decode_gemv.cuh,
// stage_codes: int4 (j, c) at j * nch + c holds codes (c / 2) * 128 + j * 32 + (c % 2) * 16
// .. + 15), nch = 2 x the 128-weight blocks of K.
__device__ __forceinline__ int64_t plane_offset(int64_t k, int nch) {
  const int64_t j = (k >> 5) & 3, c = (k >> 7) * 2 + ((k >> 4) & 1);
  return (j * nch + c) * 16 + (k & 15);
}

// `plane_nch` > 0: codes go to codes + plane_offset(k, plane_nch) (the fused product phases'
// shared-memory planes, decode_kernel.cuh v2) instead of codes + k.
template <class T>
__device__ void quant_row(const uint4* sa, const RowShape& r, float eps, const void* w, bool wf32, int nw,
                          int8_t* codes, int64_t code_step, float* scale, int* xsum, int64_t meta_step, float* red,
                          int plane_nch = 0) {
  constexpr int N = norm::VecOf<T>::N;
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
  for (int pw = 0; pw < nw; ++pw) {
    const void* wr = static_cast<const char*>(w) + pw * r.k * (wf32 ? 4 : static_cast<int64_t>(sizeof(T)));
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      int64_t vi;
      if (r.owns(j, vi)) {
        float f[N], wf[N];
        norm::unpack<T, N>(sa[vi], f);
        load_w<T, N>(wr, wf32, vi * N, wf);
#pragma unroll
        for (int i = 0; i < N; ++i) amax = norm::amax_fold(amax, (f[i] * rstd) * wf[i]);  // NaN-sticky
      }
    }
    amax = norm::amax_final(norm::block_max(amax, red));  // NaN/inf row: codes 0, scale NaN
    const float s = 127.0f / amax;
    int8_t* qr = codes + pw * code_step;
    int csum = 0;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      int64_t vi;
      if (r.owns(j, vi)) {
        float f[N], wf[N];
        int q[N];
        norm::unpack<T, N>(sa[vi], f);
        load_w<T, N>(wr, wf32, vi * N, wf);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          q[i] = norm::quant_code((f[i] * rstd) * wf[i], s);
          csum += q[i];
        }
        norm::store_codes<N>(qr + (plane_nch > 0 ? plane_offset(vi * N, plane_nch) : vi * N), q);
      }
    }
    csum = norm::block_sum(csum, reinterpret_cast<int*>(red));
    if (threadIdx.x == 0) {
      scale[pw * meta_step] = amax / 127.0f;
      xsum[pw * meta_step] = csum;
    }
  }
}

// a = rms_norm(x, w, residual=res): res_out <- round(x + res) (or a copy of x without
// residual; res_out null: not stored), a (rounded to T) into `sa`. As norm_forward.cu's
// rms_norm_vec. `x_ro`: x is a read-only input (the embedding row).
template <class T>
__device__ void residual_norm_row(const T* x, bool x_ro, const T* res, T* res_out, bool has_res, const void* w,
                                  bool wf32, const RowShape& r, float eps, uint4* sx, uint4* sr, uint4* sa,
                                  float* red) {
  constexpr int N = norm::VecOf<T>::N;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {  // every load of the row in flight at once
    int64_t vi;
    if (r.owns(j, vi)) {
      sx[vi] = x_ro ? ld_ro(x + vi * N) : ld_cg(x + vi * N);
      if (has_res) sr[vi] = ld_cg(res + vi * N);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    int64_t vi;
    if (r.owns(j, vi)) {
      float s[N];
      norm::unpack<T, N>(sx[vi], s);
      if (has_res) {
        float q[N];
        norm::unpack<T, N>(sr[vi], q);
#pragma unroll
        for (int i = 0; i < N; ++i) s[i] += q[i];
        if (res_out != nullptr) st16(res_out + vi * N, norm::pack<T, N>(s));
      } else if (res_out != nullptr) {
        st16(res_out + vi * N, sx[vi]);
      }
#pragma unroll
      for (int i = 0; i < N; ++i) ss = fmaf(s[i], s[i], ss);
    }
  }
  const float rstd = norm::rstd_of(norm::block_sum(ss, red), r.k, eps);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    int64_t vi;
    if (r.owns(j, vi)) {
      float s[N], wf[N], o[N];
      norm::unpack<T, N>(sx[vi], s);
      if (has_res) {
        float q[N];
        norm::unpack<T, N>(sr[vi], q);
#pragma unroll
        for (int i = 0; i < N; ++i) s[i] += q[i];
      }
      load_w<T, N>(w, wf32, vi * N, wf);
#pragma unroll
      for (int i = 0; i < N; ++i) o[i] = (s[i] * rstd) * wf[i];
      sa[vi] = norm::pack<T, N>(o);
    }
  }
}

// The MLGRU step of one token (mlgru_scan.cu with T = 1: one time-lane, the carry scan's
// identity maps) followed by rms_norm_swish_gate(g, h, w_gate) into `sa` (as
// norm_forward.cu's swish_gate_vec). The new state (fp32) goes to state_out (null: not
// stored; may be `state`); lb is null for layer 0 (f_t = sigmoid(f)).
template <class T>
__device__ void mlgru_gate_row(const T* gi, const T* gf, const T* gg, const float* lb, const float* state,
                               float* state_out,
                               const void* w_gate, bool wf32, const RowShape& r, float eps, uint4* sg, uint4* sh,
                               uint4* sa, float* red) {
  constexpr int N = norm::VecOf<T>::N;
  constexpr bool kFast = sizeof(T) == 2;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    int64_t vi;
    if (r.owns(j, vi)) {
      float xi[N], xf[N], lbv[N], omlb[N], carry[N], ft[N], c[N], h[N];
      norm::unpack<T, N>(ld_cg(gi + vi * N), xi);
      norm::unpack<T, N>(ld_cg(gf + vi * N), xf);
      sg[vi] = ld_cg(gg + vi * N);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        lbv[i] = lb != nullptr ? __ldg(lb + vi * N + i) : 0.0f;
        omlb[i] = 1.0f - lbv[i];
        carry[i] = state[vi * N + i];
      }
      mlgru::gate_token<kFast, N>(xi, xf, lbv, omlb, true, true, ft, c);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        // The scan kernel's per-thread map (A, b) over its tokens (this one, then identity
        // maps of the out-of-range ones), the exclusive map of a single time-lane, the carry.
        float b = fmaf(ft[i], 0.0f, c[i]);
        const float A = ft[i] * 1.0f;
        b = fmaf(1.0f, b, 0.0f);
        const float state_in = fmaf(1.0f, carry[i], 0.0f);
        if (state_out != nullptr) state_out[vi * N + i] = fmaf(A, carry[i], b);
        h[i] = fmaf(ft[i], state_in, c[i]);
      }
      sh[vi] = norm::pack<T, N>(h);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    int64_t vi;
    if (r.owns(j, vi)) {
      float f[N];
      norm::unpack<T, N>(sg[vi], f);
#pragma unroll
      for (int i = 0; i < N; ++i) ss = fmaf(f[i], f[i], ss);
    }
  }
  const float rstd = norm::rstd_of(norm::block_sum(ss, red), r.k, eps);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    int64_t vi;
    if (r.owns(j, vi)) {
      float gf[N], hf[N], wf[N], o[N];
      norm::unpack<T, N>(sg[vi], gf);
      norm::unpack<T, N>(sh[vi], hf);
      load_w<T, N>(w_gate, wf32, vi * N, wf);
#pragma unroll
      for (int i = 0; i < N; ++i) o[i] = ((gf[i] * rstd) * wf[i]) * (hf[i] * norm::sigmoid(hf[i]));
      sa[vi] = norm::pack<T, N>(o);
    }
  }
}

// t = silu(u[:I]) * u[I:] into `sa`, each op rounded to T as torch's F.silu and mul do
// (silu: x / (1 + exp(-x)) in fp32).
template <class T>
__device__ void silu_mul_row(const T* u, int64_t inter, const RowShape& r, uint4* sa) {
  constexpr int N = norm::VecOf<T>::N;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    int64_t vi;
    if (r.owns(j, vi)) {
      float a[N], b[N], o[N];
      norm::unpack<T, N>(ld_cg(u + vi * N), a);
      norm::unpack<T, N>(ld_cg(u + inter + vi * N), b);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float s = norm::round_to<T>(a[i] / (1.0f + expf(-a[i])));
        o[i] = s * b[i];
      }
      sa[vi] = norm::pack<T, N>(o);
    }
  }
}

}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
