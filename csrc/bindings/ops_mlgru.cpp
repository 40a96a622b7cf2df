// Bindings of the MLGRU scan ops: mlgru_scan (public), mlgru_scan_impl (the same with the
// CUDA algorithm forced, for tests and benchmarks) and mlgru_scan_backward.
#include "bindings/checks.h"
#include "mlgru.h"

namespace mmfree {
namespace binding {
namespace {

// Checked, normalized arguments shared by forward and backward.
struct ScanArgs {
  MlgruSeqs seqs;
  ScalarType state_type;  // fp32, or fp64 for float64 inputs (CPU only)
  int64_t batch = 0, time = 0;
  Tensor mask_u8;         // [N] uint8 view, or undefined
  Tensor cu_seqlens_i64;  // [S+1] int64, or undefined
};

MlgruPath to_path(int64_t path) {
  MMFREE_CHECK(path >= 0 && path <= 3,
               "mmfree: argument 'path' must be 0 (auto), 1 (sequential), 2 (chunked) or 3 (lanes), got ", path);
  return static_cast<MlgruPath>(path);
}

ScanArgs check_scan_args(const Tensor& i, const Tensor& f, const std::optional<Tensor>& lower_bound,
                         const std::optional<Tensor>& h0, const std::optional<Tensor>& mask,
                         const std::optional<Tensor>& cu_seqlens) {
  check_float(i, "i");
  check_dim(i, "i", 3);
  check_contiguous(i, "i");
  check_same_device(f, "f", i, "i");
  check_dtype(f, "f", i.scalar_type());
  MMFREE_CHECK(f.sizes().equals(i.sizes()), "mmfree: argument 'f' must have the shape of 'i' ", i.sizes(), ", got ",
              f.sizes());
  check_contiguous(f, "f");
  MMFREE_CHECK(!(i.is_cuda() && i.scalar_type() == kDouble),
              "mmfree: argument 'i' is float64 on CUDA; mlgru_scan supports float64 on CPU only (for gradcheck)");
  ScanArgs a;
  a.batch = i.size(0);
  a.time = i.size(1);
  const int64_t dim = i.size(2);
  a.state_type = i.scalar_type() == kDouble ? kDouble : kFloat;
  a.seqs.dim = dim;
  a.seqs.tokens = a.batch * a.time;
  a.seqs.num_seqs = a.batch;
  a.seqs.seq_len = a.time;

  if (cu_seqlens.has_value()) {
    const Tensor& cu = *cu_seqlens;
    check_same_device(cu, "cu_seqlens", i, "i");
    MMFREE_CHECK(cu.scalar_type() == kInt || cu.scalar_type() == kLong,
                "mmfree: argument 'cu_seqlens' must have dtype int32 or int64, got ", cu.scalar_type());
    check_dim(cu, "cu_seqlens", 1);
    MMFREE_CHECK(cu.size(0) >= 1, "mmfree: argument 'cu_seqlens' must have S+1 >= 1 elements, got shape ", cu.sizes());
    MMFREE_CHECK(a.batch == 1, "mmfree: argument 'cu_seqlens' (varlen) requires B == 1, got 'i' of shape ",
                i.sizes());
    a.cu_seqlens_i64 = contig(to(cu, kLong));
    a.seqs.num_seqs = cu.size(0) - 1;
    a.seqs.cu_seqlens = ptr<int64_t>(a.cu_seqlens_i64);
    if (!cu.is_cuda()) {  // on CUDA a check would sync; the kernels clamp offsets into [0, T] instead
      const int64_t* o = a.seqs.cu_seqlens;
      bool ok = o[0] == 0 && o[a.seqs.num_seqs] == a.time;
      for (int64_t s = 0; s < a.seqs.num_seqs && ok; ++s) ok = o[s] <= o[s + 1];
      MMFREE_CHECK(ok, "mmfree: argument 'cu_seqlens' must rise from 0 to T=", a.time, ", got ",
                   std::vector<int64_t>(o, o + a.seqs.num_seqs + 1));
    }
  }
  if (lower_bound.has_value()) {
    const Tensor& lb = *lower_bound;
    check_same_device(lb, "lower_bound", i, "i");
    check_dtype(lb, "lower_bound", a.state_type);
    check_dim(lb, "lower_bound", 1);
    check_numel(lb, "lower_bound", dim);
    check_contiguous(lb, "lower_bound");
  }
  if (h0.has_value()) {
    const Tensor& h = *h0;
    check_same_device(h, "h0", i, "i");
    check_dtype(h, "h0", a.state_type);
    check_dim(h, "h0", 2);
    MMFREE_CHECK(h.size(0) == a.seqs.num_seqs && h.size(1) == dim, "mmfree: argument 'h0' must have shape [",
                a.seqs.num_seqs, ", ", dim, "] ([B, D], or [S, D] with cu_seqlens), got ", h.sizes());
    check_contiguous(h, "h0");
  }
  if (mask.has_value()) {
    const Tensor& m = *mask;
    check_same_device(m, "mask", i, "i");
    check_dim(m, "mask", 2);
    MMFREE_CHECK(m.size(0) == a.batch && m.size(1) == a.time, "mmfree: argument 'mask' must have shape [", a.batch,
                ", ", a.time, "], got ", m.sizes());
    const ScalarType ms = m.scalar_type();
    MMFREE_CHECK(ms != ScalarType::ComplexHalf && ms != ScalarType::ComplexFloat && ms != ScalarType::ComplexDouble,
                 "mmfree: argument 'mask' must be bool, integer or floating, got ", ms);
    // to(bool) is m != 0 (NaN counts as set, as ne(0) does).
    const Tensor b = contig(to(m, kBool));
    a.mask_u8 = torch::stable::reshape(view_dtype(b, kByte), {a.seqs.tokens});
  }
  return a;
}

const void* opt_ptr(const std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

std::tuple<Tensor, Tensor> scan_impl(const Tensor& i, const Tensor& f,
                                             const std::optional<Tensor>& lower_bound,
                                             const std::optional<Tensor>& h0,
                                             const std::optional<Tensor>& mask,
                                             const std::optional<Tensor>& cu_seqlens, int64_t path) {
  ScanArgs a = check_scan_args(i, f, lower_bound, h0, mask, cu_seqlens);
  Tensor h = torch::stable::empty_like(i);
  Tensor h_last = empty({a.seqs.num_seqs, a.seqs.dim}, a.state_type, i);
  MlgruScanParams p{a.seqs, to_dtype(i.scalar_type()), i.data_ptr(), f.data_ptr(), opt_ptr(lower_bound),
                    opt_ptr(h0), a.mask_u8.defined() ? ptr<uint8_t>(a.mask_u8) : nullptr, h.data_ptr(),
                    h_last.data_ptr(), to_path(path), nullptr};
  if (a.seqs.num_seqs == 0 || a.seqs.dim == 0) return {h, h_last};
  if (i.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(i);
    const int64_t ws = cuda::mlgru_workspace_floats(a.seqs, p.dtype, p.path);
    Tensor workspace;
    if (ws > 0) {
      workspace = empty({ws}, kFloat, i);
      p.workspace = ptr<float>(workspace);
    }
    MMFREE_CUDA_CHECK(cuda::mlgru_scan(p, current_stream(i)));
#endif
  } else {
    cpu::mlgru_scan(p);
  }
  return {h, h_last};
}

std::tuple<Tensor, Tensor> scan(const Tensor& i, const Tensor& f,
                                        const std::optional<Tensor>& lower_bound,
                                        const std::optional<Tensor>& h0, const std::optional<Tensor>& mask,
                                        const std::optional<Tensor>& cu_seqlens) {
  return scan_impl(i, f, lower_bound, h0, mask, cu_seqlens, 0);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scan_backward(
    const Tensor& grad_h, const Tensor& grad_h_last, const Tensor& i, const Tensor& f,
    const std::optional<Tensor>& lower_bound, const std::optional<Tensor>& h0,
    const std::optional<Tensor>& mask, const std::optional<Tensor>& cu_seqlens, int64_t path) {
  ScanArgs a = check_scan_args(i, f, lower_bound, h0, mask, cu_seqlens);
  check_same_device(grad_h, "grad_h", i, "i");
  check_dtype(grad_h, "grad_h", i.scalar_type());
  MMFREE_CHECK(grad_h.sizes().equals(i.sizes()), "mmfree: argument 'grad_h' must have the shape of 'i' ", i.sizes(),
              ", got ", grad_h.sizes());
  check_same_device(grad_h_last, "grad_h_last", i, "i");
  check_dtype(grad_h_last, "grad_h_last", a.state_type);
  MMFREE_CHECK(grad_h_last.dim() == 2 && grad_h_last.size(0) == a.seqs.num_seqs && grad_h_last.size(1) == a.seqs.dim,
              "mmfree: argument 'grad_h_last' must have shape [", a.seqs.num_seqs, ", ", a.seqs.dim, "], got ",
              grad_h_last.sizes());
  // Gradients arrive with arbitrary strides (expand of a scalar, transposes): copy if needed.
  const Tensor gh = contig(grad_h);
  const Tensor ghl = contig(grad_h_last);
  Tensor grad_i = torch::stable::empty_like(i);
  Tensor grad_f = torch::stable::empty_like(i);
  Tensor grad_lb = empty({a.seqs.dim}, a.state_type, i);
  Tensor grad_h0 = empty({a.seqs.num_seqs, a.seqs.dim}, a.state_type, i);
  if (a.seqs.num_seqs == 0 || a.seqs.dim == 0) {
    torch::stable::zero_(grad_lb);
    return {grad_i, grad_f, grad_lb, grad_h0};
  }
  MlgruScanBwdParams p{a.seqs, to_dtype(i.scalar_type()), i.data_ptr(), f.data_ptr(), opt_ptr(lower_bound),
                       opt_ptr(h0), a.mask_u8.defined() ? ptr<uint8_t>(a.mask_u8) : nullptr, gh.data_ptr(),
                       ghl.data_ptr(), grad_i.data_ptr(), grad_f.data_ptr(), grad_lb.data_ptr(), grad_h0.data_ptr(),
                       to_path(path), nullptr};
  if (i.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(i);
    const int64_t ws = cuda::mlgru_bwd_workspace_floats(a.seqs, p.dtype, p.path);
    Tensor workspace;
    if (ws > 0) {
      workspace = empty({ws}, kFloat, i);
      p.workspace = ptr<float>(workspace);
    }
    MMFREE_CUDA_CHECK(cuda::mlgru_scan_backward(p, current_stream(i)));
#endif
  } else {
    cpu::mlgru_scan_backward(p);
  }
  return {grad_i, grad_f, grad_lb, grad_h0};
}

}  // namespace

#if !defined(MMFREE_WITH_CUDA)
STABLE_TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def(
      "mlgru_scan(Tensor i, Tensor f, Tensor? lower_bound=None, Tensor? h0=None, Tensor? mask=None, "
      "Tensor? cu_seqlens=None) -> (Tensor h, Tensor h_last)");
  m.def(
      "mlgru_scan_impl(Tensor i, Tensor f, Tensor? lower_bound, Tensor? h0, Tensor? mask, Tensor? cu_seqlens, "
      "int path) -> (Tensor h, Tensor h_last)");
  m.def(
      "mlgru_scan_backward(Tensor grad_h, Tensor grad_h_last, Tensor i, Tensor f, Tensor? lower_bound, Tensor? h0, "
      "Tensor? mask, Tensor? cu_seqlens, int path=0) -> (Tensor grad_i, Tensor grad_f, Tensor grad_lower_bound, "
      "Tensor grad_h0)");
}

STABLE_TORCH_LIBRARY_IMPL(mmfree, CPU, m) {
  m.impl("mlgru_scan", TORCH_BOX(&scan));
  m.impl("mlgru_scan_impl", TORCH_BOX(&scan_impl));
  m.impl("mlgru_scan_backward", TORCH_BOX(&scan_backward));
}

#else
STABLE_TORCH_LIBRARY_IMPL(mmfree, CUDA, m) {
  m.impl("mlgru_scan", TORCH_BOX(&scan));
  m.impl("mlgru_scan_impl", TORCH_BOX(&scan_impl));
  m.impl("mlgru_scan_backward", TORCH_BOX(&scan_backward));
}
#endif

}  // namespace binding
}  // namespace mmfree
