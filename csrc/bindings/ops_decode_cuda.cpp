// CUDA implementation of mmfree::decode_step (schema: ops_decode.cpp; semantics:
// csrc/kernels/decode.h): the argument checks of python/mmfree_ext/ops/decode.py's
// check_decode_args with the same messages, then one persistent kernel per step
// (csrc/kernels/cuda/decode/decode_step.cu), or, for models that kernel does not take, the
// same step op by op. MMFREE_DECODE_CUDA picks between the two (decode_path below).
#if defined(MMFREE_WITH_CUDA)

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
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

bool is_float(at::ScalarType s) { return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf; }

// Python-style names in the messages, as check_decode_args prints them.
std::string dtype_name(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kByte: return "torch.uint8";
    default: return std::string(c10::toString(s));
  }
}

std::string shape_of(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += std::to_string(t.size(i));
    if (t.dim() == 1 || i + 1 < t.dim()) s += ",";
    if (i + 1 < t.dim()) s += " ";
  }
  return s + ")";
}

void check_on(const at::Tensor& t, const std::string& name, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "mmfree: argument '", name, "' must be on ", dev, " (the device of 'embeddings'), got ",
              t.device());
}

template <class Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The step op by op through the dispatcher, exactly as the CompositeExplicitAutograd
// implementation (ops/decode.py) runs it: the fallback for models the fused kernel does not
// take (decode_step_unsupported), so the CUDA op accepts everything the schema does.
at::Tensor op_by_op_step(const at::Tensor& tokens, const at::Tensor& state, const at::Tensor& embeddings,
                         const at::Tensor& lower_bounds, const at::Tensor& norms, const at::Tensor& down_norms,
                         at::TensorList packed, const at::Tensor& w_scales, const at::Tensor& final_norms, double eps,
                         int64_t inter) {
  using T = at::Tensor;
  using Pair = std::tuple<T, T>;
  using Opt = std::optional<T>;
  static auto rms_norm = op_handle<Pair(const T&, const T&, double, const Opt&)>("mmfree::rms_norm");
  static auto quant = op_handle<Pair(const T&, const T&, double)>("mmfree::rms_norm_quant");
  static auto quant_multi = op_handle<Pair(const T&, const T&, double)>("mmfree::rms_norm_quant_multi");
  static auto grouped =
      op_handle<T(const T&, const T&, at::TensorList, at::TensorList, at::ScalarType)>("mmfree::ternary_matmul_grouped");
  static auto scan =
      op_handle<Pair(const T&, const T&, const Opt&, const Opt&, const Opt&, const Opt&)>("mmfree::mlgru_scan");
  static auto gate_quant =
      op_handle<Pair(const T&, const T&, const T&, double, const T&, double)>("mmfree::rms_norm_swish_gate_quant");
  static auto matmul = op_handle<T(const T&, const T&, const T&, const T&, at::ScalarType)>("mmfree::ternary_matmul");
  static auto linear = op_handle<T(const T&, const T&, const T&, const T&, double)>("mmfree::ternary_linear_packed");
  const at::ScalarType dtype = embeddings.scalar_type();
  T x = at::embedding(embeddings, tokens).unsqueeze(1);  // [B, 1, h]
  T delta;
  const std::vector<T> ws = w_scales.unbind(0);
  for (int64_t l = 0; l < state.size(0); ++l) {
    const T nw = norms[l];
    const int64_t base = kDecodeMatsPerLayer * l;
    T a;
    if (!delta.defined()) {
      a = std::get<0>(rms_norm.call(x, nw[kNormAttn], eps, std::nullopt));
    } else {
      std::tie(a, x) = rms_norm.call(delta, nw[kNormAttn], eps, x);
    }
    auto [x_q, x_scale] = quant_multi.call(a, nw.slice(0, kNormI, kNormG + 1), eps);
    const std::vector<T> w3(ws.begin() + base, ws.begin() + base + 3);
    const T ifg = grouped.call(x_q, x_scale, packed.slice(base, 3), w3, dtype);
    const Opt lb = l > 0 ? Opt(lower_bounds[l]) : std::nullopt;
    auto [h, h_last] = scan.call(ifg[0], ifg[1], lb, Opt(state[l]), std::nullopt, std::nullopt);
    auto [o_q, o_scale] = gate_quant.call(ifg[2], h, nw[kNormGateOut], eps, nw[kNormO], eps);
    const T attn = matmul.call(o_q, o_scale, packed[base + kMatO], ws[base + kMatO], dtype);
    T m;
    std::tie(m, x) = rms_norm.call(attn, nw[kNormMlp], eps, x);
    const T u = linear.call(m, packed[base + kMatGate], ws[base + kMatGate], nw[kNormGateProj], eps);
    const T t = at::silu(u.narrow(-1, 0, inter)) * u.narrow(-1, inter, inter);
    delta = linear.call(t, packed[base + kMatDown], ws[base + kMatDown], down_norms[l], eps);
    state[l].copy_(h_last);
  }
  const T xn = std::get<0>(rms_norm.call(delta.contiguous(), final_norms[0], eps, x.contiguous()));
  auto [q, s] = quant.call(xn, final_norms[1], eps);
  return matmul.call(q, s, packed[packed.size() - 1], ws.back(), dtype).select(1, 0);
}

