// CUDA MLGRU scan, forward and backward (algorithm notes: benchmarks/NOTES.md, "MLGRU scan").
//
// One CTA owns W channel vectors (V channels each, one 16-byte load) of one sequence and walks
// its tokens in tiles of K*U: time-lane ty of the CTA holds U consecutive tokens in registers.
// Per tile: (1) load i, f (and the mask) for all U tokens, gate them (sigmoid, lower bound,
// silu fused), (2) fold the U tokens into one affine map h -> A*h + b per thread, (3) scan the
// maps across the K time-lanes (warp shuffles, then the per-warp aggregates through shared
// memory) starting from the tile's carried state, (4) rescan the U tokens from registers and
// store h. Inputs are read once and h written once: 3 tensors of traffic, the floor.
// K = 1 is the sequential path (decode, short T); K > 1 the chunked one (long T, few
// sequences: the K chunks of a tile run in parallel). Which one runs: launch_config().
//
// The backward recomputes instead of saving states: a checkpoint pass (the forward without
// stores) keeps the state entering every tile; the backward kernel walks the tiles last to
// first, rebuilds h_{t-1} inside the tile from its checkpoint with the same scan, and runs
// the reverse recurrence delta_t = grad_h_t + f_{t+1} delta_{t+1} as a suffix scan of affine
// maps across the time-lanes. dL/dlb is reduced per CTA in a fixed order, then over
// sequences in order by a second kernel: no atomics, deterministic.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "cuda/common.cuh"
#include "cuda/mlgru/mlgru_gate.cuh"
#include "cuda/mlgru/mlgru_lanes.cuh"
#include "cuda/mlgru/mlgru_seqs.cuh"
#include "mlgru.h"

