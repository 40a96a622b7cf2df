// Prefill GEMM on Hopper: int8 wgmma (sm_90a only; compiled with -gencode
// arch=compute_90a,code=sm_90a, see CMakeLists.txt), the ternary codes decoded to signed
// int8 inside the shared-memory pipeline.
//
// out[m, n] = rescale(sum_k x[m, k] * w[n, k]). Both wgmma operands are K-major tiles in
// shared memory in the 128-byte swizzle: A = x (128 rows x 128 k), B = W decoded (BN rows
// x 128 k). One packed block (128 weights, 32 bytes) per row and stage, so a stage's row is
// exactly one 128-byte swizzle row and chunk c (16 k) of row r sits at chunk c ^ (r % 8).
//
// Warp specialization, 384 threads:
// * warpgroup 0, the producer: cp.async of the A tile (zero fill past M and K; byte loads
//   where x rows are not 16-byte aligned), and the B decode: the packed 32 bytes of a row
//   are loaded to registers one stage ahead, and each bit pair j of 16-byte half h becomes
//   chunk 2j + h of the decoded row (code c -> c - 1 as (c + 0x7F) ^ 0x80 per byte), stored
//   swizzled. It signals full[s] (count: one cp.async arrival plus one plain arrival per
//   producer thread) and waits on empty[s] before reusing a stage.
// * warpgroups 1 and 2, the consumers: rows 0..63 and 64..127 of the tile, four
//   wgmma.m64nBNk32 per stage into BN/2 int32 registers per thread, one wgmma group in
//   flight while the next is issued; each releases a stage (empty[s]) once its wgmma reads
//   are done, and at the end of a tile runs the rescale epilogue from registers while the
//   producer already fills the stages of its next tile.
// * Persistent: min(tiles, SMs) blocks walk the tiles (M fastest, so co-resident blocks
//   share a W column tile) with a stride of the grid.
// * Split-K (MMFREE_TERNARY_SM90_SPLITK, for shapes with fewer tiles than SMs, e.g. M = 512
//   x N = 2560: 40 tiles of 128 x 256 on 132 SMs): a thread-block cluster of S CTAs (2..8)
//   per tile, one tile per cluster, rank r running the same pipeline over k-tiles
//   [r*kt/S, (r+1)*kt/S). After the main loop the stage memory is free (every stage was
//   consumed); consumer warp w (0..7) of every CTA belongs to rank w*S/8: the other ranks
//   store their int32 accumulators of warp w's rows there, a cluster barrier, and rank
//   w*S/8 adds them (DSMEM, 16-byte loads) into its registers and runs the usual epilogue.
//   No workspace, no atomics, no memset, one plain (cluster) launch: graph-safe; int32
//   sums are exact, so the output is bit-identical to the unsplit kernel's.
// * Int8 weights (kDenseB; TernaryGemmImpl::kSm90Int8): the packed weights are first
//   expanded to signed int8 rows in a workspace (unpack_int8.cu, [N, 128 * blocks], zeros
//   past K); with 16-byte aligned x rows (kTma) one producer thread then loads both tiles
//   with TMA (cp.async.bulk.tensor, the 128-byte swizzle done by the copy engine, bytes
//   counted on the full barrier, zero fill past M, N and K), so no tile byte passes through
//   the LSU/L1 path that the cp.async producer keeps busy; with unaligned x rows the
//   producer copies B with cp.async beside its byte loads of A. The expansion costs
//   N x K x 1.25 bytes of traffic, a few percent of a large product.
// Integer products and int32 sums are exact, so the result is bit-identical to gemm.cu's
// and to the reference whatever the order.
#include <cooperative_groups.h>
#include <cuda.h>  // CUtensorMap (types only: the encoder comes from the runtime's driver entry point)
#include <cudaTypedefs.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/ternary_format.h"
#include "cuda/smem_optin.h"
#include "cuda/ternary/epilogue.cuh"
#include "cuda/ternary/launch.h"
#include "cuda/ternary/ptx.cuh"
#include "cuda/ternary/wgmma.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "gemm_sm90.cu uses wgmma: compile it with -gencode arch=compute_90a,code=sm_90a only"
#endif

