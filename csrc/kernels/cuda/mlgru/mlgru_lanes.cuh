// MLGRU scan v4, "lanes" (benchmarks/NOTES.md, "v4: lanes of 8 tokens"): the kernels for long
// sequences that fill the GPU (training, prefill), forward, checkpoint pass and backward.
//
// Why not v2's layout: v2 gives a thread one 16-byte vector of one token (U = 1 in the
// backward) and scans 128 time-lanes with shuffles and shared-memory rounds per token; ncu
// on the H200 counted ~250 instructions per element in its backward, at 8 warps/SM. Here a
// thread owns one 32-bit word of a row (2 channels of 16-bit, 1 of fp32) and walks
// kLanesTokens consecutive tokens in order; the K lanes of a CTA (warps' rows) hold
// consecutive runs of tokens, so a tile is K * kLanesTokens tokens. Per tile: each thread
// folds its tokens into affine maps (forward h -> A h + b; the backward's reverse flow
// e -> A e + q shares A), publishes them to shared memory, one barrier, and every thread
// folds the K lanes' maps in lane order (a uniform loop: its own entry value and the tile's
// carry out). The scan costs K map reads per kLanesTokens tokens instead of a log-step scan
// per token.
//
// The backward walks tiles last to first from the checkpoints of the forward-state (the
// checkpoint pass is the forward kernel without stores, on the same tiles): pass 1 gates the
// tile and builds the maps (f_t, c_t kept in registers), the fold gives h entering the
// thread's tokens and the flow entering them from the right, pass 2 rebuilds h_{t-1} in
// order, pass 3 walks the tokens in reverse (token_backward) and stores dL/di, dL/df.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda/common.cuh"
#include "cuda/mlgru/mlgru_gate.cuh"
#include "cuda/mlgru/mlgru_seqs.cuh"
#include "mlgru.h"

