// Row-range workers of the CPU norm kernels, one set per instruction set. The dispatcher
// (norm.cpp, baseline ISA) converts the norm weights to fp32 and owns all allocation, so
// the ISA files hold nothing but their own math (no shared inline code compiled for AVX).
#pragma once

#include <cstdint>

#include "norm.h"

namespace mmfree {
namespace cpu {
namespace norm_rows {

// w32: fp32 norm weights ([P, K] for quant). scratch: K floats (swish_gate_quant only).
#define MMFREE_NORM_ROW_WORKERS(suffix)                                                                          \
  void quant_##suffix(const RmsNormQuantParams& p, const float* w32, int64_t r0, int64_t r1);                    \
  void rms_norm_##suffix(const RmsNormParams& p, const float* w32, int64_t r0, int64_t r1);                      \
  void swish_gate_##suffix(const RmsNormSwishGateParams& p, const float* w32, int64_t r0, int64_t r1);           \
  void swish_gate_quant_##suffix(const RmsNormSwishGateParams& p, const float* w32, const float* nw32,           \
                                 float* scratch, int64_t r0, int64_t r1);

MMFREE_NORM_ROW_WORKERS(scalar)
MMFREE_NORM_ROW_WORKERS(avx2)
MMFREE_NORM_ROW_WORKERS(avx512)

#undef MMFREE_NORM_ROW_WORKERS

// float64 rms_norm / swish_gate forward, computed in fp64 (the exact path for gradcheck).
// Weights are read in their own dtype (a float64 weight keeps its precision).
void rms_norm_f64(const RmsNormParams& p, int64_t r0, int64_t r1);
void swish_gate_f64(const RmsNormSwishGateParams& p, int64_t r0, int64_t r1);

}  // namespace norm_rows
}  // namespace cpu
}  // namespace mmfree
