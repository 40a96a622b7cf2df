// One-row-per-warp kernels of the quantizing norm ops (rms_norm_quant(_multi) and
// rms_norm_swish_gate_quant), for rows of <= 512 16-byte vectors.
//
// Why: the block kernels (one row per block, 64-128 threads for K = 2.5K-7K) pay two
// barriers per block reduction and issue the weight loads only after the first reduction
// (a serial L2/DRAM round trip per row); at 64-thread blocks and ~100-170 registers only
// ~10-18 warps per SM are resident, and each spends most of its row time waiting in that
// chain with no loads in flight. Here a warp owns a row: both reductions are shuffles, the
// weights are loaded together with x, 4 independent rows per 128-thread block.
//
// Bit-exactness with the block kernels: a block of NW warps (NW = 1 for <= 256 vectors,
// 2 for <= 512; 32*NW threads, kVecPerThread vectors each) gives thread t = 32*w + l the
// vectors j*32*NW + t, i.e. 32*(j*NW + w) + l. Lane l here holds slot c = j*NW + w at the
// same address and keeps one partial sum per emulated warp w = c % NW, accumulated in the
// same j order; each partial goes through the same xor butterfly and the totals are added
// as the block kernel reads shared memory: (0 + s_0) + s_1. Max reductions are exact in
// any order. So codes and scales equal the block kernel's bit for bit, and the ops stay
// bit-identical to each other (multi vs single, fused gate vs the unfused pair).
#pragma once

#include "cuda/norm/norm_common.cuh"

namespace mmfree {
namespace cuda {
namespace norm {

constexpr int kWarpRowsPerBlock = 4;
constexpr int kWarpMaxVec = 512;      // 16-byte vectors per row on the warp path
constexpr int kMaxFusedWeights = 4;   // weights whose amax share one pass in _multi

// Vector slots per lane: 8, 12 or 16 (0: the row does not fit a warp).
inline int warp_slots(int64_t nvec) {
  if (nvec <= 256) return 8;
  if (nvec <= 384) return 12;
  if (nvec <= kWarpMaxVec) return 16;
  return 0;
}

// Raw 16-byte words of N weights of type TW, converted on use (keeps registers low).
template <class T, class TW> struct WeightWords {
  static constexpr int N = VecOf<T>::N;
  static constexpr int kWords = N * static_cast<int>(sizeof(TW)) / 16;
};

template <class T, class TW>
__device__ __forceinline__ void load_weight_words(const TW* p, uint4 (&u)[WeightWords<T, TW>::kWords]) {
#pragma unroll
  for (int q = 0; q < WeightWords<T, TW>::kWords; ++q) u[q] = __ldg(reinterpret_cast<const uint4*>(p) + q);
}

template <class T, class TW>
__device__ __forceinline__ void unpack_weight_words(const uint4 (&u)[WeightWords<T, TW>::kWords],
                                                    float (&f)[VecOf<T>::N]) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(TW));
#pragma unroll
  for (int q = 0; q < WeightWords<T, TW>::kWords; ++q) {
    const TW* e = reinterpret_cast<const TW*>(&u[q]);
#pragma unroll
    for (int i = 0; i < kPer; ++i) f[q * kPer + i] = to_float(e[i]);
  }
}

// The block kernels' reduction order (see the file comment): one partial per emulated warp.
template <int NW> __device__ __forceinline__ float emulated_block_sum(const float (&ss)[NW]) {
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) t += warp_sum(ss[w]);
  return t;
}

__device__ __forceinline__ uint4 ld_stream_warp(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }

template <class T, class TW, int C>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32)
    quant_warp(const T* __restrict__ x, const TW* __restrict__ w, int64_t num_w, int64_t rows, int64_t k, float eps,
               int8_t* __restrict__ xq, float* __restrict__ xs) {
  constexpr int N = VecOf<T>::N;
  constexpr int NW = C <= 8 ? 1 : 2;
  constexpr int WW = WeightWords<T, TW>::kWords;
  const int lane = threadIdx.x & 31;
  const int64_t nvec = k / N;
  const bool single = num_w == 1;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kWarpRowsPerBlock) + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpRowsPerBlock) {
    const T* xr = x + row * k;
    uint4 raw[C];
    uint4 wraw[C][WW];  // the single weight, loaded alongside x (no round trip after the reduction)
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t vi = c * 32 + lane;
      if (vi < nvec) {
        raw[c] = ld_stream_warp(xr + vi * N);
        if (single) load_weight_words<T, TW>(w + vi * N, wraw[c]);
      }
    }
    float ss[NW];
