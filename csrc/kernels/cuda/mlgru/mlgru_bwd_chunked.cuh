// v3 MLGRU backward (MlgruPath::kChunked; the auto path runs v2): time split across CTAs in chunks of kChunk tokens
// (benchmarks/NOTES.md, "MLGRU scan", v3). The v2 backward walked a sequence's tiles last to
// first inside one CTA (1 token per thread per tile, 4 barriers per tile, 1 CTA/SM at 235
// registers): latency-bound at ~6x its byte floor. Here every (chunk, channel pair) is one
// thread with no barrier and no shared memory:
//   K1 summary: per chunk, the affine maps of both directions. Forward h_out = P h_in + b
//      (P = prod f_t, b = the chunk's state from 0); reverse, the flow into the state before
//      the chunk e_out = P e_in + q with q = sum_t (prod_{s <= t} f_s) grad_h_t, accumulated in
//      forward order. Reads i, f, grad_h once; writes 3 floats per chunk and channel.
//   K2 carry: per (sequence, channel), the chunk maps composed in order: the state entering
//      each chunk (over b, in place) and the flow entering it from the right (over q, in
//      place); the flow out of the first chunk is dL/dh0.
//   K3 grad: per chunk, a forward sweep from the carried state keeps h_{t-1} of its kChunk
//      tokens in registers, then a reverse sweep from the carried flow writes dL/di, dL/df
//      in the input dtype and sums this chunk's dL/dlb (fixed token order).
//   K4 dlb: dL/dlb summed over chunks, lanes and then lanes in a fixed order: deterministic,
//      no atomics.
// Bytes: i, f, grad_h read twice (K1, K3; K3's reverse sweep re-reads i, f from L1/L2),
// grad_i, grad_f written once, plus 5 floats per kChunk tokens per channel of summaries.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/mlgru/mlgru_gate.cuh"
#include "cuda/mlgru/mlgru_seqs.cuh"
#include "mlgru.h"