// Which CUDA path runs the step, from MMFREE_DECODE_CUDA: "fused" (the persistent kernel,
// where it takes the model), "ops" (op_by_op_step), or unset / "auto" (kAutoFusedBatches).
// Both paths are bit-identical; tests and benchmarks force each with it.
enum class DecodePath { kAuto, kFused, kOps };

DecodePath decode_path_from_env() {
  const char* v = std::getenv("MMFREE_DECODE_CUDA");
  const std::string path = v == nullptr ? "" : v;
  TORCH_CHECK(path.empty() || path == "auto" || path == "fused" || path == "ops",
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

at::Tensor decode_step_cuda(const at::Tensor& tokens, const at::Tensor& state, const at::Tensor& embeddings,
                            const at::Tensor& lower_bounds, const at::Tensor& norms_in, const at::Tensor& down_norms_in,
                            at::TensorList packed_in, const at::Tensor& w_scales, const at::Tensor& final_norms_in,
                            double eps) {
  TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong, "mmfree: argument 'tokens' must be int64 [B], got ",
              dtype_name(tokens.scalar_type()), " of shape ", shape_of(tokens));
  TORCH_CHECK(embeddings.dim() == 2 && is_float(embeddings.scalar_type()),
              "mmfree: argument 'embeddings' must be a float32/bfloat16/float16 [V, h] tensor, got ",
              dtype_name(embeddings.scalar_type()), " of shape ", shape_of(embeddings));
  const int64_t vocab = embeddings.size(0), hidden = embeddings.size(1), batch = tokens.size(0);
  TORCH_CHECK(state.dim() == 3 && state.scalar_type() == at::kFloat && state.size(1) == batch && state.size(2) == hidden,
              "mmfree: argument 'state' must be float32 [L, B=", batch, ", h=", hidden, "], got ",
              dtype_name(state.scalar_type()), " of shape ", shape_of(state));
  const int64_t layers = state.size(0);
  TORCH_CHECK(layers >= 1, "mmfree: argument 'state' must have at least one layer");
  TORCH_CHECK(state.is_contiguous(), "mmfree: argument 'state' must be contiguous");
  TORCH_CHECK(lower_bounds.scalar_type() == at::kFloat && lower_bounds.dim() == 2 && lower_bounds.size(0) == layers &&
                  lower_bounds.size(1) == hidden,
              "mmfree: argument 'lower_bounds' must be float32 [L=", layers, ", h=", hidden, "], got ",
              dtype_name(lower_bounds.scalar_type()), " of shape ", shape_of(lower_bounds));
  TORCH_CHECK(is_float(norms_in.scalar_type()) && norms_in.dim() == 3 && norms_in.size(0) == layers &&
                  norms_in.size(1) == kDecodeNormsPerLayer && norms_in.size(2) == hidden,
              "mmfree: argument 'norms' must be a float [L=", layers, ", ", kDecodeNormsPerLayer, ", h=", hidden,
              "] tensor, got ", dtype_name(norms_in.scalar_type()), " of shape ", shape_of(norms_in));
  TORCH_CHECK(down_norms_in.dim() == 2 && down_norms_in.size(0) == layers &&
                  down_norms_in.scalar_type() == norms_in.scalar_type(),
              "mmfree: argument 'down_norms' must be [L=", layers, ", I] with the dtype of 'norms' (",
              dtype_name(norms_in.scalar_type()), "), got ", dtype_name(down_norms_in.scalar_type()), " of shape ",
              shape_of(down_norms_in));
  const int64_t inter = down_norms_in.size(1);
  TORCH_CHECK(final_norms_in.dim() == 2 && final_norms_in.size(0) == 2 && final_norms_in.size(1) == hidden &&
                  final_norms_in.scalar_type() == norms_in.scalar_type(),
              "mmfree: argument 'final_norms' must be [2, h=", hidden, "] with the dtype of 'norms', got ",
              dtype_name(final_norms_in.scalar_type()), " of shape ", shape_of(final_norms_in));
  const int64_t n_mats = kDecodeMatsPerLayer * layers + 1;
  TORCH_CHECK(static_cast<int64_t>(packed_in.size()) == n_mats, "mmfree: argument 'packed' must hold 6 * L + 1 = ",
              n_mats, " tensors, got ", packed_in.size());
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.dim() == 1 && w_scales.size(0) == n_mats,
              "mmfree: argument 'w_scales' must be float32 [", n_mats, "], got ", dtype_name(w_scales.scalar_type()),
              " of shape ", shape_of(w_scales));
  for (int64_t idx = 0; idx < n_mats; ++idx) {
    const at::Tensor& w = packed_in[idx];
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
    TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.size(0) == n && w.size(1) == rb, "mmfree: argument 'packed[",
                idx, "]' must be uint8 [", n, ", ", rb, "], got ", dtype_name(w.scalar_type()), " of shape ", shape_of(w));
  }
  const at::Device dev = embeddings.device();
  check_on(tokens, "tokens", dev);
  check_on(state, "state", dev);
  check_on(lower_bounds, "lower_bounds", dev);
  check_on(norms_in, "norms", dev);
  check_on(down_norms_in, "down_norms", dev);
  check_on(w_scales, "w_scales", dev);
  check_on(final_norms_in, "final_norms", dev);
  for (int64_t idx = 0; idx < n_mats; ++idx) {
    TORCH_CHECK(packed_in[idx].device() == dev, "mmfree: argument 'packed[", idx, "]' must be on ", dev, ", got ",
                packed_in[idx].device());
  }

  const at::ScalarType act = embeddings.scalar_type();
  at::Tensor logits = at::empty({batch, vocab}, embeddings.options());
  const DecodePath path = decode_path_from_env();  // a bad value raises for every batch size
  if (batch == 0) return logits;
  const c10::cuda::CUDAGuard guard(dev);
  // The norm kernels read weights in the activation dtype or fp32; other mixes go through
  // fp32 (exact), as the standalone norm ops do (ops_norm.cpp, cuda_weight).
  auto norm_weight = [&](const at::Tensor& w) {
    at::Tensor t = (w.scalar_type() == act || w.scalar_type() == at::kFloat) ? w : w.to(at::kFloat);
    return t.contiguous();
  };
  const at::Tensor norms = norm_weight(norms_in), down_norms = norm_weight(down_norms_in),
                   final_norms = norm_weight(final_norms_in);
  const at::Tensor emb = embeddings.contiguous(), lb = lower_bounds.contiguous(), scales = w_scales.contiguous(),
                   toks = tokens.contiguous();
  std::vector<at::Tensor> packed;
  std::vector<const uint8_t*> ptrs;
  packed.reserve(n_mats);
  ptrs.reserve(n_mats);
  for (const at::Tensor& w : packed_in) {
    packed.push_back(w.contiguous());
    ptrs.push_back(packed.back().data_ptr<uint8_t>());
  }
  DecodeStepParams p{};
  p.batch = batch;
  p.layers = layers;
  p.hidden = hidden;
  p.intermediate = inter;
  p.vocab = vocab;
  p.act_dtype = to_dtype(act);
  p.norm_dtype = to_dtype(norms.scalar_type());
  p.tokens = toks.data_ptr<int64_t>();
  p.state = state.data_ptr<float>();
  p.embeddings = emb.data_ptr();
  p.lower_bounds = lb.data_ptr<float>();
  p.norms = norms.data_ptr();
  p.down_norms = down_norms.data_ptr();
  p.packed = ptrs.data();
  p.w_scales = scales.data_ptr<float>();
  p.final_norms = final_norms.data_ptr();
  p.eps = static_cast<float>(eps);
  p.logits = logits.data_ptr();
  const bool fused = path == DecodePath::kFused || (path == DecodePath::kAuto && auto_picks_fused(batch) && cuda::decode_step_v3_runs(p));
  if (!fused || cuda::decode_step_unsupported(p) != nullptr) {
    return op_by_op_step(tokens, state, embeddings, lower_bounds, norms_in, down_norms_in, packed_in, w_scales,
                         final_norms_in, eps, inter);
  }
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(cuda::decode_step_workspace_bytes(p))}, embeddings.options().dtype(at::kByte));
  MMFREE_CUDA_CHECK(cuda::decode_step(p, workspace.data_ptr(), current_stream(embeddings)));
  return logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfree, CUDA, m) { m.impl("decode_step", &decode_step_cuda); }

}  // namespace binding
}  // namespace mmfree

#endif  // MMFREE_WITH_CUDA
