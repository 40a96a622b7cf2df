// Internal entry points of the CUDA ternary matmul, one per kernel, so that the C++
// benchmark can check and time each path on every shape. mmfree::cuda::ternary_matmul
// (dispatch.cu) picks among them; callers outside the kernels use that one.
// Torch-free and host-only: includable from plain C++.
#pragma once

#include <cuda_runtime_api.h>

#include "ternary.h"

namespace mmfree {
namespace cuda {
namespace ternary_kernels {

// Largest M the decode GEMV handles in one launch (activation rows staged per block).
constexpr int kGemvMaxRows = 16;
// Most products one grouped GEMV launch takes.
constexpr int kMaxGemvGroups = 4;
// M from which ternary_matmul uses the tensor-core GEMM instead of the GEMV. Measured on the
// H100 (bench_ternary_cuda): at M = 8 the GEMM takes 16.7 us for 2560->13824 against the
// GEMV's 32.5 (36 vs 62 us for 2560->32000; 15.7 vs 15.5 for 2560->2560; only 6912->2560
// favours the GEMV, 27 vs 35 us), and at M = 16 it wins every shape by 1.6-5x.
constexpr int kGemmMinRows = 8;
// Where ternary_matmul (TernaryGemmImpl::kAuto) takes the sm_90a wgmma GEMM instead of
// mma.sync on sm_90 devices: M >= kSm90MinRows with N >= kSm90MinCols, or any N from
// kSm90AllColsRows rows. Measured on the H200 (bench_ternary_cuda --gemm-sweep, v1 in
// benchmarks/NOTES.md): wgmma wins 2560->13824 and 2560->32000 from M = 512 (67.5 vs
// 72.3 us, 127 vs 138 us) and every shape at M = 8192 except 2560->13824 (within 2%), and
// loses the 2560-wide shapes below M = 8192 (too few 128x256 tiles for 132 SMs: M = 2048,
// 2560->2560 makes 160) and everything at M = 128.
constexpr int kSm90MinRows = 512;
constexpr int kSm90MinCols = 8192;
constexpr int kSm90AllColsRows = 8192;
// Split-K of the mma.sync GEMM over a thread-block cluster (gemm_split_k.cu, sm_90): at
// most kMaxSplitK CTAs per output tile (the portable cluster size). ternary_matmul takes it
// for M >= kSplitKMinRows (below kGemmMinRows, instead of the GEMV) where split_k_count()
// > 1. MMFREE_TERNARY_SPLITK overrides:
// "auto" (or unset), "off" (the unsplit selection of before), or 1..8 (that many CTAs per
// cluster for every product whatever M, the GEMV range included; tests and benchmarks).
constexpr int kMaxSplitK = 8;
// From M = 3 the split kernel beats the GEMV (H200, forced split vs GEMV at M = 2 / 4:
// 8.7 / 8.8 vs 8.1 / 10.6 us on 2560->2560, 14.3 / 14.2 vs 14.3 / 21.9 on 2560->13824).
constexpr int kSplitKMinRows = 3;
constexpr int kSplitKAuto = -1;
constexpr int kSplitKOff = 0;
constexpr int kSplitKInvalid = -2;

// One thread per output, byte loads: the obviously-correct baseline (any alignment).
cudaError_t launch_simple(const TernaryMatmulParams& p, cudaStream_t stream);
// Decode GEMV: dp4a on 2-bit codes, 16-byte weight loads. Any M (launches per 16 rows);
// needs `packed` 16-byte aligned.
cudaError_t launch_gemv(const TernaryMatmulParams& p, cudaStream_t stream);
// Decode GEMV over `groups` (1..kMaxGemvGroups) products with equal M, N, K and out_dtype,
// in one launch; each needs `packed` 16-byte aligned.
cudaError_t launch_gemv_grouped(const TernaryMatmulParams* ps, int groups, cudaStream_t stream);
// Prefill GEMM: int8 mma.sync m16n8k32 with the decode in the smem pipeline. Any M;
// needs `packed` 16-byte aligned.
cudaError_t launch_gemm(const TernaryMatmulParams& p, cudaStream_t stream);
// Prefill GEMM on Hopper: int8 wgmma, warp-specialized, persistent (gemm_sm90.cu). Only
// built where the arch list has 90 (MMFREE_HAVE_SM90_GEMM); cudaErrorNotSupported on a
// device other than sm_90. Any M, K and x alignment; needs `packed` 16-byte aligned.
cudaError_t launch_gemm_sm90(const TernaryMatmulParams& p, cudaStream_t stream);
// Small-M GEMM: the mma.sync main loop split over K across `splits` (1..kMaxSplitK) CTAs
// of a cluster, reduced through distributed shared memory (gemm_split_k.cu). Any M, K and
// x alignment; needs `packed` 16-byte aligned and an sm_90 device (cudaErrorNotSupported
// elsewhere or in a build without arch 90).
cudaError_t launch_gemm_split_k(const TernaryMatmulParams& p, int splits, cudaStream_t stream);
// CTAs per cluster the automatic selection uses for this product on `sms` SMs; 1 means
// the unsplit kernel (gemm.cu) is the better one.
int split_k_count(int64_t M, int64_t N, int64_t K, int sms);
// MMFREE_TERNARY_SPLITK: kSplitKAuto, kSplitKOff, 1..kMaxSplitK, or kSplitKInvalid (after
// a message on stderr) for anything else.
int split_k_override();

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