namespace mmfree {
namespace cuda {
namespace mlgru {

constexpr int kLanesWords = 8;   // W: 32-bit words of a row per CTA (32 bytes, one sector)
constexpr int kLanesTokens = 8;  // L: tokens a thread walks in order per tile
constexpr int kLanesSmallK = 16; // lanes per CTA: tile 128 tokens, 128 threads
constexpr int kLanesLargeK = 32; // tile 256 tokens, 256 threads: for few (sequence, band) blocks

struct LanesArgs {
  int blocks_per_seq;
  float* checkpoints;  // checkpoint pass (written) / backward (read)
  float* dlb_part;     // backward: [S, D]
};

// Channels per 32-bit word.
template <class T>
__host__ __device__ constexpr int word_channels() {
  return 4 / static_cast<int>(sizeof(T));
}

// The CTA's place: thread = ty * W + tx, lane ty, word tx of the CTA's band of W words.
struct LanesPlace {
  int tx, ty;
  int64_t s, d0;
  bool active;
  Range r;
};

template <class T>
__device__ __forceinline__ LanesPlace lanes_place(const MlgruSeqs& q, int blocks_per_seq) {
  constexpr int C = word_channels<T>();
  LanesPlace pl;
  pl.tx = threadIdx.x % kLanesWords;
  pl.ty = threadIdx.x / kLanesWords;
  pl.s = blockIdx.x / blocks_per_seq;
  pl.d0 = (static_cast<int64_t>(blockIdx.x % blocks_per_seq) * kLanesWords + pl.tx) * C;
  pl.active = pl.d0 < q.dim;
  pl.r = seq_range(q, pl.s);
  return pl;
}

// Streaming (evict-first) 32-bit accesses: every element is read or written once per kernel.
template <class T>
__device__ __forceinline__ uint32_t load_word(const void* base, int64_t elem) {
  return __ldcs(reinterpret_cast<const unsigned int*>(static_cast<const T*>(base) + elem));
}

template <class T, int C>
__device__ __forceinline__ void unpack_word(uint32_t w, float (&out)[C]) {
  T v[C];
  memcpy(v, &w, 4);
#pragma unroll
  for (int k = 0; k < C; ++k) out[k] = to_float(v[k]);
}

template <class T, int C>
__device__ __forceinline__ void store_word(void* base, int64_t elem, const float (&in)[C]) {
  T v[C];
#pragma unroll
  for (int k = 0; k < C; ++k) v[k] = from_float<T>(in[k]);
  uint32_t w;
  memcpy(&w, v, 4);
  __stcs(reinterpret_cast<unsigned int*>(static_cast<T*>(base) + elem), w);
}

// A copy the compiler cannot see through: pass 3 of the backward recomputes the gates from
// the raw words instead of keeping pass 1's (4 floats per value more: ~64 registers, which
// halves the CTAs per SM), at 4 more MUFU operations per element.
__device__ __forceinline__ uint32_t opaque(uint32_t w) {
  uint32_t r;
  asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(w));
  return r;
}

// The thread's run: its first element in a tensor and how many of its kLanesTokens tokens are
// in the sequence. The tensors are walked by pointer steps of one row (64-bit index math once
// per tile: per token it was ~10 instructions a tensor, a third of the forward's).
struct Run {
  int64_t elem;  // (tb * D + d0)
  int n;         // tokens in range, 0..kLanesTokens
};

__device__ __forceinline__ Run run_of(int64_t tb, int64_t end, int64_t dim, int64_t d0) {
  const int64_t left = end - tb;
  return {tb * dim + d0, static_cast<int>(left < 0 ? 0 : (left > kLanesTokens ? kLanesTokens : left))};
}

// The run's raw words of one [N, D] tensor (0 out of range or past D).
template <class T>
__device__ __forceinline__ void load_run(const void* base, const Run& run, int64_t dim, bool active,
                                         uint32_t (&out)[kLanesTokens]) {
  const T* q = static_cast<const T*>(base) + run.elem;
#pragma unroll
  for (int u = 0; u < kLanesTokens; ++u) {
    out[u] = (active && u < run.n) ? __ldcs(reinterpret_cast<const unsigned int*>(q)) : 0u;
    q += dim;
  }
}

// Bits u of the run: token in range (of the sequence), and in range and not masked.
struct RunBits {
  uint32_t in_range = 0, valid = 0;
};

__device__ __forceinline__ RunBits run_bits(const uint8_t* mask, int64_t tb, const Run& run, bool active) {
  RunBits b;
  b.in_range = (1u << run.n) - 1u;
  b.valid = active ? b.in_range : 0u;
  if (mask != nullptr) {
    const uint8_t* m = mask + tb;
#pragma unroll
    for (int u = 0; u < kLanesTokens; ++u) {
      if (u < run.n && m[u] == 0) b.valid &= ~(1u << u);
    }
  }
  return b;
}

// Lower bound (and 1 - lb) of the thread's channels.
template <int C>
__device__ __forceinline__ void load_lower_bound(const void* lower_bound, int64_t d0, bool active, float (&lb)[C],
                                                 float (&omlb)[C]) {
#pragma unroll
  for (int k = 0; k < C; ++k) {
    lb[k] = (active && lower_bound != nullptr) ? static_cast<const float*>(lower_bound)[d0 + k] : 0.0f;
    omlb[k] = 1.0f - lb[k];
  }
}

// Pass 1 of a tile: the gates of the thread's run (f_t, c_t kept for pass 2) folded into the
// forward map h -> A h + b and, kFlow (the backward), the reverse flow's q (the map
// e_left = A e_right + q shares A): q = sum_t prod_{s <= t} f_s * dL/dh_t, in token order.
template <class T, int C, int L, bool kFast, bool kFlow>
__device__ __forceinline__ void gate_run(const uint32_t (&ri)[L], const uint32_t (&rf)[L], const uint32_t (&rg)[L],
                                         const RunBits& bits, const float (&lb)[C], const float (&omlb)[C],
                                         float (&ft)[L][C], float (&c)[L][C], float (&A)[C], float (&b)[C],
                                         float (&q)[C]) {
#pragma unroll
  for (int k = 0; k < C; ++k) {
    A[k] = 1.0f;
    b[k] = 0.0f;
    q[k] = 0.0f;
  }
#pragma unroll
  for (int u = 0; u < L; ++u) {
    float xi[C], xf[C];
    unpack_word<T, C>(ri[u], xi);
    unpack_word<T, C>(rf[u], xf);
    gate_token<kFast, C>(xi, xf, lb, omlb, (bits.valid >> u) & 1u, (bits.in_range >> u) & 1u, ft[u], c[u]);
#pragma unroll
    for (int k = 0; k < C; ++k) {
      b[k] = ft[u][k] * b[k] + c[u][k];
      A[k] = ft[u][k] * A[k];
    }
    if constexpr (kFlow) {
      float gh[C];
      unpack_word<T, C>(rg[u], gh);
#pragma unroll
      for (int k = 0; k < C; ++k) q[k] = A[k] * gh[k] + q[k];
    }
  }
}

// The lanes of a warp: G = 32 / W consecutive lanes (lane g of the warp = ty % G).
constexpr int kWarpLanes = 32 / kLanesWords;

// Inclusive scan of the per-lane affine maps x -> A x + b over the G lanes of a warp
// (shuffles by W threads: same word, neighbouring lane), composing earlier lanes first
// (forward: prefix) or later lanes first (kReverse: suffix); (Aex, bex) is the exclusive map
// (identity at the first lane of the direction). Two shuffle rounds instead of a chain of
// K dependent shared-memory reads: ncu put 42-44% of the stalls of the first version there.
template <bool kReverse>
__device__ __forceinline__ void warp_lanes_scan(float& A, float& b, float& Aex, float& bex) {
  const int g = (threadIdx.x % 32) / kLanesWords;
#pragma unroll
  for (int o = 1; o < kWarpLanes; o <<= 1) {
    const float An = kReverse ? __shfl_down_sync(0xffffffffu, A, o * kLanesWords)
                              : __shfl_up_sync(0xffffffffu, A, o * kLanesWords);
    const float bn = kReverse ? __shfl_down_sync(0xffffffffu, b, o * kLanesWords)
                              : __shfl_up_sync(0xffffffffu, b, o * kLanesWords);
    if (kReverse ? (g + o < kWarpLanes) : (g >= o)) {
      b = A * bn + b;
      A = A * An;
    }
  }
  const float An = kReverse ? __shfl_down_sync(0xffffffffu, A, kLanesWords) : __shfl_up_sync(0xffffffffu, A, kLanesWords);
  const float bn = kReverse ? __shfl_down_sync(0xffffffffu, b, kLanesWords) : __shfl_up_sync(0xffffffffu, b, kLanesWords);
  const bool has = kReverse ? (g + 1 < kWarpLanes) : (g > 0);
  Aex = has ? An : 1.0f;
  bex = has ? bn : 0.0f;
}

// Forward (and, kCheckpointsOnly, the backward's checkpoint pass: no h, the state entering
// every tile to a.checkpoints). Shared memory: the lanes' maps (A, b), double-buffered so one
// barrier per tile suffices (a buffer is rewritten two tiles later, after the next barrier).
template <class T, int K, bool kCheckpointsOnly>
__global__ void __launch_bounds__(K * kLanesWords) mlgru_fwd_lanes_kernel(const MlgruScanParams p,
                                                                          const LanesArgs a) {
  constexpr int C = word_channels<T>();
  constexpr int W = kLanesWords;
  constexpr int L = kLanesTokens;
  constexpr bool kFast = sizeof(T) == 2;
  constexpr int64_t tile = static_cast<int64_t>(K) * L;
  constexpr int NW = K / kWarpLanes;     // warps
  __shared__ float2 maps[2][NW * C * W];  // warp aggregates (A, b) [buffer][(warp * C + channel) * W + word]
  const LanesPlace pl = lanes_place<T>(p.seqs, a.blocks_per_seq);
  const int64_t dim = p.seqs.dim;

  float lb[C], omlb[C], carry[C];
  load_lower_bound<C>(p.lower_bound, pl.d0, pl.active, lb, omlb);
#pragma unroll
  for (int k = 0; k < C; ++k) {
    carry[k] = (pl.active && p.h0 != nullptr) ? static_cast<const float*>(p.h0)[pl.s * dim + pl.d0 + k] : 0.0f;
  }
  int64_t j = 0;
  for (int64_t t0 = pl.r.begin; t0 < pl.r.end; t0 += tile, ++j) {
    if (kCheckpointsOnly && pl.active && pl.ty == 0) {
      float* ck = a.checkpoints + checkpoint_slot(pl.r.begin, pl.s, j, tile) * dim + pl.d0;
#pragma unroll
      for (int k = 0; k < C; ++k) ck[k] = carry[k];
    }
    const int64_t tb = t0 + static_cast<int64_t>(pl.ty) * L;
    const Run run = run_of(tb, pl.r.end, dim, pl.d0);
    uint32_t ri[L], rf[L];
    load_run<T>(p.i, run, dim, pl.active, ri);
    load_run<T>(p.f, run, dim, pl.active, rf);
    const RunBits bits = run_bits(p.mask, tb, run, pl.active);
    float ft[L][C], c[L][C], A[C], b[C], unused[C];
    gate_run<T, C, L, kFast, false>(ri, rf, rf, bits, lb, omlb, ft, c, A, b, unused);
    // Lanes within the warp by shuffles; then the warps' aggregates in order from shared memory.
    float Aex[C], bex[C];
#pragma unroll
    for (int k = 0; k < C; ++k) warp_lanes_scan<false>(A[k], b[k], Aex[k], bex[k]);
    float2* buf = maps[j & 1];
    const int wv = pl.ty / kWarpLanes;
    if (pl.ty % kWarpLanes == kWarpLanes - 1) {
#pragma unroll
      for (int k = 0; k < C; ++k) buf[(wv * C + k) * W + pl.tx] = make_float2(A[k], b[k]);
    }
    __syncthreads();
    float h[C];
#pragma unroll
    for (int k = 0; k < C; ++k) {
      float x = carry[k], xin = x;
#pragma unroll
      for (int y = 0; y < NW; ++y) {
        if (y == wv) xin = x;
        const float2 m = buf[(y * C + k) * W + pl.tx];
        x = m.x * x + m.y;
      }
      carry[k] = x;
      h[k] = Aex[k] * xin + bex[k];
    }
    if (!kCheckpointsOnly) {
      T* out = static_cast<T*>(p.h) + run.elem;
#pragma unroll
      for (int u = 0; u < L; ++u) {
#pragma unroll
        for (int k = 0; k < C; ++k) h[k] = ft[u][k] * h[k] + c[u][k];
        if (pl.active && u < run.n) store_word<T, C>(out, 0, h);
        out += dim;
      }
    }
  }
  if (!kCheckpointsOnly && pl.active && pl.ty == 0) {
    float* last = static_cast<float*>(p.h_last) + pl.s * dim + pl.d0;
#pragma unroll
    for (int k = 0; k < C; ++k) last[k] = carry[k];
  }
}

// Backward. Per thread and tile, forward maps (A, b) and the reverse map e_left = A e_right + q
// (q = sum over its tokens t of prod_{s <= t} f_s * dL/dh_t): both from one pass in token
// order, published together as (A, b, q).
template <class T, int K>
__global__ void __launch_bounds__(K * kLanesWords, 80 / K) mlgru_bwd_lanes_kernel(const MlgruScanBwdParams p,
                                                                          const LanesArgs a) {
  constexpr int C = word_channels<T>();
  constexpr int W = kLanesWords;
  constexpr int L = kLanesTokens;
  constexpr bool kFast = sizeof(T) == 2;
  constexpr int64_t tile = static_cast<int64_t>(K) * L;
  // The lanes' maps (A, b, q, -) [buffer][(lane * C + channel) * W + word]; the bwd keeps the
  // one-level fold (K shared-memory reads): with the warp shuffles of the forward, ptxas kept
  // ~90 more values live (227 registers natural, 356 B of spill at 128).
  __shared__ float4 maps[2][K * C * W];
  const LanesPlace pl = lanes_place<T>(p.seqs, a.blocks_per_seq);
  const int64_t dim = p.seqs.dim;
  const int64_t tiles = (pl.r.end - pl.r.begin + tile - 1) / tile;

  float lb[C], omlb[C], e_carry[C], dlb[C];
  load_lower_bound<C>(p.lower_bound, pl.d0, pl.active, lb, omlb);
#pragma unroll
  for (int k = 0; k < C; ++k) {
    e_carry[k] = pl.active ? static_cast<const float*>(p.grad_h_last)[pl.s * dim + pl.d0 + k] : 0.0f;
    dlb[k] = 0.0f;
  }
  for (int64_t j = tiles - 1; j >= 0; --j) {
    const int64_t tb = pl.r.begin + j * tile + static_cast<int64_t>(pl.ty) * L;
    const Run run = run_of(tb, pl.r.end, dim, pl.d0);
    uint32_t ri[L], rf[L], rg[L];
    load_run<T>(p.i, run, dim, pl.active, ri);
    load_run<T>(p.f, run, dim, pl.active, rf);
    load_run<T>(p.grad_h, run, dim, pl.active, rg);
    float ck[C];
#pragma unroll
    for (int k = 0; k < C; ++k) {
      ck[k] = pl.active ? a.checkpoints[checkpoint_slot(pl.r.begin, pl.s, j, tile) * dim + pl.d0 + k] : 0.0f;
    }
    const RunBits bits = run_bits(p.mask, tb, run, pl.active);
    // Pass 1: gates, the forward map (A, b) and the reverse one (A, q).
    float ft[L][C], c[L][C], A[C], b[C], q[C];
    gate_run<T, C, L, kFast, true>(ri, rf, rg, bits, lb, omlb, ft, c, A, b, q);
    float4* buf = maps[j & 1];
#pragma unroll
    for (int k = 0; k < C; ++k) buf[(pl.ty * C + k) * W + pl.tx] = make_float4(A[k], b[k], q[k], 0.0f);
    __syncthreads();
    // The lanes' maps in order: h entering this thread's tokens (from the tile's checkpoint),
    // the flow entering them from the right, and the tile's flow out of its first token. One
    // loop for both folds (lane y forward, lane K-1-y in reverse): two loops over the same
    // entries let the compiler keep all K maps in registers between them.
    float h[C], e[C];
#pragma unroll
    for (int k = 0; k < C; ++k) {
      float x = ck[k], z = e_carry[k];
      h[k] = x;
      e[k] = z;
#pragma unroll 4
      for (int y = 0; y < K; ++y) {
        if (y == pl.ty) h[k] = x;
        if (K - 1 - y == pl.ty) e[k] = z;
        const float2 mf = *reinterpret_cast<const float2*>(&buf[(y * C + k) * W + pl.tx]);
        const float4 mr = buf[((K - 1 - y) * C + k) * W + pl.tx];
        x = mf.x * x + mf.y;
        z = mr.x * z + mr.z;
      }
      e_carry[k] = z;
    }
    // Pass 2: h_{t-1} of every token (into c, no longer needed).
#pragma unroll
    for (int u = 0; u < L; ++u) {
#pragma unroll
      for (int k = 0; k < C; ++k) {
        const float cc = c[u][k];
        c[u][k] = h[k];
        h[k] = ft[u][k] * h[k] + cc;
      }
    }
    // Pass 3: the tokens in reverse.
    T* out_i = static_cast<T*>(p.grad_i) + run.elem + (L - 1) * dim;
    T* out_f = static_cast<T*>(p.grad_f) + run.elem + (L - 1) * dim;
#pragma unroll
    for (int u = L - 1; u >= 0; --u) {
      float xi[C], xf[C], gh[C], di[C], df[C];
      unpack_word<T, C>(opaque(ri[u]), xi);
      unpack_word<T, C>(opaque(rf[u]), xf);
      unpack_word<T, C>(rg[u], gh);
      const bool in = u < run.n;
      token_backward<kFast, C>(xi, xf, gh, c[u], ft[u], omlb, (bits.valid >> u) & 1u, in, e, dlb, di, df);
      if (pl.active && in) {
        store_word<T, C>(out_i, 0, di);
        store_word<T, C>(out_f, 0, df);
      }
      out_i -= dim;
      out_f -= dim;
    }
  }
  // dL/dh0 = the flow out of the first token; dL/dlb of this sequence summed over the lanes in
  // lane order (deterministic), into the per-sequence partials.
  if (pl.active && pl.ty == 0) {
#pragma unroll
    for (int k = 0; k < C; ++k) static_cast<float*>(p.grad_h0)[pl.s * dim + pl.d0 + k] = e_carry[k];
  }
  __syncthreads();  // the last tile's fold may still read maps[0]
  float* red = reinterpret_cast<float*>(maps[0]);
#pragma unroll
  for (int k = 0; k < C; ++k) red[(pl.ty * C + k) * W + pl.tx] = dlb[k];
  __syncthreads();
  if (pl.active && pl.ty == 0) {
#pragma unroll
    for (int k = 0; k < C; ++k) {
      float sum = 0.0f;
      for (int y = 0; y < K; ++y) sum += red[(y * C + k) * W + pl.tx];
      a.dlb_part[pl.s * dim + pl.d0 + k] = sum;
    }
  }
}

}  // namespace mlgru
}  // namespace cuda
}  // namespace mmfree
