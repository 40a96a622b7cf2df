// Internal interface between the ternary CPU entry points (ternary_matmul.cpp,
// ternary_matmul_t.cpp) and their ISA-specific bodies (*_avx2.cpp, *_avx512.cpp).
// Declarations and plain structs only: an inline function defined here would be compiled
// once per ISA and the linker could keep the AVX-512 copy for everyone.
#pragma once

#include <cstdint>

#include "ternary.h"

namespace mmfree {
namespace cpu {
namespace ternary_detail {

// Activations prepared once per call: rows padded with zeros to a multiple of 128 (the
// packed padding codes are zero weights, so the padded tail adds nothing) and the exact
// row sums needed by the offset codes: sum_k x*w = sum_k x*c - sum_k x, with c = w + 1.
struct PreparedX {
  const int8_t* x;        // [M, Kp], rows `stride` bytes apart, zero beyond K
  int64_t stride;
  int64_t kp;             // K rounded up to a multiple of 128
  const int32_t* row_sum;  // [M]
};

// Writes out[m, n0 .. n0+count) = (float(acc[i] - row_sum[m]) * x_scale[m]) * w_scale.
void store_outputs(const TernaryMatmulParams& p, const PreparedX& px, int64_t m, int64_t n0, const int32_t* dot,
                   int64_t count);

// Compute acc over output rows [n0, n1) for all M activation rows.
void matmul_rows_scalar(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1);
void matmul_rows_avx2(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1);
void matmul_rows_avx512(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1);

// Rows of activations per block in the GEMM path, so a block of x stays in L2.
int64_t gemm_row_block(int64_t kp);

// Transposed product: out[m0:m1, k0:k1] for one 128-wide column panel (k0 a multiple of
// 128, so the panel is exactly one packed block of every weight row).
constexpr int64_t kTPanelCols = 128;
void matmul_t_tile_scalar(const TernaryMatmulTParams& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1);
void matmul_t_tile_avx2(const TernaryMatmulTParams& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1);

}  // namespace ternary_detail
}  // namespace cpu
}  // namespace mmfree
