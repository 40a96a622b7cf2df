// The persistent decode-step kernel and its launcher (included by one file per activation
// dtype: decode_step_f32.cu, decode_step_bf16.cu, decode_step_f16.cu). See decode_step.cu.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda/decode/decode_gemv.cuh"
#include "cuda/decode/decode_rows.cuh"
#include "cuda/smem_optin.h"
#include "decode_cuda.h"

namespace mmfree {
namespace cuda {
namespace decode {

constexpr int kMaxMats = kDecodeMaxLayers * kDecodeMatsPerLayer + 1;
constexpr int64_t kAlign = 256;
// Shared memory the products may stage activations in (one CTA per SM; less where the
// device's opt-in limit is lower, e.g. 163 KB on the A100).
constexpr int kSmemBudget = 200 * 1024;
// The largest batch the v2 kernel (no row phases: every CTA does the row math of every batch
// row, serially) runs; from the H200 measurements in benchmarks/NOTES.md ("v2"): at B = 1 v2
// beat v1 (2645 vs 2798 us per 1.3B step), at B = 8 it lost 3x (11988 vs 4102 us: eight
// serial rows per CTA per phase). 1: only the MT = 1 tile is compiled; > 1 adds MT = 8.
constexpr int kV2MaxBatch = 1;

inline int64_t align_up(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// Kernel parameters (by value, __grid_constant__; the pointer table keeps it under 4 KB).
struct KParams {
  int B, L;
  int64_t h, I, V;
  int64_t kpad;          // row stride of the code buffers (max(h, I) rounded up to 16)
  int64_t state_stride;  // floats between layers of `state` (the full batch times h)
  const int64_t* tokens;
  float* state;
  const void* emb;
  const float* lb;
  const void* norms;
  const void* down_norms;
  const void* final_norms;
  bool w_f32;  // norm weights are fp32 (else the activation dtype)
  const float* w_scales;
  float eps;
  void* logits;
  // workspace
  unsigned* bar;
  void* xres;   // [B, h] residual stream
  void* xres2;  // [B, h] v2: the residual stream's second buffer (read one, write the other)
  float* snew;  // [B, h] v2: the new MLGRU state until every CTA has read the old one
  void* delta;  // [B, h] down_proj output
  void* ifg;    // [3, B, h]
  void* attn;   // [B, h]
  void* u;      // [B, 2I]
  int8_t* codes;  // [3, B, kpad]
  float* scales;  // [3, B]
  int* xsums;     // [3, B]
  int ph, pi;     // canonical reduction threads for rows of h / I elements
  int slab_blocks;
  int64_t ring;  // v3: shared-memory bytes of the weight ring (decode_kernel_v3.cuh)
  const uint8_t* packed[kMaxMats];
};

struct Workspace {
  int64_t bar, xres, xres2, snew, delta, ifg, attn, u, codes, scales, xsums, total;
};

inline Workspace workspace_layout(int64_t B, int64_t h, int64_t I, int64_t esize) {
  const int64_t kpad = (std::max(h, I) + 15) / 16 * 16;
  Workspace w{};
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off += align_up(bytes);
    return at;
  };
  w.bar = take(64);
  w.xres = take(B * h * esize);
  w.xres2 = take(B * h * esize);
  w.snew = take(B * h * 4);
  w.delta = take(B * h * esize);
  w.ifg = take(3 * B * h * esize);
  w.attn = take(B * h * esize);
  w.u = take(2 * B * I * esize);
  w.codes = take(3 * B * kpad);
  w.scales = take(3 * B * 4);
  w.xsums = take(3 * B * 4);
  w.total = off;
  return w;
}

// Grid-wide barrier: the counter only grows (epoch e waits for e * gridDim.x arrivals), so it
// needs no reset inside the launch; the launcher zeroes it before each launch.
__device__ __forceinline__ void grid_barrier(unsigned* bar, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(bar, 1u);
    unsigned v;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
    } while (v < target);
  }
  __syncthreads();
}

// Product q of phase g (0..3) of layer l, or of the lm_head (l == L).
template <class T>
__device__ __forceinline__ GemvJob phase_job(const KParams& p, int l, int g, int q) {
  const int64_t B = p.B, h = p.h;
  if (l == p.L) {
    const int m = kDecodeMatsPerLayer * p.L;
    return {p.codes, p.scales, p.xsums, p.packed[m], p.w_scales + m, p.logits, p.V};
  }
  const int base = kDecodeMatsPerLayer * l;
  switch (g) {
    case 0:
      return {p.codes + q * B * p.kpad, p.scales + q * B, p.xsums + q * B, p.packed[base + q], p.w_scales + base + q,
              static_cast<T*>(p.ifg) + q * B * h, h};
    case 1: return {p.codes, p.scales, p.xsums, p.packed[base + kMatO], p.w_scales + base + kMatO, p.attn, h};
    case 2:
      return {p.codes, p.scales, p.xsums, p.packed[base + kMatGate], p.w_scales + base + kMatGate, p.u, 2 * p.I};
    default: return {p.codes, p.scales, p.xsums, p.packed[base + kMatDown], p.w_scales + base + kMatDown, p.delta, h};
  }
}

// Products and K of phase g of layer l (the lm_head: l == L).
__device__ __forceinline__ int phase_jobs(const KParams& p, int l, int g) { return l < p.L && g == 0 ? 3 : 1; }
__device__ __forceinline__ int64_t phase_k(const KParams& p, int l, int g) { return l < p.L && g == 3 ? p.I : p.h; }

template <class T>
__device__ __forceinline__ void prefetch_gemv(const KParams& p, int l, int g) {
  if (l > p.L) return;
  prefetch_phase([&](int q) { return phase_job<T>(p, l, g, q); }, phase_jobs(p, l, g), phase_k(p, l, g));
}

template <class T, int MT>
__device__ __forceinline__ void run_gemv(const KParams& p, int l, int g, int4* xs) {
  // Next product phase: g + 1 of this layer, the next layer's first, or the lm_head.
  if (l < p.L) {
    if (g < 3) {
      prefetch_gemv<T>(p, l, g + 1);
    } else {
      prefetch_gemv<T>(p, l + 1, 0);
    }
  }
  gemv_phase<MT, T>([&](int q) { return phase_job<T>(p, l, g, q); }, phase_jobs(p, l, g), p.B, phase_k(p, l, g),
                    p.kpad, xs, p.slab_blocks);
}

template <class T, int MT>
__global__ void __launch_bounds__(kThreads, 1) decode_step_kernel(const __grid_constant__ KParams p) {
  constexpr int N = norm::VecOf<T>::N;
  extern __shared__ int4 smem[];
  __shared__ float red[32];
  const int B = p.B;
  const int64_t h = p.h, I = p.I;
  const int64_t wsize = p.w_f32 ? 4 : static_cast<int64_t>(sizeof(T));
  T* xres = static_cast<T*>(p.xres);
  T* delta = static_cast<T*>(p.delta);
  T* ifg = static_cast<T*>(p.ifg);
  T* attn = static_cast<T*>(p.attn);
  T* u = static_cast<T*>(p.u);
  const RowShape rh{p.ph, h, h / N}, ri{p.pi, I, I / N};
  // Row phases: three row buffers of max(h, I) elements in shared memory.
  const int64_t row_vecs = (h > I ? h : I) / N;
  uint4* s0 = reinterpret_cast<uint4*>(smem);
  uint4* s1 = s0 + row_vecs;
  uint4* s2 = s1 + row_vecs;
  auto norm_w = [&](int l, int which) {
    return static_cast<const char*>(p.norms) + (static_cast<int64_t>(l) * kDecodeNormsPerLayer + which) * h * wsize;
  };
  const int64_t code_q = static_cast<int64_t>(B) * p.kpad;  // between the i, f, g code buffers
  unsigned epoch = 0;
  auto sync = [&]() { grid_barrier(p.bar, ++epoch * gridDim.x); };

  prefetch_gemv<T>(p, 0, 0);
  for (int l = 0; l < p.L; ++l) {
    // A: attn_norm (+ residual), codes for i, f, g.
    for (int b = blockIdx.x; b < B; b += gridDim.x) {
      const T* x;
      if (l == 0) {
        const int64_t tok = p.tokens[b];
        if (tok < 0 || tok >= p.V) __trap();  // as F.embedding's device assert
        x = static_cast<const T*>(p.emb) + tok * h;
      } else {
        x = delta + b * h;
      }
      residual_norm_row<T>(x, l == 0, xres + b * h, xres + b * h, l > 0, norm_w(l, kNormAttn), p.w_f32, rh, p.eps, s0,
                           s1, s2, red);
      quant_row<T>(s2, rh, p.eps, norm_w(l, kNormI), p.w_f32, 3, p.codes + b * p.kpad, code_q, p.scales + b,
                   p.xsums + b, B, red);
    }
    sync();
    run_gemv<T, MT>(p, l, 0, smem);
    sync();
    // B: MLGRU step and output gate, codes for o.
    for (int b = blockIdx.x; b < B; b += gridDim.x) {
      const int64_t o = b * h;
      float* st = p.state + l * p.state_stride + o;
      mlgru_gate_row<T>(ifg + o, ifg + B * h + o, ifg + 2 * B * h + o, l > 0 ? p.lb + l * h : nullptr, st, st,
                        norm_w(l, kNormGateOut), p.w_f32, rh, p.eps, s0, s1, s2, red);
      quant_row<T>(s2, rh, p.eps, norm_w(l, kNormO), p.w_f32, 1, p.codes + b * p.kpad, 0, p.scales + b, p.xsums + b, 0,
                   red);
    }
    sync();
    run_gemv<T, MT>(p, l, 1, smem);
    sync();
    // C: mlp_norm (+ residual), codes for gate_proj.
    for (int b = blockIdx.x; b < B; b += gridDim.x) {
      residual_norm_row<T>(attn + b * h, false, xres + b * h, xres + b * h, true, norm_w(l, kNormMlp), p.w_f32, rh,
                           p.eps, s0, s1, s2, red);
      quant_row<T>(s2, rh, p.eps, norm_w(l, kNormGateProj), p.w_f32, 1, p.codes + b * p.kpad, 0, p.scales + b,
                   p.xsums + b, 0, red);
    }
    sync();
    run_gemv<T, MT>(p, l, 2, smem);
    sync();
    // D: silu(gate) * up, codes for down_proj.
    for (int b = blockIdx.x; b < B; b += gridDim.x) {
      silu_mul_row<T>(u + b * 2 * I, I, ri, s2);
      quant_row<T>(s2, ri, p.eps, static_cast<const char*>(p.down_norms) + l * I * wsize, p.w_f32, 1,
                   p.codes + b * p.kpad, 0, p.scales + b, p.xsums + b, 0, red);
    }
    sync();
    run_gemv<T, MT>(p, l, 3, smem);
    sync();
  }
  // Final norm (+ residual), codes for the lm_head, then the lm_head.
  for (int b = blockIdx.x; b < B; b += gridDim.x) {
    residual_norm_row<T>(delta + b * h, false, xres + b * h, xres + b * h, true, p.final_norms, p.w_f32, rh, p.eps, s0,
                         s1, s2, red);
    quant_row<T>(s2, rh, p.eps, static_cast<const char*>(p.final_norms) + h * wsize, p.w_f32, 1, p.codes + b * p.kpad,
                 0, p.scales + b, p.xsums + b, 0, red);
  }
  sync();
  run_gemv<T, MT>(p, p.L, 0, smem);
}


// ---- v2: no row phases ----------------------------------------------------------------------
// Every CTA computes the row math of ALL B batch rows itself at the start of each product
// phase (the same row functions, so the same canonical reduction order and roundings) and
// writes the codes straight into its shared-memory planes; the statistics (scale, code sum)
// stay in shared memory. Writes of shared state happen once: CTA 0 alone stores the residual
// stream (ping-pong buffers xres / xres2: a phase reads one and writes the other, so no CTA
// reads a buffer another is overwriting) and the new MLGRU state (to snew in the o_proj
// phase, copied to `state` in the gate_proj phase, after every CTA has read the old one).
// Per layer 4 product phases and 4 grid barriers (v1: 8 and 8).

// Bytes of the planes of one batch row for K (the whole K, every 128-weight block).
__host__ __device__ __forceinline__ int64_t plane_row_bytes(int64_t K) { return ternary::blocks_per_row(K) * 128; }

// Dynamic shared memory of the v2 kernel: the planes of the largest phase (3 products of K = h,
// or one of K = I), then 3 row buffers of max(h, I) elements.
inline int64_t v2_smem_bytes(int MT, int64_t h, int64_t I, int64_t esize) {
  const int64_t planes = std::max(3 * MT * plane_row_bytes(h), MT * plane_row_bytes(I));
  return planes + 3 * std::max(h, I) * esize;
}

template <class T, int MT>
__device__ __forceinline__ GemvJob phase_job_v2(const KParams& p, int l, int g, int q, const float* sscale,
                                                const int* sxsum) {
  GemvJob j = phase_job<T>(p, l, g, q);
  j.codes = nullptr;
  j.scale = sscale + q * MT;
  j.xsum = sxsum + q * MT;
  return j;
}

template <class T, int MT>
__global__ void __launch_bounds__(kThreads, 1) decode_step_kernel_v2(const __grid_constant__ KParams p) {
  constexpr int N = norm::VecOf<T>::N;
  extern __shared__ int4 smem[];
  __shared__ float red[32];
  __shared__ float sscale[3 * MT];
  __shared__ int sxsum[3 * MT];
  const int B = p.B;
  const int64_t h = p.h, I = p.I;
  const int64_t wsize = p.w_f32 ? 4 : static_cast<int64_t>(sizeof(T));
  const bool writer = blockIdx.x == 0;
  T* delta = static_cast<T*>(p.delta);
  T* ifg = static_cast<T*>(p.ifg);
  T* attn = static_cast<T*>(p.attn);
  T* u = static_cast<T*>(p.u);
  T* xbuf[2] = {static_cast<T*>(p.xres), static_cast<T*>(p.xres2)};
  int rp = 0;  // xbuf[rp] holds the residual stream
  const RowShape rh{p.ph, h, h / N}, ri{p.pi, I, I / N};
  const int64_t row_vecs = (h > I ? h : I) / N;
  const int64_t planes_h = 3 * static_cast<int64_t>(MT) * plane_row_bytes(h), planes_i = MT * plane_row_bytes(I);
  const int64_t planes_bytes = planes_h > planes_i ? planes_h : planes_i;
  int8_t* planes = reinterpret_cast<int8_t*>(smem);
  uint4* s0 = reinterpret_cast<uint4*>(planes + planes_bytes);
  uint4* s1 = s0 + row_vecs;
  uint4* s2 = s1 + row_vecs;
  const int nch_h = static_cast<int>(2 * ternary::blocks_per_row(h));
  const int nch_i = static_cast<int>(2 * ternary::blocks_per_row(I));
  auto norm_w = [&](int l, int which) {
    return static_cast<const char*>(p.norms) + (static_cast<int64_t>(l) * kDecodeNormsPerLayer + which) * h * wsize;
  };
  unsigned epoch = 0;
  auto sync = [&]() { grid_barrier(p.bar, ++epoch * gridDim.x); };
  // Before a phase's row math: the previous product is done with the planes; codes past K
  // in the last 128-weight block must be zeros (the weights there are zero codes too, but
  // the planes hold stale bytes).
  auto begin_rows = [&](int64_t K, int nprod) {
    __syncthreads();
    if (K % ternary::kBlockWeights != 0) {
      const int64_t n16 = nprod * MT * plane_row_bytes(K) / 16;
      for (int64_t i = threadIdx.x; i < n16; i += kThreads) smem[i] = make_int4(0, 0, 0, 0);
      __syncthreads();
    }
  };
  // Codes of batch row b for nw products of K into the planes.
  auto quant_to_planes = [&](int b, const RowShape& r, const void* w, int nw, int nch) {
    const int64_t row_b = static_cast<int64_t>(nch) * 64;  // = plane_row_bytes(K)
    quant_row<T>(s2, r, p.eps, w, p.w_f32, nw, planes + b * row_b, MT * row_b, sscale + b, sxsum + b, MT, red, nch);
  };
  // Product phase g of layer l (l == L: the lm_head) on the planes just written; first the
  // L2 prefetch of the next product phase's weights was issued by the caller.
  auto gemv = [&](int l, int g) {
    __syncthreads();  // the planes and statistics are complete
    gemv_phase<MT, T, true>(
        [&](int q) { return phase_job_v2<T, MT>(p, l, g, q, sscale, sxsum); }, phase_jobs(p, l, g), B,
        phase_k(p, l, g), 0, smem, 0);
  };
  auto prefetch_next = [&](int l, int g) {  // the product phase after (l, g)
    if (l >= p.L) return;
    if (g < 3) {
      prefetch_gemv<T>(p, l, g + 1);
    } else {
      prefetch_gemv<T>(p, l + 1, 0);
    }
  };

  for (int l = 0; l < p.L; ++l) {
    // G0: attn_norm (+ residual) and the codes for i, f, g, then the i/f/g products.
    prefetch_next(l, 0);
    if (l == 0) prefetch_gemv<T>(p, 0, 0);
    begin_rows(h, 3);
    for (int b = 0; b < B; ++b) {
      const T* x;
      if (l == 0) {
        const int64_t tok = p.tokens[b];
        if (tok < 0 || tok >= p.V) __trap();  // as F.embedding's device assert
        x = static_cast<const T*>(p.emb) + tok * h;
      } else {
        x = delta + b * h;
      }
      residual_norm_row<T>(x, l == 0, xbuf[rp] + b * h, writer ? xbuf[rp ^ 1] + b * h : nullptr, l > 0,
                           norm_w(l, kNormAttn), p.w_f32, rh, p.eps, s0, s1, s2, red);
      quant_to_planes(b, rh, norm_w(l, kNormI), 3, nch_h);
    }
    rp ^= 1;
    gemv(l, 0);
    sync();
    // G1: the MLGRU step and output gate (every CTA, the full vectors), codes for o, o_proj.
    prefetch_next(l, 1);
    begin_rows(h, 1);
    for (int b = 0; b < B; ++b) {
      const int64_t o = b * h;
      mlgru_gate_row<T>(ifg + o, ifg + B * h + o, ifg + 2 * B * h + o, l > 0 ? p.lb + l * h : nullptr,
                        p.state + l * p.state_stride + o, writer ? p.snew + o : nullptr, norm_w(l, kNormGateOut),
                        p.w_f32, rh, p.eps, s0, s1, s2, red);
      quant_to_planes(b, rh, norm_w(l, kNormO), 1, nch_h);
    }
    gemv(l, 1);
    sync();
    // G2: mlp_norm (+ residual), codes for gate_proj, gate_proj; CTA 0 stores the new state.
    prefetch_next(l, 2);
    if (writer) {
      float* st = p.state + l * p.state_stride;
      for (int64_t i = threadIdx.x; i < B * h; i += kThreads) st[i] = __ldcg(p.snew + i);
    }
    begin_rows(h, 1);
    for (int b = 0; b < B; ++b) {
      residual_norm_row<T>(attn + b * h, false, xbuf[rp] + b * h, writer ? xbuf[rp ^ 1] + b * h : nullptr, true,
                           norm_w(l, kNormMlp), p.w_f32, rh, p.eps, s0, s1, s2, red);
      quant_to_planes(b, rh, norm_w(l, kNormGateProj), 1, nch_h);
    }
    rp ^= 1;
    gemv(l, 2);
    sync();
    // G3: silu(gate) * up, codes for down_proj, down_proj.
    prefetch_next(l, 3);
    begin_rows(I, 1);
    for (int b = 0; b < B; ++b) {
      silu_mul_row<T>(u + b * 2 * I, I, ri, s2);
      quant_to_planes(b, ri, static_cast<const char*>(p.down_norms) + l * I * wsize, 1, nch_i);
    }
    gemv(l, 3);
    sync();
  }
  // The final norm (+ residual, not stored), codes for the lm_head, the lm_head.
  begin_rows(h, 1);
  for (int b = 0; b < B; ++b) {
    residual_norm_row<T>(delta + b * h, false, xbuf[rp] + b * h, nullptr, true, p.final_norms, p.w_f32, rh, p.eps, s0,
                         s1, s2, red);
    quant_to_planes(b, rh, static_cast<const char*>(p.final_norms) + h * wsize, 1, nch_h);
  }
  gemv(p.L, 0);
}

inline int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 0;
  return n;
}

