// The product phases of the fused decode step (decode_step.cu): out[m, n] = rescale(sum_k
// x_q[m, k] * W[n, k]) for a CTA's contiguous range of output rows, every batch row at once.
//
// The scheme of the standalone GEMV (ternary/gemv.cu): 16-byte weight chunks decoded with
// shifts and masks, dp4a against the activation rows staged in shared memory as "planes"
// (plane (m, j) holds, per chunk, the 16 activation bytes that pair with bit pair j), lane l
// of a warp streams chunks l, l + 32, ... of R rows. Here all MT batch rows share one pass
// over the weights (MT = 1, 8 or 64: the smallest that holds the batch), the staged
// activations serve every row the CTA owns when the whole K fits in shared memory, and the
// activation offset sum(x) comes from the quantizing row phase. The integer sums are exact,
// so the outputs equal the standalone kernels' bit for bit (same rescale).
#pragma once

#include "common/ternary_format.h"
#include "cuda/ternary/epilogue.cuh"

namespace mmfree {
namespace cuda {
namespace decode {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 2;  // chunks per lane and row in flight
constexpr uint32_t kCodeMask = 0x03030303u;

// Rows per warp for a batch tile: enough to reuse each staged activation vector, few enough
// that R * MT accumulators stay in registers.
template <int MT> struct RowsPerWarp { static constexpr int value = MT <= 1 ? 4 : (MT <= 8 ? 2 : 1); };

// One product of a phase: int8 codes [M][code_stride] with their scales and code sums,
// packed weights [N][row_bytes(K)], the output [M][N] in T.
struct GemvJob {
  const int8_t* codes;
  const float* scale;
  const int* xsum;
  const uint8_t* packed;
  const float* w_scale;
  void* out;
  int64_t N;
};

__device__ __forceinline__ uint4 load_weights_stream(const uint4* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Codes k0..k0+15 of one row, zero past K (written by the row phase of this launch: L2).
__device__ __forceinline__ int4 load_codes16(const int8_t* row, int64_t k0, int64_t K) {
  if (k0 + 16 <= K) return __ldcg(reinterpret_cast<const int4*>(row + k0));
  uint32_t w[4] = {0, 0, 0, 0};
  for (int i = 0; i < 16; ++i) {
    if (k0 + i < K) w[i / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(__ldcg(reinterpret_cast<const signed char*>(row) + k0 + i))) << (8 * (i % 4));
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// Issues L2 prefetches of the weight bytes [begin, end) (16-byte aligned) across the CTA, so
// that the next product phase's weights stream from DRAM while this phase (and its grid
// barrier) runs: the weights do not depend on the activations.
__device__ __forceinline__ void prefetch_l2(const uint8_t* begin, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int64_t kPiece = 16 * 1024;  // one bulk prefetch per piece, pieces across threads
  for (int64_t off = static_cast<int64_t>(threadIdx.x) * kPiece; off < bytes; off += static_cast<int64_t>(kThreads) * kPiece) {
    const int64_t n = bytes - off < kPiece ? bytes - off : kPiece;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(begin + off), "r"(static_cast<uint32_t>(n & ~int64_t{15}))
                 : "memory");
  }
#else
  for (int64_t off = static_cast<int64_t>(threadIdx.x) * 128; off < bytes; off += static_cast<int64_t>(kThreads) * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(begin + off));
  }
#endif
}

// Stages codes of chunks [c_base, c_base + nch) of the first B rows (rows B..MT-1 as zeros).
template <int MT>
__device__ __forceinline__ void stage_codes(const GemvJob& jb, int B, int64_t K, int64_t code_stride, int64_t c_base,
                                            int nch, int4* xs) {
  __syncthreads();  // the previous slab (or row phase) is done with the buffer
  for (int m = 0; m < MT; ++m) {
    const int8_t* xrow = jb.codes + m * code_stride;
    for (int u = threadIdx.x; u < 4 * nch; u += kThreads) {
      const int j = u / nch;
      const int c = u - j * nch;
      const int64_t cg = c_base + c;
      const int64_t k0 = (cg / 2) * ternary::kBlockWeights + j * 32 + (cg % 2) * 16;
      xs[(m * 4 + j) * nch + c] = m < B ? load_codes16(xrow, k0, K) : make_int4(0, 0, 0, 0);
    }
  }
  __syncthreads();
}

// Output rows [r0, r1) of one product for the B (<= MT) batch rows. Block-uniform control
// flow: every thread of the CTA calls it with the same arguments. Pre: the CTA wrote the
// codes of the whole K into `xs` itself (the planes of stage_codes, rows past B arbitrary:
// their sums are never stored) and jb.scale / jb.xsum point to shared memory.
// WS (v3): the CTA's weight rows [r0, r1) were copied to shared memory at `wsm` (row r0
// first) by the previous phase; read them there instead of streaming them from global memory.
template <int MT, class T, bool Pre = false, bool WS = false>
__device__ void gemv_rows(const GemvJob& jb, int B, int64_t K, int64_t code_stride, int64_t r0, int64_t r1, int4* xs,
                          int slab_blocks, const uint8_t* wsm = nullptr) {
  constexpr int R = RowsPerWarp<MT>::value;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t rb = ternary::row_bytes(K);
  const int64_t nblocks = rb / ternary::kBlockBytes;
  if (Pre) slab_blocks = static_cast<int>(nblocks);
  const bool one_slab = nblocks <= slab_blocks;
  if (one_slab && !Pre) stage_codes<MT>(jb, B, K, code_stride, 0, static_cast<int>(nblocks) * 2, xs);
  for (int64_t base = r0; base < r1; base += static_cast<int64_t>(kWarps) * R) {
    const int64_t n0 = base + static_cast<int64_t>(warp) * R;
    int acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0;
    }
    for (int64_t b0 = 0; b0 < nblocks; b0 += slab_blocks) {
      const int nch = static_cast<int>(min(static_cast<int64_t>(slab_blocks), nblocks - b0)) * 2;
      if (!one_slab) stage_codes<MT>(jb, B, K, code_stride, b0 * 2, nch, xs);
      if (n0 >= r1) continue;  // warp-uniform
      const uint4* wrow[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t n = min(n0 + r, r1 - 1);  // rows past the range re-read the last one; not stored
        wrow[r] = reinterpret_cast<const uint4*>(WS ? wsm + (n - r0) * rb : jb.packed + n * rb) + b0 * 2;
      }
      for (int c0 = 0; c0 < nch; c0 += 32 * kUnroll) {
        uint4 w[kUnroll][R];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int c = c0 + u * 32 + lane;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (WS) {
              w[u][r] = c < nch ? wrow[r][c] : make_uint4(0, 0, 0, 0);
            } else {
              w[u][r] = c < nch ? load_weights_stream(wrow[r] + c) : make_uint4(0, 0, 0, 0);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int c = c0 + u * 32 + lane;
          if (c >= nch) continue;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            int q[R][4];
#pragma unroll
            for (int r = 0; r < R; ++r) {
              q[r][0] = static_cast<int>((w[u][r].x >> (2 * j)) & kCodeMask);
              q[r][1] = static_cast<int>((w[u][r].y >> (2 * j)) & kCodeMask);
              q[r][2] = static_cast<int>((w[u][r].z >> (2 * j)) & kCodeMask);
              q[r][3] = static_cast<int>((w[u][r].w >> (2 * j)) & kCodeMask);
            }
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              const int4 xv = xs[(m * 4 + j) * nch + c];
#pragma unroll
              for (int r = 0; r < R; ++r) {
                int a = acc[r][m];
                a = __dp4a(q[r][0], xv.x, a);
                a = __dp4a(q[r][1], xv.y, a);
                a = __dp4a(q[r][2], xv.z, a);
                a = __dp4a(q[r][3], xv.w, a);
                acc[r][m] = a;
              }
            }
          }
        }
      }
    }
    if (n0 >= r1) continue;
    const float ws = __ldg(jb.w_scale);
    T* out = static_cast<T*>(jb.out);
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int v = warp_sum_int(acc[r][m]);
        const int64_t n = n0 + r;
        if (lane == (r * MT + m) % 32 && m < B && n < r1) {
          const int xsum = Pre ? jb.xsum[m] : __ldcg(jb.xsum + m);
          const float xscale = Pre ? jb.scale[m] : __ldcg(jb.scale + m);
          out[m * jb.N + n] = ternary_kernels::rescale<T>(v - xsum, xscale, ws);
        }
      }
    }
  }
}

