// mmfree::cuda::ternary_matmul: picks the kernel by M. Decode (M <= 16) is bound by the
// weight stream and goes to the dp4a GEMV; prefill goes to the tensor-core GEMM. Both
// read the canonical packed format directly, so there is no load-time weight transform.
#include <cstdint>

#include "cuda/ternary/launch.h"
#include "ternary.h"

namespace mmfree {
namespace cuda {

cudaError_t ternary_matmul(const TernaryMatmulParams& p, cudaStream_t stream) {
  using namespace ternary_kernels;
  if (p.M < 0 || p.N < 0 || p.K < 0 || p.x_row_stride < p.K) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  // The fast kernels read weights 16 bytes at a time; every row starts 16-byte aligned
  // when the tensor does (row_bytes is a multiple of 32).
  if (reinterpret_cast<uintptr_t>(p.packed) % 16 != 0) return launch_simple(p, stream);
  if (p.M < kGemmMinRows) return launch_gemv(p, stream);
  return launch_gemm(p, stream);
}

cudaError_t ternary_matmul_grouped(const TernaryMatmulParams* ps, int groups, cudaStream_t stream) {
  using namespace ternary_kernels;
  if (groups < 1) return cudaErrorInvalidValue;
  bool gemv = groups <= kMaxGemvGroups;
  for (int i = 0; i < groups; ++i) {
    const TernaryMatmulParams& p = ps[i];
    if (p.M < 0 || p.N < 0 || p.K < 0 || p.x_row_stride < p.K) return cudaErrorInvalidValue;
    gemv &= reinterpret_cast<uintptr_t>(p.packed) % 16 == 0 && p.M < kGemmMinRows && p.M == ps[0].M &&
            p.N == ps[0].N && p.K == ps[0].K && p.out_dtype == ps[0].out_dtype;
  }
  if (gemv) return launch_gemv_grouped(ps, groups, stream);
  for (int i = 0; i < groups; ++i) {
    const cudaError_t err = ternary_matmul(ps[i], stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mmfree