// Cooperative launch of one CTA per SM (all co-resident, or refused: no hang), the barrier
// counter zeroed first. `smem_limit`: the most dynamic shared memory any launch of this
// kernel asks for on this device (the attribute is raised once per device, to that, not to
// this launch's need); `raised`: the kernel's record of that.
template <class Kernel>
cudaError_t launch_coop(Kernel kernel, std::atomic<uint64_t>& raised, const KParams& kp, int smem, int smem_limit,
                        cudaStream_t stream) {
  cudaError_t err = raise_smem_once(kernel, smem_limit, raised);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  const int sms = sm_count();
  if (per_sm < 1 || sms < 1) return cudaErrorCooperativeLaunchTooLarge;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(sms));  // one CTA per SM: all co-resident
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeCooperative;
  attr.val.cooperative = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  err = cudaMemsetAsync(kp.bar, 0, 64, stream);
  if (err != cudaSuccess) return err;
  return cudaLaunchKernelEx(&cfg, kernel, kp);
}

template <class T, int MT, bool V2>
cudaError_t launch(const KParams& kp, int smem, int smem_limit, cudaStream_t stream) {
  void (*kernel)(const KParams);
  if constexpr (V2) {
    kernel = decode_step_kernel_v2<T, MT>;
  } else {
    kernel = decode_step_kernel<T, MT>;
  }
  static std::atomic<uint64_t> raised{0};
  return launch_coop(kernel, raised, kp, smem, smem_limit, stream);
}