namespace mmfree {
namespace cuda {
namespace ternary_kernels {
namespace {

using namespace ptx;

constexpr int kBM = 128;                       // two consumer warpgroups x 64 rows
constexpr int kBK = ternary::kBlockWeights;    // 128 k per stage = one packed block
constexpr int kProducerThreads = 128;
constexpr int kConsumerThreads = 256;
constexpr int kThreads = kProducerThreads + kConsumerThreads;
constexpr int kSwizzleAlign = 1024;            // a 128-byte-swizzle atom: 8 rows x 128 bytes

template <int BN>
struct Cfg {
  static constexpr int kStages = BN == 256 ? 4 : 6;
  static constexpr int kABytes = kBM * kBK;
  static constexpr int kBBytes = BN * kBK;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kSmemBytes = kSwizzleAlign + kStages * kStageBytes + 2 * kStages * 8;
  static constexpr int kAccRegs = BN / 2;
  static constexpr int kRowsPerProducer = BN / kProducerThreads;
  static_assert(BN % kProducerThreads == 0, "whole B rows per producer thread");
  static_assert(kStageBytes % kSwizzleAlign == 0, "stages keep the atom alignment");
};

// Activations k0..k0+15 of one row as 16 bytes, zero past K (any alignment).
__device__ __forceinline__ int4 load_x16_bytes(const int8_t* row, int64_t k0, int64_t K) {
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    if (k0 + i < K) w[i / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(row[k0 + i])) << (8 * (i % 4));
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// Four codes per byte lane at bit pair j -> four signed weights: (c + 0x7F) ^ 0x80 = c - 1
// per byte (c <= 2, so no carry crosses a byte).
__device__ __forceinline__ uint32_t decode4(uint32_t packed, int j) {
  return (((packed >> (2 * j)) & 0x03030303u) + 0x7F7F7F7Fu) ^ 0x80808080u;
}

// TMA descriptors of the x tile (box 128 k x 128 rows) and the int8 weight tile (128 k x BN
// rows), both 128-byte swizzled; unused by the other instances.
struct TmaMaps {
  CUtensorMap a, b;
};

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// One 2-D tile: box at (c0 along the inner dim, c1 rows) into shared memory at dst, its
// bytes completing on the mbarrier at bar.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// Tiles [tile0, tiles) of the product's grid (a tail launch starts past the full waves).
struct TileMap {
  int64_t m_tiles, tile0, tiles;
  int ktiles;
  int splits;  // CTAs per cluster along K; 1: no cluster, persistent blocks
  const int8_t* w_i8;  // kDenseB: the expanded weights, [N, ktiles * kBK]
  __device__ __forceinline__ int64_t m0(int64_t tile) const { return (tile % m_tiles) * kBM; }
  template <int BN>
  __device__ __forceinline__ int64_t n0(int64_t tile) const {
    return (tile / m_tiles) * BN;
  }
};

// The tiles this block walks (first, first + stride, ... < tiles) and its k-tiles of each.
struct Work {
  int64_t first, stride;
  int kt0, kt1;
  int rank;  // in the cluster (0 without split)
};

template <bool kSplit>
__device__ __forceinline__ Work work_of(const TileMap& map) {
  Work w;
  if constexpr (kSplit) {  // one tile per cluster, the cluster's ranks along K
    w.rank = static_cast<int>(cluster_ctarank());
    w.first = map.tile0 + blockIdx.x / map.splits;
    w.stride = map.tiles;
    w.kt0 = static_cast<int>(static_cast<int64_t>(map.ktiles) * w.rank / map.splits);
    w.kt1 = static_cast<int>(static_cast<int64_t>(map.ktiles) * (w.rank + 1) / map.splits);
  } else {
    w.rank = 0;
    w.first = map.tile0 + blockIdx.x;
    w.stride = gridDim.x;
    w.kt0 = 0;
    w.kt1 = map.ktiles;
  }
  return w;
}

template <int BN, bool kVecA, bool kDenseB>
__device__ __forceinline__ void producer(const TernaryMatmulParams& p, const TileMap& map, const Work& work,
                                         uint8_t* smem, uint32_t bars) {
  using C = Cfg<BN>;
  const int pt = threadIdx.x;  // 0..127
  const int xc = pt & 7;       // the A chunk (16 k) this thread copies
  const int xr0 = pt >> 3;     // its first A row; then every 16th
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t tiles_here = map.tiles > work.first ? (map.tiles - 1 - work.first) / work.stride + 1 : 0;
  const int64_t iters = tiles_here * (work.kt1 - work.kt0);

  uint4 next[C::kRowsPerProducer][2];
  auto load_packed = [&](int64_t tile, int kt) {
    if constexpr (kDenseB) return;  // B comes by cp.async
    const int64_t n0 = map.template n0<BN>(tile);
#pragma unroll
    for (int r = 0; r < C::kRowsPerProducer; ++r) {
      const int64_t n = n0 + pt + r * kProducerThreads;
      if (n < p.N) {
        const uint4* src = reinterpret_cast<const uint4*>(p.packed + n * rb + kt * ternary::kBlockBytes);
        next[r][0] = __ldg(src);
        next[r][1] = __ldg(src + 1);
      } else {  // rows past N: zero weights (their outputs are not stored)
        const unsigned z = 0x55555555u;
        next[r][0] = next[r][1] = make_uint4(z, z, z, z);
      }
    }
  };

  int64_t tile = work.first;
  int kt = work.kt0;
  int stage = 0;
  uint32_t phase = 0;
  if (iters > 0) load_packed(tile, kt);
  for (int64_t it = 0; it < iters; ++it) {
    uint4 cur[C::kRowsPerProducer][2];
#pragma unroll
    for (int r = 0; r < C::kRowsPerProducer; ++r) cur[r][0] = next[r][0], cur[r][1] = next[r][1];
    int64_t ntile = tile;
    int nkt = kt + 1;
    if (nkt == work.kt1) nkt = work.kt0, ntile += work.stride;
    if (it + 1 < iters) load_packed(ntile, nkt);  // in flight while this stage is written

    const uint32_t full = bars + 8 * stage;
    const uint32_t empty = bars + 8 * (C::kStages + stage);
    mbar_wait(empty, phase ^ 1);
    uint8_t* a_tile = smem + stage * C::kStageBytes;
    uint8_t* b_tile = a_tile + C::kABytes;

    const int64_t m0 = map.m0(tile);
    const int64_t k0 = static_cast<int64_t>(kt) * kBK + xc * 16;
    const int64_t k_left = p.K - k0;
    const int kbytes = k_left >= 16 ? 16 : (k_left > 0 ? static_cast<int>(k_left) : 0);
#pragma unroll
    for (int i = 0; i < kBM / 16; ++i) {
      const int row = xr0 + 16 * i;
      const int64_t m = m0 + row;
      uint8_t* dst = a_tile + row * kBK + ((xc ^ (row & 7)) * 16);
      if (kVecA) {
        const int n = m < p.M ? kbytes : 0;
        cp_async16(smem_addr(dst), n > 0 ? p.x_q + m * p.x_row_stride + k0 : p.x_q, n);
      } else {
        *reinterpret_cast<int4*>(dst) = m < p.M ? load_x16_bytes(p.x_q + m * p.x_row_stride, k0, p.K)
                                                : make_int4(0, 0, 0, 0);
      }
    }
    if constexpr (kDenseB) {  // B rows like the A rows: chunk xc of rows xr0 + 16 i
      const int64_t n0 = map.template n0<BN>(tile);
      const int64_t ldw = static_cast<int64_t>(map.ktiles) * kBK;
#pragma unroll
      for (int i = 0; i < BN / 16; ++i) {
        const int row = xr0 + 16 * i;
        const int64_t n = n0 + row;
        uint8_t* dst = b_tile + row * kBK + ((xc ^ (row & 7)) * 16);
        // Rows past N: zero fill (their outputs are not stored).
        cp_async16(smem_addr(dst), n < p.N ? map.w_i8 + n * ldw + static_cast<int64_t>(kt) * kBK + xc * 16 : map.w_i8,
                   n < p.N ? 16 : 0);
      }
    }
    if (kVecA || kDenseB) cp_async_mbar_arrive(full);

#pragma unroll
    for (int r = 0; r < (kDenseB ? 0 : C::kRowsPerProducer); ++r) {
      const int row = pt + r * kProducerThreads;
      uint8_t* brow = b_tile + row * kBK;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4 w = cur[r][h];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = 2 * j + h;
          const uint4 v = make_uint4(decode4(w.x, j), decode4(w.y, j), decode4(w.z, j), decode4(w.w, j));
          *reinterpret_cast<uint4*>(brow + ((c ^ (row & 7)) * 16)) = v;
        }
      }
    }
    if (!kVecA || !kDenseB) fence_proxy_async();  // generic-proxy stores above, before wgmma reads them
    mbar_arrive(full);

    if (++stage == C::kStages) stage = 0, phase ^= 1;
    tile = ntile;
    kt = nkt;
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// kTma: thread 0 of the producer warpgroup issues both tiles of every stage; full[s] counts
// one arrival (its expect_tx) plus the stage's bytes.
template <int BN>
__device__ __forceinline__ void producer_tma(const TileMap& map, const Work& work, const TmaMaps& maps,
                                             uint8_t* smem, uint32_t bars) {
  using C = Cfg<BN>;
  if (threadIdx.x != 0) return;
  const int64_t tiles_here = map.tiles > work.first ? (map.tiles - 1 - work.first) / work.stride + 1 : 0;
  int64_t tile = work.first;
  int kt = work.kt0;
  int stage = 0;
  uint32_t phase = 0;
  for (int64_t it = 0, iters = tiles_here * (work.kt1 - work.kt0); it < iters; ++it) {
    const uint32_t full = bars + 8 * stage;
    mbar_wait(bars + 8 * (C::kStages + stage), phase ^ 1);
    const uint32_t a_tile = smem_addr(smem + stage * C::kStageBytes);
    mbar_arrive_expect_tx(full, C::kStageBytes);
    tma_load_2d(a_tile, &maps.a, kt * kBK, static_cast<int>(map.m0(tile)), full);
    tma_load_2d(a_tile + C::kABytes, &maps.b, kt * kBK, static_cast<int>(map.template n0<BN>(tile)), full);
    if (++stage == C::kStages) stage = 0, phase ^= 1;
    if (++kt == work.kt1) kt = work.kt0, tile += work.stride;
  }
}

template <int BN, class OutT>
__device__ __forceinline__ void store_tile(const TernaryMatmulParams& p, const int (&acc)[Cfg<BN>::kAccRegs],
                                           int64_t m0, int64_t n0, int wg, int ct, float ws) {
  const int warp = ct >> 5;
  const int lane = ct & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  OutT* out = static_cast<OutT*>(p.out);
  const bool pair_ok = (p.N % 2) == 0;  // then (m*N + even n) keeps 2-element alignment
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t m = m0 + wg * 64 + warp * 16 + g + h * 8;
    if (m >= p.M) continue;
    const float xs = p.x_scale[m];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int64_t n = n0 + 8 * j + 2 * t;
      if (n >= p.N) break;
      const OutT v0 = rescale<OutT>(acc[4 * j + 2 * h], xs, ws);
      const OutT v1 = rescale<OutT>(acc[4 * j + 2 * h + 1], xs, ws);
      OutT* dst = out + m * p.N + n;
      if (pair_ok) {
        if constexpr (sizeof(OutT) == 4) {
          float2 v;
          v.x = v0;
          v.y = v1;
          *reinterpret_cast<float2*>(dst) = v;
        } else {
          OutT pair[2] = {v0, v1};
          *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(pair);
        }
      } else {
        dst[0] = v0;
        if (n + 1 < p.N) dst[1] = v1;
      }
    }
  }
}

// Split-K: adds the other ranks' accumulators of this thread's outputs into `acc` where
// this thread's warp belongs to this rank (returns true: it stores the tile's rows), else
// leaves its own accumulators there for the owning rank (returns false). `red` is this
// CTA's stage memory (free after the main loop); chunk j (4 ints) of consumer thread ct
// sits at int4 j * kConsumerThreads + ct, so a warp's 16-byte accesses are contiguous.
template <int BN>
__device__ __forceinline__ bool reduce_split(int (&acc)[Cfg<BN>::kAccRegs], uint8_t* smem, int ct, int rank,
                                             int splits) {
  constexpr int kChunks = Cfg<BN>::kAccRegs / 4;
  static_assert(kChunks * kConsumerThreads * 16 <= Cfg<BN>::kStages * Cfg<BN>::kStageBytes,
                "the partials fit in the stage memory");
  int4* red = reinterpret_cast<int4*>(smem);
  const int owner = (ct >> 5) * splits / (kConsumerThreads / 32);
  // Every consumer's wgmma reads of the stages are complete (each waited on its own group)
  // and every producer write is done before any thread overwrites the stages: barrier 1
  // over all 384 threads (the producers arrive after their loop; a CTA barrier that
  // racecheck sees, where the mbarrier ordering alone would already suffice).
  named_barrier_sync(1, kThreads);
  if (owner != rank) {
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      red[j * kConsumerThreads + ct] = make_int4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
  cluster_sync();  // every rank's partials written and visible cluster-wide
  if (owner != rank) return false;
  // Eight 16-byte loads in flight per thread (32 registers on top of the accumulators),
  // from one generic DSMEM pointer per rank with immediate offsets (a mapa per load made
  // ptxas keep 32 addresses and spill at the 168-register cap of the 256-wide tile).
  constexpr int kGroup = 8;
  static_assert(kChunks % kGroup == 0, "whole groups of chunks");
  for (int q = 0; q < splits; ++q) {  // rank order (int32 sums are exact in any order)
    if (q == rank) continue;
    const int4* remote = cooperative_groups::this_cluster().map_shared_rank(red + ct, q);
#pragma unroll
    for (int j0 = 0; j0 < kChunks; j0 += kGroup) {
      int4 v[kGroup];
#pragma unroll
      for (int j = 0; j < kGroup; ++j) v[j] = remote[(j0 + j) * kConsumerThreads];
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        acc[4 * (j0 + j)] += v[j].x;
        acc[4 * (j0 + j) + 1] += v[j].y;
        acc[4 * (j0 + j) + 2] += v[j].z;
        acc[4 * (j0 + j) + 3] += v[j].w;
      }
    }
  }
  return true;
}

// One tile's k-tiles [kt0, kt1) (kt1 > kt0) into `acc`, releasing each stage once its
// wgmma reads are done; returns with every wgmma complete and the last stage released.
template <int BN, bool kTma>
__device__ __forceinline__ void mma_tile(int (&acc)[Cfg<BN>::kAccRegs], uint32_t smem_base, uint32_t bars, int wg,
                                         int kt0, int kt1, int& stage, uint32_t& phase) {
  using C = Cfg<BN>;
  int prev = 0;
  for (int kt = kt0; kt < kt1; ++kt) {
    mbar_wait(bars + 8 * stage, phase);
    // cp.async writes tiles in the generic proxy, seen here through the barrier; TMA
    // writes them in the async proxy that wgmma reads, so it needs no fence.
    if constexpr (!kTma) fence_proxy_async();
    const uint32_t a = smem_base + stage * C::kStageBytes + wg * 64 * kBK;
    const uint32_t b = smem_base + stage * C::kStageBytes + C::kABytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 32; ++kk) {
      const uint64_t da = sw128_desc(a + 32 * kk);
      const uint64_t db = sw128_desc(b + 32 * kk);
      if constexpr (BN == 256) {
        wgmma_m64n256k32_s8(acc, da, db, kt != kt0 || kk != 0);
      } else {
        wgmma_m64n128k32_s8(acc, da, db, kt != kt0 || kk != 0);
      }
    }
    wgmma_commit();
    if (kt > kt0) {
      wgmma_wait<1>();  // the previous stage's reads are done
      mbar_arrive(bars + 8 * (C::kStages + prev));
    }
    prev = stage;
    if (++stage == C::kStages) stage = 0, phase ^= 1;
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < C::kAccRegs; ++i) reg_fence(acc[i]);
  mbar_arrive(bars + 8 * (C::kStages + prev));
}

// Split: the cluster's one tile over this rank's k-tiles (the host keeps S <= k-tiles, so
// no slice is empty), the reduction, the owning rank's epilogue. Kept free of a tile loop:
// accumulators written in a divergent path (the owners' adds) must not reach a later
// wgmma, or ptxas serializes every wgmma of the kernel (C7518).
template <int BN, class OutT, bool kSplit, bool kTma>
__device__ __forceinline__ void consumer(const TernaryMatmulParams& p, const TileMap& map, const Work& w,
                                         uint8_t* smem, uint32_t bars) {
  using C = Cfg<BN>;
  const uint32_t smem_base = smem_addr(smem);
  const int ct = threadIdx.x - kProducerThreads;  // 0..255
  const int wg = ct >> 7;                         // 0: tile rows 0..63, 1: rows 64..127
  const float ws = *p.w_scale;
  int acc[C::kAccRegs];
  int stage = 0;
  uint32_t phase = 0;
  if constexpr (kSplit) {
    mma_tile<BN, kTma>(acc, smem_base, bars, wg, w.kt0, w.kt1, stage, phase);
    if (reduce_split<BN>(acc, smem, ct, w.rank, map.splits)) {
      store_tile<BN, OutT>(p, acc, map.m0(w.first), map.template n0<BN>(w.first), wg, ct & 127, ws);
    }
  } else {
    for (int64_t tile = w.first; tile < map.tiles; tile += w.stride) {
      mma_tile<BN, kTma>(acc, smem_base, bars, wg, 0, map.ktiles, stage, phase);
      store_tile<BN, OutT>(p, acc, map.m0(tile), map.template n0<BN>(tile), wg, ct & 127, ws);
    }
  }
}

// kTma (with kVecA and kDenseB): both tiles by TMA through `maps`.
template <int BN, bool kVecA, class OutT, bool kSplit, bool kDenseB, bool kTma>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(TernaryMatmulParams p, TileMap map, const __grid_constant__ TmaMaps maps) {
  static_assert(!kTma || (kVecA && kDenseB), "TMA loads aligned x rows and int8 weights");
  using C = Cfg<BN>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + kSwizzleAlign - 1) & ~static_cast<uint32_t>(kSwizzleAlign - 1);
  uint8_t* smem = smem_raw + (base - raw);
  const uint32_t bars = base + C::kStages * C::kStageBytes;  // full[kStages], then empty[kStages]
  if (threadIdx.x == 0) {
    for (int s = 0; s < C::kStages; ++s) {
      mbar_init(bars + 8 * s, kTma ? 1 : (kVecA || kDenseB ? 2 * kProducerThreads : kProducerThreads));
      mbar_init(bars + 8 * (C::kStages + s), kConsumerThreads);
    }
    mbar_init_fence();
  }
  __syncthreads();
  const Work w = work_of<kSplit>(map);
  if (threadIdx.x < kProducerThreads) {
    if constexpr (kTma) {
      producer_tma<BN>(map, w, maps, smem, bars);
      __syncwarp();  // lane 0 issued the copies alone: warp 0 whole again before the aligned barriers
    } else {
      producer<BN, kVecA, kDenseB>(p, map, w, smem, bars);
    }
    if constexpr (kSplit) {  // the two barriers of reduce_split: stages free, partials written
      named_barrier_sync(1, kThreads);
      cluster_sync();
    }
  } else {
    consumer<BN, OutT, kSplit, kTma>(p, map, w, smem, bars);
  }
  // No CTA leaves while the other ranks may still read its shared memory.
  if constexpr (kSplit) cluster_sync();
}

template <int BN, bool kVecA, class OutT, bool kSplit, bool kDenseB, bool kTma>
cudaError_t launch_cfg(const TernaryMatmulParams& p, const int8_t* w_i8, const TmaMaps& maps, int sms, int splits,
                       int64_t tile0, int64_t tile1, cudaStream_t stream) {
  constexpr int smem = Cfg<BN>::kSmemBytes;
  auto kernel = gemm_sm90_kernel<BN, kVecA, OutT, kSplit, kDenseB, kTma>;
  static std::atomic<uint64_t> raised{0};
  cudaError_t err = raise_smem_once(kernel, smem, raised);
  if (err != cudaSuccess) return err;
  TileMap map;
  map.m_tiles = (p.M + kBM - 1) / kBM;
  map.tile0 = tile0;
  map.tiles = tile1 < 0 ? map.m_tiles * ((p.N + BN - 1) / BN) : tile1;
  map.ktiles = static_cast<int>(ternary::blocks_per_row(p.K));
  map.splits = kSplit ? splits : 1;
  map.w_i8 = w_i8;
  const int64_t launched = map.tiles - map.tile0;
  if constexpr (!kSplit) {
    const int grid = static_cast<int>(std::min<int64_t>(launched, sms));
    kernel<<<grid, kThreads, smem, stream>>>(p, map, maps);
    return cudaGetLastError();
  }
  if (launched * splits > INT32_MAX) return cudaErrorInvalidValue;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(launched * splits), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(splits);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, p, map, maps);
}

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

