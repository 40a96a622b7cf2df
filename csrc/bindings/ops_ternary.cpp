// Bindings of the ternary linear family:
//   ternary_matmul       int8 activations x packed ternary weights (the forward product)
//   ternary_matmul_t     float grad x packed ternary weights, transposed (the dx product)
//   ternary_linear       training BitLinear on a latent weight (+ _backward, STE)
//   ternary_linear_packed inference BitLinear on packed weights (+ _backward, frozen W)
// The two BitLinear ops are compositions of custom ops (mmfree::rms_norm_quant,
// mmfree::quantize_ternary, mmfree::ternary_matmul[_t]) called through the dispatcher, so
// one implementation serves CPU and CUDA; autograd is attached in Python
// (mmfree_ext/ops/ternary.py). The backward ops recompute the int8 activations from x
// instead of saving them: nothing but the op inputs is kept for backward.
#include <algorithm>
#include <cstdlib>
#include <string>

#include "bindings/checks.h"
#include "bindings/norm_backward_scaled.h"
#include "bindings/op_calls.h"
#include "common/ternary_format.h"
#include "dequant.h"
#include "ternary.h"
#if defined(MMFREE_WITH_CUDA)
#include "cuda/ternary/launch.h"  // the split-K switches, to name them in errors
#endif