namespace mmfree {
namespace cuda {
namespace mlgru_chunked {

using ::mmfree::cuda::mlgru::Range;
using ::mmfree::cuda::mlgru::seq_range;

constexpr int kChunk = 32;    // tokens per chunk (a thread's h_{t-1} of them live in registers)
constexpr int kThreads = 128;  // channel threads per CTA (K1, K3)
constexpr int kBatch = 8;     // tokens whose loads a thread issues together
constexpr int kCarryBatch = 16;  // chunk maps K2 loads together

// Chunk slots: chunk c of sequence s is slot floor(begin_s / kChunk) + s + c, unique over all
// (s, c) for non-decreasing offsets, and below num_slots (the same bound as the v2
// checkpoints). Slots between sequences hold no tokens.
inline int64_t num_slots(const MlgruSeqs& q) { return q.tokens / kChunk + q.num_seqs + 1; }

// Floats of workspace: 3 summary rows (P, b -> carried state, q -> carried flow) and one
// dL/dlb partial row of D per slot.
inline int64_t workspace_floats(const MlgruSeqs& q) { return num_slots(q) * 4 * q.dim; }

struct Chunk {
  int64_t begin, end;  // end <= begin: an empty slot
};

__device__ __forceinline__ int64_t first_slot(const MlgruSeqs& q, int64_t s) {
  return seq_range(q, s).begin / kChunk + s;
}

// The tokens of slot g: the sequence is the last one whose first slot is <= g (first_slot
// rises with s), found by bisection (no loads for fixed-length batches).
__device__ __forceinline__ Chunk chunk_of_slot(const MlgruSeqs& q, int64_t g) {
  int64_t lo = 0, hi = q.num_seqs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (first_slot(q, mid) <= g) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const Range r = seq_range(q, lo);
  const int64_t c = g - (r.begin / kChunk + lo);
  if (c < 0) return {0, 0};  // only for corrupt (decreasing) offsets
  const int64_t begin = r.begin + c * kChunk;
  const int64_t end = r.end < begin + kChunk ? r.end : begin + kChunk;
  return {begin, end};
}

template <class T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <class T, int V>
__device__ __forceinline__ void load_vec(const void* base, int64_t off, float (&out)[V]) {
  const Vec<T, V> x = *reinterpret_cast<const Vec<T, V>*>(static_cast<const T*>(base) + off);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_float(x.v[k]);
}

template <class T, int V>
__device__ __forceinline__ void store_vec(void* base, int64_t off, const float (&in)[V]) {
  Vec<T, V> x;
#pragma unroll
  for (int k = 0; k < V; ++k) x.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Vec<T, V>*>(static_cast<T*>(base) + off) = x;
}

template <int V>
__device__ __forceinline__ void load_lower_bound(const void* lower_bound, int64_t d0, float (&lb)[V],
                                                 float (&omlb)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    lb[k] = lower_bound != nullptr ? static_cast<const float*>(lower_bound)[d0 + k] : 0.0f;
    omlb[k] = 1.0f - lb[k];
  }
}

// Backward of one in-range token, walking time in reverse (the math of mlgru_scan.cu's
// token_backward, with f_t computed here from the same sigmoid: one evaluation of the
// gates, and the same f_t bits as gate_token's).
template <bool kFast, int V>
__device__ __forceinline__ void token_grad(const float (&xi)[V], const float (&xf)[V], const float (&gh)[V],
                                           const float (&hp)[V], const float (&lb)[V], const float (&omlb)[V],
                                           bool valid, float (&e)[V], float (&dlb)[V], float (&di)[V],
                                           float (&df)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    float sg, omsg, si, omsi;
    mlgru::sigmoid2<kFast>(xf[k], sg, omsg);
    mlgru::input_sigmoid2<kFast>(xi[k], si, omsi);
    const float f_t = lb[k] + omlb[k] * sg;
    const float delta = gh[k] + e[k];
    const float silu = valid ? xi[k] * si : 0.0f;
    const float dsilu = si * (1.0f + xi[k] * omsi);
    di[k] = valid ? delta * (omlb[k] * omsg) * dsilu : 0.0f;
    const float dft = delta * (hp[k] - silu);
    df[k] = dft * omlb[k] * (sg * omsg);
    dlb[k] += dft * omsg;
    e[k] = f_t * delta;
  }
}

__device__ __forceinline__ bool token_valid(const uint8_t* mask, int64_t t) {
  return mask == nullptr || mask[t] != 0;
}

// K1: the chunk maps (P, b, q) of slot blockIdx.x for V channels per thread.
template <class T, int V>
__global__ void __launch_bounds__(kThreads) summary_kernel(const MlgruScanBwdParams p, float* ws, int64_t ch_blocks) {
  constexpr bool kFast = sizeof(T) == 2;
  const int64_t dim = p.seqs.dim;
  const int64_t g = blockIdx.x / ch_blocks;
  const int64_t d0 = ((blockIdx.x % ch_blocks) * kThreads + threadIdx.x) * V;
  if (d0 >= dim) return;
  const Chunk ch = chunk_of_slot(p.seqs, g);
  if (ch.end <= ch.begin) return;  // K2 and K3 never read an empty slot's maps
  float lb[V], omlb[V], A[V], b[V], q[V];
  load_lower_bound<V>(p.lower_bound, d0, lb, omlb);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    A[k] = 1.0f;
    b[k] = 0.0f;
    q[k] = 0.0f;
  }
#pragma unroll
  for (int u0 = 0; u0 < kChunk; u0 += kBatch) {
    if (ch.begin + u0 >= ch.end) break;
    float xi[kBatch][V], xf[kBatch][V], gh[kBatch][V];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {  // the batch's 3 * kBatch loads first
      const int64_t t = ch.begin + u0 + u;
      if (t < ch.end) {
        load_vec<T, V>(p.i, t * dim + d0, xi[u]);
        load_vec<T, V>(p.f, t * dim + d0, xf[u]);
        load_vec<T, V>(p.grad_h, t * dim + d0, gh[u]);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) xi[u][k] = xf[u][k] = gh[u][k] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t t = ch.begin + u0 + u;
      const bool in = t < ch.end;
      float ft[V], c[V];
      mlgru::gate_token<kFast, V>(xi[u], xf[u], lb, omlb, in && token_valid(p.mask, t), in, ft, c);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        b[k] = ft[k] * b[k] + c[k];
        A[k] = ft[k] * A[k];
        q[k] = A[k] * gh[u][k] + q[k];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    ws[(g * 3 + 0) * dim + d0 + k] = A[k];
    ws[(g * 3 + 1) * dim + d0 + k] = b[k];
    ws[(g * 3 + 2) * dim + d0 + k] = q[k];
  }
}

// K2: per (sequence, channel), the carried state into each chunk (written over b) and the
// carried flow into each chunk from the right (written over q); dL/dh0 = the flow out of the
// first chunk (dL/dh_last for an empty sequence).
__global__ void __launch_bounds__(kThreads) carry_kernel(const MlgruScanBwdParams p, float* ws) {
  const int64_t dim = p.seqs.dim;
  const int64_t id = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (id >= p.seqs.num_seqs * dim) return;
  const int64_t s = id / dim, d = id % dim;
  const Range r = seq_range(p.seqs, s);
  const int64_t chunks = (r.end - r.begin + kChunk - 1) / kChunk;
  const int64_t g0 = r.begin / kChunk + s;
  float h = p.h0 != nullptr ? static_cast<const float*>(p.h0)[s * dim + d] : 0.0f;
  for (int64_t c0 = 0; c0 < chunks; c0 += kCarryBatch) {
    float P[kCarryBatch], B[kCarryBatch];
#pragma unroll
    for (int j = 0; j < kCarryBatch; ++j) {
      const int64_t g = g0 + c0 + j;
      const bool in = c0 + j < chunks;
      P[j] = in ? ws[(g * 3 + 0) * dim + d] : 1.0f;
      B[j] = in ? ws[(g * 3 + 1) * dim + d] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kCarryBatch; ++j) {
      if (c0 + j < chunks) ws[((g0 + c0 + j) * 3 + 1) * dim + d] = h;
      h = P[j] * h + B[j];
    }
  }
  float e = static_cast<const float*>(p.grad_h_last)[s * dim + d];
  for (int64_t c1 = chunks; c1 > 0; c1 -= kCarryBatch) {
    float P[kCarryBatch], Q[kCarryBatch];
#pragma unroll
    for (int j = 0; j < kCarryBatch; ++j) {
      const int64_t c = c1 - 1 - j;
      const int64_t g = g0 + c;
      P[j] = c >= 0 ? ws[(g * 3 + 0) * dim + d] : 1.0f;
      Q[j] = c >= 0 ? ws[(g * 3 + 2) * dim + d] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kCarryBatch; ++j) {
      const int64_t c = c1 - 1 - j;
      if (c >= 0) ws[((g0 + c) * 3 + 2) * dim + d] = e;
      e = P[j] * e + Q[j];
    }
  }
  static_cast<float*>(p.grad_h0)[s * dim + d] = e;
}

// K3: dL/di, dL/df of slot blockIdx.x's tokens and its dL/dlb partial (zeros for an empty slot).
template <class T, int V>
__global__ void __launch_bounds__(kThreads) grad_kernel(const MlgruScanBwdParams p, float* ws, int64_t slots,
                                                        int64_t ch_blocks) {
  constexpr bool kFast = sizeof(T) == 2;
  const int64_t dim = p.seqs.dim;
  const int64_t g = blockIdx.x / ch_blocks;
  const int64_t d0 = ((blockIdx.x % ch_blocks) * kThreads + threadIdx.x) * V;
  if (d0 >= dim) return;
  const Chunk ch = chunk_of_slot(p.seqs, g);
  float dlb[V];
#pragma unroll
  for (int k = 0; k < V; ++k) dlb[k] = 0.0f;
  if (ch.end > ch.begin) {
    float lb[V], omlb[V], h[V], e[V];
    load_lower_bound<V>(p.lower_bound, d0, lb, omlb);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      h[k] = ws[(g * 3 + 1) * dim + d0 + k];
      e[k] = ws[(g * 3 + 2) * dim + d0 + k];
    }
    float hp[kChunk][V];  // h_{t-1} of the chunk's tokens
#pragma unroll
    for (int u0 = 0; u0 < kChunk; u0 += kBatch) {
      float xi[kBatch][V], xf[kBatch][V];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t t = ch.begin + u0 + u;
        if (t < ch.end) {
          load_vec<T, V>(p.i, t * dim + d0, xi[u]);
          load_vec<T, V>(p.f, t * dim + d0, xf[u]);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) xi[u][k] = xf[u][k] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t t = ch.begin + u0 + u;
        const bool in = t < ch.end;
        float ft[V], c[V];
        mlgru::gate_token<kFast, V>(xi[u], xf[u], lb, omlb, in && token_valid(p.mask, t), in, ft, c);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          hp[u0 + u][k] = h[k];
          h[k] = ft[k] * h[k] + c[k];
        }
      }
    }