#pragma unroll
    for (int i = 0; i < NW; ++i) ss[i] = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (c * 32 + lane < nvec) {
        float f[N];
        unpack<T, N>(raw[c], f);
#pragma unroll
        for (int i = 0; i < N; ++i) ss[c % NW] = fmaf(f[i], f[i], ss[c % NW]);
      }
    }
    const float rstd = rstd_of(emulated_block_sum<NW>(ss), k, eps);
    // Up to kMaxFusedWeights weights share one amax pass and one set of shuffles.
    for (int64_t p0 = 0; p0 < num_w; p0 += kMaxFusedWeights) {
      float amax[kMaxFusedWeights];
#pragma unroll
      for (int pp = 0; pp < kMaxFusedWeights; ++pp) amax[pp] = 0.f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int64_t vi = c * 32 + lane;
        if (vi < nvec) {
          float f[N];
          unpack<T, N>(raw[c], f);
#pragma unroll
          for (int pp = 0; pp < kMaxFusedWeights; ++pp) {
            if (p0 + pp < num_w) {
              float wf[N];
              if (single) {
                unpack_weight_words<T, TW>(wraw[c], wf);
              } else {
                load_weights<TW, N>(w + (p0 + pp) * k + vi * N, wf);
              }
#pragma unroll
              for (int i = 0; i < N; ++i) amax[pp] = amax_fold(amax[pp], ((f[i] * rstd) * wf[i]));
            }
          }
        }
      }
#pragma unroll
      for (int pp = 0; pp < kMaxFusedWeights; ++pp) amax[pp] = amax_final(warp_max(amax[pp]));
#pragma unroll
      for (int pp = 0; pp < kMaxFusedWeights; ++pp) {
        const int64_t pw = p0 + pp;
        if (pw < num_w) {
          const float s = 127.0f / amax[pp];
          int8_t* qr = xq + (pw * rows + row) * k;
#pragma unroll
          for (int c = 0; c < C; ++c) {
            const int64_t vi = c * 32 + lane;
            if (vi < nvec) {
              float f[N], wf[N];
              int q[N];
              unpack<T, N>(raw[c], f);
              if (single) {
                unpack_weight_words<T, TW>(wraw[c], wf);
              } else {
                load_weights<TW, N>(w + pw * k + vi * N, wf);
              }
#pragma unroll
              for (int i = 0; i < N; ++i) q[i] = quant_code((f[i] * rstd) * wf[i], s);
              store_codes<N>(qr + vi * N, q);
            }
          }
          if (lane == 0) xs[pw * rows + row] = amax[pp] / 127.0f;
        }
      }
    }
  }
}

// Rows too wide for a warp: v1's block layout and reductions (so the same bits), but the
// single weight is loaded together with x, and multi reduces the amax of up to
// kMaxFusedWeights weights in one pass with one barrier pair (v1: one pass and one block
// reduction per weight).
template <class T, class TW>
__global__ void __launch_bounds__(kMaxThreads)
    quant_block_v2(const T* __restrict__ x, const TW* __restrict__ w, int64_t num_w, int64_t rows, int64_t k,
                   float eps, int8_t* __restrict__ xq, float* __restrict__ xs) {
  constexpr int N = VecOf<T>::N;
  constexpr int VPT = kVecPerThread;
  constexpr int WW = WeightWords<T, TW>::kWords;
  __shared__ float smem[32];
  __shared__ float smax[kMaxFusedWeights][32];
  const int64_t nvec = k / N;
  const bool single = num_w == 1;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * k;
    uint4 raw[VPT];
    uint4 wraw[VPT][WW];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (vi < nvec) {
        raw[j] = ld_stream_warp(xr + vi * N);
        if (single) load_weight_words<T, TW>(w + vi * N, wraw[j]);
      }
    }
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (vi < nvec) {
        float f[N];
        unpack<T, N>(raw[j], f);
#pragma unroll
        for (int i = 0; i < N; ++i) ss = fmaf(f[i], f[i], ss);
      }
    }
    const float rstd = rstd_of(block_sum(ss, smem), k, eps);
    for (int64_t p0 = 0; p0 < num_w; p0 += kMaxFusedWeights) {
      float amax[kMaxFusedWeights];
#pragma unroll
      for (int pp = 0; pp < kMaxFusedWeights; ++pp) amax[pp] = 0.f;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
        if (vi < nvec) {
          float f[N];
          unpack<T, N>(raw[j], f);
#pragma unroll
          for (int pp = 0; pp < kMaxFusedWeights; ++pp) {
            if (p0 + pp < num_w) {
              float wf[N];
              if (single) {
                unpack_weight_words<T, TW>(wraw[j], wf);
              } else {
                load_weights<TW, N>(w + (p0 + pp) * k + vi * N, wf);
              }
#pragma unroll
              for (int i = 0; i < N; ++i) amax[pp] = amax_fold(amax[pp], ((f[i] * rstd) * wf[i]));
            }
          }
        }
      }
      // One barrier pair for all the weights' maxima (max is exact in any order).
#pragma unroll
      for (int pp = 0; pp < kMaxFusedWeights; ++pp) amax[pp] = warp_max(amax[pp]);
      __syncthreads();  // smax may still be read by the previous group / row
      if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int pp = 0; pp < kMaxFusedWeights; ++pp) smax[pp][warp] = amax[pp];
      }
      __syncthreads();
