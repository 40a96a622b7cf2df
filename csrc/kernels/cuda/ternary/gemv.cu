// Decode GEMV (M <= 16 activation rows): streams the packed weights once, 16 bytes per
// load, and multiplies the 2-bit codes with dp4a.
//
// A 16-byte chunk of a packed row is half of a 128-weight block: bytes b0..b0+15. Shifting
// its words right by 2j and masking with 0x03030303 gives the codes of k = blk*128 + j*32 +
// b0 + 4q .. +3 as four bytes, i.e. exactly one int32 word of four consecutive int8
// activations. dp4a(codes, x) sums x*c with c = w + 1 in {0, 1, 2}; the true product is
// that minus sum(x), subtracted once per activation row in the epilogue.
//
// Work split: a warp owns R consecutive output rows; its lanes stride over the rows' chunks
// (lane l takes chunks l, l+32, ...), with kUnroll * R independent 16-byte loads in flight
// before the first use. The activation rows are staged in shared memory reordered into
// "planes": plane (m, j) holds, for chunk c, the 16 bytes that pair with bit pair j of
// chunk c. Lane l then reads plane entry l: consecutive lanes, consecutive 16 bytes, no bank
// conflicts, and each staged activation word is reused by the R rows. K is processed in
// slabs that fit the shared-memory budget (a loop with two barriers per slab).
#include <algorithm>

#include "common/ternary_format.h"
#include "cuda/ternary/epilogue.cuh"
#include "cuda/ternary/launch.h"

namespace mmfree {
namespace cuda {
namespace ternary_kernels {
namespace {

constexpr int kUnroll = 2;                 // chunks per lane and row loaded before use
// Staged activations per block: the 48 KB default limit covers dynamic + static shared
// memory, so leave room for the static row sums (no opt-in attribute needed).
constexpr int kSmemBudget = 48 * 1024 - 1024;
constexpr uint32_t kCodeMask = 0x03030303u;
constexpr int kChunkBytes = 16;
constexpr int kChunksPerBlock = ternary::kBlockBytes / kChunkBytes;  // 2

// Weights are read exactly once: keep them out of L1.
__device__ __forceinline__ uint4 load_stream(const uint4* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int sum4(int4 v, int s) {
  constexpr int kOnes = 0x01010101;
  return __dp4a(v.w, kOnes, __dp4a(v.z, kOnes, __dp4a(v.y, kOnes, __dp4a(v.x, kOnes, s))));
}

// Activations k0..k0+15 of one row as 16 bytes, zero past K.
__device__ __forceinline__ int4 load_x16(const int8_t* row, int64_t k0, int64_t K, bool vec) {
  if (vec && k0 + kChunkBytes <= K) return *reinterpret_cast<const int4*>(row + k0);
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < kChunkBytes; ++i) {
    if (k0 + i < K) w[i / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(row[k0 + i])) << (8 * (i % 4));
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// Up to kMaxGemvGroups products with the same M, N and K in one launch (blockIdx.y picks
// the group): the i/f/g projections of a decode step share a launch.
struct GemvBatch {
  TernaryMatmulParams g[kMaxGemvGroups];
};

template <int MT, int R, int kWarps, class T>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(GemvBatch batch, int slab_blocks, bool x_vec) {
  constexpr int kThreads = kWarps * 32;
  const TernaryMatmulParams& p = batch.g[blockIdx.y];
  extern __shared__ int4 xs[];  // [MT][4][chunks of the slab]
  __shared__ int xsum[MT];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t nblocks = rb / ternary::kBlockBytes;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * R;

  const uint4* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = min(n0 + r, p.N - 1);  // rows past N re-read the last row; not stored
    wrow[r] = reinterpret_cast<const uint4*>(p.packed + n * rb);
  }
  int acc[R][MT];
  int my_sum[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    my_sum[m] = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r][m] = 0;
  }
  if (threadIdx.x < MT) xsum[threadIdx.x] = 0;

  uint4 w[kUnroll][R];
  auto load_weights = [&](int c0, int nch, int64_t c_base) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * 32 + lane;
#pragma unroll
      for (int r = 0; r < R; ++r) w[u][r] = c < nch ? load_stream(wrow[r] + c_base + c) : make_uint4(0, 0, 0, 0);
    }
  };
  // The first weight loads go out before the activations are staged: their DRAM latency
  // then overlaps the staging and its barriers instead of following them.
  if (nblocks > 0) load_weights(0, static_cast<int>(min(static_cast<int64_t>(slab_blocks), nblocks)) * kChunksPerBlock, 0);

