// CUDA quantization/packing of ternary weights (format: common/ternary_format.h).
// Three small kernels: fixed-shape partial sums of |W| in double, a one-block final sum
// (both in a fixed order, so the scale is deterministic), then the packing. Training
// re-quantizes the latent weight every step, so both passes over W use 16-byte loads where
// the layout allows (an 8192 x 2560 x 13824 training step spent 2 x 207 us here with
// element loads, against about 2 x 17 us for reading 71 MB twice at 4.25 TB/s), with several
// loads in flight per thread.
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

// The vector type that carries 16 bytes of T.
template <class T> struct Vec16 { static constexpr int kN = 16 / sizeof(T); };

// Each thread sums |w| in double over a fixed set of elements in a fixed order (grid-stride
// over 16-byte vectors, then the scalar tail), so the result never depends on timing.
template <class T, bool kVec>
__global__ void abs_sum_partial(const T* __restrict__ w, int64_t n, double* __restrict__ partial) {
  __shared__ double smem[kSumThreads];
  double s = 0.0;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t tail = 0;
  if constexpr (kVec) {
    constexpr int kN = Vec16<T>::kN;
    const int64_t nvec = n / kN;
    const int4* wv = reinterpret_cast<const int4*>(w);
    // kUnroll loads in flight per thread (511 blocks hold ~1000 threads per SM: one 16-byte
    // load each is 16 KB in flight, too little to cover DRAM latency); the adds keep the
    // order i, i + stride, ... of the one-load loop, so the sum is the same bit for bit.
    constexpr int kUnroll = 4;
    int64_t i = tid;
    for (; i + (kUnroll - 1) * stride < nvec; i += kUnroll * stride) {
      int4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = __ldg(wv + i + u * stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const T* e = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
        for (int j = 0; j < kN; ++j) s += fabs(static_cast<double>(to_float(e[j])));
      }
    }
    for (; i < nvec; i += stride) {
      const int4 raw = __ldg(wv + i);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kN; ++j) s += fabs(static_cast<double>(to_float(e[j])));
    }
    tail = nvec * kN;
  }
  for (int64_t i = tail + tid; i < n; i += stride) s += fabs(static_cast<double>(to_float(w[i])));
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
    // As std::max on the CPU: a NaN mean stays NaN (fmaxf would drop it and give 1e-5).
    *scale = mean < 1e-5f ? 1e-5f : mean;
  }
}

// clamp(round_half_away(v * inv), -1, 1) + 1 as comparisons against the ties, as on the
// CPU: a NaN weight compares false both ways and gets the zero code there and here.
__device__ __forceinline__ uint32_t ternary_code(float v, float inv) {
  const float q = v * inv;
  return static_cast<uint32_t>(1 + (q >= 0.5f) - (q <= -0.5f));
}

// One thread per packed byte: byte b of block blk holds k = blk*128 + j*32 + b, so
// neighbouring threads read neighbouring weights for every j (coalesced). Any K.
template <class T>
__global__ void pack_codes(const T* __restrict__ w, int64_t rows, int64_t k_total, int64_t row_bytes,
                           const float* __restrict__ scale, uint8_t* __restrict__ packed) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= rows * row_bytes) return;
  const int64_t r = idx / row_bytes;
  const int64_t byte = idx % row_bytes;
  const int64_t k0 = (byte / ternary::kBlockBytes) * ternary::kBlockWeights + byte % ternary::kBlockBytes;
  const float inv = 1.0f / *scale;
  uint32_t out = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + j * ternary::kBlockBytes;
    const uint32_t code = k < k_total ? ternary_code(to_float(w[r * k_total + k]), inv) : ternary::kZeroCode;
    out |= code << (2 * j);
  }
  packed[idx] = static_cast<uint8_t>(out);
}

// K % 128 == 0 and W 16-byte aligned: one thread per pair of packed words (bytes 8p..8p+7
// of a block), reading four runs of 8 consecutive weights (k = j*32 + 8p ..) as 16-byte
// loads (two 16-byte loads for fp32) and writing both words as one 8-byte store. Blocks run
// from the end of W to its start: the abs-sum pass just swept W front to back, so its last
// ~tens of MB are still in L2 when this pass begins.
template <class T>
__global__ void pack_codes_vec(const T* __restrict__ w, int64_t pairs, const float* __restrict__ scale,
                               uint2* __restrict__ packed) {
  const int64_t blk = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t idx = blk * blockDim.x + threadIdx.x;
  if (idx >= pairs) return;
  // Pair idx covers block idx / 4 (flat over rows: K is whole blocks), bytes 8 (idx % 4) ..
  const int64_t k_base = (idx / 4) * ternary::kBlockWeights + (idx % 4) * 8;
  const float inv = 1.0f / *scale;
  uint32_t out[2] = {0, 0};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    T v[8];
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(v)[0] = __ldg(reinterpret_cast<const float4*>(w + k_base + j * 32));
      reinterpret_cast<float4*>(v)[1] = __ldg(reinterpret_cast<const float4*>(w + k_base + j * 32) + 1);
    } else {
      *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(w + k_base + j * 32));
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e / 4] |= ternary_code(to_float(v[e]), inv) << (8 * (e % 4) + 2 * j);
  }
  packed[idx] = make_uint2(out[0], out[1]);
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

template <class T>
void quantize_typed(const TernaryQuantizeParams& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.in_features;
  const int64_t rb = ternary::row_bytes(p.in_features);
  const int64_t bytes = p.rows * rb;
  const T* w = static_cast<const T*>(p.weight);
  const bool vec = sizeof(T) <= 4 && reinterpret_cast<uintptr_t>(p.weight) % 16 == 0;
  if constexpr (sizeof(T) <= 4) {
    if (vec) abs_sum_partial<T, true><<<kSumBlocks, kSumThreads, 0, stream>>>(w, n, p.workspace);
  }
  if (!vec) abs_sum_partial<T, false><<<kSumBlocks, kSumThreads, 0, stream>>>(w, n, p.workspace);
  finish_scale<<<1, kSumThreads, 0, stream>>>(p.workspace, kSumBlocks, n, p.scale);
  if (bytes == 0) return;
  if constexpr (sizeof(T) <= 4) {
    if (vec && p.in_features % ternary::kBlockWeights == 0 && reinterpret_cast<uintptr_t>(p.packed) % 8 == 0) {
      const int64_t pairs = bytes / 8;  // a block is 32 bytes: 4 pairs of words
      pack_codes_vec<T><<<ceil_div(pairs, 256), 256, 0, stream>>>(w, pairs, p.scale,
                                                                   reinterpret_cast<uint2*>(p.packed));
      return;
    }
  }
  pack_codes<T><<<ceil_div(bytes, 256), 256, 0, stream>>>(w, p.rows, p.in_features, rb, p.scale, p.packed);
}

}  // namespace

cudaError_t ternary_quantize(const TernaryQuantizeParams& p, cudaStream_t stream) {
  MMFREE_DISPATCH_FLOAT(p.weight_dtype, T, { quantize_typed<T>(p, stream); });
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
