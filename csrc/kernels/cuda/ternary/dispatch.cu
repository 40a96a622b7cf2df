// mmfree::cuda::ternary_matmul: picks the kernel by M. Decode (M < 8) is bound by the
// weight stream and goes to the dp4a GEMV; prefill goes to a tensor-core GEMM: on sm_90
// the wgmma kernel (gemm_sm90.cu) for the large products (launch.h says which), else mma.sync (gemm.cu). All
// read the canonical packed format directly, so there is no load-time weight transform.
#include <cstdint>

#include "cuda/ternary/launch.h"
#include "ternary.h"

namespace mmfree {
namespace cuda {

namespace {

#if defined(MMFREE_HAVE_SM90_GEMM)
bool is_sm90_device() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}
#endif

cudaError_t launch_prefill(const TernaryMatmulParams& p, cudaStream_t stream, TernaryGemmImpl impl) {
  using namespace ternary_kernels;
  if (impl == TernaryGemmImpl::kSm90) {
#if defined(MMFREE_HAVE_SM90_GEMM)
    return launch_gemm_sm90(p, stream);
#else
    return cudaErrorNotSupported;
#endif
  }
#if defined(MMFREE_HAVE_SM90_GEMM)
  const bool vec_a = reinterpret_cast<uintptr_t>(p.x_q) % 16 == 0 && p.x_row_stride % 16 == 0;
  const bool big = p.M >= kSm90AllColsRows || (p.M >= kSm90MinRows && p.N >= kSm90MinCols);
  if (impl == TernaryGemmImpl::kAuto && big && p.K > 0 && vec_a && is_sm90_device()) {
    return launch_gemm_sm90(p, stream);
  }
#endif
  return launch_gemm(p, stream);
}

}  // namespace

bool ternary_gemm_sm90_built() {
#if defined(MMFREE_HAVE_SM90_GEMM)
  return true;
#else
  return false;
#endif
}

cudaError_t ternary_matmul(const TernaryMatmulParams& p, cudaStream_t stream, TernaryGemmImpl impl) {
  using namespace ternary_kernels;
  if (p.M < 0 || p.N < 0 || p.K < 0 || p.x_row_stride < p.K) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  // The fast kernels read weights 16 bytes at a time; every row starts 16-byte aligned
  // when the tensor does (row_bytes is a multiple of 32).
  if (reinterpret_cast<uintptr_t>(p.packed) % 16 != 0) return launch_simple(p, stream);
  if (p.M < kGemmMinRows) return launch_gemv(p, stream);
  return launch_prefill(p, stream, impl);
}

cudaError_t ternary_matmul_grouped(const TernaryMatmulParams* ps, int groups, cudaStream_t stream,
                                   TernaryGemmImpl impl) {
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
    const cudaError_t err = ternary_matmul(ps[i], stream, impl);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mmfree
