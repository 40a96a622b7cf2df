// Transposed ternary product for the STE backward: out[m, k] = w_scale * sum_n g[m, n] * w[n, k]
// on 16-bit tensor cores (mma.sync m16n8k16, fp32 accumulation), read from the packed codes.
//
// The reduction runs over the weight rows n, the output columns are the weight columns k,
// so a CTA owns 128 columns = one 32-byte packed block of every weight row, and streams 64
// weight rows per stage. The packed tile (64 x 32 bytes) arrives by cp.async with the grad
// tile (BM rows x 64 n, bf16), and is decoded once per CTA into a bf16 tile [64 n][128 k]
// in shared memory: a code c in {0, 1, 2} is placed under the exponent byte of 128.0 (bf16
// 0x43) with one byte permute, which gives 128 + c exactly, and one packed subtract of 129
// leaves c - 1. The B fragments
// then come from that tile with ldmatrix.trans (it is row-major [reduction][column]), the A
// fragments from the grad tile with ldmatrix. The decode of stage t+1 overlaps the mma of
// stage t: the decoded tile is double-buffered, so one barrier per stage suffices.
//
// Products of a bf16 g with w in {-1, 0, +1} are exact; an fp32 grad comes as three bf16
// terms (hi, mid, lo) and an fp16 grad as two, which share each decoded tile, so the result
// is an fp32 sum of exact products (order differs from the CPU's, nothing else). fp16 is
// not fed to fp16 mma: Hopper's tensor cores align a k-group's products to a fixed window
// before adding, which truncates 22-bit fp16 products (measured 10x torch's fp32 error at
// N = 13824) but never the <= 9-bit products of bf16 terms with +-1.
//
// Tiles: BM = 256 rows (8 warps as 4 (m) x 2 (columns), warp tile 64 x 64) when the grid
// fills the GPU, else BM = 128 (2 x 4 warps, 64 x 32). The larger warp tile halves the
// shared-memory traffic per mma, which ncu showed to be the limit (L1 76% busy at 49%
// tensor utilisation with 64 x 32).
#include <algorithm>
#include <atomic>

#include "common/ternary_format.h"
#include "cuda/common.cuh"
#include "cuda/smem_optin.h"
#include "cuda/ternary/ptx.cuh"
#include "ternary.h"