#pragma unroll
    for (int u0 = kChunk - kBatch; u0 >= 0; u0 -= kBatch) {
      float xi[kBatch][V], xf[kBatch][V], gh[kBatch][V];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t t = ch.begin + u0 + u;
        if (t < ch.end) {
          load_vec<T, V>(p.i, t * dim + d0, xi[u]);
          load_vec<T, V>(p.f, t * dim + d0, xf[u]);
          load_vec<T, V>(p.grad_h, t * dim + d0, gh[u]);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) xi[u][k] = xf[u][k] = gh[u][k] = 0.0f;
        }
      }
#pragma unroll
      for (int u = kBatch - 1; u >= 0; --u) {
        const int64_t t = ch.begin + u0 + u;
        if (t < ch.end) {
          float di[V], df[V];
          token_grad<kFast, V>(xi[u], xf[u], gh[u], hp[u0 + u], lb, omlb, token_valid(p.mask, t), e, dlb, di, df);
          store_vec<T, V>(p.grad_i, t * dim + d0, di);
          store_vec<T, V>(p.grad_f, t * dim + d0, df);
        }
      }
    }
  }
  float* part = ws + (slots * 3 + g) * dim + d0;
#pragma unroll
  for (int k = 0; k < V; ++k) part[k] = dlb[k];
}

