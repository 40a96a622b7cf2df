// Small-M ternary GEMM (sm_90): split-K across the CTAs of a thread-block cluster,
// reduced through distributed shared memory.
//
// Why: at M <= 256 the 2.7B shapes make 20-120 output tiles of BM x 128 for 132 SMs, so the
// unsplit GEMM (gemm.cu) streams the weights through a fraction of the SMs, each CTA one
// 128-column panel over all of K (6912->2560 at M = 8: 20 CTAs x 54 k-tiles, 44 us). Here
// a cluster of S CTAs (1..8, blockIdx.z = the cluster rank) owns one output tile; rank r
// runs the same main loop as gemm.cu over k-tiles [r*kt/S, (r+1)*kt/S). Each CTA writes
// its partial (sum x*c - sum x over its slice, int32) to its own shared memory; after a
// cluster barrier, rank r sums the S partials of rows [r*rows/S, (r+1)*rows/S) in rank
// order through DSMEM and runs the rescale epilogue (epilogue.cuh) on the full sums.
// Int32 addition is exact, so the output is bit-identical to the unsplit kernel's.
//
// Against the alternatives: int32 partials in a global workspace need either a memset of
// the arrival counters or a second reduction kernel per call (each ~2-3 us of GPU time at
// targets of 5-13 us) plus a stream-ordered allocation; the cluster needs neither, has no
// atomics, is deterministic and graph-safe (one plain launch). It needs sm_90: on other
// devices ternary_matmul keeps the unsplit kernel.
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda/smem_optin.h"
#include "cuda/ternary/epilogue.cuh"
#include "cuda/ternary/gemm_mainloop.cuh"
#include "cuda/ternary/launch.h"

namespace mmfree {
namespace cuda {
namespace ternary_kernels {
namespace {

using namespace mma_gemm;

#if defined(MMFREE_HAVE_SM90_GEMM)  // clusters exist in sm_90 code only

// Partial tiles are int32 rows of kBN values, kRedStride apart: 136 = 8 mod 32 makes the
// 8-byte fragment stores of a half-warp (rows g = 0..3, columns 2t) hit distinct banks, and
// keeps 16-byte rows for the reduction's int4 reads.
constexpr int kRedStride = kBN + 8;

template <int BM>
constexpr int split_smem_bytes() {
  return std::max(Tile<BM>::kSmemBytes, BM * kRedStride * 4);
}

// Four consecutive outputs n..n+3 of row m; one vector store where the row has them all
// and the address allows it.
template <class OutT>
__device__ __forceinline__ void store4(OutT* dst, const OutT (&v)[4], int64_t n, int64_t N, bool vec4) {
  if (vec4 && n + 3 < N) {
    if constexpr (sizeof(OutT) == 4) {
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      uint2 u;
      OutT lo[2] = {v[0], v[1]};
      OutT hi[2] = {v[2], v[3]};
      u.x = *reinterpret_cast<const uint32_t*>(lo);
      u.y = *reinterpret_cast<const uint32_t*>(hi);
      *reinterpret_cast<uint2*>(dst) = u;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (n + i < N) dst[i] = v[i];
  }
}

template <int BM, bool kVecA, class OutT>
__global__ void __launch_bounds__(kThreads, 2) gemm_split_k_kernel(TernaryMatmulParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using T = Tile<BM>;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int row_sum[BM];
  __shared__ float row_scale[BM];
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 2;
  const int wn = warp & 3;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t ktiles = ternary::row_bytes(p.K) / kBRowBytes;
  const int64_t kt0 = ktiles * rank / splits;
  const int64_t kt1 = ktiles * (rank + 1) / splits;
  const int live_rows = static_cast<int>(std::min<int64_t>(BM, p.M - m0));
  // The epilogue's scales, requested now so that their DRAM latency hides behind the main
  // loop instead of following the cluster barrier (v1: a DRAM round trip there).
  const float ws = *p.w_scale;
  const float my_xs = tid < live_rows ? p.x_scale[m0 + tid] : 0.f;

  int acc[T::kMTiles][T::kNTiles][4];
  int my_sum;
  mainloop<BM, kVecA>(p, m0, n0, kt0, kt1, smem, acc, my_sum);
  const int sum_row = tid / T::kSumThreadsPerRow;
#pragma unroll
  for (int o = 1; o < T::kSumThreadsPerRow; o <<= 1) my_sum += __shfl_xor_sync(0xffffffffu, my_sum, o);
  if (tid % T::kSumThreadsPerRow == 0) row_sum[sum_row] = my_sum;
  if (tid < BM) row_scale[tid] = my_xs;
  __syncthreads();  // row sums visible; every warp is done reading the pipeline stages

  // This slice's partial, acc - row sum (int32: the ranks' sum is the exact total).
  int* red = reinterpret_cast<int*>(smem);
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int lrow = wm * T::kWarpM + mt * 16 + g + h * 8;
      if (lrow >= live_rows) continue;
      const int rs = row_sum[lrow];
#pragma unroll
      for (int nt = 0; nt < T::kNTiles; ++nt) {
        const int col = wn * (kBN / 4) + nt * 8 + 2 * t;
        *reinterpret_cast<int2*>(red + lrow * kRedStride + col) =
            make_int2(acc[mt][nt][2 * h] - rs, acc[mt][nt][2 * h + 1] - rs);
      }
    }
  }
  cluster.sync();  // every rank's partial is written and visible cluster-wide