// The driver's tensor-map encoder through the runtime (no link against libcuda); nullptr
// where the driver has none.
EncodeTiled tensor_map_encoder() {
  static const EncodeTiled fn = [] {
#if CUDART_VERSION < 12050
    return static_cast<EncodeTiled>(nullptr);  // no versioned entry-point query before CUDA 12.5
#else
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(f);
#endif
  }();
  return fn;
}

// An int8 [rows, cols] matrix with rows `stride` bytes apart, in boxes of 128 columns x
// box_rows rows, 128-byte swizzled (the layout the wgmma descriptors expect), zero fill
// outside the matrix.
bool encode_int8_tiles(CUtensorMap* map, const void* base, int64_t cols, int64_t rows, int64_t stride, int box_rows) {
  const EncodeTiled encode = tensor_map_encoder();
  if (encode == nullptr || rows > INT32_MAX || cols > INT32_MAX) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(stride)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t unit[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box, unit,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Tiles [tile0, tile1) of the BN-wide grid (tile1 = -1: to the end).
template <bool kSplit, class OutT, int BN>
cudaError_t launch_bn(const TernaryMatmulParams& p, const int8_t* w_i8, int sms, int splits, cudaStream_t stream,
                      int64_t tile0 = 0, int64_t tile1 = -1) {
  const bool vec_a = reinterpret_cast<uintptr_t>(p.x_q) % 16 == 0 && p.x_row_stride % 16 == 0;
  TmaMaps maps;
  std::memset(&maps, 0, sizeof(maps));
  if (w_i8 != nullptr) {
    const int64_t ldw = ternary::blocks_per_row(p.K) * kBK;
    if (vec_a && encode_int8_tiles(&maps.a, p.x_q, p.K, p.M, p.x_row_stride, kBM) &&
        encode_int8_tiles(&maps.b, w_i8, ldw, p.N, ldw, BN)) {
      return launch_cfg<BN, true, OutT, kSplit, true, true>(p, w_i8, maps, sms, splits, tile0, tile1, stream);
    }
    // Unaligned x rows: cp.async of B beside A's byte loads. No encoder in the driver: the
    // decoding kernel (the packed weights are still there).
    return vec_a ? launch_cfg<BN, true, OutT, kSplit, false, false>(p, nullptr, maps, sms, splits, tile0, tile1, stream)
                 : launch_cfg<BN, false, OutT, kSplit, true, false>(p, w_i8, maps, sms, splits, tile0, tile1, stream);
  }
  return vec_a ? launch_cfg<BN, true, OutT, kSplit, false, false>(p, nullptr, maps, sms, splits, tile0, tile1, stream)
               : launch_cfg<BN, false, OutT, kSplit, false, false>(p, nullptr, maps, sms, splits, tile0, tile1, stream);
}

// w_i8: the expanded weights (kDenseB instances) or nullptr (the decoding producer).
// The full waves of the BN-wide grid persistent, then its tail split over K (sm90_tail_splits).
template <class OutT, int BN>
cudaError_t launch_waves(const TernaryMatmulParams& p, const int8_t* w_i8, int sms, bool tail, cudaStream_t stream) {
  const int64_t tiles = ((p.M + kBM - 1) / kBM) * ((p.N + BN - 1) / BN);
  const int ways = tail ? sm90_tail_splits(tiles, ternary::blocks_per_row(p.K), sms) : 1;
  if (ways < 2) return launch_bn<false, OutT, BN>(p, w_i8, sms, 1, stream);
  const int64_t full = tiles / sms * sms;
  const cudaError_t err = launch_bn<false, OutT, BN>(p, w_i8, sms, 1, stream, 0, full);
  if (err != cudaSuccess) return err;
  return launch_bn<true, OutT, BN>(p, w_i8, sms, ways, stream, full, tiles);
}

template <class OutT>
cudaError_t launch_typed(const TernaryMatmulParams& p, const int8_t* w_i8, int sms, int splits, bool tail,
                         cudaStream_t stream) {
  // 256-wide tiles read A once per 256 outputs instead of 128 (less shared-memory traffic
  // per wgmma); 128-wide ones where the 256-wide grid would leave SMs idle. Split: the
  // 256-wide tile where its split grid still fits on the SMs in one wave.
  const int64_t tiles256 = ((p.M + kBM - 1) / kBM) * ((p.N + 255) / 256);
  // At least one k-tile per rank (K = 64 with S = 8 runs unsplit): the consumers then have
  // no empty-slice branch around their wgmmas.
  splits = static_cast<int>(std::min<int64_t>(splits, ternary::blocks_per_row(p.K)));
  if (splits > 1) {
    return tiles256 * splits <= sms ? launch_bn<true, OutT, 256>(p, w_i8, sms, splits, stream)
                                    : launch_bn<true, OutT, 128>(p, w_i8, sms, splits, stream);
  }
  return tiles256 >= sms ? launch_waves<OutT, 256>(p, w_i8, sms, tail, stream)
                         : launch_waves<OutT, 128>(p, w_i8, sms, tail, stream);
}

}  // namespace

namespace {

cudaError_t launch_sm90(const TernaryMatmulParams& p, const int8_t* w_i8, cudaStream_t stream) {
  int dev = 0, sms = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (err != cudaSuccess) return err;
  if (major != 9 || minor != 0) return cudaErrorNotSupported;
  const int mode = sm90_split_override();
  if (mode == kSplitKInvalid) return cudaErrorInvalidValue;
  const int splits = mode == kSplitKAuto ? sm90_split_count(p.M, p.N, p.K, sms) : std::max(mode, 1);
  // The tail split only under auto: "off" launches no split instance, a forced count splits all.
  const int tail_mode = sm90_tail_override();
  if (tail_mode < 0) return cudaErrorInvalidValue;
  const bool tail = mode == kSplitKAuto && tail_mode == 1;
  MMFREE_TERNARY_DISPATCH_OUT(p.out_dtype, T, { return launch_typed<T>(p, w_i8, sms, splits, tail, stream); });
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_gemm_sm90(const TernaryMatmulParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(p.packed) % 16 != 0) return cudaErrorInvalidValue;
  if (p.K == 0) return launch_gemm(p, stream);  // no k-tile to start the accumulators
  return launch_sm90(p, nullptr, stream);
}

cudaError_t launch_gemm_sm90_int8(const TernaryMatmulParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(p.packed) % 16 != 0) return cudaErrorInvalidValue;
  if (p.K == 0) return launch_gemm(p, stream);
  const size_t need = sm90_int8_workspace_bytes(p.N, p.K);
  if (p.workspace == nullptr || p.workspace_bytes < need || reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  int8_t* w_i8 = static_cast<int8_t*>(p.workspace);
  cudaError_t err = launch_unpack_int8(p.packed, p.N, p.K, w_i8, stream);
  if (err != cudaSuccess) return err;
  return launch_sm90(p, w_i8, stream);
}

int sm90_tail_override() {
  const char* v = std::getenv("MMFREE_TERNARY_SM90_TAIL");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return 1;
  if (std::strcmp(v, "off") == 0) return 0;
  std::fprintf(stderr, "mmfree: MMFREE_TERNARY_SM90_TAIL must be 'auto' or 'off', got '%s'\n", v);
  return -1;
}

int sm90_split_override() {
  const char* v = std::getenv("MMFREE_TERNARY_SM90_SPLITK");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return kSplitKAuto;
  if (std::strcmp(v, "off") == 0) return kSplitKOff;
  if (v[0] >= '2' && v[0] <= '0' + kMaxSm90SplitK && v[1] == '\0') return v[0] - '0';
  std::fprintf(stderr, "mmfree: MMFREE_TERNARY_SM90_SPLITK must be 'auto', 'off' or 2..%d, got '%s'\n",
               kMaxSm90SplitK, v);
  return kSplitKInvalid;
}

int sm90_tail_splits(int64_t tiles, int64_t ktiles, int sms) {
  if (sms <= 0 || tiles < sms) return 1;  // no full wave: the whole-grid split's case
  const int64_t rest = tiles % sms;
  if (rest == 0) return 1;
  const int64_t ways = std::min<int64_t>(kSm90TailMaxSplits, sms / rest);
  if (ways < 2 || ktiles * (ways - 1) < kSm90TailMinSavedKtiles * ways) return 1;
  return static_cast<int>(ways);
}

int sm90_split_count(int64_t M, int64_t N, int64_t K, int sms) {
  if (!kSm90SplitAuto) return 1;
  // Candidate rule (not measured yet): from one full 128-row tile (below, the small-M
  // split kernel), split only where the unsplit 128 x 128 grid leaves more than a third of
  // the SMs idle, into the most ways whose grid still fits one wave of 128 x 256 tiles,
  // each rank keeping at least 8 k-tiles (against the pipeline fill and the reduction).
  // M = 512: 6912->2560 splits 3 ways (120 CTAs of 18 k-tiles), 2560->2560 2 ways.
  if (M < kBM) return 1;
  const int64_t tiles256 = ceil_div(M, kBM) * ceil_div(N, 256);
  const int64_t tiles128 = ceil_div(M, kBM) * ceil_div(N, 128);
  if (3 * tiles128 >= 2 * sms) return 1;
  const int64_t ktiles = ternary::blocks_per_row(K);
  int best = 1;
  for (int s = 2; s <= kMaxSm90SplitK; ++s) {
    if (tiles256 * s <= sms && ktiles >= 8 * s) best = s;
  }
  return best;
}

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
