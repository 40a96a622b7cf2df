// The shared pieces of the mma.sync ternary GEMMs (gemm.cu: one CTA per output tile over
// all of K; gemm_split_k.cu: a thread-block cluster per tile, each CTA one slice of K):
// tile geometry, the cp.async stage loader and the main loop over a range of k-tiles.
// See gemm.cu for the fragment layout and the swizzles.
#pragma once

#include <algorithm>

#include "common/ternary_format.h"
#include "cuda/ternary/ptx.cuh"
#include "ternary.h"

namespace mmfree {
namespace cuda {
namespace ternary_kernels {
namespace mma_gemm {

using namespace ptx;

constexpr int kThreads = 256;
constexpr int kBN = 128;
constexpr int kBK = ternary::kBlockWeights;  // 128 k per stage
constexpr int kBRowBytes = ternary::kBlockBytes;  // 32 packed bytes per weight row and stage
constexpr int kStages = 4;
constexpr uint32_t kCodeMask = 0x03030303u;

template <int BM>
struct Tile {
  static constexpr int kWarpM = BM / 2;
  static constexpr int kMTiles = kWarpM / 16;
  static constexpr int kNTiles = (kBN / 4) / 8;
  static constexpr int kABytes = BM * kBK;
  static constexpr int kBBytes = kBN * kBRowBytes;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static constexpr int kAChunksPerThread = BM * (kBK / 16) / kThreads;
  static constexpr int kSumThreadsPerRow = kThreads / BM;
  static constexpr int kSumChunksPerThread = (kBK / 16) / kSumThreadsPerRow;
  static_assert(kBN * kBRowBytes / 16 == kThreads, "one B chunk per thread and stage");
};

using namespace ptx;

__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Activations k0..k0+15 of one row as 16 bytes, zero past K (any alignment).
__device__ __forceinline__ int4 load_x16_bytes(const int8_t* row, int64_t k0, int64_t K) {
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    if (k0 + i < K) w[i / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(row[k0 + i])) << (8 * (i % 4));
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// Copies k-tile kt into a stage: A (BM x 128 activations, swizzled) and B (128 weight rows
// x 32 packed bytes). Thread tid moves A chunk c = tid % 8 of rows tid / 8 + 32 i, so the
// row-dependent parts (pointer, swizzle) are computed once, before the k loop.
template <int BM, bool kVecA>
struct StageLoader {
  static constexpr int kRowStep = kThreads / (kBK / 16);  // 32 rows between a thread's A chunks
  const int8_t* a_src;     // row tid/8, chunk c, k = 0
  int64_t a_step;          // kRowStep rows of x
  int a_rows;              // how many of the thread's kAChunksPerThread rows are < M
  int a_k0;                // c * 16
  int a_dst;               // smem offset of the first A chunk
  int64_t K;
  const uint8_t* b_src;    // packed row, half, k-tile 0 (or any valid pointer)
  bool b_ok;
  int b_dst;

  __device__ __forceinline__ StageLoader(const TernaryMatmulParams& p, int64_t rb, int64_t m0, int64_t n0) {
    const int tid = threadIdx.x;
    const int row = tid / (kBK / 16);
    const int c = tid % (kBK / 16);
    const int64_t m = m0 + row;
    a_rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(Tile<BM>::kAChunksPerThread,
                                                                      (p.M - m + kRowStep - 1) / kRowStep)));
    a_src = p.x_q + (a_rows > 0 ? m * p.x_row_stride : 0);
    a_step = kRowStep * p.x_row_stride;
    a_k0 = c * 16;
    a_dst = row * kBK + ((c ^ (row & 7)) * 16);
    K = p.K;
    const int brow = tid / 2;
    const int half = tid % 2;
    b_ok = n0 + brow < p.N;
    b_src = b_ok ? p.packed + (n0 + brow) * rb + half * 16 : p.packed;
    b_dst = Tile<BM>::kABytes + brow * kBRowBytes + ((half ^ ((brow >> 2) & 1)) * 16);
  }

