// Packed ternary weights -> signed int8 rows, the B operand of the int8-weight wgmma GEMM
// (gemm_sm90.cu, kDenseB). Memory-bound: N x K / 4 bytes in, N x K bytes out.
//
// One thread per 16-byte output chunk c (16 consecutive k) of a 128-weight block: chunk c
// is bit pair c / 2 of the block's 16-byte half c % 2 (common/ternary_format.h: byte b of a
// block holds k = 32 j + b in bit pair j, so half h, pair j covers k = 32 j + 16 h ..
// + 15). Consecutive threads write consecutive chunks (coalesced 16-byte stores); the eight
// threads of a block read its two halves through L1.
#include <algorithm>
#include <cstdint>

#include "common/ternary_format.h"
#include "cuda/ternary/launch.h"

namespace mmfree {
namespace cuda {
namespace ternary_kernels {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ uint32_t codes_to_int8(uint32_t packed, int j) {
  // c -> c - 1 per byte: (c + 0x7F) ^ 0x80 (c <= 2, so no carry crosses a byte).
  return (((packed >> (2 * j)) & 0x03030303u) + 0x7F7F7F7Fu) ^ 0x80808080u;
}

__global__ void __launch_bounds__(kThreads) unpack_int8_kernel(const uint4* __restrict__ packed, int64_t chunks,
                                                               uint4* __restrict__ out) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; q < chunks;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t block = q >> 3;  // blocks of all rows in order: row-major [N, blocks]
    const int c = static_cast<int>(q & 7);
    const uint4 w = __ldg(packed + 2 * block + (c & 1));
    const int j = c >> 1;
    out[q] = make_uint4(codes_to_int8(w.x, j), codes_to_int8(w.y, j), codes_to_int8(w.z, j), codes_to_int8(w.w, j));
  }
}

}  // namespace

cudaError_t launch_unpack_int8(const uint8_t* packed, int64_t N, int64_t K, int8_t* out, cudaStream_t stream) {
  if (N < 0 || K < 0) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(packed) % 16 != 0 || reinterpret_cast<uintptr_t>(out) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t chunks = N * ternary::blocks_per_row(K) * (ternary::kBlockWeights / 16);
  if (chunks == 0) return cudaSuccess;
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  // A grid-stride loop over at most 16 blocks per SM: enough bytes in flight for bandwidth.
  const int64_t blocks = std::min<int64_t>((chunks + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 16);
  unpack_int8_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(reinterpret_cast<const uint4*>(packed),
                                                                             chunks, reinterpret_cast<uint4*>(out));
  return cudaGetLastError();
}

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
