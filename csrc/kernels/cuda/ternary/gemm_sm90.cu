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
// Integer products and int32 sums are exact, so the result is bit-identical to gemm.cu's
// and to the reference whatever the order.
#include <algorithm>
#include <atomic>

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

struct TileMap {
  int64_t m_tiles, tiles;
  int ktiles;
  __device__ __forceinline__ int64_t m0(int64_t tile) const { return (tile % m_tiles) * kBM; }
  template <int BN>
  __device__ __forceinline__ int64_t n0(int64_t tile) const {
    return (tile / m_tiles) * BN;
  }
};

template <int BN, bool kVecA>
__device__ __forceinline__ void producer(const TernaryMatmulParams& p, const TileMap& map, uint8_t* smem,
                                         uint32_t bars) {
  using C = Cfg<BN>;
  const int pt = threadIdx.x;  // 0..127
  const int xc = pt & 7;       // the A chunk (16 k) this thread copies
  const int xr0 = pt >> 3;     // its first A row; then every 16th
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t tiles_here =
      map.tiles > blockIdx.x ? (map.tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  const int64_t iters = tiles_here * map.ktiles;

  uint4 next[C::kRowsPerProducer][2];
  auto load_packed = [&](int64_t tile, int kt) {
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

  int64_t tile = blockIdx.x;
  int kt = 0;
  int stage = 0;
  uint32_t phase = 0;
  if (iters > 0) load_packed(tile, 0);
  for (int64_t it = 0; it < iters; ++it) {
    uint4 cur[C::kRowsPerProducer][2];
#pragma unroll
    for (int r = 0; r < C::kRowsPerProducer; ++r) cur[r][0] = next[r][0], cur[r][1] = next[r][1];
    int64_t ntile = tile;
    int nkt = kt + 1;
    if (nkt == map.ktiles) nkt = 0, ntile += gridDim.x;
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
    if (kVecA) cp_async_mbar_arrive(full);

#pragma unroll
    for (int r = 0; r < C::kRowsPerProducer; ++r) {
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
    fence_proxy_async();  // the generic-proxy stores above, before wgmma (async proxy) reads them
    mbar_arrive(full);

    if (++stage == C::kStages) stage = 0, phase ^= 1;
    tile = ntile;
    kt = nkt;
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
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

template <int BN, class OutT>
__device__ __forceinline__ void consumer(const TernaryMatmulParams& p, const TileMap& map, uint32_t smem_base,
                                         uint32_t bars) {
  using C = Cfg<BN>;
  const int ct = threadIdx.x - kProducerThreads;  // 0..255
  const int wg = ct >> 7;                         // 0: tile rows 0..63, 1: rows 64..127
  const float ws = *p.w_scale;
  int acc[C::kAccRegs];
  int stage = 0;
  uint32_t phase = 0;
  for (int64_t tile = blockIdx.x; tile < map.tiles; tile += gridDim.x) {
    int prev = 0;
    for (int kt = 0; kt < map.ktiles; ++kt) {
      mbar_wait(bars + 8 * stage, phase);
      fence_proxy_async();  // the cp.async-written A tile, seen through the barrier
      const uint32_t a = smem_base + stage * C::kStageBytes + wg * 64 * kBK;
      const uint32_t b = smem_base + stage * C::kStageBytes + C::kABytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 32; ++kk) {
        const uint64_t da = sw128_desc(a + 32 * kk);
        const uint64_t db = sw128_desc(b + 32 * kk);
        if constexpr (BN == 256) {
          wgmma_m64n256k32_s8(acc, da, db, (kt | kk) != 0);
        } else {
          wgmma_m64n128k32_s8(acc, da, db, (kt | kk) != 0);
        }
      }
      wgmma_commit();
      if (kt > 0) {
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
    store_tile<BN, OutT>(p, acc, map.m0(tile), map.template n0<BN>(tile), wg, ct & 127, ws);
  }
}

template <int BN, bool kVecA, class OutT>
__global__ void __launch_bounds__(kThreads, 1) gemm_sm90_kernel(TernaryMatmulParams p, TileMap map) {
  using C = Cfg<BN>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + kSwizzleAlign - 1) & ~static_cast<uint32_t>(kSwizzleAlign - 1);
  uint8_t* smem = smem_raw + (base - raw);
  const uint32_t bars = base + C::kStages * C::kStageBytes;  // full[kStages], then empty[kStages]
  if (threadIdx.x == 0) {
    for (int s = 0; s < C::kStages; ++s) {
      mbar_init(bars + 8 * s, kVecA ? 2 * kProducerThreads : kProducerThreads);
      mbar_init(bars + 8 * (C::kStages + s), kConsumerThreads);
    }
    mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x < kProducerThreads) {
    producer<BN, kVecA>(p, map, smem, bars);
  } else {
    consumer<BN, OutT>(p, map, base, bars);
  }
}

template <int BN, bool kVecA, class OutT>
cudaError_t launch_cfg(const TernaryMatmulParams& p, int sms, cudaStream_t stream) {
  constexpr int smem = Cfg<BN>::kSmemBytes;
  auto kernel = gemm_sm90_kernel<BN, kVecA, OutT>;
  static std::atomic<uint64_t> raised{0};
  cudaError_t err = raise_smem_once(kernel, smem, raised);
  if (err != cudaSuccess) return err;
  TileMap map;
  map.m_tiles = (p.M + kBM - 1) / kBM;
  map.tiles = map.m_tiles * ((p.N + BN - 1) / BN);
  map.ktiles = static_cast<int>(ternary::blocks_per_row(p.K));
  const int grid = static_cast<int>(std::min<int64_t>(map.tiles, sms));
  kernel<<<grid, kThreads, smem, stream>>>(p, map);
  return cudaGetLastError();
}

template <class OutT>
cudaError_t launch_typed(const TernaryMatmulParams& p, int sms, cudaStream_t stream) {
  const bool vec_a = reinterpret_cast<uintptr_t>(p.x_q) % 16 == 0 && p.x_row_stride % 16 == 0;
  // 256-wide tiles read A once per 256 outputs instead of 128 (less shared-memory traffic
  // per wgmma); 128-wide ones where the 256-wide grid would leave SMs idle.
  const int64_t tiles256 = ((p.M + kBM - 1) / kBM) * ((p.N + 255) / 256);
  if (tiles256 >= sms) {
    return vec_a ? launch_cfg<256, true, OutT>(p, sms, stream) : launch_cfg<256, false, OutT>(p, sms, stream);
  }
  return vec_a ? launch_cfg<128, true, OutT>(p, sms, stream) : launch_cfg<128, false, OutT>(p, sms, stream);
}

}  // namespace

cudaError_t launch_gemm_sm90(const TernaryMatmulParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(p.packed) % 16 != 0) return cudaErrorInvalidValue;
  if (p.K == 0) return launch_gemm(p, stream);  // no k-tile to start the accumulators
  int dev = 0, sms = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (err != cudaSuccess) return err;
  if (major != 9 || minor != 0) return cudaErrorNotSupported;
  MMFREE_TERNARY_DISPATCH_OUT(p.out_dtype, T, { return launch_typed<T>(p, sms, stream); });
  return cudaSuccess;
}

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
