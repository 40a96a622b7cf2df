// The avx512 build of the CPU MLGRU scan: mlgru_scan_kernel.inc compiled with this file's ISA
// flags (the compiler vectorizes its lane loops 16 floats wide); fp16 converts in hardware.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/float_convert.h"
#include "cpu/mlgru/mlgru_isa.h"
#include "cpu/parallel.h"
#include "mlgru.h"

namespace mmfree {
namespace cpu {
namespace {

inline void load_fp16_hw(const uint16_t* src, float* dst, int n) {
  int k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k))));
  for (; k < n; ++k) dst[k] = fp16_bits_to_float(src[k]);
}

inline void store_fp16_hw(const float* src, uint16_t* dst, int n) {
  int k = 0;
  for (; k + 16 <= n; k += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm512_cvtps_ph(_mm512_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
  for (; k < n; ++k) dst[k] = float_to_fp16_bits(src[k]);
}

#define MLGRU_LOAD_FP16(src, dst, n) load_fp16_hw(src, dst, n)
#define MLGRU_STORE_FP16(src, dst, n) store_fp16_hw(src, dst, n)
#include "cpu/mlgru/mlgru_scan_kernel.inc"
#undef MLGRU_LOAD_FP16
#undef MLGRU_STORE_FP16

}  // namespace

void mlgru_scan_avx512(const MlgruScanParams& p) { run_forward(p); }
void mlgru_scan_backward_avx512(const MlgruScanBwdParams& p) { run_backward(p); }

}  // namespace cpu
}  // namespace mmfree