  __device__ __forceinline__ void load(int64_t kt, uint8_t* stage) const {
    const int64_t k0 = kt * kBK + a_k0;
    const int bytes = static_cast<int>(std::min<int64_t>(16, std::max<int64_t>(0, K - k0)));
#pragma unroll
    for (int i = 0; i < Tile<BM>::kAChunksPerThread; ++i) {
      uint8_t* dst = stage + a_dst + i * kRowStep * kBK;
      const bool live = i < a_rows;
      const int8_t* src = a_src + i * a_step + k0;
      if (kVecA) {
        const int n = live ? bytes : 0;
        cp_async16(smem_addr(dst), n > 0 ? src : a_src, n);
      } else {
        *reinterpret_cast<int4*>(dst) = live ? load_x16_bytes(src - k0, k0, K) : make_int4(0, 0, 0, 0);
      }
    }
    cp_async16(smem_addr(stage + b_dst), b_ok ? b_src + kt * kBRowBytes : b_src, b_ok ? 16 : 0);
  }
};

// Int32 accumulators of one CTA's BM x kBN output tile over k-tiles [kt0, kt1) (raw codes:
// sum x*c, the caller subtracts the row sums) and this thread's share of the activation
// row sums over the same range (row tid / kSumThreadsPerRow). Leaves no cp.async pending;
// the caller syncs before it reuses `smem`.
template <int BM, bool kVecA>
__device__ __forceinline__ void mainloop(const TernaryMatmulParams& p, int64_t m0, int64_t n0, int64_t kt0,
                                         int64_t kt1, uint8_t* smem,
                                         int (&acc)[Tile<BM>::kMTiles][Tile<BM>::kNTiles][4], int& my_sum) {
  using T = Tile<BM>;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 2;  // 0..1
  const int wn = warp & 3;   // 0..3
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t ntiles = kt1 - kt0;

#pragma unroll
  for (int i = 0; i < T::kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < T::kNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
  my_sum = 0;
  const int sum_row = tid / T::kSumThreadsPerRow;
  const int sum_c0 = (tid % T::kSumThreadsPerRow) * T::kSumChunksPerThread;

  const StageLoader<BM, kVecA> loader(p, rb, m0, n0);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) loader.load(kt0 + s, smem + s * T::kStageBytes);
    cp_async_commit();
  }

  for (int64_t it = 0; it < ntiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile it has landed for everyone; stage (it-1) % kStages is free
    const int64_t next = it + kStages - 1;
    if (next < ntiles) loader.load(kt0 + next, smem + (next % kStages) * T::kStageBytes);
    cp_async_commit();

    const uint8_t* a_tile = smem + (it % kStages) * T::kStageBytes;
    const uint8_t* b_tile = a_tile + T::kABytes;

    // Activation row sums for the code offset.
#pragma unroll
    for (int i = 0; i < T::kSumChunksPerThread; ++i) {
      const int c = sum_c0 + i;
      const int4 v = *reinterpret_cast<const int4*>(a_tile + sum_row * kBK + ((c ^ (sum_row & 7)) * 16));
      constexpr int kOnes = 0x01010101;
      my_sum = __dp4a(v.w, kOnes, __dp4a(v.z, kOnes, __dp4a(v.y, kOnes, __dp4a(v.x, kOnes, my_sum))));
    }

    uint32_t b_lo[T::kNTiles], b_hi[T::kNTiles];
#pragma unroll
    for (int nt = 0; nt < T::kNTiles; ++nt) {
      const int row = wn * (kBN / 4) + nt * 8 + g;
      const int s = (row >> 2) & 1;
      const uint8_t* base = b_tile + row * kBRowBytes + t * 4;
      b_lo[nt] = *reinterpret_cast<const uint32_t*>(base + s * 16);
      b_hi[nt] = *reinterpret_cast<const uint32_t*>(base + (s ^ 1) * 16);
    }

#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t a[T::kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < T::kMTiles; ++mt) {
        const int row = wm * T::kWarpM + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = 2 * j + (lane >> 4);
        ldmatrix_x4(a[mt], smem_addr(a_tile + row * kBK + ((c ^ (row & 7)) * 16)));
      }
#pragma unroll
      for (int nt = 0; nt < T::kNTiles; ++nt) {
        const uint32_t b0 = (b_lo[nt] >> (2 * j)) & kCodeMask;
        const uint32_t b1 = (b_hi[nt] >> (2 * j)) & kCodeMask;
#pragma unroll
        for (int mt = 0; mt < T::kMTiles; ++mt) mma_s8(acc[mt][nt], a[mt], b0, b1);
      }
    }
  }
  cp_async_wait<0>();
}

}  // namespace mma_gemm
}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