namespace mmfree {
namespace cuda {
namespace {

using namespace mlgru;

constexpr int kThreads = 256;
constexpr int kMaxTimeLanes = 128;
// Values (tokens x channels) a thread holds per tile: the forward keeps f_t and c_t of 32 in
// fp32 registers (2 CTAs/SM fit), the backward also i, f, grad_h and h_{t-1}, so 16.
constexpr int kFwdValues = 32;
constexpr int kBwdValues = 16;

template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <class T, int V>
__device__ __forceinline__ void load_pack(const void* base, int64_t off, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(static_cast<const T*>(base) + off);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_float(pk.v[k]);
}

template <class T, int V>
__device__ __forceinline__ void store_pack(void* base, int64_t off, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, V>*>(static_cast<T*>(base) + off) = pk;
}

// The CTA's layout: thread = ty * W + tx, time-lane ty, channel vector tx. A warp holds G
// consecutive time-lanes (G = 32 / W when W < 32); the NG = K / G warp groups meet in shared
// memory.
struct Layout {
  int W, K, tx, ty, G, grp, lane_in_grp, NG;
  __device__ Layout(int w, int k) : W(w), K(k) {
    tx = threadIdx.x % W;
    ty = threadIdx.x / W;
    G = W >= 32 ? 1 : 32 / W;
    G = G > K ? K : G;
    grp = ty / G;
    lane_in_grp = ty % G;
    NG = K / G;
  }
};

// Inclusive prefix (forward, kReverse = false) or suffix (reverse) scan of per-thread affine
// maps x -> A x + b over the time-lanes of a warp group, composing earlier-then-later
// (forward) or later-then-earlier (reverse). Also returns the exclusive map in (Ae, be).
template <int V, bool kReverse>
__device__ __forceinline__ void warp_scan(const Layout& L, float (&A)[V], float (&b)[V], float (&Ae)[V],
                                          float (&be)[V]) {
  for (int o = 1; o < L.G; o <<= 1) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float An = kReverse ? __shfl_down_sync(0xffffffffu, A[k], o * L.W) : __shfl_up_sync(0xffffffffu, A[k], o * L.W);
      const float bn = kReverse ? __shfl_down_sync(0xffffffffu, b[k], o * L.W) : __shfl_up_sync(0xffffffffu, b[k], o * L.W);
      const bool take = kReverse ? (L.lane_in_grp + o < L.G) : (L.lane_in_grp >= o);
      if (take) {  // mine is the later map (forward) / the earlier one (reverse): apply the neighbour's first
        b[k] = A[k] * bn + b[k];
        A[k] = A[k] * An;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float An = kReverse ? __shfl_down_sync(0xffffffffu, A[k], L.W) : __shfl_up_sync(0xffffffffu, A[k], L.W);
    const float bn = kReverse ? __shfl_down_sync(0xffffffffu, b[k], L.W) : __shfl_up_sync(0xffffffffu, b[k], L.W);
    const bool has = kReverse ? (L.lane_in_grp + 1 < L.G) : (L.lane_in_grp > 0);
    Ae[k] = has ? An : 1.0f;
    be[k] = has ? bn : 0.0f;
  }
}

// Publishes each warp group's aggregate map, then gives every thread the state entering its
// own tokens (carry through the earlier groups and its group's exclusive map) and advances
// the carry over the whole tile. Two barriers: the shared buffer is reused next tile.
// One warp group's aggregate map (A, b interleaved per channel) from shared memory; kVec
// (v2) reads it as 16-byte vectors: per tile each thread reads all NG groups' maps, 2V
// words each, which for V = 8, NG = 8 was 128 LDS.32 per 16 elements in v1 (as many
// shared-memory instructions as the whole gate math), 32 LDS.128 here.
template <int V, bool kVec>
__device__ __forceinline__ void read_group(const float* smem, int slot, float (&ga)[V], float (&gb)[V]) {
  if constexpr (kVec && V % 2 == 0) {
    const float4* q = reinterpret_cast<const float4*>(smem + slot * V * 2);
#pragma unroll
    for (int j = 0; j < V / 2; ++j) {
      const float4 x = q[j];
      ga[2 * j] = x.x;
      gb[2 * j] = x.y;
      ga[2 * j + 1] = x.z;
      gb[2 * j + 1] = x.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      ga[k] = smem[(slot * V + k) * 2];
      gb[k] = smem[(slot * V + k) * 2 + 1];
    }
  }
}

template <int V, bool kReverse, bool kVec = false>
__device__ __forceinline__ void block_scan(const Layout& L, float* smem, float (&A)[V], float (&b)[V],
                                           float (&carry)[V], float (&state_in)[V]) {
  float Ae[V], be[V];
  warp_scan<V, kReverse>(L, A, b, Ae, be);
  const bool publisher = kReverse ? (L.lane_in_grp == 0) : (L.lane_in_grp == L.G - 1);
  if (publisher) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      smem[((L.grp * L.W + L.tx) * V + k) * 2] = A[k];
      smem[((L.grp * L.W + L.tx) * V + k) * 2 + 1] = b[k];
    }
  }
  __syncthreads();
  float x[V];
#pragma unroll
  for (int k = 0; k < V; ++k) x[k] = carry[k];
  for (int gi = 0; gi < L.NG; ++gi) {
    const int g = kReverse ? L.NG - 1 - gi : gi;
    if (g == L.grp) {
#pragma unroll
      for (int k = 0; k < V; ++k) state_in[k] = Ae[k] * x[k] + be[k];
    }
    float ga[V], gb[V];
    read_group<V, kVec>(smem, g * L.W + L.tx, ga, gb);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = ga[k] * x[k] + gb[k];
  }
#pragma unroll
  for (int k = 0; k < V; ++k) carry[k] = x[k];
  __syncthreads();
}

// End of a backward block: dL/dh0 = the flow out of the first token (time-lane 0 writes
// it); dL/dlb of this sequence's channels reduced over the time-lanes in lane order.
template <int V>
__device__ __forceinline__ void finish_backward(const Layout& L, float* smem, bool active, const float (&e_carry)[V],
                                                const float (&dlb)[V], float* dh0, float* dlb_part) {
  if (active && L.ty == 0) {
#pragma unroll
    for (int k = 0; k < V; ++k) dh0[k] = e_carry[k];
  }
#pragma unroll
  for (int k = 0; k < V; ++k) smem[(L.ty * L.W + L.tx) * V + k] = dlb[k];
  __syncthreads();
  if (active && L.ty == 0) {
    for (int k = 0; k < V; ++k) {
      float sum = 0.0f;
      for (int y = 0; y < L.K; ++y) sum += smem[(y * L.W + L.tx) * V + k];
      dlb_part[k] = sum;
    }
  }
}

struct KernelArgs {
  int W, K, blocks_per_seq;
  float* checkpoints;  // forward in checkpoint mode / backward
  float* dlb_part;     // backward: [S, D]
};

template <class T, int V, int U, bool kCheckpointsOnly>
__global__ void __launch_bounds__(kThreads, 2) mlgru_fwd_kernel(const MlgruScanParams p, const KernelArgs a) {
  constexpr bool kFast = sizeof(T) == 2;
  extern __shared__ float smem[];
  const Layout L(a.W, a.K);
  const int64_t s = blockIdx.x / a.blocks_per_seq;
  const int64_t dim = p.seqs.dim;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.x % a.blocks_per_seq) * L.W + L.tx) * V;
  const bool active = d0 < dim;
  const Range r = seq_range(p.seqs, s);
  const int64_t tile = static_cast<int64_t>(L.K) * U;

  float lb[V], omlb[V], carry[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    lb[k] = (active && p.lower_bound != nullptr) ? static_cast<const float*>(p.lower_bound)[d0 + k] : 0.0f;
    omlb[k] = 1.0f - lb[k];
    carry[k] = (active && p.h0 != nullptr) ? static_cast<const float*>(p.h0)[s * dim + d0 + k] : 0.0f;
  }
  for (int64_t t0 = r.begin, j = 0; t0 < r.end; t0 += tile, ++j) {
    if (kCheckpointsOnly && active && L.ty == 0) {
      float* ck = a.checkpoints + checkpoint_slot(r.begin, s, j, tile) * dim + d0;
#pragma unroll
      for (int k = 0; k < V; ++k) ck[k] = carry[k];
    }
    const int64_t tb = t0 + static_cast<int64_t>(L.ty) * U;
    float xi[U][V], xf[U][V];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // all loads first: U * 2 vectors in flight per thread
      const int64_t t = tb + u;
      const bool in = active && t < r.end;
      if (in) {
        load_pack<T, V>(p.i, t * dim + d0, xi[u]);
        load_pack<T, V>(p.f, t * dim + d0, xf[u]);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) xi[u][k] = xf[u][k] = 0.0f;
      }
      valid[u] = in && (p.mask == nullptr || p.mask[t] != 0);
    }
    float ft[U][V], c[U][V], A[V], b[V];