  OutT* out = static_cast<OutT*>(p.out);
  const bool vec4 = p.N % 4 == 0 && reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  constexpr int kQuads = kBN / 4;
  const int units = live_rows * kQuads;
  const int u_end = units * (rank + 1) / splits;
  for (int u = units * rank / splits + tid; u < u_end; u += kThreads) {
    const int lrow = u / kQuads;
    const int c4 = (u % kQuads) * 4;
    const int64_t n = n0 + c4;
    if (n >= p.N) continue;
    int* mine = red + lrow * kRedStride + c4;
    // All the ranks' 16-byte loads in flight at once (unrolled to the largest cluster,
    // predicated on the actual one), then summed in rank order.
    int4 part[kMaxSplitK];
#pragma unroll
    for (int q = 0; q < kMaxSplitK; ++q) {
      if (q < splits) part[q] = *reinterpret_cast<const int4*>(cluster.map_shared_rank(mine, q));
    }
    int4 s = part[0];
#pragma unroll
    for (int q = 1; q < kMaxSplitK; ++q) {
      if (q < splits) s.x += part[q].x, s.y += part[q].y, s.z += part[q].z, s.w += part[q].w;
    }
    const int64_t m = m0 + lrow;
    const float xs = row_scale[lrow];
    const OutT v[4] = {rescale<OutT>(s.x, xs, ws), rescale<OutT>(s.y, xs, ws), rescale<OutT>(s.z, xs, ws),
                       rescale<OutT>(s.w, xs, ws)};
    store4(out + m * p.N + n, v, n, p.N, vec4);
  }
  cluster.sync();  // no rank leaves while others still read its shared memory
#else
  __trap();  // launched only on sm_90 devices (launch_gemm_split_k checks)
#endif
}

template <int BM, bool kVecA, class OutT>
cudaError_t launch_split(const TernaryMatmulParams& p, int splits, cudaStream_t stream) {
  constexpr int smem = split_smem_bytes<BM>();
  auto kernel = gemm_split_k_kernel<BM, kVecA, OutT>;
  static std::atomic<uint64_t> raised{0};
  cudaError_t err = raise_smem_once(kernel, smem, raised);
  if (err != cudaSuccess) return err;
  constexpr int64_t kMaxRows = int64_t{65535} * BM;  // grid.y limit, as in gemm.cu
  const int64_t esize = dtype_size(p.out_dtype);
  for (int64_t r0 = 0; r0 < p.M; r0 += kMaxRows) {
    TernaryMatmulParams q = p;
    q.M = std::min(kMaxRows, p.M - r0);
    q.x_q = p.x_q + r0 * p.x_row_stride;
    q.x_scale = p.x_scale + r0;
    q.out = static_cast<char*>(p.out) + r0 * p.N * esize;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(ceil_div(q.N, kBN), ceil_div(q.M, BM), splits);
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = static_cast<unsigned>(splits);
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    err = cudaLaunchKernelEx(&cfg, kernel, q);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <class OutT>
cudaError_t launch_split_typed(const TernaryMatmulParams& p, int splits, cudaStream_t stream) {
  const bool vec_a = reinterpret_cast<uintptr_t>(p.x_q) % 16 == 0 && p.x_row_stride % 16 == 0;
  if (p.M <= 32) {
    return vec_a ? launch_split<32, true, OutT>(p, splits, stream) : launch_split<32, false, OutT>(p, splits, stream);
  }
  return vec_a ? launch_split<64, true, OutT>(p, splits, stream) : launch_split<64, false, OutT>(p, splits, stream);
}

bool device_has_clusters(int dev) {
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9;
}

#endif  // MMFREE_HAVE_SM90_GEMM

}  // namespace

int split_k_override() {
  const char* v = std::getenv("MMFREE_TERNARY_SPLITK");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return kSplitKAuto;
  if (std::strcmp(v, "off") == 0) return kSplitKOff;
  if (v[0] >= '1' && v[0] <= '0' + kMaxSplitK && v[1] == '\0') return v[0] - '0';
  std::fprintf(stderr, "mmfree: MMFREE_TERNARY_SPLITK must be 'auto', 'off' or 1..%d, got '%s'\n", kMaxSplitK, v);
  return kSplitKInvalid;
}

int split_k_count(int64_t M, int64_t N, int64_t K, int sms) {
  // Where 128-row tiles already fill the SMs, the unsplit kernel is the right one.
  const int64_t col_tiles = ceil_div(N, kBN);
  if (col_tiles * ceil_div(M, 128) >= sms) return 1;
  const int64_t tiles = col_tiles * ceil_div(M, M <= 32 ? 32 : 64);
  const int64_t ktiles = ternary::row_bytes(K) / kBRowBytes;
  // About two resident CTAs per SM (the kernel is built for 2), at least two k-tiles each.
  const int64_t s = std::min<int64_t>({kMaxSplitK, 2 * sms / std::max<int64_t>(tiles, 1), ktiles / 2});
  // Where the split measured faster than the unsplit kernel (H200, benchmarks/NOTES.md,
  // "Small-M products", v1): any split up to 32 rows (the 32-row tile helps as well); up to
  // 64 rows only 3 or more ways (2 ways lost: 2560->13824 at M = 64, 19.4 vs 18.5 us).
  // Above 64 rows exactly 4 ways (session 4's sweep, splitk_sweep_h200_s4.json: 2560->2560
  // at M = 128: 13.0 us at 4 ways against 18.0 unsplit and 17.2 at 8; 6912->2560 at M = 128
  // / 256: 21.9 / 30.9 against 24.1 at 6 ways / 36.9 unsplit), where the formula allows 4
  // or more, or 3 with long K; 2 and 3 ways lost there (2560->7680 at M = 128: 18.9 vs
  // 18.3; 2560->2560 at M = 256: 18.1 / 18.5 vs 18.0).
  if (M > 64) return s >= 4 || (s >= 3 && ktiles >= 40) ? 4 : 1;
  const bool wins = M <= 32 ? s > 1 : s >= 3;
  return wins ? static_cast<int>(s) : 1;
}

cudaError_t launch_gemm_split_k(const TernaryMatmulParams& p, int splits, cudaStream_t stream) {
  if (splits < 1 || splits > kMaxSplitK) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
#if defined(MMFREE_HAVE_SM90_GEMM)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (!device_has_clusters(dev)) return cudaErrorNotSupported;
  MMFREE_TERNARY_DISPATCH_OUT(p.out_dtype, T, { return launch_split_typed<T>(p, splits, stream); });
  return cudaSuccess;
#else
  (void)p;
  (void)stream;
  return cudaErrorNotSupported;
#endif
}

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
