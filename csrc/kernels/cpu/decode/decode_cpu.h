// The fused CPU decode step (decode.h says what it computes): the whole layer loop in one
// parallel team over the CPU kernels the op-by-op path calls, in the same order, so the
// result is bit-identical to it.
//
// Threads: every thread runs the small row ops (norms, quantization, the MLGRU step) itself
// on the B rows, into its own buffers (the same code on the same inputs gives the same
// bits); only the ternary products are split, by output rows, into shared buffers, with a
// barrier after each. Five barriers per layer, one team per step. The one elementwise op
// whose rounding belongs to torch (silu(u_gate) * u_up in the activation dtype: torch's
// vectorized exp) is a callback, run by thread 0 on the whole [B, 1, 2I] buffer exactly
// as the op-by-op path runs it.
//
// Memory: a caller-owned workspace of decode_workspace_bytes(...) bytes, carved up here;
// nothing is allocated per step (for B < 4: the GEMV path; larger B reach the GEMM body,
// which allocates its accumulator tile).
#pragma once

#include <cstddef>
#include <cstdint>

#include "decode.h"

namespace mmfree {
namespace cpu {

// t [B, 1, I] = silu(u[:, :, :I]) * u[:, :, I:], u [B, 1, 2I], both in the activation dtype.
using DecodeSiluMulFn = void (*)(void* ctx, const void* u, void* t);

struct DecodeCpuArgs {
  DecodeStepParams p;
  // fp32 copies of the norm weights (null when p.norm_dtype is fp32: p's are used):
  const float* norms_f32;        // [L, 8, h]
  const float* down_norms_f32;   // [L, I]
  const float* final_norms_f32;  // [2, h]
  DecodeSiluMulFn silu_mul;
  void* silu_ctx;
  void* workspace;  // decode_workspace_bytes(p, max_threads) bytes, 64-byte aligned
};

// Workspace bytes for these shapes and up to `threads` team threads.
size_t decode_workspace_bytes(const DecodeStepParams& p, int threads);
// fp32 copies of p's norm weights (for a non-fp32 norm_dtype), written into the buffers.
void decode_convert_norms(const DecodeStepParams& p, float* norms_f32, float* down_norms_f32, float* final_norms_f32);
void decode_step(const DecodeCpuArgs& args);
// Where the step keeps u [B, 1, 2I] and t [B, 1, I] in a workspace (for the silu*mul callback).
void* decode_silu_u(void* workspace, const DecodeStepParams& p);
void* decode_silu_t(void* workspace, const DecodeStepParams& p);

}  // namespace cpu
}  // namespace mmfree