// MMFREE_DECODE_V3=0 turns the v3 kernel off (v2 then runs at batch 1), to compare the two in
// one build (benchmarks/NOTES.md); unset or anything else: on.
inline bool v3_enabled() {
  const char* v = std::getenv("MMFREE_DECODE_V3");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// v3 (batch 1; decode_kernel_v3.cuh, instantiated per dtype in decode_step_v3_<dtype>.cu):
// cudaErrorNotSupported where it does not apply.
template <class T>
cudaError_t launch_v3(const KParams& kp, int budget, cudaStream_t stream);

// One launch per dtype; each dtype's kernels are compiled in their own file
// (decode_step_<dtype>.cu) so the build runs them in parallel.
template <class T>
cudaError_t launch_typed(const KParams& kp, int smem_rows, cudaStream_t stream) {
  // Batch tile MT >= B; staging for as many 128-weight blocks as fit.
  const int64_t max_blocks = ternary::blocks_per_row(std::max(kp.h, kp.I));
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  const int budget = std::min(kSmemBudget, optin - 1024);  // static shared memory and slack
  if (smem_rows > budget) return cudaErrorInvalidValue;
  auto go = [&](auto mt) {  // v1
    constexpr int MT = decltype(mt)::value;
    KParams k = kp;
    k.slab_blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_blocks, budget / (MT * 128))));
    const int smem = std::max(smem_rows, MT * 128 * k.slab_blocks);
    return launch<T, MT, false>(k, smem, budget, stream);
  };
  auto go_v2 = [&](auto mt) -> cudaError_t {  // cudaErrorNotSupported: does not fit, use v1
    constexpr int MT = decltype(mt)::value;
    const int64_t smem = v2_smem_bytes(MT, kp.h, kp.I, static_cast<int64_t>(sizeof(T)));
    if (smem > budget) return cudaErrorNotSupported;
    return launch<T, MT, true>(kp, static_cast<int>(smem), budget, stream);
  };
  // v3 at batch 1 where it applies; v2 (no row phases) for batches up to kV2MaxBatch where
  // its shared memory fits; v1 with the tiles 8 (1..8 rows) and 64 (9..64) otherwise.
  if (kp.B == 1) {
    const cudaError_t err3 = launch_v3<T>(kp, budget, stream);
    if (err3 != cudaErrorNotSupported) return err3;
  }
  if (kp.B <= kV2MaxBatch) {
    cudaError_t err2 = cudaErrorNotSupported;
    if constexpr (kV2MaxBatch > 1) {
      err2 = kp.B <= 1 ? go_v2(std::integral_constant<int, 1>{}) : go_v2(std::integral_constant<int, 8>{});
    } else {
      err2 = go_v2(std::integral_constant<int, 1>{});
    }
    if (err2 != cudaErrorNotSupported) return err2;
  }
  if (kp.B <= 8) return go(std::integral_constant<int, 8>{});
  return go(std::integral_constant<int, 64>{});
}

}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
