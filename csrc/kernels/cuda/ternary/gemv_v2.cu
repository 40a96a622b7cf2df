// Decode GEMV v2 (M <= 16 activation rows per launch): one pass over the weights with all of
// a row's loads issued before any use, no shared memory and no barrier.
//
// Why not v1: v1 stages the activations in shared memory behind a __syncthreads, so every
// block pays two dependent memory latencies (x, then the weights) and few bytes are in
// flight per SM; at M = 16 its 248 registers left 8 warps per SM.
//
// Work split: a group of G lanes (G = 8, 16 or 32) owns one output row; a warp holds 32/G
// rows. Lane i of a group takes the row's 16-byte chunks i, i+G, ..., i+(U-1)G of a pass
// and loads all U of them (ld.global.nc, no L1 allocation) before decoding the first, so a
// pass has G*U*16 bytes of the row in flight (1 KB with G = 8, U = 8: the whole row for
// K <= 4096). The launcher picks G so that one pass covers the row where it can.
//
// Activations come straight from global memory through L1 (__ldg): x is 2.5-7 KB per row
// and every warp of the SM reuses it, so after the first touch it is an L1 hit; the lanes
// of the 32/G groups of a warp read the same addresses (a broadcast).
//
// Decode: chunk c of a row is half (c % 2) of block c / 2; bit pair j of its word q holds
// k = (c/2)*128 + j*32 + (c%2)*16 + 4q .. +3, i.e. one int32 word of four consecutive x.
// The 2-bit codes c = w + 1 become signed bytes w without a borrow between bytes:
//   ((code | 0x80) - 1) ^ 0x80 = code - 1   per byte (code + 127 never borrows),
// so dp4a(w, x) is the true product and no sum(x) correction is needed: 4 ALU ops per
// weight word shared by the M activation rows, then M dp4a. Accumulators are int32 (exact:
// |acc| <= 128 K). Positions k >= K have code 1 (w = 0) and read x as 0.
#include <algorithm>

#include "common/ternary_format.h"
#include "cuda/ternary/epilogue.cuh"
#include "cuda/ternary/launch.h"

namespace mmfree {
namespace cuda {
namespace ternary_kernels {
namespace {

constexpr int kWarps = 4;  // 128 threads: N = 2560 with G = 8 is 160 blocks (>= 132 SMs)
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 8;  // chunks per lane loaded before the first use
// At least 16 warps per SM (<= 128 registers): unbounded, the M = 1 kernel hoisted every
// activation load of the unrolled loop and took 168 registers (12 warps/SM).
constexpr int kMinBlocks = 4;
constexpr int kChunkBytes = 16;

__device__ __forceinline__ uint4 load_stream(const uint4* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// x[k0 .. k0+15] byte by byte, zero at k >= K: the row tail and unaligned rows. Kept out of
// line: inlined into every (chunk, bit pair, row) of the unrolled loop it made the kernel
// enormous, and it is not the fast path.
__device__ __noinline__ int4 load_x16_bytes(const int8_t* row, int64_t k0, int64_t K) {
  uint64_t lo = 0, hi = 0;  // bytes 0..7, 8..15 (no run-time indexed array: no local memory)
  for (int i = 0; i < kChunkBytes && k0 + i < K; ++i) {
    const uint64_t b = static_cast<uint8_t>(__ldg(row + k0 + i));
    if (i < 8) lo |= b << (8 * i);
    else hi |= b << (8 * (i - 8));
  }
  return make_int4(static_cast<int>(static_cast<uint32_t>(lo)), static_cast<int>(static_cast<uint32_t>(lo >> 32)),
                   static_cast<int>(static_cast<uint32_t>(hi)), static_cast<int>(static_cast<uint32_t>(hi >> 32)));
}

// x[k0 .. k0+15] of one activation row as four words, zero at k >= K. The vector path
// needs the row 16-byte aligned (x_vec) and the whole chunk inside K.
__device__ __forceinline__ int4 load_x16(const int8_t* row, int64_t k0, int64_t K, bool x_vec) {
  if (x_vec && k0 + kChunkBytes <= K) return __ldg(reinterpret_cast<const int4*>(row + k0));
  return load_x16_bytes(row, k0, K);
}

// Signed weights of bit pair j of one packed word: four bytes in {-1, 0, +1}.
__device__ __forceinline__ int decode(uint32_t word, int j) {
  const uint32_t code = (word >> (2 * j)) & 0x03030303u;
  return static_cast<int>(((code | 0x80808080u) - 0x01010101u) ^ 0x80808080u);
}

template <int MT, int G, class T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) gemv_v2_kernel(TernaryMatmulParams p, bool x_vec) {
  constexpr int kRowsPerWarp = 32 / G;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int li = lane % G;  // lane within the row's group
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRowsPerWarp + lane / G;
  const bool row_ok = n < p.N;
  const int64_t rb = ternary::row_bytes(p.K);
  const int nchunks = static_cast<int>(rb / kChunkBytes);  // 2 per 128-weight block
  // Groups past N read nothing (their loads are predicated off) and store nothing; they
  // still take part in the shuffles below, which need the whole warp.
  const uint4* wrow = reinterpret_cast<const uint4*>(p.packed + (row_ok ? n : 0) * rb);
  const int mrows = static_cast<int>(p.M);

  int acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0;

  for (int c0 = 0; c0 < nchunks; c0 += G * kUnroll) {
    uint4 w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * G + li;
      w[u] = (row_ok && c < nchunks) ? load_stream(wrow + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * G + li;
      if (!row_ok || c >= nchunks) continue;
      const int64_t kc = static_cast<int64_t>(c >> 1) * ternary::kBlockWeights + (c & 1) * kChunkBytes;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int q0 = decode(w[u].x, j);
        const int q1 = decode(w[u].y, j);
        const int q2 = decode(w[u].z, j);
        const int q3 = decode(w[u].w, j);
        const int64_t k0 = kc + j * 32;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m >= mrows) break;
          const int4 xv = load_x16(p.x_q + m * p.x_row_stride, k0, p.K, x_vec);
          int a = acc[m];
          a = __dp4a(q0, xv.x, a);
          a = __dp4a(q1, xv.y, a);
          a = __dp4a(q2, xv.z, a);
          a = __dp4a(q3, xv.w, a);
          acc[m] = a;
        }
      }
    }
  }