#pragma unroll
    for (int k = 0; k < V; ++k) { A[k] = 1.0f; b[k] = 0.0f; }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      gate_token<kFast, V>(xi[u], xf[u], lb, omlb, valid[u], tb + u < r.end, ft[u], c[u]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        b[k] = ft[u][k] * b[k] + c[u][k];
        A[k] = ft[u][k] * A[k];
      }
    }
    float h[V];
    block_scan<V, false>(L, smem, A, b, carry, h);
    if (!kCheckpointsOnly) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int k = 0; k < V; ++k) h[k] = ft[u][k] * h[k] + c[u][k];
        if (active && tb + u < r.end) store_pack<T, V>(p.h, (tb + u) * dim + d0, h);
      }
    }
  }
  if (!kCheckpointsOnly && active && L.ty == 0) {
    float* last = static_cast<float*>(p.h_last) + s * dim + d0;
#pragma unroll
    for (int k = 0; k < V; ++k) last[k] = carry[k];
  }
}

// Streaming 16-byte accesses for data touched once (evict-first in L1 and L2).
__device__ __forceinline__ uint4 load_stream(const void* base, int64_t byte_off) {
  return __ldcs(reinterpret_cast<const uint4*>(static_cast<const char*>(base) + byte_off));
}

template <class T, int V>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[V]) {
  static_assert(sizeof(T) * V == 16, "one 16-byte vector");
  Pack<T, V> pk;
  memcpy(&pk, &raw, 16);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_float(pk.v[k]);
}

template <class T, int V>
__device__ __forceinline__ void store_stream(void* base, int64_t off, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = from_float<T>(in[k]);
  uint4 raw;
  memcpy(&raw, &pk, 16);
  __stcs(reinterpret_cast<uint4*>(static_cast<T*>(base) + off), raw);
}

// Loads the raw i, f vectors of a thread's U tokens starting at token tb (zeros out of range).
template <class T, int U>
__device__ __forceinline__ void load_tile_raw(const MlgruScanParams& p, int64_t tb, int64_t end, int64_t dim,
                                              int64_t d0, bool active, uint4 (&ri)[U], uint4 (&rf)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t t = tb + u;
    if (active && t < end) {
      ri[u] = load_stream(p.i, (t * dim + d0) * static_cast<int64_t>(sizeof(T)));
      rf[u] = load_stream(p.f, (t * dim + d0) * static_cast<int64_t>(sizeof(T)));
    } else {
      ri[u] = rf[u] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// v2 forward (vector path only): as mlgru_fwd_kernel, but the tile's raw 16-bit/fp32 vectors
// are gated straight from the load registers, and the NEXT tile's loads are issued into
// those registers before the carry scan, the rescan and the stores of this one, so the
// DRAM latency of tile j+1 hides behind the barriers of tile j (v1 left the SM idle there:
// 2 CTAs/SM, each with all its loads stalled behind the same __syncthreads).
template <class T, int V, int U, int kMinBlocks, bool kCheckpointsOnly>
__global__ void __launch_bounds__(kThreads, kMinBlocks) mlgru_fwd_v2_kernel(const MlgruScanParams p,
                                                                            const KernelArgs a) {
  constexpr bool kFast = sizeof(T) == 2;
  extern __shared__ float smem[];
  const Layout L(a.W, a.K);
  const int64_t s = blockIdx.x / a.blocks_per_seq;
  const int64_t dim = p.seqs.dim;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.x % a.blocks_per_seq) * L.W + L.tx) * V;
  const bool active = d0 < dim;
  const Range r = seq_range(p.seqs, s);
  const int64_t tile = static_cast<int64_t>(L.K) * U;

  float lb[V], carry[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    lb[k] = (active && p.lower_bound != nullptr) ? static_cast<const float*>(p.lower_bound)[d0 + k] : 0.0f;
    carry[k] = (active && p.h0 != nullptr) ? static_cast<const float*>(p.h0)[s * dim + d0 + k] : 0.0f;
  }
  uint4 ri[U], rf[U];
  load_tile_raw<T, U>(p, r.begin + static_cast<int64_t>(L.ty) * U, r.end, dim, d0, active, ri, rf);
  for (int64_t t0 = r.begin, j = 0; t0 < r.end; t0 += tile, ++j) {
    if (kCheckpointsOnly && active && L.ty == 0) {
      float* ck = a.checkpoints + checkpoint_slot(r.begin, s, j, tile) * dim + d0;
#pragma unroll
      for (int k = 0; k < V; ++k) ck[k] = carry[k];
    }
    const int64_t tb = t0 + static_cast<int64_t>(L.ty) * U;
    float ft[U][V], c[U][V], A[V], b[V];
#pragma unroll
    for (int k = 0; k < V; ++k) { A[k] = 1.0f; b[k] = 0.0f; }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = tb + u;
      const bool in = active && t < r.end;
      const bool valid = in && (p.mask == nullptr || p.mask[t] != 0);
      float xi[V], xf[V], omlb[V];
      unpack<T, V>(ri[u], xi);
      unpack<T, V>(rf[u], xf);
#pragma unroll
      for (int k = 0; k < V; ++k) omlb[k] = 1.0f - lb[k];
      gate_token<kFast, V>(xi, xf, lb, omlb, valid, t < r.end, ft[u], c[u]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        b[k] = ft[u][k] * b[k] + c[u][k];
        A[k] = ft[u][k] * A[k];
      }
    }
    if (t0 + tile < r.end) load_tile_raw<T, U>(p, tb + tile, r.end, dim, d0, active, ri, rf);
    float h[V];
    block_scan<V, false, true>(L, smem, A, b, carry, h);
    if (!kCheckpointsOnly) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int k = 0; k < V; ++k) h[k] = ft[u][k] * h[k] + c[u][k];
        if (active && tb + u < r.end) store_stream<T, V>(p.h, (tb + u) * dim + d0, h);
      }
    }
  }
  if (!kCheckpointsOnly && active && L.ty == 0) {
    float* last = static_cast<float*>(p.h_last) + s * dim + d0;
#pragma unroll
    for (int k = 0; k < V; ++k) last[k] = carry[k];
  }
}

