// The canonical packed ternary weight format of mmfree-ext.
//
// This header is the single definition of the format; docs/packed_format.md explains it
// with a worked example. CPU and CUDA kernels both read this layout, so a packed
// checkpoint loads on either device. A kernel that wants another arrangement must
// derive it from this one at load time, inside the API, never on disk.
//
// * Code: a ternary weight w in {-1, 0, +1} is stored as the unsigned 2-bit code
//   c = w + 1 (0 -> -1, 1 -> 0, 2 -> +1). Code 3 never occurs in valid data.
//   The offset encoding lets a kernel multiply unsigned codes by signed int8
//   activations (vpdpbusd, pmaddubsw, dp4a) and subtract the activation row sum once:
//       sum_k x[k] * w[k] = sum_k x[k] * c[k] - sum_k x[k].
// * Block: 128 consecutive weights of one output row along K are 32 bytes. Byte b
//   (0..31) of a block holds, in its bit pair j (bits 2j..2j+1, j = 0 the lowest),
//   the weight at k = block * 128 + j * 32 + b. Shifting a 32-byte vector right by 2j
//   and masking with 0x03 therefore yields the codes of 32 consecutive k.
// * Row: ceil(K / 128) blocks; positions k >= K hold code 1 (a zero weight), so tails
//   contribute nothing even when a kernel reads the whole last block.
// * Tensor: uint8 [N, ceil(K / 128) * 32], row-major, one output row after another.
//   K (in_features) is not stored in the tensor and travels beside it.
// * Scale: a separate fp32 tensor with one element, the dequantization multiplier
//   w_scale = max(mean(|W|), 1e-5), so W ~ w * w_scale.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MMFREE_HD __host__ __device__ __forceinline__
#else
#define MMFREE_HD inline
#endif

namespace mmfree {
namespace ternary {

constexpr int kBlockWeights = 128;   // weights per block along K
constexpr int kBlockBytes = 32;      // bytes per block
constexpr int kCodesPerByte = 4;
constexpr uint8_t kZeroCode = 1;     // code of a zero weight; also the padding code
constexpr uint8_t kZeroByte = 0x55;  // four zero codes

MMFREE_HD int64_t blocks_per_row(int64_t in_features) {
  return (in_features + kBlockWeights - 1) / kBlockWeights;
}

MMFREE_HD int64_t row_bytes(int64_t in_features) {
  return blocks_per_row(in_features) * kBlockBytes;
}

// Byte offset within a row and bit shift of weight k.
MMFREE_HD int64_t byte_of(int64_t k) {
  return (k / kBlockWeights) * kBlockBytes + (k % kBlockBytes);
}
MMFREE_HD int shift_of(int64_t k) {
  return static_cast<int>((k % kBlockWeights) / kBlockBytes) * 2;
}

MMFREE_HD uint8_t encode(int8_t w) { return static_cast<uint8_t>(w + 1); }
MMFREE_HD int8_t decode(uint8_t code) { return static_cast<int8_t>(code) - 1; }

}  // namespace ternary
}  // namespace mmfree