  // Sum over the G lanes of the group (xor offsets < G stay inside it).
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  }

  if (!row_ok) return;
  const float ws = *p.w_scale;
  T* out = static_cast<T*>(p.out);
  // Every lane of the group holds all sums; spread the M stores over the group's lanes.
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < mrows && li == m % G) out[m * p.N + n] = rescale<T>(acc[m], p.x_scale[m], ws);
  }
}

template <int MT, int G, class T>
cudaError_t launch_v2(const TernaryMatmulParams& p, bool x_vec, cudaStream_t stream) {
  constexpr int rows_per_block = kWarps * (32 / G);
  const int64_t grid = ceil_div(p.N, static_cast<int64_t>(rows_per_block));
  gemv_v2_kernel<MT, G, T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, x_vec);
  return cudaGetLastError();
}

template <int G, class T>
cudaError_t launch_m(const TernaryMatmulParams& p, bool x_vec, cudaStream_t stream) {
  if (p.M <= 1) return launch_v2<1, G, T>(p, x_vec, stream);
  if (p.M <= 2) return launch_v2<2, G, T>(p, x_vec, stream);
  if (p.M <= 4) return launch_v2<4, G, T>(p, x_vec, stream);
  if (p.M <= 8) return launch_v2<8, G, T>(p, x_vec, stream);
  return launch_v2<16, G, T>(p, x_vec, stream);
}

}  // namespace

cudaError_t launch_gemv_v2(const TernaryMatmulParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(p.packed) % 16 != 0) return cudaErrorInvalidValue;
  // One pass over the row when it fits (G * kUnroll chunks of 16 bytes): 8 lanes per row
  // up to K = 4096, 16 up to 8192, else 32 and several passes.
  const int64_t nchunks = ternary::row_bytes(p.K) / kChunkBytes;
  const int g = nchunks <= 8 * kUnroll ? 8 : nchunks <= 16 * kUnroll ? 16 : 32;
  const int64_t esize = dtype_size(p.out_dtype);
  cudaError_t err = cudaSuccess;
  for (int64_t m0 = 0; m0 < p.M; m0 += kGemvMaxRows) {
    TernaryMatmulParams q = p;
    q.M = std::min<int64_t>(kGemvMaxRows, p.M - m0);
    q.x_q = p.x_q + m0 * p.x_row_stride;
    q.x_scale = p.x_scale + m0;
    q.out = static_cast<char*>(p.out) + m0 * p.N * esize;
    const bool x_vec = reinterpret_cast<uintptr_t>(q.x_q) % 16 == 0 && q.x_row_stride % 16 == 0;
    MMFREE_TERNARY_DISPATCH_OUT(p.out_dtype, T, {
      if (g == 8) err = launch_m<8, T>(q, x_vec, stream);
      else if (g == 16) err = launch_m<16, T>(q, x_vec, stream);
      else err = launch_m<32, T>(q, x_vec, stream);
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
