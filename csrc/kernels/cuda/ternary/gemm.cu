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
#include "cuda/smem_optin.h"
#include "cuda/ternary/epilogue.cuh"
#include "cuda/ternary/gemm_mainloop.cuh"
#include "cuda/ternary/launch.h"

namespace mmfree {
namespace cuda {
namespace ternary_kernels {
namespace {

using namespace mma_gemm;

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
  int my_sum;
  mainloop<BM, kVecA>(p, m0, n0, 0, ktiles, smem, acc, my_sum);
  const int sum_row = tid / T::kSumThreadsPerRow;

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