template <class T, int V, int U>
__global__ void __launch_bounds__(kThreads) mlgru_bwd_kernel(const MlgruScanBwdParams p, const KernelArgs a) {
  constexpr bool kFast = sizeof(T) == 2;
  extern __shared__ float smem[];
  const Layout L(a.W, a.K);
  const int64_t s = blockIdx.x / a.blocks_per_seq;
  const int64_t dim = p.seqs.dim;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.x % a.blocks_per_seq) * L.W + L.tx) * V;
  const bool active = d0 < dim;
  const Range r = seq_range(p.seqs, s);
  const int64_t tile = static_cast<int64_t>(L.K) * U;
  const int64_t tiles = (r.end - r.begin + tile - 1) / tile;

  float lb[V], omlb[V], e_carry[V], dlb[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    lb[k] = (active && p.lower_bound != nullptr) ? static_cast<const float*>(p.lower_bound)[d0 + k] : 0.0f;
    omlb[k] = 1.0f - lb[k];
    e_carry[k] = active ? static_cast<const float*>(p.grad_h_last)[s * dim + d0 + k] : 0.0f;
    dlb[k] = 0.0f;
  }
  for (int64_t j = tiles - 1; j >= 0; --j) {
    const int64_t tb = r.begin + j * tile + static_cast<int64_t>(L.ty) * U;
    float xi[U][V], xf[U][V], gh[U][V];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = tb + u;
      const bool in = active && t < r.end;
      if (in) {
        load_pack<T, V>(p.i, t * dim + d0, xi[u]);
        load_pack<T, V>(p.f, t * dim + d0, xf[u]);
        load_pack<T, V>(p.grad_h, t * dim + d0, gh[u]);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) xi[u][k] = xf[u][k] = gh[u][k] = 0.0f;
      }
      valid[u] = in && (p.mask == nullptr || p.mask[t] != 0);
    }
    // Forward inside the tile from its checkpoint: h_{t-1} of every token, kept in hp.
    float ft[U][V], hp[U][V], A[V], b[V], h_carry[V], h[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A[k] = 1.0f;
      b[k] = 0.0f;
      h_carry[k] = active ? a.checkpoints[checkpoint_slot(r.begin, s, j, tile) * dim + d0 + k] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      gate_token<kFast, V>(xi[u], xf[u], lb, omlb, valid[u], tb + u < r.end, ft[u], hp[u]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        b[k] = ft[u][k] * b[k] + hp[u][k];
        A[k] = ft[u][k] * A[k];
      }
    }
    block_scan<V, false>(L, smem, A, b, h_carry, h);
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float c = hp[u][k];
        hp[u][k] = h[k];
        h[k] = ft[u][k] * h[k] + c;
      }
    }
    // Reverse: e = dL/dh flowing into h_{t-1}; per thread e_out = P e_in + q over its tokens.
    float P[V], q[V], e[V];
#pragma unroll
    for (int k = 0; k < V; ++k) { P[k] = 1.0f; q[k] = 0.0f; }
#pragma unroll
    for (int u = U - 1; u >= 0; --u) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        q[k] = ft[u][k] * (gh[u][k] + q[k]);
        P[k] = ft[u][k] * P[k];
      }
    }
    block_scan<V, true>(L, smem, P, q, e_carry, e);
#pragma unroll
    for (int u = U - 1; u >= 0; --u) {
      float di[V], df[V];
      token_backward<kFast, V>(xi[u], xf[u], gh[u], hp[u], ft[u], omlb, valid[u], tb + u < r.end, e, dlb, di, df);
      if (active && tb + u < r.end) {
        store_pack<T, V>(p.grad_i, (tb + u) * dim + d0, di);
        store_pack<T, V>(p.grad_f, (tb + u) * dim + d0, df);
      }
    }
  }
  finish_backward<V>(L, smem, active, e_carry, dlb, static_cast<float*>(p.grad_h0) + s * dim + d0,
                     a.dlb_part + s * dim + d0);
}

// Raw 16-byte vectors of one [N, D] tensor for a thread's U tokens from tb (zeros out of range).
template <class T, int U>
__device__ __forceinline__ void load_vecs(const void* base, int64_t tb, int64_t end, int64_t dim, int64_t d0,
                                          bool active, uint4 (&out)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t t = tb + u;
    out[u] = (active && t < end) ? load_stream(base, (t * dim + d0) * static_cast<int64_t>(sizeof(T)))
                                 : make_uint4(0u, 0u, 0u, 0u);
  }
}

