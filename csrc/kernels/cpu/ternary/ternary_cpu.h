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

// GEMV paths (M < kGemvMaxM): the VNNI mask trick of ternary_gemv_avx512.cpp. The AVX-512
// one reads activations prepared by gemv_prepare_x512 (gemv_x512_bytes(K) bytes per row,
// 64-byte aligned); the 256-bit one reads the natural padded rows.
constexpr int64_t kGemvMaxM = 4;
int64_t gemv_x512_bytes(int64_t k);
void gemv_prepare_x512(const int8_t* x, int64_t k, int8_t* xp);
void gemv_rows_avx512(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1);
void gemv_rows_avxvnni(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1);

// The body that computes output rows [n0, n1) for M activation rows on the active path,
// and the activation layout it reads (prepared once per call by prepare_x_row).
using RowsFn = void (*)(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1);
enum class XLayout : int { kPadded = 0, kGemv512 = 1, kAmx = 2 };
struct RowsPlan {
  RowsFn body;
  XLayout layout;
};
RowsPlan plan_rows(int64_t m);
// Bytes of one prepared activation row (a multiple of 64); prepare_x_row writes it (zeros
// beyond K) and returns the exact row sum.
int64_t prepared_row_bytes(XLayout layout, int64_t k);
int32_t prepare_x_row(XLayout layout, const int8_t* x, int64_t k, int8_t* dst);

// AMX-INT8 path (M >= kAmxMinM, ternary_matmul_amx.cpp): the activations in the VNNI tile
// layout, rows padded to a multiple of 32 (amx_x_bytes), written for rows [m0, m1) of the
// padded count by amx_prepare_x; px.kp is K rounded up to 128.
constexpr int64_t kAmxMinM = 16;
int64_t amx_x_bytes(int64_t m, int64_t kp);
void amx_prepare_x(const int8_t* x, int64_t stride, int64_t m, int64_t k, int64_t kp, int64_t m0, int64_t m1,
                   int8_t* xv);
void matmul_rows_amx(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1);

// Rows of activations per block in the GEMM path, so a block of x stays in L2.
int64_t gemm_row_block(int64_t kp);

// Transposed product: out[m0:m1, k0:k1] for one 128-wide column panel (k0 a multiple of
// 128, so the panel is exactly one packed block of every weight row).
constexpr int64_t kTPanelCols = 128;
void matmul_t_tile_scalar(const TernaryMatmulTParams& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1);
void matmul_t_tile_avx2(const TernaryMatmulTParams& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1);
// AMX-BF16 path (M >= kAmxMinM, ternary_matmul_t_amx.cpp): the whole product, its own tiling
// (grad split into three exact bf16 terms; see the file comment for the rounding differences).
void matmul_t_amx_bf16(const TernaryMatmulTParams& p);

}  // namespace ternary_detail
}  // namespace cpu
}  // namespace mmfree
