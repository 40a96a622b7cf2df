// The fused decode step (decode.h): ONE persistent kernel per step and per 64 batch rows.
//
// Every CTA stays resident for the whole step (cooperative launch: a grid that cannot be
// co-resident is refused at launch instead of hanging) and walks the same phase list,
// separated by grid-wide barriers on a global counter. Per layer:
//   A  rows:    a = rms_norm(delta, attn_norm, residual=x); codes of a for i, f, g
//   G0 product: i, f, g = W_i/f/g codes (3 N = h products in one phase)
//   B  rows:    MLGRU step (state in place) -> h; codes of rms_norm_swish_gate(g, h) for o
//   G1 product: attn_out = W_o codes
//   C  rows:    m = rms_norm(attn_out, mlp_norm, residual=x); codes of m for gate_proj
//   G2 product: u = W_gate codes  [B, 2I]
//   D  rows:    t = silu(u[:I]) * u[I:]; codes of t for down_proj
//   G3 product: delta = W_down codes
// then the final norm (rows) and the lm_head (product). Row phases give one batch row to a
// CTA (the statistics of a row come from one CTA: decode_rows.cuh, in the canonical order of
// the standalone norm kernels); product phases give each CTA a contiguous range of output
// rows of the phase (decode_gemv.cuh). Every product phase first issues L2 prefetches of the
// CTA's rows of the NEXT product phase: weights do not depend on activations, so DRAM keeps
// streaming through the row phases and barriers. Activations live in a small workspace (L2).
//
// That is v1 (batches 2..64 now). v2 (decode_kernel.cuh, decode_step_kernel_v2; batches up
// to kV2MaxBatch = 1, where it measured faster, and where its shared memory fits) has no row
// phases: every CTA does the row math of every batch row at the start of each product phase,
// codes straight into its shared memory, so a layer is 4 phases and 4 grid barriers, not 8.
// v3 (decode_kernel_v3.cuh; batch 1, where its shared memory fits; MMFREE_DECODE_V3=0: v2)
// keeps v2's phases and copies each CTA's weight rows of the next product into its shared
// memory while the current phase runs, the row inputs in one wave, the row math on all warps.
#include <algorithm>
#include <cstdint>

#include "cuda/decode/decode_kernel.cuh"
#include "cuda/decode/decode_kernel_v3.cuh"

