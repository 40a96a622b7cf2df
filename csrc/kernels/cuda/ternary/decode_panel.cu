// Decodes a column panel of packed ternary weights into a dense bf16/fp16/fp32 matrix: the
// operand of the cuBLAS path of ternary_matmul_t, which takes dY @ W_q one column panel at a
// time, so no full float copy of W ever exists. w = code - 1 is exact in all three.
//
// One thread per packed 32-bit word (bytes 4q..4q+3 of one 32-byte block of one row): for
// each bit pair j it writes the 4 consecutive weights k = blk*128 + j*32 + 4q .. +3 with one
// vector store (16-bit types: a byte permute puts each code under the exponent byte of 128
// (bf16) or 1024 (fp16), then one packed subtract of 129 / 1025 leaves c - 1).
#include <algorithm>

#include "common/ternary_format.h"
#include "cuda/common.cuh"
#include "ternary.h"

namespace mmfree {
namespace cuda {
namespace {

// Four codes (bytes of `codes`) -> four weights, stored as 8 (16-bit) or 16 (fp32) bytes.
template <class T> struct Decode4;
template <> struct Decode4<__nv_bfloat16> {
  using Vec = uint2;
  static __device__ __forceinline__ Vec run(uint32_t codes) {
    uint32_t lo = __byte_perm(codes, 0x43, 0x4140);  // [c0, 0x43, c1, 0x43]: bf16 128 + c
    uint32_t hi = __byte_perm(codes, 0x43, 0x4342);
    const __nv_bfloat162 bias = __floats2bfloat162_rn(129.f, 129.f);
    __nv_bfloat162 l = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&lo), bias);
    __nv_bfloat162 h = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&hi), bias);
    return make_uint2(*reinterpret_cast<uint32_t*>(&l), *reinterpret_cast<uint32_t*>(&h));
  }
};
template <> struct Decode4<__half> {
  using Vec = uint2;
  static __device__ __forceinline__ Vec run(uint32_t codes) {
    uint32_t lo = __byte_perm(codes, 0x64, 0x4140);  // [c0, 0x64, c1, 0x64]: fp16 1024 + c
    uint32_t hi = __byte_perm(codes, 0x64, 0x4342);
    const __half2 bias = __floats2half2_rn(1025.f, 1025.f);
    __half2 l = __hsub2(*reinterpret_cast<__half2*>(&lo), bias);
    __half2 h = __hsub2(*reinterpret_cast<__half2*>(&hi), bias);
    return make_uint2(*reinterpret_cast<uint32_t*>(&l), *reinterpret_cast<uint32_t*>(&h));
  }
};
template <> struct Decode4<float> {
  using Vec = float4;
  static __device__ __forceinline__ Vec run(uint32_t codes) {
    return make_float4(static_cast<float>(codes & 0xff) - 1.f, static_cast<float>((codes >> 8) & 0xff) - 1.f,
                       static_cast<float>((codes >> 16) & 0xff) - 1.f, static_cast<float>(codes >> 24) - 1.f);
  }
};

template <class T>
__global__ void decode_panel_kernel(TernaryDecodePanelParams p, int64_t width, bool vec_store) {
  const int64_t words_per_row = (p.block_end - p.block_begin) * (ternary::kBlockBytes / 4);
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= p.N * words_per_row) return;
  const int64_t n = idx / words_per_row;
  const int64_t wi = idx % words_per_row;
  const int64_t blk = wi / 8;  // block within the panel
  const int q = static_cast<int>(wi % 8);
  const uint32_t word = reinterpret_cast<const uint32_t*>(
      p.packed + n * ternary::row_bytes(p.K) + (p.block_begin + blk) * ternary::kBlockBytes)[q];
  T* row = static_cast<T*>(p.out) + n * width;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const auto v = Decode4<T>::run((word >> (2 * j)) & 0x03030303u);
    const int64_t c0 = blk * ternary::kBlockWeights + j * 32 + 4 * q;  // panel column
    if (vec_store && c0 + 4 <= width) {
      *reinterpret_cast<typename Decode4<T>::Vec*>(row + c0) = v;
    } else {
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (c0 + i < width) row[c0 + i] = e[i];
    }
  }
}

}  // namespace

cudaError_t ternary_decode_panel(const TernaryDecodePanelParams& p, cudaStream_t stream) {
  const int64_t nblocks = ternary::blocks_per_row(p.K);
  if (p.N < 0 || p.K < 0 || p.block_begin < 0 || p.block_end > nblocks || p.block_begin > p.block_end)
    return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(p.packed) % 4 != 0) return cudaErrorInvalidValue;
  const int64_t width = std::min<int64_t>(p.K, p.block_end * ternary::kBlockWeights) - p.block_begin * ternary::kBlockWeights;
  const int64_t words = p.N * (p.block_end - p.block_begin) * (ternary::kBlockBytes / 4);
  if (words == 0) return cudaSuccess;
  // Vector stores of 4 weights need every row (width elements apart) and the base aligned.
  const bool vec_store = width % 4 == 0 && reinterpret_cast<uintptr_t>(p.out) % (4 * dtype_size(p.out_dtype)) == 0;
  switch (p.out_dtype) {
    case DType::kBFloat16: decode_panel_kernel<__nv_bfloat16><<<ceil_div(words, 256), 256, 0, stream>>>(p, width, vec_store); break;
    case DType::kFloat16: decode_panel_kernel<__half><<<ceil_div(words, 256), 256, 0, stream>>>(p, width, vec_store); break;
    case DType::kFloat32: decode_panel_kernel<float><<<ceil_div(words, 256), 256, 0, stream>>>(p, width, vec_store); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmfree
