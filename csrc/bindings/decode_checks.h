// The argument checks of mmfree::decode_step, shared by its CPU (ops_decode_cpu.cpp) and
// CUDA (ops_decode_cuda.cpp) kernels: the checks of check_decode_args
// (python/mmfree_ext/ops/decode.py) with the same messages, word for word, so every path
// of the op rejects bad input alike. The CPU kernel adds the token range check (it reads
// the tokens on the host anyway).
#pragma once

#include <string>
#include <vector>

#include "bindings/checks.h"
#include "common/ternary_format.h"
#include "decode.h"

namespace mmfree {
namespace binding {
namespace decode_checks {

inline bool is_act_float(ScalarType s) { return s == kFloat || s == kBFloat16 || s == kHalf; }

// Python-style spellings, as check_decode_args prints them.
inline std::string py_dtype(ScalarType s) {
  switch (s) {
    case kFloat: return "torch.float32";
    case kBFloat16: return "torch.bfloat16";
    case kHalf: return "torch.float16";
    case kDouble: return "torch.float64";
    case kLong: return "torch.int64";
    case kInt: return "torch.int32";
    case kByte: return "torch.uint8";
    case kChar: return "torch.int8";
    default: return std::string("torch.") + torch::headeronly::toString(s);
  }
}

// A Python tuple: "(2, 3)", "(4,)", "()".
inline std::string py_shape(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += std::to_string(t.size(i));
    if (t.dim() == 1 || i + 1 < t.dim()) s += ",";
    if (i + 1 < t.dim()) s += " ";
  }
  return s + ")";
}

}  // namespace decode_checks

struct DecodeDims {
  int64_t batch, layers, hidden, inter, vocab;
};

// Checks dtypes, shapes and devices of every decode_step argument; returns the model's dims.
inline DecodeDims check_decode_step_args(const Tensor& tokens, const Tensor& state, const Tensor& embeddings,
                                         const Tensor& lower_bounds, const Tensor& norms, const Tensor& down_norms,
                                         const std::vector<Tensor>& packed, const Tensor& w_scales,
                                         const Tensor& final_norms) {
  using decode_checks::is_act_float;
  using decode_checks::py_dtype;
  using decode_checks::py_shape;
  MMFREE_CHECK(tokens.dim() == 1 && tokens.scalar_type() == kLong, "mmfree: argument 'tokens' must be int64 [B], got ",
               py_dtype(tokens.scalar_type()), " of shape ", py_shape(tokens));
  MMFREE_CHECK(embeddings.dim() == 2 && is_act_float(embeddings.scalar_type()),
               "mmfree: argument 'embeddings' must be a float32/bfloat16/float16 [V, h] tensor, got ",
               py_dtype(embeddings.scalar_type()), " of shape ", py_shape(embeddings));
  const int64_t vocab = embeddings.size(0), hidden = embeddings.size(1), batch = tokens.size(0);
  MMFREE_CHECK(state.dim() == 3 && state.scalar_type() == kFloat && state.size(1) == batch && state.size(2) == hidden,
               "mmfree: argument 'state' must be float32 [L, B=", batch, ", h=", hidden, "], got ",
               py_dtype(state.scalar_type()), " of shape ", py_shape(state));
  const int64_t layers = state.size(0);
  MMFREE_CHECK(layers >= 1, "mmfree: argument 'state' must have at least one layer");
  MMFREE_CHECK(state.is_contiguous(), "mmfree: argument 'state' must be contiguous");
  MMFREE_CHECK(lower_bounds.scalar_type() == kFloat && lower_bounds.dim() == 2 && lower_bounds.size(0) == layers &&
                   lower_bounds.size(1) == hidden,
               "mmfree: argument 'lower_bounds' must be float32 [L=", layers, ", h=", hidden, "], got ",
               py_dtype(lower_bounds.scalar_type()), " of shape ", py_shape(lower_bounds));
  MMFREE_CHECK(is_act_float(norms.scalar_type()) && norms.dim() == 3 && norms.size(0) == layers &&
                   norms.size(1) == kDecodeNormsPerLayer && norms.size(2) == hidden,
               "mmfree: argument 'norms' must be a float [L=", layers, ", ", kDecodeNormsPerLayer, ", h=", hidden,
               "] tensor, got ", py_dtype(norms.scalar_type()), " of shape ", py_shape(norms));
  MMFREE_CHECK(down_norms.dim() == 2 && down_norms.size(0) == layers && down_norms.scalar_type() == norms.scalar_type(),
               "mmfree: argument 'down_norms' must be [L=", layers, ", I] with the dtype of 'norms' (",
               py_dtype(norms.scalar_type()), "), got ", py_dtype(down_norms.scalar_type()), " of shape ",
               py_shape(down_norms));
  const int64_t inter = down_norms.size(1);
  MMFREE_CHECK(final_norms.dim() == 2 && final_norms.size(0) == 2 && final_norms.size(1) == hidden &&
                   final_norms.scalar_type() == norms.scalar_type(),
               "mmfree: argument 'final_norms' must be [2, h=", hidden, "] with the dtype of 'norms', got ",
               py_dtype(final_norms.scalar_type()), " of shape ", py_shape(final_norms));
  const int64_t n_mats = kDecodeMatsPerLayer * layers + 1;
  MMFREE_CHECK(static_cast<int64_t>(packed.size()) == n_mats, "mmfree: argument 'packed' must hold 6 * L + 1 = ", n_mats,
               " tensors, got ", packed.size());
  MMFREE_CHECK(w_scales.scalar_type() == kFloat && w_scales.dim() == 1 && w_scales.size(0) == n_mats,
               "mmfree: argument 'w_scales' must be float32 [", n_mats, "], got ", py_dtype(w_scales.scalar_type()),
               " of shape ", py_shape(w_scales));
  for (int64_t idx = 0; idx < n_mats; ++idx) {
    int64_t n = vocab, k = hidden;  // lm_head (last)
    if (idx < n_mats - 1) {
      const int mat = static_cast<int>(idx % kDecodeMatsPerLayer);
      n = mat == kMatGate ? 2 * inter : hidden;
      k = mat == kMatDown ? inter : hidden;
    }
    const Tensor& w = packed[idx];
    const int64_t rb = ternary::row_bytes(k);
    MMFREE_CHECK(w.scalar_type() == kByte && w.dim() == 2 && w.size(0) == n && w.size(1) == rb,
                 "mmfree: argument 'packed[", idx, "]' must be uint8 [", n, ", ", rb, "], got ",
                 py_dtype(w.scalar_type()), " of shape ", py_shape(w));
  }
  const Device dev = embeddings.device();
  const std::pair<const char*, const Tensor*> others[] = {
      {"tokens", &tokens}, {"state", &state}, {"lower_bounds", &lower_bounds}, {"norms", &norms},
      {"down_norms", &down_norms}, {"w_scales", &w_scales}, {"final_norms", &final_norms}};
  for (const auto& [name, t] : others) {
    MMFREE_CHECK(t->device() == dev, "mmfree: argument '", name, "' must be on ", dev,
                 " (the device of 'embeddings'), got ", t->device());
  }
  for (int64_t idx = 0; idx < n_mats; ++idx) {
    MMFREE_CHECK(packed[idx].device() == dev, "mmfree: argument 'packed[", idx, "]' must be on ", dev, ", got ",
                 packed[idx].device());
  }
  return {batch, layers, hidden, inter, vocab};
}

}  // namespace binding
}  // namespace mmfree
