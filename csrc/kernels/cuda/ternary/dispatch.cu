// mmfree::cuda::ternary_matmul: picks the kernel by M. Decode (M < 8) is bound by the
// weight stream and goes to the dp4a GEMV (on sm_90 only M < 3, or where the split-K
// kernel below does not pay; launch.h); prefill goes to a tensor-core GEMM: on sm_90
// the wgmma kernel (gemm_sm90.cu) for the large products (launch.h says which), the
// cluster split-K mma.sync kernel (gemm_split_k.cu) where unsplit tiles would leave SMs
// idle, else mma.sync (gemm.cu). All
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

// CTAs per cluster for the split-K kernel (gemm_split_k.cu) under the automatic selection:
// > 1 where unsplit tiles would leave SMs idle on an sm_90 device, else 1 (also where the
// build has no sm_90 code or MMFREE_TERNARY_SPLITK=off); 0 with an error in `err`.
int auto_splits(const TernaryMatmulParams& p, int split_mode, cudaError_t& err) {
  using namespace ternary_kernels;
  err = cudaSuccess;
#if defined(MMFREE_HAVE_SM90_GEMM)
  if (split_mode != kSplitKAuto || !is_sm90_device()) return 1;
  int dev = 0, sms = 0;
  err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return 0;
  return split_k_count(p.M, p.N, p.K, sms);
#else
  (void)p;
  (void)split_mode;
  return 1;
#endif
}

#if defined(MMFREE_HAVE_SM90_GEMM)
// Whether the automatic selection takes the wgmma kernel split along K (gemm_sm90.cu) for
// a product it would otherwise give to mma.sync: never while kSm90SplitAuto is false
// (launch.h: the rule is not measured yet), nor under a set MMFREE_TERNARY_SM90_SPLITK.
bool sm90_split_pays(const TernaryMatmulParams& p) {
  using namespace ternary_kernels;
  if constexpr (!kSm90SplitAuto) {
    (void)p;
    return false;
  } else {
    if (sm90_split_override() != kSplitKAuto) return false;
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return false;
    return sm90_split_count(p.M, p.N, p.K, sms) > 1;
  }
}
#endif

#if defined(MMFREE_HAVE_SM90_GEMM)
bool x_rows_aligned(const TernaryMatmulParams& p) {
  return reinterpret_cast<uintptr_t>(p.x_q) % 16 == 0 && p.x_row_stride % 16 == 0;
}

// Whether the automatic selection takes the int8-weight wgmma kernel for this prefill-sized
// product (launch.h: kSm90Int8Auto, kSm90Int8MinRows), workspace aside.
bool int8_auto(const TernaryMatmulParams& p) {
  using namespace ternary_kernels;
  if constexpr (!kSm90Int8Auto) {
    (void)p;
    return false;
  } else {
    return p.M >= kSm90Int8MinRows && p.K > 0 && x_rows_aligned(p) && is_sm90_device();
  }
}
#endif

// Whether ternary_matmul(p, impl) runs the int8-weight kernel given enough workspace.
bool wants_int8(const TernaryMatmulParams& p, TernaryGemmImpl impl, int split_mode) {
  using namespace ternary_kernels;
#if defined(MMFREE_HAVE_SM90_GEMM)
  if (p.M < kGemmMinRows || p.N == 0 || reinterpret_cast<uintptr_t>(p.packed) % 16 != 0) return false;
  if (impl == TernaryGemmImpl::kSm90Int8) return true;
  return impl == TernaryGemmImpl::kAuto && split_mode <= 0 && int8_auto(p);
#else
  (void)p;
  (void)impl;
  (void)split_mode;
  return false;
#endif
}

cudaError_t launch_mma(const TernaryMatmulParams& p, cudaStream_t stream, int split_mode) {
  using namespace ternary_kernels;
  cudaError_t err = cudaSuccess;
  const int splits = auto_splits(p, split_mode, err);
  if (err != cudaSuccess) return err;
  if (splits > 1) return ternary_kernels::launch_gemm_split_k(p, splits, stream);
  return launch_gemm(p, stream);
}

cudaError_t launch_prefill(const TernaryMatmulParams& p, cudaStream_t stream, TernaryGemmImpl impl,
                           int split_mode) {
  using namespace ternary_kernels;
  if (impl == TernaryGemmImpl::kSm90Int8) {
#if defined(MMFREE_HAVE_SM90_GEMM)
    return launch_gemm_sm90_int8(p, stream);
#else
    return cudaErrorNotSupported;
#endif
  }
  if (impl == TernaryGemmImpl::kSm90) {
#if defined(MMFREE_HAVE_SM90_GEMM)
    return launch_gemm_sm90(p, stream);
#else
    return cudaErrorNotSupported;
#endif
  }
#if defined(MMFREE_HAVE_SM90_GEMM)
  const bool have_workspace = p.workspace != nullptr && reinterpret_cast<uintptr_t>(p.workspace) % 16 == 0 &&
                              p.workspace_bytes >= sm90_int8_workspace_bytes(p.N, p.K);
  if (impl == TernaryGemmImpl::kAuto && have_workspace && wants_int8(p, impl, split_mode)) {
    return launch_gemm_sm90_int8(p, stream);
  }
  const bool vec_a = x_rows_aligned(p);
  const bool big = p.M >= kSm90AllColsRows || (p.M >= kSm90MinRows && p.N >= kSm90MinCols);
  if (impl == TernaryGemmImpl::kAuto && p.K > 0 && vec_a && is_sm90_device() && (big || sm90_split_pays(p))) {
    return launch_gemm_sm90(p, stream);
  }
#endif
  return launch_mma(p, stream, split_mode);
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
  const int split_mode = split_k_override();
  if (split_mode == kSplitKInvalid) return cudaErrorInvalidValue;
  // A forced split count takes every product but the ones forced to wgmma.
  const bool forced_sm90 = impl == TernaryGemmImpl::kSm90 || impl == TernaryGemmImpl::kSm90Int8;
  if (split_mode > 0 && !forced_sm90) return launch_gemm_split_k(p, split_mode, stream);
  if (p.M < kGemmMinRows) {
    cudaError_t err = cudaSuccess;
    const int splits = p.M >= kSplitKMinRows ? auto_splits(p, split_mode, err) : 1;
    if (err != cudaSuccess) return err;
    return splits > 1 ? launch_gemm_split_k(p, splits, stream) : launch_gemv(p, stream);
  }
  return launch_prefill(p, stream, impl, split_mode);
}

size_t ternary_matmul_workspace_bytes(const TernaryMatmulParams& p, TernaryGemmImpl impl) {
  using namespace ternary_kernels;
  if (p.M <= 0 || p.N <= 0 || p.K <= 0) return 0;
  const int split_mode = split_k_override();
  if (split_mode == kSplitKInvalid) return 0;  // ternary_matmul reports it
  return wants_int8(p, impl, split_mode) ? sm90_int8_workspace_bytes(p.N, p.K) : 0;
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
