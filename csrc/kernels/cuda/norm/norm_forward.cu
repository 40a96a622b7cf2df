// CUDA forward kernels of the norm ops. One row per block. Fast path: the row lives in
// registers (kVecPerThread 16-byte vectors per thread, up to 256 threads: rows of up to
// 16K bf16 / 8K fp32 elements), so x is read from memory exactly once; it needs K to be a
// multiple of the vector width, 16-byte aligned buffers, and weights in x's dtype or fp32.
// Everything else (odd K, huge K, float64) takes the generic path, which re-reads the row
// (from L1/L2) for each pass. Both paths run the same fp32 operation sequence.
// The register path's reduction order (thread t of vec_threads(K / N) owns vectors t, t + P,
// ...; norm_common.cuh's block_sum) is the canonical one: the fused decode step
// (cuda/decode/decode_rows.cuh) reproduces it to stay bit-identical.
#include "cuda/norm/norm_common.cuh"
#include "norm.h"

namespace mmfree {
namespace cuda {
namespace {

using namespace norm;
constexpr int VPT = kVecPerThread;

// Streaming 16-byte load (x is read once).
__device__ __forceinline__ uint4 ld_stream(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }

// ---- rms_norm_quant(_multi) -------------------------------------------------------------

template <class T, class TW>
__global__ void __launch_bounds__(kMaxThreads) quant_vec(const T* __restrict__ x, const TW* __restrict__ w,
                                                         int64_t num_w, int64_t rows, int64_t k, float eps,
                                                         int8_t* __restrict__ xq, float* __restrict__ xs) {
  constexpr int N = VecOf<T>::N;
  __shared__ float smem[32];
  const int64_t nvec = k / N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * k;
    uint4 raw[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (vi < nvec) raw[j] = ld_stream(xr + vi * N);
    }
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (vi < nvec) {
        float f[N];
        unpack<T, N>(raw[j], f);
#pragma unroll
        for (int i = 0; i < N; ++i) ss = fmaf(f[i], f[i], ss);
      }
    }
    const float rstd = rstd_of(block_sum(ss, smem), k, eps);
    for (int64_t pw = 0; pw < num_w; ++pw) {
      const TW* wr = w + pw * k;
      float amax = 0.f;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
        if (vi < nvec) {
          float f[N], wf[N];
          unpack<T, N>(raw[j], f);
          load_weights<TW, N>(wr + vi * N, wf);
#pragma unroll
          for (int i = 0; i < N; ++i) amax = amax_fold(amax, ((f[i] * rstd) * wf[i]));
        }
      }
      amax = amax_final(block_max(amax, smem));
      const float s = 127.0f / amax;
      int8_t* qr = xq + (pw * rows + row) * k;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
        if (vi < nvec) {
          float f[N], wf[N];
          int q[N];
          unpack<T, N>(raw[j], f);
          load_weights<TW, N>(wr + vi * N, wf);
#pragma unroll
          for (int i = 0; i < N; ++i) q[i] = quant_code((f[i] * rstd) * wf[i], s);
          store_codes<N>(qr + vi * N, q);
        }
      }
      if (threadIdx.x == 0) xs[pw * rows + row] = amax / 127.0f;
    }
  }
}

// Generic path; float64 x is rounded to fp32 on load, like the reference's x.float().
template <class T>
__global__ void quant_generic(const T* __restrict__ x, const void* __restrict__ w, DType wt, int64_t num_w,
                              int64_t rows, int64_t k, float eps, int8_t* __restrict__ xq, float* __restrict__ xs) {
  __shared__ float smem[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * k;
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const float v = load_as<T, float>(xr, i);
      ss = fmaf(v, v, ss);
    }
    const float rstd = rstd_of(block_sum(ss, smem), k, eps);
    for (int64_t pw = 0; pw < num_w; ++pw) {
      float amax = 0.f;
      for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
        amax = amax_fold(amax, ((load_as<T, float>(xr, i) * rstd) * load_any<float>(w, wt, pw * k + i)));
      }
      amax = amax_final(block_max(amax, smem));
      const float s = 127.0f / amax;
      int8_t* qr = xq + (pw * rows + row) * k;
      for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
        qr[i] = static_cast<int8_t>(quant_code((load_as<T, float>(xr, i) * rstd) * load_any<float>(w, wt, pw * k + i), s));
      }
      if (threadIdx.x == 0) xs[pw * rows + row] = amax / 127.0f;
    }
  }
}

// ---- rms_norm (+ residual) --------------------------------------------------------------