  for (int64_t b0 = 0; b0 < nblocks; b0 += slab_blocks) {
    const int nch = static_cast<int>(min(static_cast<int64_t>(slab_blocks), nblocks - b0)) * kChunksPerBlock;
    const int64_t c_base = b0 * kChunksPerBlock;
    __syncthreads();  // the previous slab is consumed
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int8_t* xrow = p.x_q + m * p.x_row_stride;
      for (int u = threadIdx.x; u < 4 * nch; u += kThreads) {
        const int j = u / nch;
        const int c = u - j * nch;
        const int64_t cg = c_base + c;
        const int64_t k0 = (cg / kChunksPerBlock) * ternary::kBlockWeights + j * 32 + (cg % kChunksPerBlock) * kChunkBytes;
        const int4 v = m < p.M ? load_x16(xrow, k0, p.K, x_vec) : make_int4(0, 0, 0, 0);
        xs[(m * 4 + j) * nch + c] = v;
        my_sum[m] = sum4(v, my_sum[m]);
      }
    }
    __syncthreads();

    for (int c0 = 0; c0 < nch; c0 += 32 * kUnroll) {
      if (b0 > 0 || c0 > 0) load_weights(c0, nch, c_base);
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

  __syncthreads();  // xsum initialised (K = 0 runs no slab)
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int s = warp_sum(my_sum[m]);
    if (lane == 0 && m < p.M) atomicAdd(&xsum[m], s);
  }
  __syncthreads();

  const float ws = *p.w_scale;
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int v = warp_sum(acc[r][m]);
      const int64_t n = n0 + r;
      // Spread the stores over the lanes instead of funnelling them through lane 0.
      if (lane == (r * MT + m) % 32 && m < p.M && n < p.N) {
        out[m * p.N + n] = rescale<T>(v - xsum[m], p.x_scale[m], ws);
      }
    }
  }
}

template <int MT, int R, int W, class T>
cudaError_t launch_rows(const GemvBatch& b, int groups, cudaStream_t stream) {
  const TernaryMatmulParams& p = b.g[0];
  const int64_t nblocks = ternary::blocks_per_row(p.K);
  const int budget_blocks = kSmemBudget / (MT * ternary::kBlockWeights);
  const int slab_blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nblocks, budget_blocks)));
  const size_t smem = nblocks == 0 ? 0 : static_cast<size_t>(MT) * slab_blocks * ternary::kBlockWeights;
  bool x_vec = true;
  for (int i = 0; i < groups; ++i)
    x_vec &= reinterpret_cast<uintptr_t>(b.g[i].x_q) % 16 == 0 && b.g[i].x_row_stride % 16 == 0;
  const dim3 grid(ceil_div(p.N, static_cast<int64_t>(W) * R), groups);
  gemv_kernel<MT, R, W, T><<<grid, W * 32, smem, stream>>>(b, slab_blocks, x_vec);
  return cudaGetLastError();
}

template <int R, int W, class T>
cudaError_t launch_group(const GemvBatch& b, int groups, cudaStream_t stream) {
  const int64_t m = b.g[0].M;
  if (m <= 1) return launch_rows<1, R, W, T>(b, groups, stream);
  if (m <= 2) return launch_rows<2, R, W, T>(b, groups, stream);
  if (m <= 4) return launch_rows<4, R, W, T>(b, groups, stream);
  if (m <= 8) return launch_rows<8, R, W, T>(b, groups, stream);
  return launch_rows<16, R, W, T>(b, groups, stream);
}

}  // namespace

cudaError_t launch_gemv_grouped(const TernaryMatmulParams* ps, int groups, cudaStream_t stream) {
  if (groups < 1 || groups > kMaxGemvGroups) return cudaErrorInvalidValue;
  const TernaryMatmulParams& p = ps[0];
  for (int i = 1; i < groups; ++i) {
    if (ps[i].M != p.M || ps[i].N != p.N || ps[i].K != p.K || ps[i].out_dtype != p.out_dtype) return cudaErrorInvalidValue;
  }
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  // Rows per warp: four amortise the staged activations best; two when four would leave
  // SMs without blocks (2560 rows at 4 per warp are 160 blocks of 4 warps). Measured on
  // the H100 (M = 1): 2560->2560 6.5 us at two vs 7.0 at four; 6912->2560 9.8 at four vs
  // 11.7 at two; eight rows per warp, or eight warps per block, were slower everywhere.
  const bool two_rows = static_cast<int64_t>(ceil_div(p.N, 4 * 4)) * groups < 2 * sms;
  const int64_t esize = dtype_size(p.out_dtype);
  for (int64_t m0 = 0; m0 < p.M; m0 += kGemvMaxRows) {
    GemvBatch b;
    for (int i = 0; i < groups; ++i) {
      TernaryMatmulParams& g = b.g[i];
      g = ps[i];
      g.M = std::min<int64_t>(kGemvMaxRows, ps[i].M - m0);
      g.x_q = ps[i].x_q + m0 * ps[i].x_row_stride;
      g.x_scale = ps[i].x_scale + m0;
      g.out = static_cast<char*>(ps[i].out) + m0 * ps[i].N * esize;
    }
    MMFREE_TERNARY_DISPATCH_OUT(p.out_dtype, T, {
      err = two_rows ? launch_group<2, 4, T>(b, groups, stream) : launch_group<4, 4, T>(b, groups, stream);
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_gemv(const TernaryMatmulParams& p, cudaStream_t stream) { return launch_gemv_grouped(&p, 1, stream); }

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
