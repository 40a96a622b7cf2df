// Ternary matrix product: int8 activations x packed ternary weights -> rescaled output.
//   acc[m, n] = sum_k x_q[m, k] * w[n, k]          (exact int32; w in {-1, 0, +1})
//   out[m, n] = (float(acc) * x_scale[m]) * w_scale  cast to out_dtype (round to nearest even)
// Weights are in the canonical packed format (common/ternary_format.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mmfree {

struct TernaryMatmulParams {
  const int8_t* x_q;      // [M, K], rows x_row_stride elements apart (>= K), contiguous along K
  int64_t x_row_stride;
  const float* x_scale;   // [M] dequantization multipliers of the activation rows
  const uint8_t* packed;  // [N, ternary::row_bytes(K)]
  const float* w_scale;   // one element (same device as the data)
  void* out;              // [M, N] contiguous, out_dtype
  DType out_dtype;
  int64_t M, N, K;
  // Scratch for kernels that first expand the packed weights (CUDA, the sm_90 int8-weight
  // GEMM): ternary_matmul_workspace_bytes() says how much a product needs; where it gets
  // less, the dispatch picks a kernel that needs none. Device memory, 16-byte aligned.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Transposed product for the straight-through backward of BitLinear (SPEC.md section 1):
//   out[m, k] = sum_n grad[m, n] * (w[n, k] * w_scale)     (fp32 accumulation)
// read directly from the packed weights: no float copy of W is ever materialized (the CPU
// kernel decodes one L2-sized panel of W at a time).
struct TernaryMatmulTParams {
  const float* grad;      // [M, N] contiguous
  const uint8_t* packed;  // [N, ternary::row_bytes(K)]
  const float* w_scale;   // one element
  float* out;             // [M, K] contiguous
  int64_t M, N, K;
};

// The CUDA transposed product runs on bf16 tensor cores (W_q is exact in bf16, the products
// of bf16 terms with +-1 are exact, accumulation is fp32). Wider grads come as `splits`
// bf16 terms whose sum is the grad exactly: fp16 as hi + lo, fp32 as hi + mid + lo (3 x 8
// significand bits cover fp32's 24); all terms are read against the same decoded weight
// tile, so the result is an fp32 sum of exact products, as on the CPU. (fp16 is not given
// to fp16 mma: Hopper's tensor cores align each k-group's products to a fixed window before
// adding, which truncates 22-bit fp16 products but never the <= 9-bit bf16 x +-1 ones.)
struct TernaryMatmulTCudaParams {
  const void* grad;       // [splits, M, N] contiguous bf16, 16-byte aligned for the fast path
  DType grad_dtype;       // must be DType::kBFloat16
  int splits;             // 1, 2 or 3 terms
  const uint8_t* packed;  // [N, ternary::row_bytes(K)], 16-byte aligned
  const float* w_scale;   // one element
  float* out;             // [M, K] contiguous
  int64_t M, N, K;
};

#if defined(MMFREE_WITH_CUDA)
// A column panel of W_q, decoded: out[n, c] = w[n, block_begin*128 + c] for
// c < width = min(K, block_end*128) - block_begin*128; out is [N, width] contiguous.
struct TernaryDecodePanelParams {
  const uint8_t* packed;  // [N, ternary::row_bytes(K)], 4-byte aligned
  int64_t N, K;
  int64_t block_begin, block_end;  // packed blocks (128 columns each) of the panel
  void* out;
  DType out_dtype;  // bf16, fp16 or fp32
};
#endif

namespace cpu {
void ternary_matmul(const TernaryMatmulParams& p);
void ternary_matmul_t(const TernaryMatmulTParams& p);
}  // namespace cpu

#if defined(MMFREE_WITH_CUDA)
namespace cuda {
// Which tensor-core GEMM serves the products that do not go to the decode GEMV (M >= 8).
// kAuto: the sm_90a wgmma kernel on sm_90 devices for the large products where it measured
// faster (cuda/ternary/launch.h; x rows 16-byte aligned), else the mma.sync kernel.
// kMma: always mma.sync. kSm90: always wgmma decoding the packed weights in its pipeline;
// kSm90Int8: always wgmma on the weights expanded to int8 first (needs the workspace).
// Both sm_90 ones: cudaErrorNotSupported where they are not built or the device is not sm_90.
enum class TernaryGemmImpl { kAuto, kMma, kSm90, kSm90Int8 };
cudaError_t ternary_matmul(const TernaryMatmulParams& p, cudaStream_t stream,
                           TernaryGemmImpl impl = TernaryGemmImpl::kAuto);
// Bytes of p.workspace that ternary_matmul(p, stream, impl) uses on the current device (0:
// none). The caller allocates them (the torch layer: from the caching allocator, so
// graph capture works) and passes them in p; a product given less runs a kernel that
// needs none (a forced kSm90Int8: cudaErrorInvalidValue).
size_t ternary_matmul_workspace_bytes(const TernaryMatmulParams& p, TernaryGemmImpl impl = TernaryGemmImpl::kAuto);
// `groups` independent products; decode-sized ones (M < the GEMM threshold, same M, N, K
// and out_dtype, at most 4) share one GEMV launch, others run one after another.
cudaError_t ternary_matmul_grouped(const TernaryMatmulParams* ps, int groups, cudaStream_t stream,
                                   TernaryGemmImpl impl = TernaryGemmImpl::kAuto);
// Whether this build has the sm_90a wgmma GEMM.
bool ternary_gemm_sm90_built();
// cudaErrorInvalidValue for a grad_dtype other than bf16, splits outside 1..3, or a
// misaligned `packed`; cudaErrorNotSupported where a block cannot have the shared memory
// the kernel needs (106 KB for one term: sm_80 and sm_90 can, sm_86/sm_89 cannot).
cudaError_t ternary_matmul_t(const TernaryMatmulTCudaParams& p, cudaStream_t stream);
// cudaErrorInvalidValue for a block range outside the row or a misaligned `packed`.
cudaError_t ternary_decode_panel(const TernaryDecodePanelParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace mmfree
