// v3 of the fused decode step, batch 1 (included by decode_step_v3_<dtype>.cu; chosen by
// launch_typed in decode_kernel.cuh, see benchmarks/NOTES.md "v3").
//
// v2's phases (4 per layer: every CTA does the row math of the phase, then its share of the
// product; one grid barrier per phase) with the latency chain of a phase cut down:
//  - Each CTA's weight rows of product phase k + 1 are copied into its shared memory with
//    cp.async while phase k runs (issued right after phase k's barrier: the weights do not
//    depend on the activations), so phase k + 1's product reads shared memory only. Two
//    consecutive phases' slices share a ring of `ring` bytes (even phases at its start, odd
//    ones at its end). The L2 prefetch goes two phases ahead (the lm_head, whose slice does
//    not fit, streams from L2 as in v2).
//  - A phase's row inputs (activations from L2, the norm vectors, the MLGRU state and lower
//    bounds) are copied into shared memory in one wave (one round trip, all in flight) before
//    any arithmetic; the norm vectors were L2-prefetched the phase before.
//  - The row math runs on all 8 warps with 3 block reductions per quantization
//    (decode_rows_v3.cuh), in the canonical reduction order, so the results stay
//    bit-identical to the op-by-op path.
#pragma once

#include "cuda/decode/decode_kernel.cuh"
#include "cuda/decode/decode_rows_v3.cuh"

