// The CPU norm kernels on the calling thread with fp32 norm weights already at hand: the
// same row workers (and ISA choice) as the entry points in norm.h, without the weight
// conversion, the scratch allocation or the split over threads. For callers that run their
// own threads and own their buffers (the fused decode step, cpu/decode/).
#pragma once

#include "norm.h"

namespace mmfree {
namespace cpu {
namespace norm_serial {

// p.weights / p.weight / p.norm_weight are ignored: w32 (and nw32) are used instead.
void rms_norm_quant(const RmsNormQuantParams& p, const float* w32);
void rms_norm(const RmsNormParams& p, const float* w32);
// scratch: p.k floats.
void rms_norm_swish_gate_quant(const RmsNormSwishGateParams& p, const float* w32, const float* nw32, float* scratch);

}  // namespace norm_serial
}  // namespace cpu
}  // namespace mmfree