template <class T, class TW>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_vec(const T* __restrict__ x, const T* __restrict__ res,
                                                            const TW* __restrict__ w, int64_t rows, int64_t k,
                                                            float eps, T* __restrict__ y, T* __restrict__ res_out) {
  constexpr int N = VecOf<T>::N;
  __shared__ float smem[32];
  const int64_t nvec = k / N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t off = row * k;
    uint4 rx[VPT], rr[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (vi < nvec) {
        rx[j] = ld_stream(x + off + vi * N);
        if (res != nullptr) rr[j] = ld_stream(res + off + vi * N);
      }
    }
    // The fp32 sum stays in registers; its rounded copy is residual_out.
    float s[VPT][N];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (vi < nvec) {
        unpack<T, N>(rx[j], s[j]);
        if (res != nullptr) {
          float r[N];
          unpack<T, N>(rr[j], r);
#pragma unroll
          for (int i = 0; i < N; ++i) s[j][i] += r[i];
          *reinterpret_cast<uint4*>(res_out + off + vi * N) = pack<T, N>(s[j]);
        } else {
          *reinterpret_cast<uint4*>(res_out + off + vi * N) = rx[j];
        }
#pragma unroll
        for (int i = 0; i < N; ++i) ss = fmaf(s[j][i], s[j][i], ss);
      }
    }
    const float rstd = rstd_of(block_sum(ss, smem), k, eps);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (vi < nvec) {
        float wf[N], o[N];
        load_weights<TW, N>(w + vi * N, wf);
#pragma unroll
        for (int i = 0; i < N; ++i) o[i] = (s[j][i] * rstd) * wf[i];
        *reinterpret_cast<uint4*>(y + off + vi * N) = pack<T, N>(o);
      }
    }
  }
}

template <class T>
__global__ void rms_norm_generic(const T* __restrict__ x, const T* __restrict__ res, const void* __restrict__ w,
                                 DType wt, int64_t rows, int64_t k, float eps, T* __restrict__ y,
                                 T* __restrict__ res_out) {
  using A = AccOf<T>;
  __shared__ A smem[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t off = row * k;
    A ss = 0;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      A s = load_as<T, A>(x + off, i);
      if (res != nullptr) {
        s += load_as<T, A>(res + off, i);
        res_out[off + i] = store_as<T, A>(s);
      } else {
        res_out[off + i] = x[off + i];
      }
      ss += s * s;
    }
    const A rstd = rstd_of(block_sum(ss, smem), k, eps);
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      A s = load_as<T, A>(x + off, i);
      if (res != nullptr) s += load_as<T, A>(res + off, i);
      y[off + i] = store_as<T, A>((s * rstd) * load_any<A>(w, wt, i));
    }
  }
}

// ---- rms_norm_swish_gate (+ quant) ------------------------------------------------------

template <class T, class TW, bool kQuant>
__global__ void __launch_bounds__(kMaxThreads)
    swish_gate_vec(const T* __restrict__ g, const T* __restrict__ h, const TW* __restrict__ w, int64_t rows, int64_t k,
                   float eps, T* __restrict__ y, const TW* __restrict__ nw, float norm_eps, int8_t* __restrict__ xq,
                   float* __restrict__ xs) {
  constexpr int N = VecOf<T>::N;
  __shared__ float smem[32];
  const int64_t nvec = k / N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t off = row * k;
    uint4 rg[VPT], rh[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (vi < nvec) {
        rg[j] = ld_stream(g + off + vi * N);
        rh[j] = ld_stream(h + off + vi * N);
      }
    }
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (vi < nvec) {
        float f[N];
        unpack<T, N>(rg[j], f);
#pragma unroll
        for (int i = 0; i < N; ++i) ss = fmaf(f[i], f[i], ss);
      }
    }
    const float rstd = rstd_of(block_sum(ss, smem), k, eps);
    // Gate output, rounded to T by packing it: rg now holds exactly what the unfused op
    // would have stored.
    float ss2 = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (vi < nvec) {
        float gf[N], hf[N], wf[N], o[N];
        unpack<T, N>(rg[j], gf);
        unpack<T, N>(rh[j], hf);
        load_weights<TW, N>(w + vi * N, wf);
#pragma unroll
        for (int i = 0; i < N; ++i) o[i] = ((gf[i] * rstd) * wf[i]) * (hf[i] * sigmoid(hf[i]));
        rg[j] = pack<T, N>(o);
        if constexpr (!kQuant) {
          *reinterpret_cast<uint4*>(y + off + vi * N) = rg[j];
        } else {
          unpack<T, N>(rg[j], o);
#pragma unroll
          for (int i = 0; i < N; ++i) ss2 = fmaf(o[i], o[i], ss2);
        }
      }
    }
    if constexpr (kQuant) {
      const float rstd2 = rstd_of(block_sum(ss2, smem), k, norm_eps);
      float amax = 0.f;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
        if (vi < nvec) {
          float f[N], wf[N];
          unpack<T, N>(rg[j], f);
          load_weights<TW, N>(nw + vi * N, wf);
#pragma unroll
          for (int i = 0; i < N; ++i) amax = amax_fold(amax, ((f[i] * rstd2) * wf[i]));
        }
      }
      amax = amax_final(block_max(amax, smem));
      const float s = 127.0f / amax;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const int64_t vi = j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
        if (vi < nvec) {
          float f[N], wf[N];
          int q[N];
          unpack<T, N>(rg[j], f);
          load_weights<TW, N>(nw + vi * N, wf);
#pragma unroll
          for (int i = 0; i < N; ++i) q[i] = quant_code((f[i] * rstd2) * wf[i], s);
          store_codes<N>(xq + off + vi * N, q);
        }
      }
      if (threadIdx.x == 0) xs[row] = amax / 127.0f;
    }
  }
}