namespace mmfree {
namespace binding {
namespace {

void check_packed_for(const Tensor& packed, int64_t k, const Tensor& ref, const char* ref_name) {
  check_dtype(packed, "packed", kByte);
  check_dim(packed, "packed", 2);
  check_contiguous(packed, "packed");
  check_same_device(packed, "packed", ref, ref_name);
  MMFREE_CHECK(packed.size(1) == ternary::row_bytes(k), "mmfree: argument 'packed' must have ", ternary::row_bytes(k),
              " bytes per row (ceil(K/128)*32) for K=", k, " taken from '", ref_name, "', got shape ", packed.sizes());
}

void check_w_scale(const Tensor& w_scale, const Tensor& ref, const char* ref_name) {
  check_dtype(w_scale, "w_scale", kFloat);
  check_numel(w_scale, "w_scale", 1);
  check_same_device(w_scale, "w_scale", ref, ref_name);
}

// x_scale: fp32, contiguous, one element per row of x_q (its leading dims).
void check_x_scale(const Tensor& x_scale, const Tensor& x_q) {
  check_dtype(x_scale, "x_scale", kFloat);
  check_contiguous(x_scale, "x_scale");
  check_same_device(x_scale, "x_scale", x_q, "x_q");
  const IntArrayRef lead = x_q.sizes().slice(0, x_q.dim() - 1);
  MMFREE_CHECK(x_scale.sizes().equals(lead), "mmfree: argument 'x_scale' must have shape ", lead,
               " (x_q's leading dims), got ", x_scale.sizes());
}

void check_norm_weight(const Tensor& norm_weight, int64_t k, const Tensor& x) {
  check_float(norm_weight, "norm_weight");
  check_dim(norm_weight, "norm_weight", 1);
  check_same_device(norm_weight, "norm_weight", x, "x");
  MMFREE_CHECK(norm_weight.size(0) == k, "mmfree: argument 'norm_weight' must have K=", k,
              " elements (the last dim of 'x'), got shape ", norm_weight.sizes());
}

void check_x(const Tensor& x) {
  check_float(x, "x");
  MMFREE_CHECK(x.dim() >= 1, "mmfree: argument 'x' must have at least 1 dim [..., K], got a 0-dim tensor");
  MMFREE_CHECK(size_at(x, -1) >= 1, "mmfree: argument 'x' must have K >= 1 (last dim), got shape ", x.sizes());
}

std::vector<int64_t> with_last(IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// ---- ternary_matmul ---------------------------------------------------------------------

#if defined(MMFREE_WITH_CUDA)
// Which CUDA GEMM serves prefill-sized products (M >= 8), from MMFREE_TERNARY_GEMM:
// unset or "auto" (wgmma on sm_90 for the large products where it measured faster,
// mma.sync elsewhere; cuda/ternary/launch.h), "mma" (always mma.sync), "sm90" (always the
// sm_90a wgmma kernel decoding the packed weights in its pipeline) or "sm90_int8" (always
// the wgmma kernel on the weights expanded to int8 first, in a workspace from the caching
// allocator); the sm90 ones are an error where that is not built or the GPU is not sm_90.
// Tests and benchmarks force each kernel with it.
cuda::TernaryGemmImpl gemm_impl_from_env() {
  const char* v = std::getenv("MMFREE_TERNARY_GEMM");
  const std::string impl = v == nullptr ? "" : v;
  MMFREE_CHECK(impl.empty() || impl == "auto" || impl == "mma" || impl == "sm90" || impl == "sm90_int8",
              "mmfree: MMFREE_TERNARY_GEMM must be 'auto', 'mma', 'sm90' or 'sm90_int8', got '", impl, "'");
  if (impl == "mma") return cuda::TernaryGemmImpl::kMma;
  if (impl == "sm90" || impl == "sm90_int8") {
    MMFREE_CHECK(cuda::ternary_gemm_sm90_built(), "mmfree: MMFREE_TERNARY_GEMM=", impl,
                 " needs a build whose CUDA arch list has 90");
    return impl == "sm90" ? cuda::TernaryGemmImpl::kSm90 : cuda::TernaryGemmImpl::kSm90Int8;
  }
  return cuda::TernaryGemmImpl::kAuto;
}

// p.workspace for the kernel ternary_matmul will pick (most products need none); the
// returned tensor owns it and must outlive the launch (the caching allocator keeps it
// stream-ordered, so releasing it right after the launch is safe).
std::optional<Tensor> attach_workspace(TernaryMatmulParams& p, cuda::TernaryGemmImpl impl, const Tensor& like) {
  const size_t bytes = cuda::ternary_matmul_workspace_bytes(p, impl);
  if (bytes == 0) return std::nullopt;
  Tensor ws = empty({static_cast<int64_t>(bytes)}, kByte, like);
  p.workspace = ws.data_ptr();
  p.workspace_bytes = bytes;
  return ws;
}

void check_gemm_launch(cudaError_t err, cuda::TernaryGemmImpl impl) {
  const bool forced = impl == cuda::TernaryGemmImpl::kSm90 || impl == cuda::TernaryGemmImpl::kSm90Int8;
  MMFREE_CHECK(!(err == cudaErrorNotSupported && forced), "mmfree: MMFREE_TERNARY_GEMM=",
               impl == cuda::TernaryGemmImpl::kSm90 ? "sm90" : "sm90_int8", " needs an sm_90 GPU (H100/H200)");
  // The split-K switches are read by the kernel library, which can only say "invalid value":
  // name the variable here.
  if (err == cudaErrorInvalidValue) {
    MMFREE_CHECK(cuda::ternary_kernels::split_k_override() != cuda::ternary_kernels::kSplitKInvalid,
                 "mmfree: MMFREE_TERNARY_SPLITK must be 'auto', 'off' or 1..", cuda::ternary_kernels::kMaxSplitK);
    MMFREE_CHECK(cuda::ternary_kernels::sm90_split_override() != cuda::ternary_kernels::kSplitKInvalid,
                 "mmfree: MMFREE_TERNARY_SM90_SPLITK must be 'auto', 'off' or 2..",
                 cuda::ternary_kernels::kMaxSm90SplitK);
    MMFREE_CHECK(cuda::ternary_kernels::sm90_tail_override() >= 0,
                 "mmfree: MMFREE_TERNARY_SM90_TAIL must be 'auto' or 'off'");
  }
  MMFREE_CUDA_CHECK(err);
}
#endif

Tensor ternary_matmul_impl(const Tensor& x_q, const Tensor& x_scale, const Tensor& packed,
                               const Tensor& w_scale, ScalarType out_dtype) {
  check_dtype(x_q, "x_q", kChar);
  MMFREE_CHECK(x_q.dim() >= 1, "mmfree: argument 'x_q' must have at least 1 dim [..., K], got a 0-dim tensor");
  check_contiguous(x_q, "x_q");
  const int64_t k = size_at(x_q, -1);
  MMFREE_CHECK(k >= 1, "mmfree: argument 'x_q' must have K >= 1 (last dim), got shape ", x_q.sizes());
  check_x_scale(x_scale, x_q);
  check_packed_for(packed, k, x_q, "x_q");
  check_w_scale(w_scale, x_q, "x_q");
  MMFREE_CHECK(out_dtype == kFloat || out_dtype == kBFloat16 || out_dtype == kHalf,
              "mmfree: argument 'out_dtype' must be float32, bfloat16 or float16, got ", out_dtype);

  const int64_t n = packed.size(0);
  const int64_t m = x_q.numel() / k;
  Tensor out = empty(with_last(x_q.sizes(), n), out_dtype, x_q);
  if (m == 0 || n == 0) return out;
  TernaryMatmulParams p{ptr<int8_t>(x_q), k,   ptr<float>(x_scale), ptr<uint8_t>(packed),
                        ptr<float>(w_scale),  out.data_ptr(),            to_dtype(out_dtype),
                        m,                          n,                         k};
  if (x_q.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(x_q);
    const cuda::TernaryGemmImpl impl = gemm_impl_from_env();
    const std::optional<Tensor> workspace = attach_workspace(p, impl, x_q);
    check_gemm_launch(cuda::ternary_matmul(p, current_stream(x_q), impl), impl);
#endif
  } else {
    cpu::ternary_matmul(p);
  }
  return out;
}

// ---- ternary_matmul_grouped ---------------------------------------------------------------

// G products of the same shape in one call: out[g] = ternary_matmul(x_q[g], x_scale[g],
// packed[g], w_scale[g]). On CUDA, decode-sized ones share one GEMV launch (the i/f/g
// projections of a decode step).
Tensor ternary_matmul_grouped_impl(const Tensor& x_q, const Tensor& x_scale, const std::vector<Tensor>& packed,
                                       const std::vector<Tensor>& w_scale, ScalarType out_dtype) {
  check_dtype(x_q, "x_q", kChar);
  MMFREE_CHECK(x_q.dim() >= 2, "mmfree: argument 'x_q' must be [G, ..., K] with at least 2 dims, got shape ", x_q.sizes());
  check_contiguous(x_q, "x_q");
  const int64_t groups = x_q.size(0);
  MMFREE_CHECK(groups >= 1 && static_cast<int64_t>(packed.size()) == groups &&
                  static_cast<int64_t>(w_scale.size()) == groups,
              "mmfree: ternary_matmul_grouped needs one 'packed' and one 'w_scale' per group: x_q has G=", groups,
              ", got ", packed.size(), " packed and ", w_scale.size(), " w_scale tensors");
  const int64_t k = size_at(x_q, -1);
  MMFREE_CHECK(k >= 1, "mmfree: argument 'x_q' must have K >= 1 (last dim), got shape ", x_q.sizes());
  check_x_scale(x_scale, x_q);
  const int64_t n = packed[0].dim() == 2 ? packed[0].size(0) : -1;
  for (int64_t g = 0; g < groups; ++g) {
    check_packed_for(packed[g], k, x_q, "x_q");
    check_w_scale(w_scale[g], x_q, "x_q");
    MMFREE_CHECK(packed[g].size(0) == n, "mmfree: every 'packed' must have the same N rows, got ", n, " and ",
                packed[g].size(0), " (group ", g, ")");
  }
  MMFREE_CHECK(out_dtype == kFloat || out_dtype == kBFloat16 || out_dtype == kHalf,
              "mmfree: argument 'out_dtype' must be float32, bfloat16 or float16, got ", out_dtype);
  Tensor out = empty(with_last(x_q.sizes(), n), out_dtype, x_q);
  const int64_t m = x_q.numel() / (k * groups);
  if (m == 0 || n == 0) return out;
  std::vector<TernaryMatmulParams> ps;
  const int64_t esize = out.element_size();
  for (int64_t g = 0; g < groups; ++g) {
    ps.push_back(TernaryMatmulParams{ptr<int8_t>(x_q) + g * m * k, k, ptr<float>(x_scale) + g * m,
                                     ptr<uint8_t>(packed[g]), ptr<float>(w_scale[g]),
                                     static_cast<char*>(out.data_ptr()) + g * m * n * esize, to_dtype(out_dtype), m,
                                     n, k});
  }
  if (x_q.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(x_q);
    const cuda::TernaryGemmImpl impl = gemm_impl_from_env();
    // The groups run one after another on one stream: one workspace, the largest any group's
    // kernel wants (alignments differ per group), serves all.
    size_t bytes = 0;
    for (const auto& q : ps) bytes = std::max(bytes, cuda::ternary_matmul_workspace_bytes(q, impl));
    std::optional<Tensor> workspace;
    if (bytes > 0) {
      workspace = empty({static_cast<int64_t>(bytes)}, kByte, x_q);
      for (auto& q : ps) q.workspace = workspace->data_ptr(), q.workspace_bytes = bytes;
    }
    check_gemm_launch(cuda::ternary_matmul_grouped(ps.data(), static_cast<int>(groups), current_stream(x_q), impl),
                      impl);
#endif
  } else {
    for (const auto& p : ps) cpu::ternary_matmul(p);
  }
  return out;
}

// ---- ternary_matmul_t -------------------------------------------------------------------

#if defined(MMFREE_WITH_CUDA)
// Which CUDA implementation of ternary_matmul_t runs. "panels" (default): W_q is decoded one
// column panel (<= 16 MiB) at a time into the grad's dtype (bf16, fp16 or fp32; exact) and
// multiplied by cuBLAS with fp32 output (or, for the bf16 BitLinear backward, bf16 output left
// unscaled: ternary_matmul_t_unscaled_cuda): the precision of a dense product in that dtype,
// at cuBLAS speed (wgmma on sm_90). "mma": the torch-free mma.sync kernel that decodes the
// codes in shared memory (gemm_t.cu), bf16 grads only (and GPUs with >= 106 KB of shared
// memory per block); measured 2.1x slower than the panels on the H100 (1776 us at
// M = 8192, N = 13824, K = 2560), see benchmarks/NOTES.md. An fp32 grad's panel product
// follows torch's TF32 setting, as nn.Linear does (exact fp32 unless TF32 is allowed).
bool use_mma_kernel(const Tensor& grad) {
  const char* v = std::getenv("MMFREE_TERNARY_T_CUDA");
  const std::string impl = v == nullptr ? "" : v;
  MMFREE_CHECK(impl.empty() || impl == "panels" || impl == "mma",
              "mmfree: MMFREE_TERNARY_T_CUDA must be 'panels' or 'mma', got '", impl, "'");
  return impl == "mma" && grad.scalar_type() == kBFloat16;
}

// out[m, :] = g @ W_q over column panels of decoded weights; g is [M, N] in the compute dtype,
// out [M, K] fp32 or g's dtype.
void matmul_t_panels(const Tensor& g, const Tensor& packed, int64_t k, Tensor& out) {
  constexpr int64_t kPanelBytes = int64_t{16} << 20;
  const int64_t n = packed.size(0);
  const int64_t esize = g.element_size();
  const int64_t nblocks = ternary::blocks_per_row(k);
  const int64_t panel_blocks = std::clamp<int64_t>(kPanelBytes / (esize * n * ternary::kBlockWeights), 1, nblocks);
  const cudaStream_t stream = current_stream(packed);
  for (int64_t b0 = 0; b0 < nblocks; b0 += panel_blocks) {
    const int64_t b1 = std::min(nblocks, b0 + panel_blocks);
    const int64_t c0 = b0 * ternary::kBlockWeights;
    const int64_t width = std::min(k, b1 * ternary::kBlockWeights) - c0;
    Tensor w = empty({n, width}, g.scalar_type(), g);
    TernaryDecodePanelParams d{ptr<uint8_t>(packed), n, k, b0, b1, w.data_ptr(), to_dtype(g.scalar_type())};
    MMFREE_CUDA_CHECK(cuda::ternary_decode_panel(d, stream));
    Tensor o = torch::stable::narrow(out, 1, c0, width);
    if (g.scalar_type() == kFloat || out.scalar_type() == g.scalar_type()) {
      aten::mm_out(o, g, w);  // fp32, or 16-bit operands and output (fp32 accumulation)
    } else {
      aten::mm_dtype_out(o, g, w, kFloat);  // 16-bit operands, fp32 accumulation and output
    }
  }
}

// out_dtype: fp32 for the op; the BitLinear backward asks for x's dtype when it cannot take
// the unscaled product (fp16, dY in another dtype than x, the mma kernel), which the panels
// path then writes in the same pass that applies w_scale.
Tensor ternary_matmul_t_cuda(const Tensor& grad, Tensor packed, const Tensor& w_scale,
                                 int64_t in_features, const std::vector<int64_t>& out_sizes,
                                 ScalarType out_dtype = kFloat) {
  const CudaGuard guard(grad);
  const int64_t n = packed.size(0);
  if (n == 0) return zeros(out_sizes, out_dtype, grad);  // an empty sum
  const int64_t m = grad.numel() / n;
  Tensor out = empty(out_sizes, kFloat, grad);
  if (m == 0) return to(out, out_dtype);
  // The kernels read packed rows in 16-byte chunks; a view at an odd offset gets copied.
  if (reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 != 0) packed = torch::stable::clone(packed);
  if (use_mma_kernel(grad)) {
    Tensor g = contig(grad);
    if (reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 != 0) g = torch::stable::clone(g);
    TernaryMatmulTCudaParams p{g.data_ptr(), DType::kBFloat16, 1, ptr<uint8_t>(packed),
                               ptr<float>(w_scale), ptr<float>(out), m, n, in_features};
    const cudaError_t err = cuda::ternary_matmul_t(p, current_stream(grad));
    if (err != cudaErrorNotSupported) {  // not enough shared memory on this GPU: use the panels
      MMFREE_CUDA_CHECK(err);
      return to(out, out_dtype);
    }
  }
  const Tensor g = contig(torch::stable::reshape(grad.scalar_type() == kDouble ? to(grad, kFloat) : grad, {m, n}));
  Tensor out2 = torch::stable::view(out, {m, in_features});
  matmul_t_panels(g, packed, in_features, out2);
  // w_scale after the sums, as the kernel does (a device scalar: no host sync).
  if (out_dtype == kFloat) {
    aten::mul_(out, torch::stable::reshape(w_scale, {}));
    return out;
  }
  Tensor res = empty(out_sizes, out_dtype, grad);
  // One vectorized pass, the fp32 product rounded once as at::mul_out rounds it (whose
  // casting loop ran at ~1 TB/s here).
  const ScaleCastParams sc{ptr<float>(out), ptr<float>(w_scale), out.numel(), to_dtype(out_dtype), res.data_ptr()};
  MMFREE_CUDA_CHECK(cuda::scale_cast(sc, current_stream(grad)));
  return res;
}

// grad @ W_q in grad's dtype, w_scale NOT applied: the panels product with cuBLAS writing
// grad's dtype directly (fp32 accumulation; split-K reductions as torch allows them), for a
// consumer that applies w_scale itself as it reads the product (the BitLinear backward's
// RMSNorm: rms_norm_backward_scaled). Saves the
// fp32 [M, K] product and the pass that scaled and cast it (152 passes, 4.6 ms of a 1.3B
// training step on the H200). grad: [M, N] contiguous, 16-bit or fp32.
Tensor ternary_matmul_t_unscaled_cuda(const Tensor& grad, Tensor packed, int64_t in_features) {
  const CudaGuard guard(grad);
  const int64_t n = packed.size(0), m = grad.size(0);
  if (n == 0) return zeros({m, in_features}, grad.scalar_type(), grad);  // an empty sum
  Tensor out = empty({m, in_features}, grad.scalar_type(), grad);
  if (m == 0) return out;
  if (reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 != 0) packed = torch::stable::clone(packed);
  matmul_t_panels(grad, packed, in_features, out);
  return out;
}
#endif

Tensor ternary_matmul_t_impl(const Tensor& grad, const Tensor& packed, const Tensor& w_scale,
                                 int64_t in_features) {
  check_float(grad, "grad");
  MMFREE_CHECK(grad.dim() >= 1, "mmfree: argument 'grad' must have at least 1 dim [..., N], got a 0-dim tensor");
  MMFREE_CHECK(in_features >= 1, "mmfree: argument 'in_features' must be >= 1, got ", in_features);
  check_packed_for(packed, in_features, grad, "in_features");
  check_w_scale(w_scale, grad, "grad");
  const int64_t n = packed.size(0);
  MMFREE_CHECK(size_at(grad, -1) == n, "mmfree: argument 'grad' must have N=", n, " (rows of 'packed') in its last dim, got shape ",
              grad.sizes());
  const auto out_sizes = with_last(grad.sizes(), in_features);
  if (grad.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    return ternary_matmul_t_cuda(grad, packed, w_scale, in_features, out_sizes);
#endif
  }
  Tensor g = contig(to(grad, kFloat));
  Tensor out = empty(out_sizes, kFloat, grad);
  const int64_t m = n > 0 ? g.numel() / n : out.numel() / in_features;
  TernaryMatmulTParams p{ptr<float>(g), ptr<uint8_t>(packed), ptr<float>(w_scale),
                         ptr<float>(out), m, n, in_features};
  cpu::ternary_matmul_t(p);
  return out;
}

// ---- BitLinear --------------------------------------------------------------------------

// The quantized input side, computed in fp32 whatever x's dtype (the reference does too).
TensorPair quantized_input(const Tensor& x, const Tensor& norm_weight, double eps) {
  const Tensor xf = x.scalar_type() == kDouble ? to(x, kFloat) : contig(x);
  const Tensor gf = norm_weight.scalar_type() == kDouble ? to(norm_weight, kFloat) : contig(norm_weight);
  return call_rms_norm_quant(xf, gf, eps);
}

// y in x's dtype; float64 callers (gradcheck) get the fp32 result widened exactly.
Tensor bit_linear_forward(const Tensor& x, const Tensor& packed, const Tensor& w_scale,
                              const Tensor& norm_weight, double eps) {
  auto [x_q, x_scale] = quantized_input(x, norm_weight, eps);
  const bool f64 = x.scalar_type() == kDouble;
  Tensor y = ternary_matmul_impl(x_q, x_scale, packed, w_scale, f64 ? kFloat : x.scalar_type());
  return f64 ? to(y, kDouble) : y;
}

void check_weight_for(const Tensor& weight, const Tensor& x) {
  check_float(weight, "weight");
  check_dim(weight, "weight", 2);
  check_contiguous(weight, "weight");
  check_same_device(weight, "weight", x, "x");
  MMFREE_CHECK(weight.size(1) == size_at(x, -1), "mmfree: argument 'weight' must be [N, K] with K=", size_at(x, -1),
              " (the last dim of 'x'), got shape ", weight.sizes());
}

Tensor ternary_linear_impl(const Tensor& x, const Tensor& weight, const Tensor& norm_weight, double eps) {
  check_x(x);
  check_weight_for(weight, x);
  check_norm_weight(norm_weight, size_at(x, -1), x);
  auto [packed, w_scale] = call_quantize_ternary(weight);
  return bit_linear_forward(x, packed, w_scale, norm_weight, eps);
}

Tensor ternary_linear_packed_impl(const Tensor& x, const Tensor& packed, const Tensor& w_scale,
                                      const Tensor& norm_weight, double eps) {
  check_x(x);
  check_packed_for(packed, size_at(x, -1), x, "x");
  check_w_scale(w_scale, x, "x");
  check_norm_weight(norm_weight, size_at(x, -1), x);
  return bit_linear_forward(x, packed, w_scale, norm_weight, eps);
}

void check_grad_out(const Tensor& grad_out, const Tensor& x, int64_t n) {
  check_float(grad_out, "grad_out");
  check_same_device(grad_out, "grad_out", x, "x");
  const std::vector<int64_t> expected = with_last(x.sizes(), n);
  MMFREE_CHECK(grad_out.sizes().equals(expected), "mmfree: argument 'grad_out' must have shape ", expected,
               " (x's leading dims, N), got ", grad_out.sizes());
}

Tensor call_rms_norm_backward_dx_dg(const Tensor& grad_y, const Tensor& x, const Tensor& weight, double eps,
                                         Tensor* dweight) {
  auto r = call_op<2>("mmfree::rms_norm_backward", "", grad_y, x, weight, eps, std::nullopt, std::nullopt);
  *dweight = take(r[1]);
  return take(r[0]);
}

// STE backward through the product and the RMSNorm:
//   dxn = dY @ (W_q * w_scale)                 (ternary_matmul_t, from the packed codes)
//   dg  = sum_rows(dxn * xhat),  xhat = x * rstd
//   dx  = rstd * (dxn*g - xhat * mean(dxn*g * xhat))
// For fp32/bf16/fp16 x the last two lines are the fused mmfree::rms_norm_backward, fed dxn
// in x's dtype (a 16-bit x gets dxn rounded to 16 bits, as a 16-bit autograd graph of the
// reference would hold it; on CUDA with bf16 dY and x it is the unscaled dY @ W_q that is
// rounded, w_scale applied in fp32 by the norm). float64 (gradcheck) stays in fp32 ops,
// widened at the end.
// Returns (dx in x's dtype, dg in norm_weight's dtype, g2 = dY as [M, N] in dY's dtype, or
// fp32 for a float64 dY).
std::tuple<Tensor, Tensor, Tensor> norm_and_input_backward(const Tensor& grad_out, const Tensor& x,
                                                                       const Tensor& packed, const Tensor& w_scale,
                                                                       const Tensor& norm_weight, double eps) {
  const int64_t k = size_at(x, -1), n = packed.size(0);
  // Rows from x, not -1: with N = 0 (no outputs) dY has no elements to infer them from.
  Tensor g2 = torch::stable::reshape(grad_out, {k > 0 ? x.numel() / k : 0, n});
  g2 = contig(g2.scalar_type() == kDouble ? to(g2, kFloat) : g2);
  const bool fused = x.scalar_type() != kDouble &&
                     (norm_weight.scalar_type() == x.scalar_type() || norm_weight.scalar_type() == kFloat);
  if (fused) {
    std::optional<Tensor> dxn;
#if defined(MMFREE_WITH_CUDA)
    // fp16 keeps the scaled product: unscaled, |dY @ W_q| is 1 / w_scale (~60x at init) larger
    // and would overflow fp16's range that much sooner (GradScaler-scaled gradients).
    if (g2.is_cuda() && g2.scalar_type() == x.scalar_type() && g2.scalar_type() != kHalf && !use_mma_kernel(g2)) {
      // w_scale is applied in fp32 as the norm reads the product: a bf16 product is rounded
      // once, before the scale (bf16(dY @ W_q) * w_scale instead of bf16((dY @ W_q) *
      // w_scale)); fp32 gives the same bits. cuBLAS's bf16 output follows torch's
      // allow_bf16_reduced_precision_reduction, as a bf16 nn.Linear's does.
      const Tensor prod = ternary_matmul_t_unscaled_cuda(g2, packed, k);
      const Tensor x2 = contig(torch::stable::reshape(x, {-1, k}));
      auto [dx, dg] = rms_norm_backward_scaled(prod, x2, contig(norm_weight), eps, w_scale);
      return {torch::stable::reshape(dx, x.sizes()), dg, g2};
    }
    if (g2.is_cuda()) dxn = ternary_matmul_t_cuda(g2, packed, w_scale, k, {g2.size(0), k}, x.scalar_type());
#endif
    if (!dxn.has_value()) dxn = to(ternary_matmul_t_impl(g2, packed, w_scale, k), x.scalar_type());
    Tensor dg;
    const Tensor x2 = contig(torch::stable::reshape(x, {-1, k}));
    Tensor dx = call_rms_norm_backward_dx_dg(*dxn, x2, contig(norm_weight), eps, &dg);
    return {torch::stable::reshape(dx, x.sizes()), dg, g2};
  }
  Tensor dxn = ternary_matmul_t_impl(g2, packed, w_scale, k);
  // fp32 aten ops; k and eps are 0-dim fp32 CPU tensors (no Scalar arguments in the stable
  // ABI; a CPU 0-dim operand of a binary op takes the Python-scalar path on every device).
  const Tensor x2 = to(torch::stable::reshape(x, {-1, k}), kFloat);
  const Tensor kt = cpu_scalar(static_cast<double>(k), kFloat);
  const Tensor epst = cpu_scalar(eps, kFloat);
  const Tensor rstd = aten::rsqrt(aten::add(aten::div(aten::sum_keepdim(aten::mul(x2, x2), -1), kt), epst));
  const Tensor xhat = aten::mul(x2, rstd);
  Tensor dg = aten::sum0(aten::mul(dxn, xhat));
  aten::mul_(dxn, to(norm_weight, kFloat));  // now d/dxhat
  const Tensor mean_dot = aten::div(aten::sum_keepdim(aten::mul(dxn, xhat), -1), kt);
  Tensor dx = aten::mul(aten::sub(dxn, aten::mul(xhat, mean_dot)), rstd);
  return {torch::stable::reshape(to(dx, x.scalar_type()), x.sizes()), to(dg, norm_weight.scalar_type()), g2};
}

std::tuple<Tensor, Tensor, Tensor> ternary_linear_backward_impl(const Tensor& grad_out, const Tensor& x,
                                                                            const Tensor& weight,
                                                                            const Tensor& norm_weight, double eps) {
  check_x(x);
  check_weight_for(weight, x);
  check_norm_weight(norm_weight, size_at(x, -1), x);
  check_grad_out(grad_out, x, weight.size(0));
  auto [packed, w_scale] = call_quantize_ternary(weight);
  auto [dx, dg, g2] = norm_and_input_backward(grad_out, x, packed, w_scale, norm_weight, eps);
  // dW = dY^T @ (x_q * x_scale): the int8 activations are recomputed from x (same kernel as
  // the forward, so bit-identical), then one dense product (cuBLAS on CUDA). It runs in
  // dY's dtype: a 16-bit dY gives a 16-bit product with fp32 accumulation (what a 16-bit
  // nn.Linear does), an fp32 dY an fp32 one.
  auto [x_q, x_scale] = quantized_input(x, norm_weight, eps);
  const int64_t k = size_at(x, -1);
  // One pass: the int8 x fp32 product is computed in fp32 and rounded once into dY's dtype.
  Tensor x_deq = empty({x_q.numel() / k, k}, g2.scalar_type(), g2);
  aten::mul_out(x_deq, torch::stable::reshape(x_q, {-1, k}), torch::stable::reshape(x_scale, {-1, 1}));
  Tensor dw = to(aten::mm(aten::t(g2), x_deq), weight.scalar_type());
  return {dx, dw, dg};
}

std::tuple<Tensor, Tensor> ternary_linear_packed_backward_impl(const Tensor& grad_out, const Tensor& x,
                                                                       const Tensor& packed, const Tensor& w_scale,
                                                                       const Tensor& norm_weight, double eps) {
  check_x(x);
  check_packed_for(packed, size_at(x, -1), x, "x");
  check_w_scale(w_scale, x, "x");
  check_norm_weight(norm_weight, size_at(x, -1), x);
  check_grad_out(grad_out, x, packed.size(0));
  auto [dx, dg, g2] = norm_and_input_backward(grad_out, x, packed, w_scale, norm_weight, eps);
  return {dx, dg};
}

}  // namespace

#define MMFREE_TERNARY_IMPLS(m)                                                                     \
  m.impl("ternary_matmul", TORCH_BOX(&ternary_matmul_impl));                                        \
  m.impl("ternary_matmul_grouped", TORCH_BOX(&ternary_matmul_grouped_impl));                        \
  m.impl("ternary_matmul_t", TORCH_BOX(&ternary_matmul_t_impl));                                    \
  m.impl("ternary_linear", TORCH_BOX(&ternary_linear_impl));                                        \
  m.impl("ternary_linear_backward", TORCH_BOX(&ternary_linear_backward_impl));                      \
  m.impl("ternary_linear_packed", TORCH_BOX(&ternary_linear_packed_impl));                          \
  m.impl("ternary_linear_packed_backward", TORCH_BOX(&ternary_linear_packed_backward_impl));

#if !defined(MMFREE_WITH_CUDA)
STABLE_TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def("ternary_matmul(Tensor x_q, Tensor x_scale, Tensor packed, Tensor w_scale, ScalarType out_dtype) -> Tensor");
  m.def(
      "ternary_matmul_grouped(Tensor x_q, Tensor x_scale, Tensor[] packed, Tensor[] w_scale, ScalarType out_dtype) "
      "-> Tensor");
  m.def("ternary_matmul_t(Tensor grad, Tensor packed, Tensor w_scale, int in_features) -> Tensor");
  m.def("ternary_linear(Tensor x, Tensor weight, Tensor norm_weight, float eps) -> Tensor");
  m.def(
      "ternary_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor norm_weight, float eps) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_norm_weight)");
  m.def("ternary_linear_packed(Tensor x, Tensor packed, Tensor w_scale, Tensor norm_weight, float eps) -> Tensor");
  m.def(
      "ternary_linear_packed_backward(Tensor grad_out, Tensor x, Tensor packed, Tensor w_scale, Tensor norm_weight, "
      "float eps) -> (Tensor grad_x, Tensor grad_norm_weight)");
}

STABLE_TORCH_LIBRARY_IMPL(mmfree, CPU, m) { MMFREE_TERNARY_IMPLS(m) }
#else
STABLE_TORCH_LIBRARY_IMPL(mmfree, CUDA, m) { MMFREE_TERNARY_IMPLS(m) }
#endif

}  // namespace binding
}  // namespace mmfree