namespace mmfree {
namespace cuda {
namespace {

constexpr int kThreads = 256;                      // 8 warps
constexpr int kBC = ternary::kBlockWeights;        // 128 output columns per CTA
constexpr int kBR = 64;                            // weight rows (reduction) per stage
constexpr int kARowBytes = kBR * 2;                // 128 bytes: eight 16-byte chunks
constexpr int kBTileBytes = kBR * ternary::kBlockBytes;  // 2 KB of packed codes
constexpr int kDRowBytes = kBC * 2 + 16;           // decoded row, padded: ldmatrix rows hit distinct banks
constexpr int kDTileBytes = kBR * kDRowBytes;
constexpr uint32_t kMagicByte = 0x43;              // bf16 0x43cc = 128 + c

template <int BM, int S>
struct Cfg {
  static constexpr int kWarpsM = BM / 64;
  static constexpr int kWarpsC = 8 / kWarpsM;
  static constexpr int kWarpC = kBC / kWarpsC;     // 32 or 64 columns per warp
  static constexpr int kMTiles = 4;                // 64 rows per warp
  static constexpr int kNTiles = kWarpC / 8;
  static constexpr int kATileBytes = BM * kARowBytes;
  static constexpr int kStageBytes = S * kATileBytes + kBTileBytes;
  static constexpr int kStages = (S * kATileBytes <= 32 * 1024) ? 4 : 3;
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kDTileBytes;
  static constexpr int kMinBlocks = (2 * kSmemBytes <= 220 * 1024 && kNTiles == 4) ? 2 : 1;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");  // sm_90; others are checked at launch
};

__device__ __forceinline__ uint32_t minus_bias(uint32_t v) {  // v - 129 in each bf16 half
  __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&v);
  h = __hsub2(h, __floats2bfloat162_rn(129.f, 129.f));
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

using namespace ptx;

// Copies reduction tile rt (weight rows rt*64 ..) into a stage: S grad tiles (BM rows x 64
// values, 16-byte chunks XOR-swizzled by row % 8 for conflict-free ldmatrix) and the packed
// tile (64 rows x the CTA's 32-byte block). kVec: 16-byte cp.async of grad (rows 16-byte
// aligned, N % 8 == 0); otherwise element loads with bounds checks.
template <int BM, int S, bool kVec>
__device__ __forceinline__ void load_stage(const TernaryMatmulTCudaParams& p, int64_t term_stride, int64_t m0,
                                           int64_t kb, int64_t rt, uint8_t* stage) {
  using C = Cfg<BM, S>;
  const int tid = threadIdx.x;
  const int64_t n0 = rt * kBR;
  const __nv_bfloat16* grad = static_cast<const __nv_bfloat16*>(p.grad);
  constexpr int kChunksPerThread = BM * (kARowBytes / 16) / kThreads;
#pragma unroll
  for (int s = 0; s < S; ++s) {
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      const int idx = tid + i * kThreads;
      const int row = idx / 8;
      const int c = idx % 8;
      const int64_t m = m0 + row;
      const int64_t n = n0 + c * 8;
      uint8_t* dst = stage + s * C::kATileBytes + row * kARowBytes + ((c ^ (row & 7)) * 16);
      const __nv_bfloat16* src = grad + s * term_stride + m * p.N + n;
      if (kVec) {
        const bool live = m < p.M && n < p.N;  // N % 8 == 0: a chunk is all in or all out
        cp_async16(smem_addr(dst), live ? src : p.grad, live ? 16 : 0);
      } else {
        alignas(16) __nv_bfloat16 v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = (m < p.M && n + e < p.N) ? src[e] : __float2bfloat16(0.f);
        *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(v);
      }
    }
  }
  if (tid < kBTileBytes / 16) {
    const int row = tid / 2;
    const int half = tid % 2;
    const int64_t n = n0 + row;
    const int64_t rb = ternary::row_bytes(p.K);
    const bool live = n < p.N;
    const uint8_t* src = p.packed + (live ? n * rb + kb * ternary::kBlockBytes + half * 16 : 0);
    cp_async16(smem_addr(stage + S * C::kATileBytes + row * ternary::kBlockBytes + half * 16), src, live ? 16 : 0);
  }
}

// Packed tile -> bf16 tile [64 n][128 k] (w = code - 1). Weight rows past N decode as 0.
// A warp's 32 words cover rows q, q+2, q+4, q+6 (8 words each): with the 272-byte row pitch
// their 64-byte stores spread over all banks (2 wavefronts, the minimum for 256 bytes).
__device__ __forceinline__ void decode_stage(const uint8_t* packed_tile, uint8_t* dtile, int64_t n0, int64_t N) {
#pragma unroll
  for (int i = 0; i < kBTileBytes / 4 / kThreads; ++i) {  // 2 words per thread
    const int u = threadIdx.x + i * kThreads;
    const int group = u / 32;                                       // 0..15
    const int row = (group / 2) * 8 + (group % 2) + 2 * ((u / 8) % 4);
    const int wi = u % 8;                                           // bytes 4wi..4wi+3 of the row's block
    uint32_t word = reinterpret_cast<const uint32_t*>(packed_tile)[row * 8 + wi];
    if (n0 + row >= N) word = 0x55555555u;  // zero codes
    uint8_t* drow = dtile + row * kDRowBytes;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t codes = (word >> (2 * j)) & 0x03030303u;      // k = j*32 + 4wi + 0..3
      const uint32_t lo = __byte_perm(codes, kMagicByte, 0x4140);  // [c0, 0x43, c1, 0x43]
      const uint32_t hi = __byte_perm(codes, kMagicByte, 0x4342);  // [c2, 0x43, c3, 0x43]
      uint2 v;
      v.x = minus_bias(lo);
      v.y = minus_bias(hi);
      *reinterpret_cast<uint2*>(drow + (j * 32 + 4 * wi) * 2) = v;
    }
  }
}

template <int BM, int S, bool kVec>
__global__ void __launch_bounds__(kThreads, Cfg<BM, S>::kMinBlocks)
    gemm_t_kernel(TernaryMatmulTCudaParams p, int64_t term_stride) {
  using C = Cfg<BM, S>;
  constexpr int kMTiles = C::kMTiles;
  constexpr int kNTiles = C::kNTiles;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* dtiles = smem + C::kStages * C::kStageBytes;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / C::kWarpsC;
  const int wc = warp % C::kWarpsC;
  const int64_t kb = blockIdx.x;  // packed block = output columns kb*128 ..
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t rtiles = (p.N + kBR - 1) / kBR;

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < rtiles) load_stage<BM, S, kVec>(p, term_stride, m0, kb, s, smem + s * C::kStageBytes);
    cp_async_commit();
  }
  cp_async_wait<C::kStages - 2>();
  __syncthreads();
  decode_stage(smem + S * C::kATileBytes, dtiles, 0, p.N);

  for (int64_t rt = 0; rt < rtiles; ++rt) {
    // Tile rt+1 must have landed (for its decode below); tile rt landed one step earlier.
    cp_async_wait<C::kStages - 3>();
    __syncthreads();  // also: every warp is done with tile rt-1 and decoded tile rt
    const int64_t next = rt + C::kStages - 1;
    if (next < rtiles) load_stage<BM, S, kVec>(p, term_stride, m0, kb, next, smem + (next % C::kStages) * C::kStageBytes);
    cp_async_commit();
    if (rt + 1 < rtiles) {
      decode_stage(smem + ((rt + 1) % C::kStages) * C::kStageBytes + S * C::kATileBytes,
                   dtiles + ((rt + 1) % 2) * kDTileBytes, (rt + 1) * kBR, p.N);
    }

    const uint8_t* a_tile = smem + (rt % C::kStages) * C::kStageBytes;
    const uint8_t* d_tile = dtiles + (rt % 2) * kDTileBytes;
#pragma unroll
    for (int ks = 0; ks < kBR / 16; ++ks) {
      uint32_t b[kNTiles][2];
#pragma unroll
      for (int pr = 0; pr < kNTiles / 2; ++pr) {
        const int row = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int col = wc * C::kWarpC + pr * 16 + (lane >> 4) * 8;
        uint32_t r[4];
        ldmatrix_x4_trans(r, smem_addr(d_tile + row * kDRowBytes + col * 2));
        b[2 * pr][0] = r[0];
        b[2 * pr][1] = r[1];
        b[2 * pr + 1][0] = r[2];
        b[2 * pr + 1][1] = r[3];
      }
#pragma unroll
      for (int s = 0; s < S; ++s) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          const int row = wm * 64 + mt * 16 + (lane & 15);
          const int c = ks * 2 + (lane >> 4);
          uint32_t a[4];
          ldmatrix_x4(a, smem_addr(a_tile + s * C::kATileBytes + row * kARowBytes + ((c ^ (row & 7)) * 16)));
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) mma_bf16(acc[mt][nt], a, b[nt][0], b[nt][1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  const float ws = *p.w_scale;
  const int g = lane >> 2;
  const int t = lane & 3;
  const bool pair_ok = (p.K % 2) == 0 && reinterpret_cast<uintptr_t>(p.out) % 8 == 0;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + wm * 64 + mt * 16 + g + h * 8;
      if (m >= p.M) continue;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const int64_t k = kb * kBC + wc * C::kWarpC + nt * 8 + 2 * t;
        float* dst = p.out + m * p.K + k;
        const float v0 = acc[mt][nt][2 * h] * ws;
        const float v1 = acc[mt][nt][2 * h + 1] * ws;
        if (pair_ok && k + 1 < p.K) {
          *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
        } else {
          if (k < p.K) dst[0] = v0;
          if (k + 1 < p.K) dst[1] = v1;
        }
      }
    }
  }
}

