// The ISA-specific builds of the CPU MLGRU scan (one translation unit each, all sharing
// mlgru_scan_kernel.inc); mlgru_scan.cpp picks one at run time.
#pragma once

#include "mlgru.h"

namespace mmfree {
namespace cpu {

#if defined(MMFREE_HAVE_AVX2_KERNELS)
void mlgru_scan_avx2(const MlgruScanParams& p);
void mlgru_scan_backward_avx2(const MlgruScanBwdParams& p);
#endif
#if defined(MMFREE_HAVE_AVX512_KERNELS)
void mlgru_scan_avx512(const MlgruScanParams& p);
void mlgru_scan_backward_avx512(const MlgruScanBwdParams& p);
#endif

}  // namespace cpu
}  // namespace mmfree
