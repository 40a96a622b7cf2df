// CUDA quantization/packing of ternary weights (format: common/ternary_format.h).
// Three small kernels: fixed-shape partial sums of |W| in double, a one-block final sum
// (both in a fixed order, so the scale is deterministic), then one thread per packed byte.
#include "common/ternary_format.h"
#include "cuda/common.cuh"
#include "pack.h"

namespace mmfree {
namespace cuda {
namespace {

constexpr int kSumBlocks = kTernaryQuantizeWorkspace - 1;  // last slot unused
constexpr int kSumThreads = 256;

__device__ double block_sum(double v, double* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  return smem[0];
}

template <class T>
__global__ void abs_sum_partial(const T* __restrict__ w, int64_t n, double* __restrict__ partial) {
  __shared__ double smem[kSumThreads];
  double s = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    s += fabs(static_cast<double>(to_float(w[i])));
  }
  const double total = block_sum(s, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

__global__ void finish_scale(const double* __restrict__ partial, int nparts, int64_t n, float* __restrict__ scale) {
  __shared__ double smem[kSumThreads];
  double s = 0.0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += partial[i];
  const double total = block_sum(s, smem);
  if (threadIdx.x == 0) {
    const float mean = n > 0 ? static_cast<float>(total / static_cast<double>(n)) : 0.f;
    *scale = fmaxf(mean, 1e-5f);
  }
}

// One thread per packed byte: byte b of block blk holds k = blk*128 + j*32 + b, so
// neighbouring threads read neighbouring weights for every j (coalesced).
template <class T>
__global__ void pack_codes(const T* __restrict__ w, int64_t rows, int64_t k_total, int64_t row_bytes,
                           const float* __restrict__ scale, uint8_t* __restrict__ packed) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * row_bytes) return;
  const int64_t r = idx / row_bytes;
  const int64_t byte = idx % row_bytes;
  const int64_t k0 = (byte / ternary::kBlockBytes) * ternary::kBlockWeights + byte % ternary::kBlockBytes;
  const float inv = 1.0f / *scale;
  uint8_t out = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + j * ternary::kBlockBytes;
    int q = 0;
    if (k < k_total) {
      const float v = roundf(to_float(w[r * k_total + k]) * inv);
      q = v > 0.f ? static_cast<int>(fminf(v, 1.f)) : static_cast<int>(fmaxf(v, -1.f));  // NaN -> 0
    }
    out |= static_cast<uint8_t>((q + 1) << (2 * j));
  }
  packed[idx] = out;
}

__global__ void unpack_codes(const uint8_t* __restrict__ packed, int64_t rows, int64_t k_total, int64_t row_bytes,
                             int8_t* __restrict__ out, unsigned long long* __restrict__ invalid) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * row_bytes) return;
  const int64_t r = idx / row_bytes;
  const int64_t byte = idx % row_bytes;
  const int64_t k0 = (byte / ternary::kBlockBytes) * ternary::kBlockWeights + byte % ternary::kBlockBytes;
  const uint8_t v = packed[idx];
  int bad = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + j * ternary::kBlockBytes;
    const uint8_t code = (v >> (2 * j)) & 3;
    if (k < k_total) {
      bad += code == 3;
      out[r * k_total + k] = ternary::decode(code);
    } else {
      bad += code != ternary::kZeroCode;
    }
  }
  if (bad) atomicAdd(invalid, static_cast<unsigned long long>(bad));
}

}  // namespace

cudaError_t ternary_quantize(const TernaryQuantizeParams& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.in_features;
  const int64_t rb = ternary::row_bytes(p.in_features);
  const int64_t bytes = p.rows * rb;
  MMFREE_DISPATCH_FLOAT(p.weight_dtype, T, {
    const T* w = static_cast<const T*>(p.weight);
    abs_sum_partial<T><<<kSumBlocks, kSumThreads, 0, stream>>>(w, n, p.workspace);
    finish_scale<<<1, kSumThreads, 0, stream>>>(p.workspace, kSumBlocks, n, p.scale);
    if (bytes > 0) {
      pack_codes<T><<<ceil_div(bytes, 256), 256, 0, stream>>>(w, p.rows, p.in_features, rb, p.scale, p.packed);
    }
  });
  return cudaGetLastError();
}

cudaError_t ternary_unpack(const TernaryUnpackParams& p, cudaStream_t stream) {
  const int64_t rb = ternary::row_bytes(p.in_features);
  const int64_t bytes = p.rows * rb;
  cudaError_t err = cudaMemsetAsync(p.invalid_count, 0, sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  if (bytes > 0) {
    unpack_codes<<<ceil_div(bytes, 256), 256, 0, stream>>>(p.packed, p.rows, p.in_features, rb, p.out,
                                                           reinterpret_cast<unsigned long long*>(p.invalid_count));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mmfree
