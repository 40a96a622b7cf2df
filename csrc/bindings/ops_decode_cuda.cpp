// CUDA implementation of mmfree::decode_step (schema: ops_decode.cpp; semantics:
// csrc/kernels/decode.h): the argument checks of python/mmfree_ext/ops/decode.py's
// check_decode_args with the same messages, then one persistent kernel per step
// (csrc/kernels/cuda/decode/decode_step.cu), or, for models that kernel does not take, the
// same step op by op.
#if defined(MMFREE_WITH_CUDA)

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/checks.h"
#include "common/ternary_format.h"
#include "decode_cuda.h"

namespace mmfree {
namespace binding {
namespace {

bool is_float(ScalarType s) { return s == kFloat || s == kBFloat16 || s == kHalf; }

// Python-style names in the messages, as check_decode_args prints them.
std::string dtype_name(ScalarType s) {
  switch (s) {
    case kFloat: return "torch.float32";
    case kBFloat16: return "torch.bfloat16";
    case kHalf: return "torch.float16";
    case kDouble: return "torch.float64";
    case kLong: return "torch.int64";
    case kInt: return "torch.int32";
    case kByte: return "torch.uint8";
    default: return std::string(torch::headeronly::toString(s));
  }
}

std::string shape_of(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += std::to_string(t.size(i));
    if (t.dim() == 1 || i + 1 < t.dim()) s += ",";
    if (i + 1 < t.dim()) s += " ";
  }
  return s + ")";
}

void check_on(const Tensor& t, const std::string& name, const Device& dev) {
  MMFREE_CHECK(t.device() == dev, "mmfree: argument '", name, "' must be on ", dev, " (the device of 'embeddings'), got ",
              t.device());
}

// The first of an op's two results (the second is released).
template <size_t N>
Tensor first(const std::array<StableIValue, N>& r) {
  take(r[1]);
  return take(r[0]);
}

Tensor row(const Tensor& t, int64_t i) { return torch::stable::select(t, 0, i); }

// The step op by op through the dispatcher, exactly as the CompositeExplicitAutograd
// implementation (ops/decode.py) runs it: the fallback for models the fused kernel does not
// take (decode_step_unsupported), so the CUDA op accepts everything the schema does.
Tensor op_by_op_step(const Tensor& tokens, const Tensor& state, const Tensor& embeddings,
                     const Tensor& lower_bounds, const Tensor& norms, const Tensor& down_norms,
                     const std::vector<Tensor>& packed, const Tensor& w_scales, const Tensor& final_norms, double eps,
                     int64_t inter) {
  using Opt = std::optional<Tensor>;
  const ScalarType dtype = embeddings.scalar_type();
  // embedding(E, tokens) = index_select(E, 0, tokens): [B, h] -> [B, 1, h] (called by name:
  // torch::stable::index_select needs 2.14 headers)
  Tensor x = torch::stable::unsqueeze(call_tensor_op("aten::index_select", "", embeddings, int64_t{0}, tokens), 1);
  std::optional<Tensor> delta;
  for (int64_t l = 0; l < state.size(0); ++l) {
    const Tensor nw = row(norms, l);
    const int64_t base = kDecodeMatsPerLayer * l;
    Tensor a;
    if (!delta.has_value()) {
      a = first(call_op<2>("mmfree::rms_norm", "", x, row(nw, kNormAttn), eps, std::nullopt));
    } else {
      auto r = call_op<2>("mmfree::rms_norm", "", *delta, row(nw, kNormAttn), eps, Opt(x));
      a = take(r[0]);
      x = take(r[1]);
    }
    Tensor nw_ifg = nw;
    nw_ifg = torch::stable::narrow(nw_ifg, 0, kNormI, kNormG + 1 - kNormI);
    auto q = call_op<2>("mmfree::rms_norm_quant_multi", "", a, nw_ifg, eps);
    const Tensor x_q = take(q[0]), x_scale = take(q[1]);
    const std::vector<Tensor> p3(packed.begin() + base, packed.begin() + base + 3);
    const std::vector<Tensor> w3{row(w_scales, base), row(w_scales, base + 1), row(w_scales, base + 2)};
    const Tensor ifg = call_tensor_op("mmfree::ternary_matmul_grouped", "", x_q, x_scale, p3, w3, dtype);
    const Opt lb = l > 0 ? Opt(row(lower_bounds, l)) : std::nullopt;
    auto sc = call_op<2>("mmfree::mlgru_scan", "", row(ifg, 0), row(ifg, 1), lb, Opt(row(state, l)), std::nullopt,
                         std::nullopt);
    const Tensor h = take(sc[0]), h_last = take(sc[1]);
    auto o = call_op<2>("mmfree::rms_norm_swish_gate_quant", "", row(ifg, 2), h, row(nw, kNormGateOut), eps,
                        row(nw, kNormO), eps);
    const Tensor o_q = take(o[0]), o_scale = take(o[1]);
    const Tensor attn =
        call_tensor_op("mmfree::ternary_matmul", "", o_q, o_scale, packed[base + kMatO], row(w_scales, base + kMatO), dtype);
    auto r = call_op<2>("mmfree::rms_norm", "", attn, row(nw, kNormMlp), eps, Opt(x));
    const Tensor m = take(r[0]);
    x = take(r[1]);
    Tensor u = call_tensor_op("mmfree::ternary_linear_packed", "", m, packed[base + kMatGate],
                              row(w_scales, base + kMatGate), row(nw, kNormGateProj), eps);
    const int64_t last = u.dim() - 1;
    const Tensor t = aten::mul(aten::silu(torch::stable::narrow(u, last, 0, inter)),
                               torch::stable::narrow(u, last, inter, inter));
    delta = call_tensor_op("mmfree::ternary_linear_packed", "", t, packed[base + kMatDown],
                           row(w_scales, base + kMatDown), row(down_norms, l), eps);
    Tensor state_l = row(state, l);
    torch::stable::copy_(state_l, h_last);
  }
  const Tensor xn = first(call_op<2>("mmfree::rms_norm", "", contig(*delta), row(final_norms, 0), eps, Opt(contig(x))));
  auto fq = call_op<2>("mmfree::rms_norm_quant", "", xn, row(final_norms, 1), eps);
  const Tensor q2 = take(fq[0]), s2 = take(fq[1]);
  const int64_t n_mats = static_cast<int64_t>(packed.size());
  return torch::stable::select(
      call_tensor_op("mmfree::ternary_matmul", "", q2, s2, packed[n_mats - 1], row(w_scales, n_mats - 1), dtype), 1, 0);
}

Tensor decode_step_cuda(const Tensor& tokens, const Tensor& state, const Tensor& embeddings,
                            const Tensor& lower_bounds, const Tensor& norms_in, const Tensor& down_norms_in,
                            const std::vector<Tensor>& packed_in, const Tensor& w_scales, const Tensor& final_norms_in,
                            double eps) {
  MMFREE_CHECK(tokens.dim() == 1 && tokens.scalar_type() == kLong, "mmfree: argument 'tokens' must be int64 [B], got ",
              dtype_name(tokens.scalar_type()), " of shape ", shape_of(tokens));
  MMFREE_CHECK(embeddings.dim() == 2 && is_float(embeddings.scalar_type()),
              "mmfree: argument 'embeddings' must be a float32/bfloat16/float16 [V, h] tensor, got ",
              dtype_name(embeddings.scalar_type()), " of shape ", shape_of(embeddings));
  const int64_t vocab = embeddings.size(0), hidden = embeddings.size(1), batch = tokens.size(0);
  MMFREE_CHECK(state.dim() == 3 && state.scalar_type() == kFloat && state.size(1) == batch && state.size(2) == hidden,
              "mmfree: argument 'state' must be float32 [L, B=", batch, ", h=", hidden, "], got ",
              dtype_name(state.scalar_type()), " of shape ", shape_of(state));
  const int64_t layers = state.size(0);
  MMFREE_CHECK(layers >= 1, "mmfree: argument 'state' must have at least one layer");
  MMFREE_CHECK(state.is_contiguous(), "mmfree: argument 'state' must be contiguous");
  MMFREE_CHECK(lower_bounds.scalar_type() == kFloat && lower_bounds.dim() == 2 && lower_bounds.size(0) == layers &&
                  lower_bounds.size(1) == hidden,
              "mmfree: argument 'lower_bounds' must be float32 [L=", layers, ", h=", hidden, "], got ",
              dtype_name(lower_bounds.scalar_type()), " of shape ", shape_of(lower_bounds));
  MMFREE_CHECK(is_float(norms_in.scalar_type()) && norms_in.dim() == 3 && norms_in.size(0) == layers &&
                  norms_in.size(1) == kDecodeNormsPerLayer && norms_in.size(2) == hidden,
              "mmfree: argument 'norms' must be a float [L=", layers, ", ", kDecodeNormsPerLayer, ", h=", hidden,
              "] tensor, got ", dtype_name(norms_in.scalar_type()), " of shape ", shape_of(norms_in));
  MMFREE_CHECK(down_norms_in.dim() == 2 && down_norms_in.size(0) == layers &&
                  down_norms_in.scalar_type() == norms_in.scalar_type(),
              "mmfree: argument 'down_norms' must be [L=", layers, ", I] with the dtype of 'norms' (",
              dtype_name(norms_in.scalar_type()), "), got ", dtype_name(down_norms_in.scalar_type()), " of shape ",
              shape_of(down_norms_in));
  const int64_t inter = down_norms_in.size(1);
  MMFREE_CHECK(final_norms_in.dim() == 2 && final_norms_in.size(0) == 2 && final_norms_in.size(1) == hidden &&
                  final_norms_in.scalar_type() == norms_in.scalar_type(),
              "mmfree: argument 'final_norms' must be [2, h=", hidden, "] with the dtype of 'norms', got ",
              dtype_name(final_norms_in.scalar_type()), " of shape ", shape_of(final_norms_in));
  const int64_t n_mats = kDecodeMatsPerLayer * layers + 1;
  MMFREE_CHECK(static_cast<int64_t>(packed_in.size()) == n_mats, "mmfree: argument 'packed' must hold 6 * L + 1 = ",
              n_mats, " tensors, got ", packed_in.size());
  MMFREE_CHECK(w_scales.scalar_type() == kFloat && w_scales.dim() == 1 && w_scales.size(0) == n_mats,
              "mmfree: argument 'w_scales' must be float32 [", n_mats, "], got ", dtype_name(w_scales.scalar_type()),
              " of shape ", shape_of(w_scales));
  for (int64_t idx = 0; idx < n_mats; ++idx) {
    const Tensor& w = packed_in[idx];
    const int m = static_cast<int>(idx % kDecodeMatsPerLayer);
    int64_t n = hidden, k = hidden;
    if (idx == n_mats - 1) {
      n = vocab;
    } else if (m == kMatGate) {
      n = 2 * inter;
    } else if (m == kMatDown) {
      k = inter;
    }
    const int64_t rb = ternary::row_bytes(k);
    MMFREE_CHECK(w.scalar_type() == kByte && w.dim() == 2 && w.size(0) == n && w.size(1) == rb, "mmfree: argument 'packed[",
                idx, "]' must be uint8 [", n, ", ", rb, "], got ", dtype_name(w.scalar_type()), " of shape ", shape_of(w));
  }
  const Device dev = embeddings.device();
  check_on(tokens, "tokens", dev);
  check_on(state, "state", dev);
  check_on(lower_bounds, "lower_bounds", dev);
  check_on(norms_in, "norms", dev);
  check_on(down_norms_in, "down_norms", dev);
  check_on(w_scales, "w_scales", dev);
  check_on(final_norms_in, "final_norms", dev);
  for (int64_t idx = 0; idx < n_mats; ++idx) {
    MMFREE_CHECK(packed_in[idx].device() == dev, "mmfree: argument 'packed[", idx, "]' must be on ", dev, ", got ",
                packed_in[idx].device());
  }

  const ScalarType act = embeddings.scalar_type();
  Tensor logits = empty({batch, vocab}, embeddings.scalar_type(), embeddings);
  if (batch == 0) return logits;
  const CudaGuard guard(embeddings);
  // The norm kernels read weights in the activation dtype or fp32; other mixes go through
  // fp32 (exact), as the standalone norm ops do (ops_norm.cpp, cuda_weight).
  auto norm_weight = [&](const Tensor& w) {
    const Tensor t = (w.scalar_type() == act || w.scalar_type() == kFloat) ? w : to(w, kFloat);
    return contig(t);
  };
  const Tensor norms = norm_weight(norms_in), down_norms = norm_weight(down_norms_in),
                   final_norms = norm_weight(final_norms_in);
  const Tensor emb = contig(embeddings), lb = contig(lower_bounds), scales = contig(w_scales), toks = contig(tokens);
  std::vector<Tensor> packed;
  std::vector<const uint8_t*> ptrs;
  packed.reserve(n_mats);
  ptrs.reserve(n_mats);
  for (const Tensor& w : packed_in) {
    packed.push_back(contig(w));
    ptrs.push_back(ptr<uint8_t>(packed.back()));
  }
  DecodeStepParams p{};
  p.batch = batch;
  p.layers = layers;
  p.hidden = hidden;
  p.intermediate = inter;
  p.vocab = vocab;
  p.act_dtype = to_dtype(act);
  p.norm_dtype = to_dtype(norms.scalar_type());
  p.tokens = ptr<int64_t>(toks);
  p.state = ptr<float>(state);
  p.embeddings = emb.data_ptr();
  p.lower_bounds = ptr<float>(lb);
  p.norms = norms.data_ptr();
  p.down_norms = down_norms.data_ptr();
  p.packed = ptrs.data();
  p.w_scales = ptr<float>(scales);
  p.final_norms = final_norms.data_ptr();
  p.eps = static_cast<float>(eps);
  p.logits = logits.data_ptr();
  if (cuda::decode_step_unsupported(p) != nullptr) {
    return op_by_op_step(tokens, state, embeddings, lower_bounds, norms_in, down_norms_in, packed_in, w_scales,
                         final_norms_in, eps, inter);
  }
  Tensor workspace = empty({static_cast<int64_t>(cuda::decode_step_workspace_bytes(p))}, kByte, embeddings);
  MMFREE_CUDA_CHECK(cuda::decode_step(p, workspace.data_ptr(), current_stream(embeddings)));
  return logits;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfree, CUDA, m) { m.impl("decode_step", TORCH_BOX(&decode_step_cuda)); }

}  // namespace binding
}  // namespace mmfree

#endif  // MMFREE_WITH_CUDA
