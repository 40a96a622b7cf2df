// CUDA implementation of mmfree::decode_step (schema: ops_decode.cpp; semantics:
// csrc/kernels/decode.h): the argument checks of decode_checks.h (shared with the CPU
// kernel, the messages of ops/decode.py's check_decode_args), then one persistent kernel per step
// (csrc/kernels/cuda/decode/decode_step.cu), or, for models that kernel does not take, the
// same step op by op. MMFREE_DECODE_CUDA picks between the two (decode_path below).
#if defined(MMFREE_WITH_CUDA)

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/decode_checks.h"
#include "decode_cuda.h"

namespace mmfree {
namespace binding {
namespace {

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

// Which CUDA path runs the step, from MMFREE_DECODE_CUDA: "fused" (the persistent kernel,
// where it takes the model), "ops" (op_by_op_step), or unset / "auto" (kAutoFusedBatches).
// Both paths are bit-identical; tests and benchmarks force each with it.
enum class DecodePath { kAuto, kFused, kOps };

DecodePath decode_path_from_env() {
  const char* v = std::getenv("MMFREE_DECODE_CUDA");
  const std::string path = v == nullptr ? "" : v;
  MMFREE_CHECK(path.empty() || path == "auto" || path == "fused" || path == "ops",
               "mmfree: MMFREE_DECODE_CUDA must be 'auto', 'fused' or 'ops', got '", path, "'");
  if (path == "fused") return DecodePath::kFused;
  if (path == "ops") return DecodePath::kOps;
  return DecodePath::kAuto;
}

// The auto rule: the batch sizes [lo, hi] on which the fused kernel measured faster than
// op by op on the H200 (benchmarks/NOTES.md, "Fused decode step"; bench_decode.py with
// MMFREE_DECODE_CUDA=fused / ops in the same run). Change it from measurements only.
// v1 and v2 measured slower at every batch size; v3 (batch 1 only) faster at batch 1 (H200,
// 11:36: 1.3B 1216 vs 1729 us GPU, generate() 804 vs 794 tok/s; 2.7B 1866 vs 2151 us, 522 vs
// 520 tok/s), so auto takes the fused path at batch 1 where v3 runs (decode_step_v3_runs).
struct BatchRange {
  int64_t lo, hi;
};
constexpr BatchRange kAutoFusedBatches[] = {{1, 1}};

bool auto_picks_fused(int64_t batch) {
  for (const BatchRange& r : kAutoFusedBatches) {
    if (batch >= r.lo && batch <= r.hi) return true;
  }
  return false;
}

Tensor decode_step_cuda(const Tensor& tokens, const Tensor& state, const Tensor& embeddings,
                            const Tensor& lower_bounds, const Tensor& norms_in, const Tensor& down_norms_in,
                            const std::vector<Tensor>& packed_in, const Tensor& w_scales, const Tensor& final_norms_in,
                            double eps) {
  const DecodeDims d = check_decode_step_args(tokens, state, embeddings, lower_bounds, norms_in, down_norms_in,
                                              packed_in, w_scales, final_norms_in);
  const int64_t batch = d.batch, layers = d.layers, hidden = d.hidden, inter = d.inter, vocab = d.vocab;
  const int64_t n_mats = static_cast<int64_t>(packed_in.size());

  const ScalarType act = embeddings.scalar_type();
  Tensor logits = empty({batch, vocab}, embeddings.scalar_type(), embeddings);
  const DecodePath path = decode_path_from_env();  // a bad value raises for every batch size
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
  const bool fused = path == DecodePath::kFused ||
                     (path == DecodePath::kAuto && auto_picks_fused(batch) && cuda::decode_step_v3_runs(p));
  if (!fused || cuda::decode_step_unsupported(p) != nullptr) {
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