#pragma unroll
      for (int pp = 0; pp < kMaxFusedWeights; ++pp) {
        float t = smax[pp][0];
        for (int wi = 1; wi < nwarps; ++wi) t = fmaxf(t, smax[pp][wi]);
        amax[pp] = amax_final(t);
      }
#pragma unroll
      for (int pp = 0; pp < kMaxFusedWeights; ++pp) {
        const int64_t pw = p0 + pp;
        if (pw < num_w) {
          const float s = 127.0f / amax[pp];
          int8_t* qr = xq + (pw * rows + row) * k;
#pragma unroll
          for (int j = 0; j < VPT; ++j) {
            const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
            if (vi < nvec) {
              float f[N], wf[N];
              int q[N];
              unpack<T, N>(raw[j], f);
              if (single) {
                unpack_weight_words<T, TW>(wraw[j], wf);
              } else {
                load_weights<TW, N>(w + pw * k + vi * N, wf);
              }
#pragma unroll
              for (int i = 0; i < N; ++i) q[i] = quant_code((f[i] * rstd) * wf[i], s);
              store_codes<N>(qr + vi * N, q);
            }
          }
          if (threadIdx.x == 0) xs[pw * rows + row] = amax[pp] / 127.0f;
        }
      }
    }
  }
}

// rms_norm_swish_gate_quant, one row per warp; same operation sequence as swish_gate_vec.
template <class T, class TW, int C>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32)
    swish_gate_quant_warp(const T* __restrict__ g, const T* __restrict__ h, const TW* __restrict__ w, int64_t rows,
                          int64_t k, float eps, const TW* __restrict__ nw, float norm_eps, int8_t* __restrict__ xq,
                          float* __restrict__ xs) {
  constexpr int N = VecOf<T>::N;
  constexpr int NW = C <= 8 ? 1 : 2;
  constexpr int WW = WeightWords<T, TW>::kWords;
  const int lane = threadIdx.x & 31;
  const int64_t nvec = k / N;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kWarpRowsPerBlock) + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpRowsPerBlock) {
    const int64_t off = row * k;
    uint4 rg[C], rh[C];
    uint4 wraw[C][WW];  // gate weight, then (once used) the quantizer's norm weight
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t vi = c * 32 + lane;
      if (vi < nvec) {
        rg[c] = ld_stream_warp(g + off + vi * N);
        rh[c] = ld_stream_warp(h + off + vi * N);
        load_weight_words<T, TW>(w + vi * N, wraw[c]);
      }
    }
    float ss[NW];
#pragma unroll
    for (int i = 0; i < NW; ++i) ss[i] = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (c * 32 + lane < nvec) {
        float f[N];
        unpack<T, N>(rg[c], f);
#pragma unroll
        for (int i = 0; i < N; ++i) ss[c % NW] = fmaf(f[i], f[i], ss[c % NW]);
      }
    }
    const float rstd = rstd_of(emulated_block_sum<NW>(ss), k, eps);
    float ss2[NW];
#pragma unroll
    for (int i = 0; i < NW; ++i) ss2[i] = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t vi = c * 32 + lane;
      if (vi < nvec) {
        float gf[N], hf[N], wf[N], o[N];
        unpack<T, N>(rg[c], gf);
        unpack<T, N>(rh[c], hf);
        unpack_weight_words<T, TW>(wraw[c], wf);
        // The norm weight's loads fly during the second reduction.
        load_weight_words<T, TW>(nw + vi * N, wraw[c]);
#pragma unroll
        for (int i = 0; i < N; ++i) o[i] = ((gf[i] * rstd) * wf[i]) * (hf[i] * sigmoid(hf[i]));
        rg[c] = pack<T, N>(o);  // rounded to T, as the unfused op stores it
        unpack<T, N>(rg[c], o);
#pragma unroll
        for (int i = 0; i < N; ++i) ss2[c % NW] = fmaf(o[i], o[i], ss2[c % NW]);
      }
    }
    const float rstd2 = rstd_of(emulated_block_sum<NW>(ss2), k, norm_eps);
    float amax = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (c * 32 + lane < nvec) {
        float f[N], wf[N];
        unpack<T, N>(rg[c], f);
        unpack_weight_words<T, TW>(wraw[c], wf);
#pragma unroll
        for (int i = 0; i < N; ++i) amax = amax_fold(amax, ((f[i] * rstd2) * wf[i]));
      }
    }
    amax = amax_final(warp_max(amax));
    const float s = 127.0f / amax;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t vi = c * 32 + lane;
      if (vi < nvec) {
        float f[N], wf[N];
        int q[N];
        unpack<T, N>(rg[c], f);
        unpack_weight_words<T, TW>(wraw[c], wf);
#pragma unroll
        for (int i = 0; i < N; ++i) q[i] = quant_code((f[i] * rstd2) * wf[i], s);
        store_codes<N>(xq + off + vi * N, q);
      }
    }
    if (lane == 0) xs[row] = amax / 127.0f;
  }
}

}  // namespace norm
}  // namespace cuda
}  // namespace mmfree
