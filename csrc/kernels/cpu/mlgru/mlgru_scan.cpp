// CPU MLGRU scan: run-time choice between the AVX-512, AVX2 and baseline builds of
// mlgru_scan_kernel.inc (the baseline build is also the float64 path for gradcheck).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/float_convert.h"
#include "cpu/cpu_features.h"
#include "cpu/mlgru/mlgru_isa.h"
#include "cpu/parallel.h"
#include "mlgru.h"

namespace mmfree {
namespace cpu {
namespace {
#include "cpu/mlgru/mlgru_scan_kernel.inc"
}  // namespace

void mlgru_scan(const MlgruScanParams& p) {
  const Isa isa = active_isa();
  (void)isa;
#if defined(MMFREE_HAVE_AVX512_KERNELS)
  if (isa == Isa::kAvx512) return mlgru_scan_avx512(p);
#endif
#if defined(MMFREE_HAVE_AVX2_KERNELS)
  if (isa >= Isa::kAvx2) return mlgru_scan_avx2(p);
#endif
  run_forward(p);
}

void mlgru_scan_backward(const MlgruScanBwdParams& p) {
  const Isa isa = active_isa();
  (void)isa;
#if defined(MMFREE_HAVE_AVX512_KERNELS)
  if (isa == Isa::kAvx512) return mlgru_scan_backward_avx512(p);
#endif
#if defined(MMFREE_HAVE_AVX2_KERNELS)
  if (isa >= Isa::kAvx2) return mlgru_scan_backward_avx2(p);
#endif
  run_backward(p);
}

}  // namespace cpu
}  // namespace mmfree