template <class T, class A>
__device__ __forceinline__ A gate_at(const T* g, const T* h, const void* w, DType wt, A rstd, int64_t i) {
  const A hv = load_as<T, A>(h, i);
  return ((load_as<T, A>(g, i) * rstd) * load_any<A>(w, wt, i)) * (hv * sigmoid(hv));
}

template <class T>
__global__ void swish_gate_generic(const T* __restrict__ g, const T* __restrict__ h, const void* __restrict__ w,
                                   DType wt, int64_t rows, int64_t k, float eps, T* __restrict__ y) {
  using A = AccOf<T>;
  __shared__ A smem[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t off = row * k;
    A ss = 0;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const A v = load_as<T, A>(g + off, i);
      ss += v * v;
    }
    const A rstd = rstd_of(block_sum(ss, smem), k, eps);
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) y[off + i] = store_as<T, A>(gate_at<T, A>(g + off, h + off, w, wt, rstd, i));
  }
}

// The quantizing gate computes in fp32 for every dtype (float64 rounds on load, like the
// reference); the gate value is recomputed per pass and rounded to T each time.
template <class T>
__global__ void swish_gate_quant_generic(const T* __restrict__ g, const T* __restrict__ h, const void* __restrict__ w,
                                         DType wt, int64_t rows, int64_t k, float eps, const void* __restrict__ nw,
                                         DType nwt, float norm_eps, int8_t* __restrict__ xq, float* __restrict__ xs) {
  __shared__ float smem[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t off = row * k;
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const float v = load_as<T, float>(g + off, i);
      ss = fmaf(v, v, ss);
    }
    const float rstd = rstd_of(block_sum(ss, smem), k, eps);
    auto gate = [&](int64_t i) {
      const float v = gate_at<T, float>(g + off, h + off, w, wt, rstd, i);
      return std::is_same<T, double>::value ? v : round_to<T>(v);
    };
    float ss2 = 0.f;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const float v = gate(i);
      ss2 = fmaf(v, v, ss2);
    }
    const float rstd2 = rstd_of(block_sum(ss2, smem), k, norm_eps);
    float amax = 0.f;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      amax = amax_fold(amax, ((gate(i) * rstd2) * load_any<float>(nw, nwt, i)));
    }
    amax = amax_final(block_max(amax, smem));
    const float s = 127.0f / amax;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      xq[off + i] = static_cast<int8_t>(quant_code((gate(i) * rstd2) * load_any<float>(nw, nwt, i), s));
    }
    if (threadIdx.x == 0) xs[row] = amax / 127.0f;
  }
}

// ---- launchers --------------------------------------------------------------------------

// The register path applies: a 16-bit/fp32 input, K a multiple of the vector width and
// small enough, the given buffers 16-byte aligned, weights in the input dtype or fp32.
template <class T>
bool use_vec(int64_t k, DType w_dtype, std::initializer_list<const void*> ptrs) {
  if (std::is_same<T, double>::value) return false;
  constexpr int N = VecOf<T>::N;
  if (k % N != 0 || k / N > static_cast<int64_t>(kVecPerThread) * kMaxThreads) return false;
  if (w_dtype != TypeOf<T>::value && w_dtype != DType::kFloat32) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return true;
}

template <class T>
cudaError_t launch_quant(const RmsNormQuantParams& p, cudaStream_t stream) {
  const T* x = static_cast<const T*>(p.x);
  if constexpr (!std::is_same<T, double>::value) {
    if (use_vec<T>(p.k, p.w_dtype, {p.x, p.weights, p.x_q})) {
      const int threads = vec_threads(p.k / VecOf<T>::N);
      if (p.w_dtype == DType::kFloat32) {
        quant_vec<T, float><<<grid_for(p.rows), threads, 0, stream>>>(
            x, static_cast<const float*>(p.weights), p.num_weights, p.rows, p.k, p.eps, p.x_q, p.x_scale);
      } else {
        quant_vec<T, T><<<grid_for(p.rows), threads, 0, stream>>>(x, static_cast<const T*>(p.weights), p.num_weights,
                                                                  p.rows, p.k, p.eps, p.x_q, p.x_scale);
      }
      return cudaGetLastError();
    }
  }
  quant_generic<T><<<grid_for(p.rows), kGenericThreads, 0, stream>>>(x, p.weights, p.w_dtype, p.num_weights, p.rows,
                                                                     p.k, p.eps, p.x_q, p.x_scale);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* ro = static_cast<T*>(p.residual_out);
  if constexpr (!std::is_same<T, double>::value) {
    if (use_vec<T>(p.k, p.w_dtype, {p.x, p.residual, p.weight, p.y, p.residual_out})) {
      const int threads = vec_threads(p.k / VecOf<T>::N);
      if (p.w_dtype == DType::kFloat32) {
        rms_norm_vec<T, float><<<grid_for(p.rows), threads, 0, stream>>>(x, res, static_cast<const float*>(p.weight),
                                                                         p.rows, p.k, p.eps, y, ro);
      } else {
        rms_norm_vec<T, T><<<grid_for(p.rows), threads, 0, stream>>>(x, res, static_cast<const T*>(p.weight), p.rows,
                                                                     p.k, p.eps, y, ro);
      }
      return cudaGetLastError();
    }
  }
  rms_norm_generic<T><<<grid_for(p.rows), kGenericThreads, 0, stream>>>(x, res, p.weight, p.w_dtype, p.rows, p.k,
                                                                        p.eps, y, ro);
  return cudaGetLastError();
}

template <class T, bool kQuant>
cudaError_t launch_swish_gate(const RmsNormSwishGateParams& p, cudaStream_t stream) {
  const T* g = static_cast<const T*>(p.g);
  const T* h = static_cast<const T*>(p.h);
  if constexpr (!std::is_same<T, double>::value) {
    // Both norm weights must share one type on the register path.
    const bool weights_ok = !kQuant || p.norm_w_dtype == p.w_dtype;
    if (weights_ok && use_vec<T>(p.k, p.w_dtype, {p.g, p.h, p.weight, p.y, p.norm_weight, p.x_q})) {
      const int threads = vec_threads(p.k / VecOf<T>::N);
      if (p.w_dtype == DType::kFloat32) {
        swish_gate_vec<T, float, kQuant><<<grid_for(p.rows), threads, 0, stream>>>(
            g, h, static_cast<const float*>(p.weight), p.rows, p.k, p.eps, static_cast<T*>(p.y),
            static_cast<const float*>(p.norm_weight), p.norm_eps, p.x_q, p.x_scale);
      } else {
        swish_gate_vec<T, T, kQuant><<<grid_for(p.rows), threads, 0, stream>>>(
            g, h, static_cast<const T*>(p.weight), p.rows, p.k, p.eps, static_cast<T*>(p.y),
            static_cast<const T*>(p.norm_weight), p.norm_eps, p.x_q, p.x_scale);
      }
      return cudaGetLastError();
    }
  }
  if constexpr (kQuant) {
    swish_gate_quant_generic<T><<<grid_for(p.rows), kGenericThreads, 0, stream>>>(
        g, h, p.weight, p.w_dtype, p.rows, p.k, p.eps, p.norm_weight, p.norm_w_dtype, p.norm_eps, p.x_q, p.x_scale);
  } else {
    swish_gate_generic<T><<<grid_for(p.rows), kGenericThreads, 0, stream>>>(g, h, p.weight, p.w_dtype, p.rows, p.k,
                                                                            p.eps, static_cast<T*>(p.y));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_quant(const RmsNormQuantParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.k == 0) return cudaSuccess;
  MMFREE_DISPATCH_FLOAT(p.x_dtype, T, return launch_quant<T>(p, stream));
  return cudaSuccess;
}

cudaError_t rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.k == 0) return cudaSuccess;
  MMFREE_DISPATCH_FLOAT(p.dtype, T, return launch_rms_norm<T>(p, stream));
  return cudaSuccess;
}

cudaError_t rms_norm_swish_gate(const RmsNormSwishGateParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.k == 0) return cudaSuccess;
  MMFREE_DISPATCH_FLOAT(p.dtype, T, return (launch_swish_gate<T, false>(p, stream)));
  return cudaSuccess;
}

cudaError_t rms_norm_swish_gate_quant(const RmsNormSwishGateParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.k == 0) return cudaSuccess;
  MMFREE_DISPATCH_FLOAT(p.dtype, T, return (launch_swish_gate<T, true>(p, stream)));
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mmfree
