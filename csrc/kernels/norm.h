// Fused RMSNorm kernels: RMSNorm + per-row int8 quantization (BitLinear's input side),
// RMSNorm with a fused residual add, and the MLGRU output gate RMSNorm(g)*w*silu(h)
// (optionally going straight on into o_proj's RMSNorm + int8 quantization).
//
// Conventions (python/mmfree_ext/reference.py): statistics in fp32 with
// rstd = 1/sqrt(sum(x^2)/K + eps) and xn = (x*rstd)*w; amax = max(max|xn|, 1e-5),
// codes = clamp(round_half_away(xn * (127/amax)), -128, 127), x_scale = amax/127.
// float64 inputs: the quantizing ops compute in fp32 like the reference; rms_norm and
// rms_norm_swish_gate (and their backward passes) compute in fp64, so gradcheck is exact.
//
// All tensors are contiguous, rows of K elements. Inputs of one op (x, residual / g, h,
// grad) share one dtype; norm weights have their own dtype.
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mmfree {

// x [rows, K] -> x_q [P, rows, K] int8 and x_scale [P, rows] fp32, one per norm weight.
struct RmsNormQuantParams {
  const void* x;
  DType x_dtype;
  const void* weights;  // [P, K]
  DType w_dtype;
  int64_t num_weights;  // P >= 1
  int64_t rows;
  int64_t k;
  float eps;
  int8_t* x_q;
  float* x_scale;
};

// y = RMSNorm(x + residual) * w in x's dtype (normalizing the fp32 sum);
// residual_out = (x + residual) in x's dtype, or a copy of x without a residual.
struct RmsNormParams {
  const void* x;
  const void* residual;  // nullable, x's dtype
  DType dtype;
  const void* weight;  // [K]
  DType w_dtype;
  int64_t rows;
  int64_t k;
  float eps;
  void* y;
  void* residual_out;
};

// y = ((g*rstd(g))*w) * silu(h), in g's dtype. With quantize, y is rounded to g's dtype
// in registers and goes on into rms_norm_quant with norm_weight/norm_eps.
struct RmsNormSwishGateParams {
  const void* g;
  const void* h;  // g's dtype
  DType dtype;
  const void* weight;  // [K]
  DType w_dtype;
  int64_t rows;
  int64_t k;
  float eps;
  void* y;  // forward without quantization
  // Fused quantization (rms_norm_swish_gate_quant):
  const void* norm_weight;  // [K]
  DType norm_w_dtype;
  float norm_eps;
  int8_t* x_q;
  float* x_scale;
};

// Backward of rms_norm: grad wrt the sum s = x (+ residual); dx = ds (+ grad_residual).
// dweight is reduced in a fixed order (deterministic); dweight_partial is a workspace of
// max(norm_backward_partial_rows(rows), 1) * K elements of the statistics type (fp64 for
// float64 inputs, else fp32), CUDA only.
struct RmsNormBackwardParams {
  const void* grad_y;
  const void* x;
  const void* residual;       // nullable
  const void* grad_residual;  // nullable: gradient arriving at residual_out
  DType dtype;
  const void* weight;
  DType w_dtype;
  int64_t rows;
  int64_t k;
  float eps;
  void* dx;       // x's dtype
  void* dweight;  // weight's dtype
  void* dweight_partial;
  // Nullable, CUDA only (the CPU kernel requires nullptr): a device fp32 scalar that
  // multiplies grad_y as it is read, so a BitLinear's dX product reaches the norm backward
  // unscaled in x's dtype and w_scale is applied in fp32 here (no separate scaling pass).
  const float* grad_scale = nullptr;
};

struct RmsNormSwishGateBackwardParams {
  const void* grad_y;
  const void* g;
  const void* h;
  DType dtype;
  const void* weight;
  DType w_dtype;
  int64_t rows;
  int64_t k;
  float eps;
  void* dg;
  void* dh;
  void* dweight;
  void* dweight_partial;
};

// Rows per partial dweight sum in the backward passes (fixed: the sum order never
// depends on the thread or block count). 8 rows: M=8192 gives 1024 CUDA blocks (enough to
// fill an H100), while the partials ([M/8, K] fp32) add only ~5% to the bytes moved.
constexpr int64_t kNormBackwardRowsPerPartial = 8;
inline int64_t norm_backward_partial_rows(int64_t rows) {
  return (rows + kNormBackwardRowsPerPartial - 1) / kNormBackwardRowsPerPartial;
}

namespace cpu {
void rms_norm_quant(const RmsNormQuantParams& p);
void rms_norm(const RmsNormParams& p);
void rms_norm_swish_gate(const RmsNormSwishGateParams& p);
void rms_norm_swish_gate_quant(const RmsNormSwishGateParams& p);
void rms_norm_backward(const RmsNormBackwardParams& p);
void rms_norm_swish_gate_backward(const RmsNormSwishGateBackwardParams& p);
}  // namespace cpu

#if defined(MMFREE_WITH_CUDA)
namespace cuda {
cudaError_t rms_norm_quant(const RmsNormQuantParams& p, cudaStream_t stream);
cudaError_t rms_norm(const RmsNormParams& p, cudaStream_t stream);
cudaError_t rms_norm_swish_gate(const RmsNormSwishGateParams& p, cudaStream_t stream);
cudaError_t rms_norm_swish_gate_quant(const RmsNormSwishGateParams& p, cudaStream_t stream);
cudaError_t rms_norm_backward(const RmsNormBackwardParams& p, cudaStream_t stream);
cudaError_t rms_norm_swish_gate_backward(const RmsNormSwishGateBackwardParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace mmfree