// The CTA's share of a phase of `njobs` products with the same K (job(q) gives product q):
// the rows of all of them, one after another, cut into gridDim.x contiguous ranges.
// Pre (see gemv_rows): product q's planes start at xs + q * MT * 4 * 2 * blocks(K).
// WS: the CTA's rows of all the products lie in shared memory at `wsm`, one after another (as
// stage_phase_weights in decode_kernel_v3.cuh copied them).
template <int MT, class T, bool Pre = false, bool WS = false, class JobOf>
__device__ void gemv_phase(JobOf job, int njobs, int B, int64_t K, int64_t code_stride, int4* xs, int slab_blocks,
                           const uint8_t* wsm = nullptr) {
  const int64_t rb = ternary::row_bytes(K);
  const int64_t planes = static_cast<int64_t>(MT) * 4 * 2 * (ternary::row_bytes(K) / ternary::kBlockBytes);
  int64_t total = 0;
  for (int q = 0; q < njobs; ++q) total += job(q).N;
  const int64_t r0 = total * blockIdx.x / gridDim.x, r1 = total * (blockIdx.x + 1) / gridDim.x;
  int64_t start = 0;
  for (int q = 0; q < njobs; ++q) {
    const GemvJob jb = job(q);
    const int64_t lo = max(r0, start), hi = min(r1, start + jb.N);
    if (lo < hi) {
      gemv_rows<MT, T, Pre, WS>(jb, B, K, code_stride, lo - start, hi - start, Pre ? xs + q * planes : xs, slab_blocks,
                                wsm);
      if (WS) wsm += (hi - lo) * rb;
    }
    start += jb.N;
  }
}

// Prefetch of the CTA's weight rows of a phase (the same split as gemv_phase).
template <class JobOf>
__device__ __forceinline__ void prefetch_phase(JobOf job, int njobs, int64_t K) {
  const int64_t rb = ternary::row_bytes(K);
  int64_t total = 0;
  for (int q = 0; q < njobs; ++q) total += job(q).N;
  const int64_t r0 = total * blockIdx.x / gridDim.x, r1 = total * (blockIdx.x + 1) / gridDim.x;
  int64_t start = 0;
  for (int q = 0; q < njobs; ++q) {
    const GemvJob jb = job(q);
    const int64_t lo = max(r0, start), hi = min(r1, start + jb.N);
    if (lo < hi) prefetch_l2(jb.packed + (lo - start) * rb, (hi - lo) * rb);
    start += jb.N;
  }
}

}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
