// Internal entry points of the CUDA ternary matmul, one per kernel, so that the C++
// benchmark can check and time each path on every shape. mmfree::cuda::ternary_matmul
// (dispatch.cu) picks among them; callers outside the kernels use that one.
// Torch-free and host-only: includable from plain C++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/ternary_format.h"
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
// Split-K inside the wgmma GEMM (gemm_sm90.cu): a cluster of 2..kMaxSm90SplitK CTAs per
// output tile along K, for shapes with fewer tiles than SMs (M = 512 x N = 2560: 40 tiles
// of 128 x 256 on 132 SMs). MMFREE_TERNARY_SM90_SPLITK: "auto" (or unset), "off" or 2..8
// (every product the wgmma kernel runs). Under auto, sm90_split_count() decides, and it
// says 1 (no split) while kSm90SplitAuto is false: the rule is a candidate that has not
// been measured yet (benchmarks/NOTES.md, issue 11, "split-K in the wgmma GEMM").
constexpr int kMaxSm90SplitK = 8;
constexpr bool kSm90SplitAuto = false;
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
// Splits K over a cluster as MMFREE_TERNARY_SM90_SPLITK says (sm90_split_override below).
cudaError_t launch_gemm_sm90(const TernaryMatmulParams& p, cudaStream_t stream);
// The same wgmma GEMM on the weights expanded to int8 first (launch_unpack_int8 into
// p.workspace, which must hold sm90_int8_workspace_bytes(N, K), 16-byte aligned), then both
// tiles by TMA (cp.async for B beside byte loads of A where x rows are not 16-byte aligned):
// cudaErrorInvalidValue without that workspace. Same split-K switch.
cudaError_t launch_gemm_sm90_int8(const TernaryMatmulParams& p, cudaStream_t stream);
// Where ternary_matmul (kAuto) takes launch_gemm_sm90_int8 on sm_90 (given the workspace and
// 16-byte aligned x rows, i.e. its TMA instance): M >= kSm90Int8MinRows, every N. Measured
// on the H200 (bench_ternary_cuda --gemm-sweep, session 5, benchmarks/NOTES.md "int8-weight
// wgmma"): from M = 512 it beats every other kernel on the four 2.7B shapes (M = 512:
// 21.7 / 57.4 / 37.7 / 113.8 us against auto's 26.2 / 67.4 / 59.0 / ~127 for 2560->2560 /
// 2560->13824 / 6912->2560 / 2560->32000), at M = 128 it loses to the split-K and mma.sync
// kernels on all four (21.2 vs 12.9 us on 2560->2560).
constexpr bool kSm90Int8Auto = true;
constexpr int64_t kSm90Int8MinRows = 512;
// Expanded weights of an [N, K] product: N rows of 128 * ceil(K / 128) signed bytes.
inline size_t sm90_int8_workspace_bytes(int64_t N, int64_t K) {
  return static_cast<size_t>(N) * static_cast<size_t>(ternary::blocks_per_row(K)) * ternary::kBlockWeights;
}
// out[n, k] = w[n, k] in {-1, 0, 1} as int8 for k < 128 * blocks (0 past K, from the
// padding codes); out is [N, 128 * ceil(K / 128)], 16-byte aligned; packed 16-byte aligned.
cudaError_t launch_unpack_int8(const uint8_t* packed, int64_t N, int64_t K, int8_t* out, cudaStream_t stream);
// Small-M GEMM: the mma.sync main loop split over K across `splits` (1..kMaxSplitK) CTAs
// of a cluster, reduced through distributed shared memory (gemm_split_k.cu). Any M, K and
// x alignment; needs `packed` 16-byte aligned and an sm_90 device (cudaErrorNotSupported
// elsewhere or in a build without arch 90).
cudaError_t launch_gemm_split_k(const TernaryMatmulParams& p, int splits, cudaStream_t stream);
// MMFREE_TERNARY_SM90_SPLITK: kSplitKAuto, kSplitKOff, 2..kMaxSm90SplitK, or
// kSplitKInvalid (after a message on stderr) for anything else.
int sm90_split_override();
// The tail wave of the wgmma GEMM (auto split mode, no whole-grid split): a grid of T tiles
// on S SMs with T >= S runs its floor(T / S) full waves persistent, and the T mod S tiles
// left (a wave that leaves SMs idle: M = 2048 x 6912->2560 is 160 tiles of 128 x 256, 132 +
// 28) as a second launch split over K across a cluster, so that they fill the SMs:
// sm90_tail_splits() ways, 1 for none. At most kSm90TailMaxSplits ways, the split grid in one
// wave, and only where the k-tiles each rank is spared, ktiles * (ways - 1) / ways, reach
// kSm90TailMinSavedKtiles: the second launch, its pipeline fills and the reduction cost
// about 15 k-tiles of one tile's time (H200, session 6: at 20 k-tiles, 4 ways, M = 2048
// 2560->2560 ran 47.8 us with it and 48.0 without; at 54, 6912->2560, 78.9 against 93.1).
// MMFREE_TERNARY_SM90_TAIL=off turns it off (benchmarks compare the two); so does
// MMFREE_TERNARY_SM90_SPLITK=off (no split instance at all), and a forced count splits every
// tile instead. Not checked yet: whether 3- and 4-CTA clusters of the tail always fit one wave
// (clusters must sit in one GPC; cudaOccupancyMaxActiveClusters would say).
constexpr int kSm90TailMaxSplits = 4;
constexpr int kSm90TailMinSavedKtiles = 24;
int sm90_tail_splits(int64_t tiles, int64_t ktiles, int sms);
// MMFREE_TERNARY_SM90_TAIL: 1 ("auto" or unset), 0 ("off"), -1 (after a message on stderr)
// for anything else.
int sm90_tail_override();
// CTAs per cluster the wgmma GEMM uses for this product under auto (1: no split).
int sm90_split_count(int64_t M, int64_t N, int64_t K, int sms);
// CTAs per cluster the automatic selection uses for this product on `sms` SMs; 1 means
// the unsplit kernel (gemm.cu) is the better one.
int split_k_count(int64_t M, int64_t N, int64_t K, int sms);
// MMFREE_TERNARY_SPLITK: kSplitKAuto, kSplitKOff, 1..kMaxSplitK, or kSplitKInvalid (after
// a message on stderr) for anything else.
int split_k_override();

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
