// CUDA implementation of mmfree::decode_step (schema: ops_decode.cpp; semantics:
// csrc/kernels/decode.h): the argument checks of python/mmfree_ext/ops/decode.py's
// check_decode_args with the same messages, then one persistent kernel per step
// (csrc/kernels/cuda/decode/decode_step.cu).
#if defined(MMFREE_WITH_CUDA)

#include <string>
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
  const char* why = cuda::decode_step_unsupported(p);
  TORCH_CHECK(why == nullptr, "mmfree: decode_step on CUDA does not support this model: ", why);
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