// v2 backward (vector path only): mlgru_bwd_kernel's math, with the previous tile's raw
// i, f, grad_h (3U 16-byte registers) loaded before this tile's two carry scans, so their
// DRAM latency overlaps the barriers (the same change as mlgru_fwd_v2_kernel), streaming
// hints on the read-once inputs and outputs, and float4 reads of the group maps.
template <class T, int V, int U, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks) mlgru_bwd_v2_kernel(const MlgruScanBwdParams p,
                                                                            const KernelArgs a) {
  constexpr bool kFast = sizeof(T) == 2;
  extern __shared__ float smem[];
  const Layout L(a.W, a.K);
  const int64_t s = blockIdx.x / a.blocks_per_seq;
  const int64_t dim = p.seqs.dim;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.x % a.blocks_per_seq) * L.W + L.tx) * V;
  const bool active = d0 < dim;
  const Range r = seq_range(p.seqs, s);
  const int64_t tile = static_cast<int64_t>(L.K) * U;
  const int64_t tiles = (r.end - r.begin + tile - 1) / tile;
  const int64_t lane_off = static_cast<int64_t>(L.ty) * U;

  float lb[V], omlb[V], e_carry[V], dlb[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    lb[k] = (active && p.lower_bound != nullptr) ? static_cast<const float*>(p.lower_bound)[d0 + k] : 0.0f;
    omlb[k] = 1.0f - lb[k];
    e_carry[k] = active ? static_cast<const float*>(p.grad_h_last)[s * dim + d0 + k] : 0.0f;
    dlb[k] = 0.0f;
  }
  uint4 ri[U], rf[U], rg[U];
  if (tiles > 0) {
    const int64_t tb = r.begin + (tiles - 1) * tile + lane_off;
    load_vecs<T, U>(p.i, tb, r.end, dim, d0, active, ri);
    load_vecs<T, U>(p.f, tb, r.end, dim, d0, active, rf);
    load_vecs<T, U>(p.grad_h, tb, r.end, dim, d0, active, rg);
  }
  for (int64_t j = tiles - 1; j >= 0; --j) {
    const int64_t tb = r.begin + j * tile + lane_off;
    float xi[U][V], xf[U][V], gh[U][V];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = tb + u;
      unpack<T, V>(ri[u], xi[u]);
      unpack<T, V>(rf[u], xf[u]);
      unpack<T, V>(rg[u], gh[u]);
      valid[u] = active && t < r.end && (p.mask == nullptr || p.mask[t] != 0);
    }
    if (j > 0) {  // the next tile walked (j - 1): every token of it is in range
      load_vecs<T, U>(p.i, tb - tile, r.end, dim, d0, active, ri);
      load_vecs<T, U>(p.f, tb - tile, r.end, dim, d0, active, rf);
      load_vecs<T, U>(p.grad_h, tb - tile, r.end, dim, d0, active, rg);
    }
    // Forward inside the tile from its checkpoint: h_{t-1} of every token, kept in hp.
    float ft[U][V], hp[U][V], A[V], b[V], h_carry[V], h[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A[k] = 1.0f;
      b[k] = 0.0f;
      h_carry[k] = active ? a.checkpoints[checkpoint_slot(r.begin, s, j, tile) * dim + d0 + k] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      gate_token<kFast, V>(xi[u], xf[u], lb, omlb, valid[u], tb + u < r.end, ft[u], hp[u]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        b[k] = ft[u][k] * b[k] + hp[u][k];
        A[k] = ft[u][k] * A[k];
      }
    }
    block_scan<V, false, true>(L, smem, A, b, h_carry, h);
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float c = hp[u][k];
        hp[u][k] = h[k];
        h[k] = ft[u][k] * h[k] + c;
      }
    }
    // Reverse: e = dL/dh flowing into h_{t-1}; per thread e_out = P e_in + q over its tokens.
    float P[V], q[V], e[V];
#pragma unroll
    for (int k = 0; k < V; ++k) { P[k] = 1.0f; q[k] = 0.0f; }
#pragma unroll
    for (int u = U - 1; u >= 0; --u) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        q[k] = ft[u][k] * (gh[u][k] + q[k]);
        P[k] = ft[u][k] * P[k];
      }
    }
    block_scan<V, true, true>(L, smem, P, q, e_carry, e);
#pragma unroll
    for (int u = U - 1; u >= 0; --u) {
      float di[V], df[V];
      token_backward<kFast, V>(xi[u], xf[u], gh[u], hp[u], ft[u], omlb, valid[u], tb + u < r.end, e, dlb, di, df);
      if (active && tb + u < r.end) {
        store_stream<T, V>(p.grad_i, (tb + u) * dim + d0, di);
        store_stream<T, V>(p.grad_f, (tb + u) * dim + d0, df);
      }
    }
  }
  finish_backward<V>(L, smem, active, e_carry, dlb, static_cast<float*>(p.grad_h0) + s * dim + d0,
                     a.dlb_part + s * dim + d0);
}

// grad_lower_bound[d] = sum over sequences of the per-sequence partials, in sequence order.
__global__ void mlgru_dlb_reduce_kernel(const float* part, int64_t seqs, int64_t dim, float* out) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= dim) return;
  float sum = 0.0f;
  for (int64_t s = 0; s < seqs; ++s) sum += part[s * dim + d];
  out[d] = sum;
}

// ---- launch configuration ----------------------------------------------------------------

struct Config {
  int V, U, W, K, blocks_per_seq;
  int64_t tile;
  size_t smem_bytes;
};