namespace mmfree {
namespace cuda {
namespace decode {
extern template cudaError_t launch_typed<float>(const KParams&, int, cudaStream_t);
extern template cudaError_t launch_typed<__nv_bfloat16>(const KParams&, int, cudaStream_t);
extern template cudaError_t launch_typed<__half>(const KParams&, int, cudaStream_t);
}  // namespace decode

using namespace decode;

namespace {
bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
}  // namespace

const char* decode_step_unsupported(const DecodeStepParams& p) {
  if (p.act_dtype != DType::kFloat32 && p.act_dtype != DType::kBFloat16 && p.act_dtype != DType::kFloat16)
    return "the activation dtype must be float32, bfloat16 or float16";
  if (p.norm_dtype != p.act_dtype && p.norm_dtype != DType::kFloat32)
    return "the norm weights must have the activation dtype or float32";
  if (p.layers > kDecodeMaxLayers) return "at most 64 layers";
  const int64_t n = 16 / dtype_size(p.act_dtype);
  const int64_t max_vecs = static_cast<int64_t>(norm::kVecPerThread) * norm::kMaxThreads;
  if (p.hidden % n != 0 || p.intermediate % n != 0 || p.hidden / n > max_vecs || p.intermediate / n > max_vecs)
    return "hidden and intermediate sizes must be multiples of 16 bytes of the activation dtype, at most 2048 vectors";
  for (const void* ptr : {static_cast<const void*>(p.embeddings), p.norms, p.down_norms, p.final_norms})
    if (!aligned16(ptr)) return "the embedding and norm tensors must be 16-byte aligned";
  for (int64_t i = 0; i < p.layers * kDecodeMatsPerLayer + 1; ++i)
    if (!aligned16(p.packed[i])) return "the packed weights must be 16-byte aligned";
  return nullptr;
}

bool decode_step_v3_runs(const DecodeStepParams& p) {
  // The conditions of launch_typed / launch_v3 (decode_kernel*.cuh).
  if (decode_step_unsupported(p) != nullptr || p.batch != 1 || !v3_enabled()) return false;
  if (!aligned16(p.state) || !aligned16(p.lower_bounds)) return false;
  int dev = 0, optin = 0;
  const int sms = sm_count();
  if (sms < 1 || cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return false;
  const int64_t budget = std::min(kSmemBudget, optin - 1024);
  const int64_t esize = dtype_size(p.act_dtype);
  const bool wf32 = p.norm_dtype == DType::kFloat32 && p.act_dtype != DType::kFloat32;
  return v3_smem_bytes(p.hidden, p.intermediate, esize, wf32 ? 4 : esize, sms) <= budget;
}

size_t decode_step_workspace_bytes(const DecodeStepParams& p) {
  const int64_t b = std::min<int64_t>(p.batch, kDecodeMaxBatch);
  return static_cast<size_t>(workspace_layout(b, p.hidden, p.intermediate, dtype_size(p.act_dtype)).total);
}

cudaError_t decode_step(const DecodeStepParams& p, void* workspace, cudaStream_t stream) {
  if (decode_step_unsupported(p) != nullptr) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const int64_t esize = dtype_size(p.act_dtype);
  const int64_t n = 16 / esize;
  const int64_t bmax = std::min<int64_t>(p.batch, kDecodeMaxBatch);
  const Workspace w = workspace_layout(bmax, p.hidden, p.intermediate, esize);
  char* ws = static_cast<char*>(workspace);
  KParams k{};
  k.L = static_cast<int>(p.layers);
  k.h = p.hidden;
  k.I = p.intermediate;
  k.V = p.vocab;
  k.kpad = (std::max(p.hidden, p.intermediate) + 15) / 16 * 16;
  k.state_stride = p.batch * p.hidden;
  k.emb = p.embeddings;
  k.lb = p.lower_bounds;
  k.norms = p.norms;
  k.down_norms = p.down_norms;
  k.final_norms = p.final_norms;
  k.w_f32 = p.norm_dtype == DType::kFloat32 && p.act_dtype != DType::kFloat32;
  k.w_scales = p.w_scales;
  k.eps = p.eps;
  k.bar = reinterpret_cast<unsigned*>(ws + w.bar);
  k.xres = ws + w.xres;
  k.xres2 = ws + w.xres2;
  k.snew = reinterpret_cast<float*>(ws + w.snew);
  k.delta = ws + w.delta;
  k.ifg = ws + w.ifg;
  k.attn = ws + w.attn;
  k.u = ws + w.u;
  k.codes = reinterpret_cast<int8_t*>(ws + w.codes);
  k.scales = reinterpret_cast<float*>(ws + w.scales);
  k.xsums = reinterpret_cast<int*>(ws + w.xsums);
  k.ph = norm::vec_threads(p.hidden / n);
  k.pi = norm::vec_threads(p.intermediate / n);
  for (int64_t i = 0; i < p.layers * kDecodeMatsPerLayer + 1; ++i) k.packed[i] = p.packed[i];
  const int smem_rows = static_cast<int>(3 * std::max(p.hidden, p.intermediate) * esize);
  for (int64_t b0 = 0; b0 < p.batch; b0 += kDecodeMaxBatch) {
    k.B = static_cast<int>(std::min<int64_t>(kDecodeMaxBatch, p.batch - b0));
    k.tokens = p.tokens + b0;
    k.state = p.state + b0 * p.hidden;
    k.logits = static_cast<char*>(p.logits) + b0 * p.vocab * esize;
    cudaError_t err = cudaSuccess;
    switch (p.act_dtype) {
      case DType::kFloat32: err = launch_typed<float>(k, smem_rows, stream); break;
      case DType::kBFloat16: err = launch_typed<__nv_bfloat16>(k, smem_rows, stream); break;
      default: err = launch_typed<__half>(k, smem_rows, stream); break;
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace mmfree