// K4: grad_lower_bound[d] = sum of the slots' partials; 32 lanes take every 32nd slot, then
// the lanes are added in lane order (fixed order for any timing: deterministic).
constexpr int kDlbLanes = 32;
__global__ void __launch_bounds__(32 * kDlbLanes) dlb_kernel(const float* part, int64_t slots, int64_t dim,
                                                             float* out) {
  __shared__ float lanes[kDlbLanes][33];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  float sum = 0.0f;
  if (d < dim) {
#pragma unroll 4
    for (int64_t g = ty; g < slots; g += kDlbLanes) sum += part[g * dim + d];
  }
  lanes[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && d < dim) {
    float total = 0.0f;
#pragma unroll
    for (int y = 0; y < kDlbLanes; ++y) total += lanes[y][tx];
    out[d] = total;
  }
}

inline bool aligned_to(const void* ptr, size_t bytes) { return (reinterpret_cast<uintptr_t>(ptr) % bytes) == 0; }

template <class T, int V>
cudaError_t launch_typed(const MlgruScanBwdParams& p, float* ws, int64_t slots, cudaStream_t stream) {
  const int64_t ch_blocks = (p.seqs.dim + static_cast<int64_t>(kThreads) * V - 1) / (static_cast<int64_t>(kThreads) * V);
  // Block = slot * ch_blocks + channel block: the CTAs resident together cover whole rows of
  // a few chunks (as v2's do), not one column band of every row (the first H200 run had
  // blockIdx.x = slot, blockIdx.y = channel block).
  if (slots > 0x7fffffffLL / ch_blocks) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(slots * ch_blocks);
  summary_kernel<T, V><<<grid, kThreads, 0, stream>>>(p, ws, ch_blocks);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t carry_blocks = (p.seqs.num_seqs * p.seqs.dim + kThreads - 1) / kThreads;
  if (carry_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  carry_kernel<<<static_cast<unsigned>(carry_blocks), kThreads, 0, stream>>>(p, ws);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  grad_kernel<T, V><<<grid, kThreads, 0, stream>>>(p, ws, slots, ch_blocks);
  return cudaGetLastError();
}

// The whole backward (workspace: workspace_floats(p.seqs) floats). V = 2 channels per thread
// (4- or 8-byte accesses) when D is even and every [N, D] pointer allows it, else 1.
inline cudaError_t backward(const MlgruScanBwdParams& p, cudaStream_t stream) {
  const int64_t slots = num_slots(p.seqs);
  float* ws = p.workspace;
  const size_t pair = 2 * static_cast<size_t>(dtype_size(p.dtype));
  const bool vec = p.seqs.dim % 2 == 0 && aligned_to(p.i, pair) && aligned_to(p.f, pair) &&
                   aligned_to(p.grad_h, pair) && aligned_to(p.grad_i, pair) && aligned_to(p.grad_f, pair);
  cudaError_t err = cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      err = vec ? launch_typed<float, 2>(p, ws, slots, stream) : launch_typed<float, 1>(p, ws, slots, stream);
      break;
    case DType::kBFloat16:
      err = vec ? launch_typed<__nv_bfloat16, 2>(p, ws, slots, stream)
                : launch_typed<__nv_bfloat16, 1>(p, ws, slots, stream);
      break;
    case DType::kFloat16:
      err = vec ? launch_typed<__half, 2>(p, ws, slots, stream) : launch_typed<__half, 1>(p, ws, slots, stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  dlb_kernel<<<ceil_div(p.seqs.dim, 32), 32 * kDlbLanes, 0, stream>>>(ws + slots * 3 * p.seqs.dim, slots,
                                                                      p.seqs.dim,
                                                                      static_cast<float*>(p.grad_lower_bound));
  return cudaGetLastError();
}

}  // namespace mlgru_chunked
}  // namespace cuda
}  // namespace mmfree
