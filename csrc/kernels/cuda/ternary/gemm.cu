// Prefill GEMM (M > 16): int8 tensor cores (mma.sync m16n8k32 s8.s8.s32, sm_80 and sm_90)
// fed straight from the canonical packed format.
//
// The format lines up with the mma B fragment: for k-step j of a 128-weight block (k =
// j*32 .. j*32+31), lane (g = lane/4, t = lane%4) needs the codes of column n = g at k =
// 4t..4t+3 and 16+4t..16+4t+3 -- bytes 4t..4t+3 and 16+4t..16+4t+3 of that row's 32-byte
// block at bit pair j, i.e. words t and 4+t shifted right by 2j and masked with 0x03030303.
// So a lane loads two 32-bit words per output column and block, and every k-step's B
// fragment costs one shift and one AND per register. The mma multiplies the unsigned codes
// (0..2, valid as s8) by x; the epilogue subtracts the activation row sums (sum x*w = sum
// x*c - sum x), which the block accumulates from its A tiles in shared memory with dp4a.
//
// Tiles: BM x 128 (N) x 128 (K, one packed block), 8 warps as 2 (M) x 4 (N), warp tile
// BM/2 x 32. A tiles (int8 activations) and B tiles (packed bytes, 32 per row) flow
// through a kStages-deep cp.async pipeline. A rows are 128 bytes: the eight 16-byte
// chunks of row r are stored XOR-swizzled by r % 8 so ldmatrix reads are conflict-free;
// B rows swap their two 16-byte halves when (r / 4) is odd, which makes the eight rows a
// warp reads per word land in distinct banks.
#include <algorithm>
#include <atomic>

#include "common/ternary_format.h"
#include "cuda/ternary/epilogue.cuh"
#include "cuda/ternary/launch.h"
#include "cuda/smem_optin.h"
#include "cuda/ternary/ptx.cuh"

namespace mmfree {
namespace cuda {
namespace ternary_kernels {
namespace {

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

template <int BM, bool kVecA, class OutT>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel(TernaryMatmulParams p) {
  using T = Tile<BM>;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int row_sum[BM];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 2;  // 0..1
  const int wn = warp & 3;   // 0..3
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t ktiles = rb / kBRowBytes;

  int acc[T::kMTiles][T::kNTiles][4];
#pragma unroll
  for (int i = 0; i < T::kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < T::kNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
  int my_sum = 0;
  const int sum_row = tid / T::kSumThreadsPerRow;
  const int sum_c0 = (tid % T::kSumThreadsPerRow) * T::kSumChunksPerThread;

  const StageLoader<BM, kVecA> loader(p, rb, m0, n0);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) loader.load(s, smem + s * T::kStageBytes);
    cp_async_commit();
  }

  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt has landed for everyone; stage (kt-1) % kStages is free
    const int64_t next = kt + kStages - 1;
    if (next < ktiles) loader.load(next, smem + (next % kStages) * T::kStageBytes);
    cp_async_commit();

    const uint8_t* a_tile = smem + (kt % kStages) * T::kStageBytes;
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

  // Row sums: combine the threads that shared a row.
#pragma unroll
  for (int o = 1; o < T::kSumThreadsPerRow; o <<= 1) my_sum += __shfl_xor_sync(0xffffffffu, my_sum, o);
  if (tid % T::kSumThreadsPerRow == 0) row_sum[sum_row] = my_sum;
  __syncthreads();

  const float ws = *p.w_scale;
  OutT* out = static_cast<OutT*>(p.out);
  const bool pair_ok = (p.N % 2) == 0;  // then (m*N + even n) keeps 2-element alignment
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int lrow = wm * T::kWarpM + mt * 16 + g + h * 8;
      const int64_t m = m0 + lrow;
      if (m >= p.M) continue;
      const float xs = p.x_scale[m];
      const int rs = row_sum[lrow];
#pragma unroll
      for (int nt = 0; nt < T::kNTiles; ++nt) {
        const int64_t n = n0 + wn * (kBN / 4) + nt * 8 + 2 * t;
        const OutT v0 = rescale<OutT>(acc[mt][nt][2 * h] - rs, xs, ws);
        const OutT v1 = rescale<OutT>(acc[mt][nt][2 * h + 1] - rs, xs, ws);
        OutT* dst = out + m * p.N + n;
        if (pair_ok && n + 1 < p.N) {
          if constexpr (sizeof(OutT) == 4) {
            float2 v;
            v.x = v0; v.y = v1;
            *reinterpret_cast<float2*>(dst) = v;
          } else {
            OutT pair[2] = {v0, v1};
            *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(pair);
          }
        } else {
          if (n < p.N) dst[0] = v0;
          if (n + 1 < p.N) dst[1] = v1;
        }
      }
    }
  }
}

template <int BM, bool kVecA, class OutT>
cudaError_t launch_tile(const TernaryMatmulParams& p, cudaStream_t stream) {
  constexpr int smem = Tile<BM>::kSmemBytes;
  auto kernel = gemm_kernel<BM, kVecA, OutT>;
  static std::atomic<uint64_t> raised{0};
  cudaError_t err = raise_smem_once(kernel, smem, raised);
  if (err != cudaSuccess) return err;
  // grid.y is limited to 65535 tiles: very tall inputs go in several launches.
  constexpr int64_t kMaxRows = int64_t{65535} * BM;
  const int64_t esize = dtype_size(p.out_dtype);
  for (int64_t r0 = 0; r0 < p.M; r0 += kMaxRows) {
    TernaryMatmulParams q = p;
    q.M = std::min(kMaxRows, p.M - r0);
    q.x_q = p.x_q + r0 * p.x_row_stride;
    q.x_scale = p.x_scale + r0;
    q.out = static_cast<char*>(p.out) + r0 * p.N * esize;
    const dim3 grid(ceil_div(q.N, kBN), ceil_div(q.M, BM));
    kernel<<<grid, kThreads, smem, stream>>>(q);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <class OutT>
cudaError_t launch_typed(const TernaryMatmulParams& p, int sms, cudaStream_t stream) {
  // 16-byte cp.async of activations needs 16-byte aligned rows; other layouts (odd K with a
  // contiguous x, sliced inputs) stage A with byte loads instead.
  const bool vec_a = reinterpret_cast<uintptr_t>(p.x_q) % 16 == 0 && p.x_row_stride % 16 == 0;
  // 128-row tiles halve the B decode and A-sum work per mma; take 64-row tiles when the
  // 128-row grid would leave SMs idle.
  const bool big = static_cast<int64_t>(ceil_div(p.N, kBN)) * ceil_div(p.M, 128) >= sms;
  if (big) return vec_a ? launch_tile<128, true, OutT>(p, stream) : launch_tile<128, false, OutT>(p, stream);
  return vec_a ? launch_tile<64, true, OutT>(p, stream) : launch_tile<64, false, OutT>(p, stream);
}

}  // namespace

cudaError_t launch_gemm(const TernaryMatmulParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  MMFREE_TERNARY_DISPATCH_OUT(p.out_dtype, T, { return launch_typed<T>(p, sms, stream); });
  return cudaSuccess;
}

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