template <int BM, int S, bool kVec>
cudaError_t launch(const TernaryMatmulTCudaParams& p, cudaStream_t stream) {
  constexpr int smem = Cfg<BM, S>::kSmemBytes;
  auto kernel = gemm_t_kernel<BM, S, kVec>;
  static std::atomic<uint64_t> raised{0};
  cudaError_t err = raise_smem_once(kernel, smem, raised);
  if (err != cudaSuccess) return err;
  // grid.y holds at most 65535 row tiles: taller inputs go in several launches.
  constexpr int64_t kMaxRows = int64_t{65535} * BM;
  const int64_t term_stride = p.M * p.N;  // elements between the split terms of the grad
  for (int64_t r0 = 0; r0 < p.M; r0 += kMaxRows) {
    TernaryMatmulTCudaParams q = p;
    q.M = std::min(kMaxRows, p.M - r0);
    q.grad = static_cast<const __nv_bfloat16*>(p.grad) + r0 * p.N;
    q.out = p.out + r0 * p.K;
    const dim3 grid(ceil_div(p.K, kBC), ceil_div(q.M, BM));
    kernel<<<grid, kThreads, smem, stream>>>(q, term_stride);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <int S>
cudaError_t launch_splits(const TernaryMatmulTCudaParams& p, int sms, int smem_optin, cudaStream_t stream) {
  const bool vec = reinterpret_cast<uintptr_t>(p.grad) % 16 == 0 && p.N % 8 == 0;
  // 256-row tiles (64 x 64 per warp) once they fill every SM; their A stages fit only for
  // one grad term, and only where a block may have 170 KB of shared memory (sm_90).
  if constexpr (S == 1) {
    if (Cfg<256, S>::kSmemBytes <= smem_optin &&
        static_cast<int64_t>(ceil_div(p.K, kBC)) * ceil_div(p.M, 256) >= sms)
      return vec ? launch<256, S, true>(p, stream) : launch<256, S, false>(p, stream);
  }
  if (Cfg<128, S>::kSmemBytes > smem_optin) return cudaErrorNotSupported;  // e.g. sm_86/89 (99 KB)
  return vec ? launch<128, S, true>(p, stream) : launch<128, S, false>(p, stream);
}

}  // namespace

cudaError_t ternary_matmul_t(const TernaryMatmulTCudaParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.N < 0 || p.K < 0) return cudaErrorInvalidValue;
  if (p.grad_dtype != DType::kBFloat16 || p.splits < 1 || p.splits > 3) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(p.packed) % 16 != 0) return cudaErrorInvalidValue;
  if (p.M == 0 || p.K == 0) return cudaSuccess;
  if (p.N == 0) return cudaMemsetAsync(p.out, 0, static_cast<size_t>(p.M * p.K) * sizeof(float), stream);
  int dev = 0, sms = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (p.splits == 1) return launch_splits<1>(p, sms, smem_optin, stream);
  if (p.splits == 2) return launch_splits<2>(p, sms, smem_optin, stream);
  return launch_splits<3>(p, sms, smem_optin, stream);
}

}  // namespace cuda
}  // namespace mmfree