// Multiprocessor count of the current device, queried once per device (the attribute query
// is cheap but sits on every decode step's host path).
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // zero-initialized (static storage)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return 132;
  int n = cached[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
    cached[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

int pow2_ceil(int64_t x) {
  int p = 1;
  while (p < x && p < (1 << 30)) p <<= 1;
  return p;
}

// Tokens per thread of the vector path, by variant: v1 held U*V = 32 values in the forward
// (2 CTAs/SM with ~60 B of spill for bf16) and 16 in the backward (255 registers, 1 CTA/SM);
// v2 holds U = 2 tokens in the forward (the raw loads of the next tile ride along: 2U
// 16-byte registers; U = 4 spills 450 B at 128 registers) and 8 values in the backward.
struct TokensPerThread {
  int fwd, bwd;
};
TokensPerThread tokens_per_thread(MlgruVariant variant, int v) {
  switch (variant) {
    case MlgruVariant::kV1: return {kFwdValues / v, kBwdValues / v};
    case MlgruVariant::kV2U4: return {4, 8 / v};
    default: return {2, 8 / v};
  }
}

// V: one 16-byte vector when D allows it (else 1 channel, U = 8); U tokens per thread
// (u, see tokens_per_thread); then time-lanes K so one tile covers the sequence (K = 1 when a thread's
// U tokens already do: the sequential path), and channel vectors W = 256 / K. When that leaves
// the GPU short of CTAs, trade W for K. Every row segment a warp touches stays >= 32 bytes.
Config launch_config(const MlgruSeqs& q, DType dtype, MlgruPath path, bool vector_ok, int u) {
  Config c{};
  const int esize = dtype_size(dtype);
  c.V = vector_ok ? 16 / esize : 1;
  c.U = c.V == 1 ? 8 : u;
  const int64_t nvec = (q.dim + c.V - 1) / c.V;
  const int64_t avg_len = q.num_seqs > 0 ? (q.tokens + q.num_seqs - 1) / q.num_seqs : 0;
  const int w_min = c.V * esize >= 32 ? 1 : 32 / (c.V * esize);
  int k = pow2_ceil((avg_len + c.U - 1) / c.U);
  k = k > kMaxTimeLanes ? kMaxTimeLanes : k;
  if (path == MlgruPath::kSequential) k = 1;
  if (path == MlgruPath::kChunked && k < 2) k = 2;
  int w = kThreads / k;
  const int w_need = pow2_ceil(nvec);
  if (w > w_need) w = w_need > w_min ? w_need : w_min;
  if (w < w_min) w = w_min;
  if (w * k > kThreads) k = kThreads / w;
  if (k < 1) k = 1;
  const int64_t target = 2LL * sm_count();
  while (path != MlgruPath::kSequential && q.num_seqs * ((nvec + w - 1) / w) < target && w > w_min &&
         k < kMaxTimeLanes && static_cast<int64_t>(k) * c.U < avg_len) {
    w /= 2;
    k *= 2;
  }
  if (w * k < 32) w = 32 / k;  // whole warps: the shuffles use the full mask
  c.W = w;
  c.K = k;
  c.blocks_per_seq = static_cast<int>((nvec + w - 1) / w);
  c.tile = static_cast<int64_t>(k) * c.U;
  const size_t scan = static_cast<size_t>(k) * w * c.V * 2 * sizeof(float);  // >= the dlb buffer
  c.smem_bytes = scan;
  return c;
}

Config fwd_config(const MlgruSeqs& q, DType dtype, MlgruPath path, bool vector_ok, MlgruVariant variant) {
  return launch_config(q, dtype, path, vector_ok, tokens_per_thread(variant, 16 / dtype_size(dtype)).fwd);
}
Config bwd_config(const MlgruSeqs& q, DType dtype, MlgruPath path, bool vector_ok, MlgruVariant variant) {
  return launch_config(q, dtype, path, vector_ok, tokens_per_thread(variant, 16 / dtype_size(dtype)).bwd);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

bool vector_ok_fwd(const MlgruScanParams& p) {
  const int v = 16 / dtype_size(p.dtype);
  return p.seqs.dim % v == 0 && aligned16(p.i) && aligned16(p.f) && aligned16(p.h);
}

bool vector_ok_bwd(const MlgruScanBwdParams& p) {
  const int v = 16 / dtype_size(p.dtype);
  return p.seqs.dim % v == 0 && aligned16(p.i) && aligned16(p.f) && aligned16(p.grad_h) && aligned16(p.grad_i) &&
         aligned16(p.grad_f);
}

int64_t checkpoint_slots(const MlgruSeqs& q, int64_t tile) { return q.tokens / tile + q.num_seqs + 1; }

// Checkpoint slots for the largest need over every variant and both the vector and the
// scalar configuration (which one runs depends on pointer alignment, known only at launch):
// the workspace size and the launcher's layout of it must agree.
int64_t bwd_checkpoint_slots(const MlgruSeqs& q, DType dtype, MlgruPath path) {
  int64_t slots = checkpoint_slots(q, launch_config(q, dtype, path, false, 8).tile);
  slots = std::max(slots, checkpoint_slots(q, static_cast<int64_t>(kLanesSmallK) * kLanesTokens));  // v4's smallest tile
  for (MlgruVariant v : {MlgruVariant::kBest, MlgruVariant::kV1, MlgruVariant::kV2U4}) {
    const int64_t n = checkpoint_slots(q, bwd_config(q, dtype, path, true, v).tile);
    slots = n > slots ? n : slots;
  }
  return slots;
}

template <class T, int V, int U, bool kCk>
cudaError_t launch_fwd(const MlgruScanParams& p, const Config& c, const KernelArgs& a, cudaStream_t stream) {
  const int64_t blocks = p.seqs.num_seqs * c.blocks_per_seq;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  mlgru_fwd_kernel<T, V, U, kCk><<<static_cast<unsigned>(blocks), c.W * c.K, c.smem_bytes, stream>>>(p, a);
  return cudaGetLastError();
}

template <class T, int V, int U, int kMinBlocks, bool kCk>
cudaError_t launch_fwd_v2(const MlgruScanParams& p, const Config& c, const KernelArgs& a, cudaStream_t stream) {
  const int64_t blocks = p.seqs.num_seqs * c.blocks_per_seq;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  mlgru_fwd_v2_kernel<T, V, U, kMinBlocks, kCk><<<static_cast<unsigned>(blocks), c.W * c.K, c.smem_bytes, stream>>>(p, a);
  return cudaGetLastError();
}

// The checkpoint pass runs on the backward's tiles (its U, the variant's backward one).
template <class T>
cudaError_t fwd_typed(const MlgruScanParams& p, const Config& c, const KernelArgs& a, bool checkpoints,
                      cudaStream_t stream) {
  constexpr int kV = 16 / sizeof(T);
  if (c.V != kV) {
    return checkpoints ? launch_fwd<T, 1, 8, true>(p, c, a, stream) : launch_fwd<T, 1, 8, false>(p, c, a, stream);
  }
  if (p.variant == MlgruVariant::kV1) {
    return checkpoints ? launch_fwd<T, kV, kBwdValues / kV, true>(p, c, a, stream)
                       : launch_fwd<T, kV, kFwdValues / kV, false>(p, c, a, stream);
  }
  if (checkpoints) return launch_fwd_v2<T, kV, 8 / kV, 2, true>(p, c, a, stream);
  if (p.variant == MlgruVariant::kV2U4) return launch_fwd_v2<T, kV, 4, 1, false>(p, c, a, stream);
  return launch_fwd_v2<T, kV, 2, 2, false>(p, c, a, stream);
}

cudaError_t fwd_dispatch(const MlgruScanParams& p, const Config& c, const KernelArgs& a, bool checkpoints,
                         cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return fwd_typed<float>(p, c, a, checkpoints, stream);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(p, c, a, checkpoints, stream);
    case DType::kFloat16: return fwd_typed<__half>(p, c, a, checkpoints, stream);
    default: return cudaErrorInvalidValue;  // float64 is CPU-only (checked by the binding)
  }
}

template <class T>
cudaError_t bwd_typed(const MlgruScanBwdParams& p, const Config& c, const KernelArgs& a, cudaStream_t stream) {
  constexpr int kV = 16 / sizeof(T);
  const int64_t blocks = p.seqs.num_seqs * c.blocks_per_seq;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(blocks);
  const int threads = c.W * c.K;
  if (c.V != kV) {
    mlgru_bwd_kernel<T, 1, 8><<<grid, threads, c.smem_bytes, stream>>>(p, a);
  } else if (p.variant == MlgruVariant::kV1) {
    mlgru_bwd_kernel<T, kV, kBwdValues / kV><<<grid, threads, c.smem_bytes, stream>>>(p, a);
  } else if (p.variant == MlgruVariant::kV2U4) {
    mlgru_bwd_v2_kernel<T, kV, 8 / kV, 2><<<grid, threads, c.smem_bytes, stream>>>(p, a);
  } else {
    mlgru_bwd_v2_kernel<T, kV, 8 / kV, 1><<<grid, threads, c.smem_bytes, stream>>>(p, a);
  }
  return cudaGetLastError();
}

// ---- v4 lanes (mlgru_lanes.cuh) ----------------------------------------------------------

struct LanesConfig {
  bool use = false;
  int K = 0;  // lanes per CTA (CTA = K * kLanesWords threads)
  int blocks_per_seq = 0;
};

bool aligned4(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 3u) == 0; }

// kAuto takes the lanes kernels for sequences of >= 64 tokens when the (sequence, 8-word band)
// blocks give the GPU at least 8 warps per SM; kLanes takes them whenever the layout allows
// 32-bit accesses (D a multiple of the channels per word, 4-byte aligned tensors).
LanesConfig lanes_config(const MlgruSeqs& q, DType dtype, MlgruPath path, bool words_ok) {
  LanesConfig c;
  if (!words_ok || path == MlgruPath::kSequential || path == MlgruPath::kChunked) return c;
  const int ch = 4 / dtype_size(dtype);
  const int64_t words = q.dim / ch;
  const int64_t bands = (words + kLanesWords - 1) / kLanesWords;
  const int64_t avg_len = q.num_seqs > 0 ? q.tokens / q.num_seqs : 0;
  const int64_t blocks = q.num_seqs * bands;
  c.K = (blocks < 2LL * sm_count() && avg_len >= 32LL * kLanesTokens) ? kLanesLargeK : kLanesSmallK;
  if (path == MlgruPath::kAuto) {
    if (avg_len < 64) return c;
    if (blocks * c.K * kLanesWords < 256LL * sm_count()) return c;
  }
  c.use = bands <= 0x7fffffffLL;
  c.blocks_per_seq = static_cast<int>(bands);
  return c;
}

bool words_ok_fwd(const MlgruScanParams& p) {
  const int ch = 4 / dtype_size(p.dtype);
  return p.seqs.dim % ch == 0 && aligned4(p.i) && aligned4(p.f) && (p.h == nullptr || aligned4(p.h));
}

bool words_ok_bwd(const MlgruScanBwdParams& p) {
  const int ch = 4 / dtype_size(p.dtype);
  return p.seqs.dim % ch == 0 && aligned4(p.i) && aligned4(p.f) && aligned4(p.grad_h) && aligned4(p.grad_i) &&
         aligned4(p.grad_f);
}

template <class T, bool kCk>
cudaError_t launch_lanes_fwd(const MlgruScanParams& p, const LanesConfig& c, const LanesArgs& a, cudaStream_t stream) {
  const int64_t blocks = p.seqs.num_seqs * c.blocks_per_seq;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(blocks);
  if (c.K == kLanesLargeK) {
    mlgru_fwd_lanes_kernel<T, kLanesLargeK, kCk><<<grid, kLanesLargeK * kLanesWords, 0, stream>>>(p, a);
  } else {
    mlgru_fwd_lanes_kernel<T, kLanesSmallK, kCk><<<grid, kLanesSmallK * kLanesWords, 0, stream>>>(p, a);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_lanes_bwd(const MlgruScanBwdParams& p, const LanesConfig& c, const LanesArgs& a,
                             cudaStream_t stream) {
  const int64_t blocks = p.seqs.num_seqs * c.blocks_per_seq;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(blocks);
  if (c.K == kLanesLargeK) {
    mlgru_bwd_lanes_kernel<T, kLanesLargeK><<<grid, kLanesLargeK * kLanesWords, 0, stream>>>(p, a);
  } else {
    mlgru_bwd_lanes_kernel<T, kLanesSmallK><<<grid, kLanesSmallK * kLanesWords, 0, stream>>>(p, a);
  }
  return cudaGetLastError();
}

cudaError_t lanes_fwd_dispatch(const MlgruScanParams& p, const LanesConfig& c, const LanesArgs& a, bool checkpoints,
                               cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32:
      return checkpoints ? launch_lanes_fwd<float, true>(p, c, a, stream) : launch_lanes_fwd<float, false>(p, c, a, stream);
    case DType::kBFloat16:
      return checkpoints ? launch_lanes_fwd<__nv_bfloat16, true>(p, c, a, stream)
                         : launch_lanes_fwd<__nv_bfloat16, false>(p, c, a, stream);
    case DType::kFloat16:
      return checkpoints ? launch_lanes_fwd<__half, true>(p, c, a, stream) : launch_lanes_fwd<__half, false>(p, c, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lanes_bwd_dispatch(const MlgruScanBwdParams& p, const LanesConfig& c, const LanesArgs& a,
                               cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_lanes_bwd<float>(p, c, a, stream);
    case DType::kBFloat16: return launch_lanes_bwd<__nv_bfloat16>(p, c, a, stream);
    case DType::kFloat16: return launch_lanes_bwd<__half>(p, c, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int64_t mlgru_workspace_floats(const MlgruSeqs&, DType, MlgruPath) { return 0; }

// Checkpoints (one state vector per tile slot) followed by the [S, D] dL/dlb partials.
int64_t mlgru_bwd_workspace_floats(const MlgruSeqs& q, DType dtype, MlgruPath path) {
  return bwd_checkpoint_slots(q, dtype, path) * q.dim + q.num_seqs * q.dim;
}

cudaError_t mlgru_scan(const MlgruScanParams& p, cudaStream_t stream) {
  if (p.seqs.num_seqs == 0 || p.seqs.dim == 0) return cudaSuccess;
  // The lanes forward (with stores) runs only when forced: on the H200 it measured 78-96 us at
  // B=4 T=2048 D=2560 against v2's 79-88 (NOTES "v4 lanes"); its checkpoint mode serves the
  // lanes backward.
  if (p.variant == MlgruVariant::kBest && p.path == MlgruPath::kLanes) {
    const LanesConfig lc = lanes_config(p.seqs, p.dtype, p.path, words_ok_fwd(p));
    if (lc.use) return lanes_fwd_dispatch(p, lc, LanesArgs{lc.blocks_per_seq, nullptr, nullptr}, false, stream);
  }
  const Config c = fwd_config(p.seqs, p.dtype, p.path, vector_ok_fwd(p), p.variant);
  const KernelArgs a{c.W, c.K, c.blocks_per_seq, nullptr, nullptr};
  return fwd_dispatch(p, c, a, false, stream);
}

cudaError_t mlgru_scan_backward(const MlgruScanBwdParams& p, cudaStream_t stream) {
  if (p.seqs.num_seqs == 0 || p.seqs.dim == 0) return cudaSuccess;
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t slots = bwd_checkpoint_slots(p.seqs, p.dtype, p.path);
  float* checkpoints = p.workspace;
  float* dlb_part = p.workspace + slots * p.seqs.dim;
  // The checkpoint pass is the forward kernel on the backward's tiles, storing only tile states.
  MlgruScanParams fp{p.seqs, p.dtype, p.i, p.f, p.lower_bound, p.h0, p.mask, nullptr, nullptr, p.path, nullptr,
                     p.variant};
  const LanesConfig lc = p.variant == MlgruVariant::kBest ? lanes_config(p.seqs, p.dtype, p.path, words_ok_bwd(p))
                                                          : LanesConfig{};
  cudaError_t err = cudaSuccess;
  if (lc.use) {
    const LanesArgs la{lc.blocks_per_seq, checkpoints, dlb_part};
    err = lanes_fwd_dispatch(fp, lc, la, true, stream);
    if (err != cudaSuccess) return err;
    err = lanes_bwd_dispatch(p, lc, la, stream);
  } else {
    const Config c = bwd_config(p.seqs, p.dtype, p.path, vector_ok_bwd(p), p.variant);
    const KernelArgs a{c.W, c.K, c.blocks_per_seq, checkpoints, dlb_part};
    err = fwd_dispatch(fp, c, a, true, stream);
    if (err != cudaSuccess) return err;
    switch (p.dtype) {
      case DType::kFloat32: err = bwd_typed<float>(p, c, a, stream); break;
      case DType::kBFloat16: err = bwd_typed<__nv_bfloat16>(p, c, a, stream); break;
      case DType::kFloat16: err = bwd_typed<__half>(p, c, a, stream); break;
      default: return cudaErrorInvalidValue;
    }
  }
  if (err != cudaSuccess) return err;
  const int threads = 256;
  mlgru_dlb_reduce_kernel<<<ceil_div(p.seqs.dim, threads), threads, 0, stream>>>(
      dlb_part, p.seqs.num_seqs, p.seqs.dim, static_cast<float*>(p.grad_lower_bound));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmfree
