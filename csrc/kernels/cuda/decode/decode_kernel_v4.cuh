// v4 of the fused decode step, batch 1, sm_90 (included by decode_step_v4_<dtype>.cu; chosen by
// launch_typed in decode_kernel.cuh when MMFREE_DECODE_V4 is 1 or "force"; benchmarks/NOTES.md
// "v4").
//
// v3 (decode_kernel_v3.cuh) with the row math no longer repeated in full by every CTA: the
// grid is cut into thread-block clusters of `cs` CTAs (8 by default, MMFREE_DECODE_V4_CLUSTER),
// and each cluster computes every row once, each CTA 1 / cs of it (decode_rows_v4.cuh): its
// threads load their own vectors of the row inputs and norm weights straight into registers
// (one wave, no staging copies), keep them there through the passes, exchange the partial
// statistics with the cluster through distributed shared memory, and write their codes into
// the planes of every CTA of the cluster. Each row pass costs one cluster barrier instead of
// one CTA-wide reduction over the full row. Everything else is v3: 4 product phases per layer,
// one grid barrier each, each CTA's weight rows of the next product copied into a shared ring
// while the current phase runs, the product from shared memory (the lm_head from L2).
//
// The launch is cooperative (every CTA co-resident or the launch is refused: no hang) and
// clustered; the grid is the largest multiple of cs whose clusters can all be resident
// (cudaOccupancyMaxActiveClusters), e.g. 128 CTAs on 132 SMs. Cluster 0 alone writes the
// shared state (residual stream, new MLGRU state), each CTA its own vectors.
#pragma once

#include <map>
#include <mutex>
#include <tuple>

#include "cuda/decode/decode_kernel_v3.cuh"
#include "cuda/decode/decode_rows_v4.cuh"

namespace mmfree {
namespace cuda {
namespace decode {

// Slot values of the chain threads (decode_rows_v4.cuh): 8 floats per thread.
constexpr int64_t kV4SlotBytes = static_cast<int64_t>(kThreads) * 8 * 4;

// Shared-memory layout of the v4 kernel (bytes from the start of the dynamic shared memory):
// the product planes, the chain threads' slot values, the weight ring.
struct V4Smem {
  int64_t planes, cbuf, ring, total;
};

__host__ __device__ __forceinline__ V4Smem v4_smem(int64_t h, int64_t I, int64_t ring) {
  V4Smem s{};
  const int64_t planes = 3 * plane_row_bytes(h) > plane_row_bytes(I) ? 3 * plane_row_bytes(h) : plane_row_bytes(I);
  s.planes = 0;
  s.cbuf = up16(planes);
  s.ring = s.cbuf + kV4SlotBytes;
  s.total = s.ring + up16(ring);
  return s;
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) decode_step_kernel_v4(const __grid_constant__ KParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int N = norm::VecOf<T>::N;
  extern __shared__ int4 smem[];
  __shared__ V4Xchg xch;
  __shared__ float sscale[3];
  __shared__ int sxsum[3];
  const int h = static_cast<int>(p.h), I = static_cast<int>(p.I);
  const int wsize = p.w_f32 ? 4 : static_cast<int>(sizeof(T));
  const bool wf32 = p.w_f32;
  const int rank = cluster_rank(), cs = cluster_size();
  const bool writer = static_cast<int>(blockIdx.x) < cs;  // cluster 0
  const V4Smem lay = v4_smem(h, I, p.ring);
  char* base = reinterpret_cast<char*>(smem);
  int8_t* planes = reinterpret_cast<int8_t*>(base + lay.planes);
  float* cbuf = reinterpret_cast<float*>(base + lay.cbuf);
  uint8_t* ring = reinterpret_cast<uint8_t*>(base + lay.ring);
  const T* delta = static_cast<const T*>(p.delta);
  const T* ifg = static_cast<const T*>(p.ifg);
  const T* attn = static_cast<const T*>(p.attn);
  const T* u = static_cast<const T*>(p.u);
  T* xin = static_cast<T*>(p.xres);  // the residual stream; a phase that updates it writes xout
  T* xout = static_cast<T*>(p.xres2);
  const V4Row rh = v4_row(p.ph, h / N, h, rank, cs), ri = v4_row(p.pi, I / N, I, rank, cs);
  const int nph = 4 * p.L;  // product phases with staged weights; phase nph is the lm_head
  auto norm_w = [&](int l, int which) {
    return static_cast<const char*>(p.norms) + (static_cast<int64_t>(l) * kDecodeNormsPerLayer + which) * h * wsize;
  };
  auto ring_of = [&](int k) { return (k & 1) ? ring + p.ring - phase_slice_bytes<T>(p, k) : ring; };
  // The norm vectors phase k's row math reads: (first, bytes), for the L2 prefetch.
  auto norms_of = [&](int k, const char*& w, int64_t& bytes) {
    const int l = k / 4, g = k % 4;
    if (k == nph) {
      w = static_cast<const char*>(p.final_norms), bytes = 2 * h * wsize;
    } else if (g == 0) {
      w = norm_w(l, kNormAttn), bytes = 4 * h * wsize;
    } else if (g == 1) {
      w = norm_w(l, kNormGateOut), bytes = 2 * h * wsize;
    } else if (g == 2) {
      w = norm_w(l, kNormMlp), bytes = 2 * h * wsize;
    } else {
      w = static_cast<const char*>(p.down_norms) + static_cast<int64_t>(l) * I * wsize, bytes = I * wsize;
    }
  };
  unsigned epoch = 0;

  stage_phase_weights<T>(p, 0, ring_of(0));
  cp_async_commit();
  cluster_sync();  // every CTA of the cluster has started: its shared memory may be written
  for (int k = 0; k <= nph; ++k) {
    const int l = k / 4, g = k % 4;
    const bool last = k == nph;
    const int K = last ? h : static_cast<int>(phase_k(p, l, g));
    const int nprod = !last && g == 0 ? 3 : 1;
    const int nch = static_cast<int>(2 * ternary::blocks_per_row(K));
    const int prow = nch * 64;  // plane_row_bytes(K)
    const bool rowk = last || g == 0 || g == 2;  // (residual +) norm, then the quantization
    const bool has_res = l > 0 || g == 2 || last;
    const V4Row r = !last && g == 3 ? ri : rh;
    // 1. This thread's row inputs and norm weights, one wave of loads issued before anything
    // else (their round trip is the phase's critical path): rows of h: x, res, the norm and
    // quantization weights; the MLGRU phase: gi, gf, gg, lower bounds, old state, g_norm and
    // o_proj.norm; down_proj: u's two halves and its norm.
    uint4 v0 = make_uint4(0, 0, 0, 0), v1 = v0, v2 = v0;
    float w0[N], wq[3][N], f0[N], f1[N];
    if (r.vi >= 0) {
      const int off = r.vi * N;
      if (rowk) {
        const char* wn_row = last ? static_cast<const char*>(p.final_norms) : norm_w(l, g == 0 ? kNormAttn : kNormMlp);
        const char* wq_row = wn_row + static_cast<int64_t>(h) * wsize;  // i (f, g) / gate_proj / lm_head norm
        if (l == 0 && g == 0 && !last) {
          const int64_t tok = p.tokens[0];
          if (tok < 0 || tok >= p.V) __trap();  // as F.embedding's device assert
          v0 = ld_ro(static_cast<const T*>(p.emb) + tok * h + off);
        } else {
          v0 = ld_cg((g == 2 && !last ? attn : delta) + off);
        }
        if (has_res) v1 = ld_cg(xin + off);
        load_w32<T, N>(wn_row, wf32, off, w0);
#pragma unroll
        for (int pw = 0; pw < 3; ++pw) {
          if (pw < nprod) load_w32<T, N>(wq_row + static_cast<int64_t>(pw) * h * wsize, wf32, off, wq[pw]);
        }
        // Cluster 0 moves the new MLGRU state into `state` (every CTA has read the old one
        // in phase g = 1), each CTA its own vectors.
        if (writer && g == 2 && !last) load_f32_cg<N>(p.snew + off, f0);
      } else if (g == 1) {
        v0 = ld_cg(ifg + off);
        v1 = ld_cg(ifg + h + off);
        v2 = ld_cg(ifg + 2 * h + off);
        if (l > 0) {
          load_w32<float, N>(reinterpret_cast<const char*>(p.lb + static_cast<int64_t>(l) * h), false, off, f0);
        } else {
#pragma unroll
          for (int i = 0; i < N; ++i) f0[i] = 0.0f;
        }
        load_f32_cg<N>(p.state + l * p.state_stride + off, f1);
        load_w32<T, N>(norm_w(l, kNormGateOut), wf32, off, w0);
        load_w32<T, N>(norm_w(l, kNormO), wf32, off, wq[0]);
      } else {
        v0 = ld_cg(u + off);
        v1 = ld_cg(u + I + off);
        load_w32<T, N>(static_cast<const char*>(p.down_norms) + static_cast<int64_t>(l) * I * wsize, wf32, off, wq[0]);
      }
    }
    // 2. Codes past K in the last 128-weight block must be zeros (the planes hold stale
    // bytes): byte stores to those positions only, which no rank's code stores touch.
    if (K % ternary::kBlockWeights != 0) {
      const int padn = nch * 64 - K;
      for (int i = threadIdx.x; i < nprod * padn; i += kThreads) {
        const int pw = i / padn;
        planes[pw * prow + plane_offset32(K + i - pw * padn, nch)] = 0;
      }
    }
    // 3. The next phase's weight slice into the ring; L2 prefetches a phase further, and of
    // the next phase's norm vectors.
    if (k + 1 < nph) stage_phase_weights<T>(p, k + 1, ring_of(k + 1));
    cp_async_commit();
    if (k + 2 <= nph) prefetch_gemv<T>(p, (k + 2) / 4, (k + 2) % 4);
    if (k + 1 <= nph && blockIdx.x == 1 % gridDim.x) {
      const char* w;
      int64_t wbytes;
      norms_of(k + 1, w, wbytes);
      prefetch_l2(reinterpret_cast<const uint8_t*>(w), wbytes);
    }
    if (writer && g == 2 && !last && r.vi >= 0) {
      float4* st = reinterpret_cast<float4*>(p.state + l * p.state_stride + r.vi * N);
#pragma unroll
      for (int q = 0; q < N / 4; ++q) st[q] = make_float4(f0[4 * q], f0[4 * q + 1], f0[4 * q + 2], f0[4 * q + 3]);
    }
    // 4. The row math: codes of the product inputs into every rank's planes.
    float a[N];
    if (rowk) {
      residual_norm_v4<T>(rh, v0, v1, has_res, writer && !last ? xout : nullptr, w0, p.eps, cbuf, xch, rank, cs, a);
      if (nprod == 3) {
        quant_v4<T, 3>(rh, a, wq, p.eps, cbuf, xch, planes, prow, nch, sscale, sxsum, rank, cs);
      } else {
        quant_v4<T, 1>(rh, a, wq, p.eps, cbuf, xch, planes, prow, nch, sscale, sxsum, rank, cs);
      }
      if (!last) {
        T* t = xin;
        xin = xout;
        xout = t;
      }
    } else if (g == 1) {
      mlgru_gate_v4<T>(rh, v0, v1, v2, f0, f1, writer ? p.snew : nullptr, w0, p.eps, cbuf, xch, rank, cs, a);
      quant_v4<T, 1>(rh, a, wq, p.eps, cbuf, xch, planes, prow, nch, sscale, sxsum, rank, cs);
    } else {
      if (ri.vi >= 0) silu_mul_v4<T>(v0, v1, a);
      quant_v4<T, 1>(ri, a, wq, p.eps, cbuf, xch, planes, prow, nch, sscale, sxsum, rank, cs);
    }
    // After the last cluster barrier of the row math no CTA touches another's shared memory
    // until the next phase, so a CTA may also leave the kernel after the lm_head freely.
    cp_async_wait<1>();  // this phase's weight slice has landed
    __syncthreads();     // ... for every thread; the local pad zeros and statistics too
    // 5. The product.
    auto job = [&](int q) { return phase_job_v2<T, 1>(p, l, g, q, sscale, sxsum); };
    if (last) {
      gemv_phase<1, T, true>(job, 1, 1, h, 0, smem, 0);
    } else {
      gemv_phase<1, T, true, true>(job, phase_jobs(p, l, g), 1, K, 0, smem, 0, ring_of(k));
      grid_barrier(p.bar, ++epoch * gridDim.x);
    }
  }
#else
  (void)p;
  __trap();  // launch_v4 never launches it below sm_90
#endif
}

// MMFREE_DECODE_V4_CLUSTER: CTAs per cluster, 1, 2, 4 or 8 (default 8).
inline int v4_cluster() {
  const char* v = std::getenv("MMFREE_DECODE_V4_CLUSTER");
  if (v == nullptr) return kMaxCluster;
  const int c = std::atoi(v);
  return c == 1 || c == 2 || c == 4 || c == 8 ? c : kMaxCluster;
}

// The v4 launch for one batch row, or cudaErrorNotSupported where v4 does not apply (off,
// batch > 1, below sm_90, its shared memory does not fit `budget`, no cluster fits, unaligned
// state / lower bounds, or (mode 1) an earlier launch failed).
template <class T>
cudaError_t launch_v4(const KParams& kp, int budget, cudaStream_t stream) {
  static std::atomic<int> failed{0};
  const int mode = v4_mode();
  if (kp.B != 1 || mode == 0 || (mode == 1 && failed.load() != 0)) return cudaErrorNotSupported;
  if ((reinterpret_cast<uintptr_t>(kp.state) & 15u) != 0 || (reinterpret_cast<uintptr_t>(kp.lb) & 15u) != 0)
    return cudaErrorNotSupported;
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (major < 9) return cudaErrorNotSupported;
  const int cs = v4_cluster();
  const int sms = sm_count();
  if (sms < cs) return cudaErrorNotSupported;
  // One vector per thread (decode_rows_v4.cuh): P / cs * kVecPerThread slots must fit the CTA,
  // i.e. cs >= P / 32 (the 2.7B's I rows: P = 128, cs >= 4; cs = 8 fits every P <= 256).
  if (kp.ph / cs * VPT > kThreads || kp.pi / cs * VPT > kThreads) return cudaErrorNotSupported;
  void (*kernel)(const KParams) = decode_step_kernel_v4<T>;
  static std::atomic<uint64_t> raised{0};
  err = raise_smem_once(kernel, budget, raised);
  if (err != cudaSuccess) return err;
  // The grid: the largest multiple of cs whose clusters are all co-resident (found once per
  // device and shape, outside any graph capture: the first launch is eager).
  static std::mutex mu;
  static std::map<std::tuple<int, int64_t, int64_t, int, bool>, int> grids;
  const auto key = std::make_tuple(dev, kp.h, kp.I, cs, kp.w_f32);
  int grid = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = grids.find(key);
    if (it != grids.end()) {
      grid = it->second;
    } else {
      grid = sms / cs * cs;
      for (int iter = 0; iter < 4 && grid >= cs; ++iter) {
        const int64_t smem = v4_smem(kp.h, kp.I, v3_ring_bytes(kp.h, kp.I, grid)).total;
        if (smem > budget) {
          grid = 0;
          break;
        }
        cudaLaunchConfig_t cfg{};
        cfg.gridDim = dim3(static_cast<unsigned>(grid));
        cfg.blockDim = dim3(kThreads);
        cfg.dynamicSmemBytes = static_cast<size_t>(smem);
        cudaLaunchAttribute attr{};
        attr.id = cudaLaunchAttributeClusterDimension;
        attr.val.clusterDim.x = static_cast<unsigned>(cs);
        attr.val.clusterDim.y = 1;
        attr.val.clusterDim.z = 1;
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        int clusters = 0;
        if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
          (void)cudaGetLastError();
          clusters = 0;
        }
        if (clusters * cs >= grid) break;
        grid = clusters * cs;
      }
      if (grid < cs) grid = 0;
      grids[key] = grid;
    }
  }
  if (grid == 0) return cudaErrorNotSupported;
  KParams k = kp;
  k.ring = v3_ring_bytes(kp.h, kp.I, grid);
  const int64_t smem = v4_smem(kp.h, kp.I, k.ring).total;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2]{};
  attrs[0].id = cudaLaunchAttributeCooperative;
  attrs[0].val.cooperative = 1;
  attrs[1].id = cudaLaunchAttributeClusterDimension;
  attrs[1].val.clusterDim.x = static_cast<unsigned>(cs);
  attrs[1].val.clusterDim.y = 1;
  attrs[1].val.clusterDim.z = 1;
  cfg.attrs = attrs;
  cfg.numAttrs = 2;
  // Diagnostics only: MMFREE_DECODE_V4_COOP=0 drops the cooperative attribute (should a driver
  // refuse it together with clusters), leaving co-residency to the occupancy check above: a
  // grid barrier could then hang if another kernel held SMs. Never the default.
  const char* coop = std::getenv("MMFREE_DECODE_V4_COOP");
  if (coop != nullptr && std::strcmp(coop, "0") == 0) {
    cfg.attrs = attrs + 1;
    cfg.numAttrs = 1;
  }
  err = cudaMemsetAsync(kp.bar, 0, 64, stream);
  if (err != cudaSuccess) return err;
  err = cudaLaunchKernelEx(&cfg, kernel, k);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // a refused configuration is not sticky: clear it
    if (mode == 1) {            // ... and run v3 from now on
      failed.store(1);
      return cudaErrorNotSupported;
    }
  }
  return err;
}

}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