namespace mmfree {
namespace cuda {
namespace decode {

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gsrc) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gsrc) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Copies `bytes` (a multiple of 16; both ends 16-byte aligned) into shared memory across the
// CTA (cp.async: part of the thread's current group).
__device__ __forceinline__ void stage16(void* dst, const void* src, int64_t bytes) {
  for (int64_t off = static_cast<int64_t>(threadIdx.x) * 16; off < bytes; off += static_cast<int64_t>(kThreads) * 16)
    cp_async16(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off);
}

__host__ __device__ __forceinline__ int64_t up16(int64_t v) { return (v + 15) / 16 * 16; }

// Shared-memory layout of the v3 kernel (bytes from the start of the dynamic shared memory).
struct V3Smem {
  int64_t planes, sin, snorm, sa, ring, total;
};

__host__ __device__ __forceinline__ V3Smem v3_smem(int64_t h, int64_t I, int64_t esize, int64_t wsize,
                                                   int64_t ring) {
  V3Smem s{};
  const int64_t planes = 3 * plane_row_bytes(h) > plane_row_bytes(I) ? 3 * plane_row_bytes(h) : plane_row_bytes(I);
  // Row inputs: x + res (2h), the MLGRU's i, f, g, h scratch (4h) + state + lower bounds
  // (fp32), or u (2I).
  int64_t sin = 4 * h * esize + 8 * h;
  if (2 * I * esize > sin) sin = 2 * I * esize;
  int64_t snorm = (4 * h > I ? 4 * h : I) * wsize;
  const int64_t sa = (h > I ? h : I) * esize;
  s.planes = 0;
  s.sin = up16(planes);
  s.snorm = s.sin + up16(sin);
  s.sa = s.snorm + up16(snorm);
  s.ring = s.sa + up16(sa);
  s.total = s.ring + up16(ring);
  return s;
}

// The most weight bytes two consecutive product phases' slices of one CTA take (the ring).
inline int64_t v3_ring_bytes(int64_t h, int64_t I, int grid) {
  auto slice = [&](int64_t rows, int64_t K) { return (rows + grid - 1) / grid * ternary::row_bytes(K); };
  const int64_t s[4] = {slice(3 * h, h), slice(h, h), slice(2 * I, h), slice(h, I)};
  int64_t m = 0;
  for (int g = 0; g < 4; ++g) m = std::max(m, s[g] + s[(g + 1) % 4]);
  return m;
}

// Dynamic shared memory of the v3 kernel for these shapes on `sms` SMs (one CTA each).
inline int64_t v3_smem_bytes(int64_t h, int64_t I, int64_t esize, int64_t wsize, int sms) {
  return v3_smem(h, I, esize, wsize, v3_ring_bytes(h, I, sms)).total;
}

// This CTA's rows of product phase k (k = 4 l + g; k = 4 L: the lm_head), as gemv_phase cuts
// them: calls fn(job, first row, rows) for each product it has rows of.
template <class T, class Fn>
__device__ __forceinline__ void phase_slices(const KParams& p, int k, Fn fn) {
  const int l = k / 4, g = k % 4;
  const int nj = phase_jobs(p, l, g);
  int64_t total = 0;
  for (int q = 0; q < nj; ++q) total += phase_job<T>(p, l, g, q).N;
  const int64_t r0 = total * blockIdx.x / gridDim.x, r1 = total * (blockIdx.x + 1) / gridDim.x;
  int64_t start = 0;
  for (int q = 0; q < nj; ++q) {
    const GemvJob jb = phase_job<T>(p, l, g, q);
    const int64_t lo = max(r0, start), hi = min(r1, start + jb.N);
    if (lo < hi) fn(jb, lo - start, hi - lo);
    start += jb.N;
  }
}

template <class T>
__device__ __forceinline__ int64_t phase_slice_bytes(const KParams& p, int k) {
  const int64_t rb = ternary::row_bytes(phase_k(p, k / 4, k % 4));
  int64_t bytes = 0;
  phase_slices<T>(p, k, [&](const GemvJob&, int64_t, int64_t rows) { bytes += rows * rb; });
  return bytes;
}

template <class T>
__device__ __forceinline__ void stage_phase_weights(const KParams& p, int k, uint8_t* dst) {
  const int64_t rb = ternary::row_bytes(phase_k(p, k / 4, k % 4));
  phase_slices<T>(p, k, [&](const GemvJob& jb, int64_t lo, int64_t rows) {
    stage16(dst, jb.packed + lo * rb, rows * rb);
    dst += rows * rb;
  });
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) decode_step_kernel_v3(const __grid_constant__ KParams p) {
  constexpr int N = norm::VecOf<T>::N;
  constexpr int64_t E = sizeof(T);
  extern __shared__ int4 smem[];
  __shared__ float red[32];
  __shared__ float sscale[3];
  __shared__ int sxsum[3];
  const int64_t h = p.h, I = p.I;
  const int64_t wsize = p.w_f32 ? 4 : E;
  const bool writer = blockIdx.x == 0;
  const V3Smem lay = v3_smem(h, I, E, wsize, p.ring);
  char* base = reinterpret_cast<char*>(smem);
  int8_t* planes = reinterpret_cast<int8_t*>(base + lay.planes);
  char* sin = base + lay.sin;
  const char* snorm = base + lay.snorm;
  uint4* sa = reinterpret_cast<uint4*>(base + lay.sa);
  uint8_t* ring = reinterpret_cast<uint8_t*>(base + lay.ring);
  const uint4* sin4 = reinterpret_cast<const uint4*>(sin);
  T* delta = static_cast<T*>(p.delta);
  T* ifg = static_cast<T*>(p.ifg);
  T* attn = static_cast<T*>(p.attn);
  T* u = static_cast<T*>(p.u);
  T* xbuf[2] = {static_cast<T*>(p.xres), static_cast<T*>(p.xres2)};
  int rp = 0;  // xbuf[rp] holds the residual stream
  const RowShape rh{p.ph, h, h / N}, ri{p.pi, I, I / N};
  const int nch_h = static_cast<int>(2 * ternary::blocks_per_row(h));
  const int nch_i = static_cast<int>(2 * ternary::blocks_per_row(I));
  const int64_t prow_h = plane_row_bytes(h), prow_i = plane_row_bytes(I);
  const int nph = 4 * p.L;  // product phases with staged weights; phase nph is the lm_head
  auto norm_w = [&](int l, int which) {
    return static_cast<const char*>(p.norms) + (static_cast<int64_t>(l) * kDecodeNormsPerLayer + which) * h * wsize;
  };
  auto ring_of = [&](int k) { return (k & 1) ? ring + p.ring - phase_slice_bytes<T>(p, k) : ring; };
  // The norm vectors phase k's row math reads: (first, bytes).
  auto norms_of = [&](int k, const char*& w, int64_t& bytes) {
    const int l = k / 4, g = k % 4;
    if (k == nph) {
      w = static_cast<const char*>(p.final_norms), bytes = 2 * h * wsize;
    } else if (g == 0) {
      w = norm_w(l, kNormAttn), bytes = 4 * h * wsize;  // attn_norm, then the i, f, g norms
    } else if (g == 1) {
      w = norm_w(l, kNormGateOut), bytes = 2 * h * wsize;  // g_norm, o_proj.norm
    } else if (g == 2) {
      w = norm_w(l, kNormMlp), bytes = 2 * h * wsize;  // mlp_norm, gate_proj.norm
    } else {
      w = static_cast<const char*>(p.down_norms) + l * I * wsize, bytes = I * wsize;
    }
  };
  unsigned epoch = 0;

  stage_phase_weights<T>(p, 0, ring_of(0));
  cp_async_commit();
  for (int k = 0; k <= nph; ++k) {
    const int l = k / 4, g = k % 4;
    const bool last = k == nph;
    const int64_t K = last ? h : phase_k(p, l, g);
    const int nprod = !last && g == 0 ? 3 : 1;
    // Codes past K in the last 128-weight block must be zeros (the planes hold stale bytes).
    if (K % ternary::kBlockWeights != 0) {
      const int64_t n16 = nprod * plane_row_bytes(K) / 16;
      for (int64_t i = threadIdx.x; i < n16; i += kThreads) smem[i] = make_int4(0, 0, 0, 0);
    }
    // 1. This phase's row inputs and norm vectors, one wave of copies.
    {
      const char* w;
      int64_t wbytes;
      norms_of(k, w, wbytes);
      stage16(base + lay.snorm, w, wbytes);
      if (last || g == 0 || g == 2) {
        const T* x;
        if (last) {
          x = delta;
        } else if (g == 2) {
          x = attn;
        } else if (l == 0) {
          const int64_t tok = p.tokens[0];
          if (tok < 0 || tok >= p.V) __trap();  // as F.embedding's device assert
          x = static_cast<const T*>(p.emb) + tok * h;
        } else {
          x = delta;
        }
        stage16(sin, x, h * E);
        if (l > 0 || g == 2 || last) stage16(sin + h * E, xbuf[rp], h * E);
      } else if (g == 1) {
        stage16(sin, ifg, 3 * h * E);
        stage16(sin + 4 * h * E, p.state + l * p.state_stride, h * 4);
        if (l > 0) stage16(sin + 4 * h * E + 4 * h, p.lb + l * h, h * 4);
      } else {
        stage16(sin, u, 2 * I * E);
      }
    }
    cp_async_commit();
    // 2. The next phase's weight slice into the ring; L2 prefetches a phase further.
    if (k + 1 < nph) stage_phase_weights<T>(p, k + 1, ring_of(k + 1));
    cp_async_commit();
    if (k + 2 <= nph) prefetch_gemv<T>(p, (k + 2) / 4, (k + 2) % 4);
    if (k + 1 <= nph && blockIdx.x == 1 % gridDim.x) {
      const char* w;
      int64_t wbytes;
      norms_of(k + 1, w, wbytes);
      prefetch_l2(reinterpret_cast<const uint8_t*>(w), wbytes);
    }
    if (writer && !last && g == 2) {  // every CTA has read the old state (phase g = 1)
      float* st = p.state + l * p.state_stride;
      for (int64_t i = threadIdx.x; i < h; i += kThreads) st[i] = __ldcg(p.snew + i);
    }
    cp_async_wait<1>();  // this phase's weights and row inputs have landed
    __syncthreads();
    // 3. The row math: codes of the product inputs into the planes.
    if (last || g == 0 || g == 2) {
      const bool has_res = l > 0 || g == 2 || last;
      T* res_out = writer && !last ? xbuf[rp ^ 1] : nullptr;
      residual_norm_v3<T>(sin4, has_res ? sin4 + h / N : nullptr, res_out, snorm, p.w_f32, rh, p.eps, sa, red);
      if (!last && g == 0) {
        quant_v3<T, 3>(sa, rh, p.eps, snorm + h * wsize, p.w_f32, planes, prow_h, nch_h, sscale, sxsum, red);
      } else {
        quant_v3<T, 1>(sa, rh, p.eps, snorm + h * wsize, p.w_f32, planes, prow_h, nch_h, sscale, sxsum, red);
      }
      if (!last) rp ^= 1;
    } else if (g == 1) {
      const float* sst = reinterpret_cast<const float*>(sin + 4 * h * E);
      mlgru_gate_v3<T>(sin4, sin4 + h / N, sin4 + 2 * h / N, l > 0 ? sst + h : nullptr, sst,
                       writer ? p.snew : nullptr, snorm, p.w_f32, rh, p.eps,
                       reinterpret_cast<uint4*>(sin + 3 * h * E), sa, red);
      quant_v3<T, 1>(sa, rh, p.eps, snorm + h * wsize, p.w_f32, planes, prow_h, nch_h, sscale, sxsum, red);
    } else {
      silu_mul_v3<T>(sin4, ri, sa);
      quant_v3<T, 1>(sa, ri, p.eps, snorm, p.w_f32, planes, prow_i, nch_i, sscale, sxsum, red);
    }
    __syncthreads();  // the planes and statistics are complete
    // 4. The product.
    auto job = [&](int q) { return phase_job_v2<T, 1>(p, l, g, q, sscale, sxsum); };
    if (last) {
      gemv_phase<1, T, true>(job, 1, 1, h, 0, smem, 0);
    } else {
      gemv_phase<1, T, true, true>(job, phase_jobs(p, l, g), 1, K, 0, smem, 0, ring_of(k));
      grid_barrier(p.bar, ++epoch * gridDim.x);
    }
  }
}

// The v3 launch for one batch row, or cudaErrorNotSupported where v3 does not apply (batch
// > 1, its shared memory does not fit `budget`, an unaligned state or lower-bound tensor, or
// MMFREE_DECODE_V3=0: the v2 / v1 kernels then run).
template <class T>
cudaError_t launch_v3(const KParams& kp, int budget, cudaStream_t stream) {
  if (kp.B != 1 || !v3_enabled()) return cudaErrorNotSupported;
  if ((reinterpret_cast<uintptr_t>(kp.state) & 15u) != 0 || (reinterpret_cast<uintptr_t>(kp.lb) & 15u) != 0)
    return cudaErrorNotSupported;
  const int sms = sm_count();
  if (sms < 1) return cudaErrorCooperativeLaunchTooLarge;
  KParams k = kp;
  k.ring = v3_ring_bytes(kp.h, kp.I, sms);
  const int64_t esize = static_cast<int64_t>(sizeof(T));
  const int64_t smem = v3_smem_bytes(kp.h, kp.I, esize, kp.w_f32 ? 4 : esize, sms);
  if (smem > budget) return cudaErrorNotSupported;
  static std::atomic<uint64_t> raised{0};
  return launch_coop(decode_step_kernel_v3<T>, raised, k, static_cast<int>(smem), budget, stream);
}

}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
