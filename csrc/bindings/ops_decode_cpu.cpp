// CPU implementation of mmfree::decode_step (schema in ops_decode.cpp, semantics in
// csrc/kernels/decode.h): the argument checks of check_decode_args (ops/decode.py) with the
// same messages, then the fused step of cpu/decode/ in one parallel team. The workspace, the
// fp32 copies of non-fp32 norm weights and the tensors the silu*mul callback runs on are
// cached per calling thread and rebuilt only when the shapes (or the norm tensors) change,
// so a step allocates nothing once warm.
#include <ATen/Parallel.h>

#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "bindings/checks.h"
#include "common/ternary_format.h"
#include "cpu/decode/decode_cpu.h"
#include "cpu/parallel.h"
#include "decode.h"

namespace mmfree {
namespace binding {
namespace {

// Python-style spellings, so the messages match check_decode_args word for word.
std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string py_device(const at::Device& d) { return d.str(); }

bool is_act_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

#define MMFREE_REQ(cond, ...) TORCH_CHECK(cond, "mmfree: ", __VA_ARGS__)

struct Dims {
  int64_t batch, layers, hidden, inter, vocab;
};

Dims check_args(const at::Tensor& tokens, const at::Tensor& state, const at::Tensor& embeddings,
                const at::Tensor& lower_bounds, const at::Tensor& norms, const at::Tensor& down_norms,
                const at::TensorList& packed, const at::Tensor& w_scales, const at::Tensor& final_norms) {
  MMFREE_REQ(tokens.dim() == 1 && tokens.scalar_type() == at::kLong, "argument 'tokens' must be int64 [B], got ",
             py_dtype(tokens.scalar_type()), " of shape ", py_shape(tokens.sizes()));
  MMFREE_REQ(embeddings.dim() == 2 && is_act_float(embeddings.scalar_type()),
             "argument 'embeddings' must be a float32/bfloat16/float16 [V, h] tensor, got ",
             py_dtype(embeddings.scalar_type()), " of shape ", py_shape(embeddings.sizes()));
  const int64_t vocab = embeddings.size(0), hidden = embeddings.size(1), batch = tokens.size(0);
  MMFREE_REQ(state.dim() == 3 && state.scalar_type() == at::kFloat && state.size(1) == batch && state.size(2) == hidden,
             "argument 'state' must be float32 [L, B=", batch, ", h=", hidden, "], got ", py_dtype(state.scalar_type()),
             " of shape ", py_shape(state.sizes()));
  const int64_t layers = state.size(0);
  MMFREE_REQ(layers >= 1, "argument 'state' must have at least one layer");
  MMFREE_REQ(state.is_contiguous(), "argument 'state' must be contiguous");
  MMFREE_REQ(lower_bounds.scalar_type() == at::kFloat && lower_bounds.dim() == 2 && lower_bounds.size(0) == layers &&
                 lower_bounds.size(1) == hidden,
             "argument 'lower_bounds' must be float32 [L=", layers, ", h=", hidden, "], got ",
             py_dtype(lower_bounds.scalar_type()), " of shape ", py_shape(lower_bounds.sizes()));
  MMFREE_REQ(is_act_float(norms.scalar_type()) && norms.dim() == 3 && norms.size(0) == layers &&
                 norms.size(1) == kDecodeNormsPerLayer && norms.size(2) == hidden,
             "argument 'norms' must be a float [L=", layers, ", ", kDecodeNormsPerLayer, ", h=", hidden,
             "] tensor, got ", py_dtype(norms.scalar_type()), " of shape ", py_shape(norms.sizes()));
  MMFREE_REQ(down_norms.dim() == 2 && down_norms.size(0) == layers && down_norms.scalar_type() == norms.scalar_type(),
             "argument 'down_norms' must be [L=", layers, ", I] with the dtype of 'norms' (",
             py_dtype(norms.scalar_type()), "), got ", py_dtype(down_norms.scalar_type()), " of shape ",
             py_shape(down_norms.sizes()));
  const int64_t inter = down_norms.size(1);
  MMFREE_REQ(final_norms.dim() == 2 && final_norms.size(0) == 2 && final_norms.size(1) == hidden &&
                 final_norms.scalar_type() == norms.scalar_type(),
             "argument 'final_norms' must be [2, h=", hidden, "] with the dtype of 'norms', got ",
             py_dtype(final_norms.scalar_type()), " of shape ", py_shape(final_norms.sizes()));
  const int64_t n_mats = kDecodeMatsPerLayer * layers + 1;
  MMFREE_REQ(static_cast<int64_t>(packed.size()) == n_mats, "argument 'packed' must hold 6 * L + 1 = ", n_mats,
             " tensors, got ", packed.size());
  MMFREE_REQ(w_scales.scalar_type() == at::kFloat && w_scales.dim() == 1 && w_scales.size(0) == n_mats,
             "argument 'w_scales' must be float32 [", n_mats, "], got ", py_dtype(w_scales.scalar_type()), " of shape ",
             py_shape(w_scales.sizes()));
  for (int64_t idx = 0; idx < n_mats; ++idx) {
    int64_t n = vocab, k = hidden;
    if (idx < n_mats - 1) {
      const int mat = static_cast<int>(idx % kDecodeMatsPerLayer);
      n = mat == kMatGate ? 2 * inter : hidden;
      k = mat == kMatDown ? inter : hidden;
    }
    const at::Tensor& w = packed[idx];
    const int64_t rb = ternary::row_bytes(k);
    MMFREE_REQ(w.scalar_type() == at::kByte && w.dim() == 2 && w.size(0) == n && w.size(1) == rb, "argument 'packed[",
               idx, "]' must be uint8 [", n, ", ", rb, "], got ", py_dtype(w.scalar_type()), " of shape ",
               py_shape(w.sizes()));
  }
  const at::Device dev = embeddings.device();
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"tokens", &tokens}, {"state", &state}, {"lower_bounds", &lower_bounds}, {"norms", &norms},
      {"down_norms", &down_norms}, {"w_scales", &w_scales}, {"final_norms", &final_norms}};
  for (const auto& [name, t] : others) {
    MMFREE_REQ(t->device() == dev, "argument '", name, "' must be on ", py_device(dev),
               " (the device of 'embeddings'), got ", py_device(t->device()));
  }
  for (size_t idx = 0; idx < packed.size(); ++idx) {
    MMFREE_REQ(packed[idx].device() == dev, "argument 'packed[", idx, "]' must be on ", py_device(dev), ", got ",
               py_device(packed[idx].device()));
  }
  return {batch, layers, hidden, inter, vocab};
}

// The silu*mul callback: torch's own kernels on views of the workspace, shaped like the
// op-by-op path's u [B, 1, 2I] (so the same vectorized loop covers the same elements).
struct SiluMul {
  at::Tensor u, tmp, t;  // u over the workspace buffer, tmp [B, 1, I] owned, t over the buffer
  int64_t inter = 0;
  static void run(void* ctx, const void*, void*) {
    auto* s = static_cast<SiluMul*>(ctx);
    at::silu_out(s->tmp, s->u.narrow(2, 0, s->inter));
    at::mul_out(s->t, s->tmp, s->u.narrow(2, s->inter, s->inter));
  }
};

// Everything kept between steps of one calling thread.
struct Cache {
  std::vector<int64_t> key;  // B, L, h, I, V, act dtype, norm dtype, threads
  std::unique_ptr<char[]> raw;
  char* workspace = nullptr;
  size_t bytes = 0;
  std::vector<float> norms_f32, down_f32, final_f32;
  const void* norms_ptr = nullptr;  // the norm tensors the fp32 copies were made from
  const void* down_ptr = nullptr;
  const void* final_ptr = nullptr;
  int64_t norms_version = -1, down_version = -1, final_version = -1;
  SiluMul silu;
};

Cache& thread_cache() {
  thread_local Cache cache;
  return cache;
}

at::Tensor decode_step_cpu(const at::Tensor& tokens, const at::Tensor& state, const at::Tensor& embeddings_in,
                           const at::Tensor& lower_bounds_in, const at::Tensor& norms_in,
                           const at::Tensor& down_norms_in, at::TensorList packed_in, const at::Tensor& w_scales_in,
                           const at::Tensor& final_norms_in, double eps) {
  const Dims d = check_args(tokens, state, embeddings_in, lower_bounds_in, norms_in, down_norms_in, packed_in,
                            w_scales_in, final_norms_in);
  const at::ScalarType act = embeddings_in.scalar_type();
  at::Tensor logits = at::empty({d.batch, d.vocab}, embeddings_in.options());
  if (d.batch == 0) return logits;
  const at::Tensor tok = tokens.contiguous();
  const int64_t* tp = tok.data_ptr<int64_t>();
  for (int64_t b = 0; b < d.batch; ++b) {
    if (tp[b] < 0 || tp[b] >= d.vocab) {
      std::ostringstream o;
      o << "[";
      for (int64_t i = 0; i < d.batch; ++i) o << (i ? ", " : "") << tp[i];
      o << "]";
      TORCH_CHECK(false, "mmfree: argument 'tokens' must be in [0, ", d.vocab, "), got ", o.str());
    }
  }
  const at::Tensor embeddings = embeddings_in.contiguous(), lower_bounds = lower_bounds_in.contiguous();
  const at::Tensor norms = norms_in.contiguous(), down_norms = down_norms_in.contiguous();
  const at::Tensor w_scales = w_scales_in.contiguous(), final_norms = final_norms_in.contiguous();
  std::vector<at::Tensor> packed_keep;
  std::vector<const uint8_t*> packed(packed_in.size());
  for (size_t i = 0; i < packed_in.size(); ++i) {
    if (packed_in[i].is_contiguous()) {
      packed[i] = packed_in[i].data_ptr<uint8_t>();
    } else {
      packed_keep.push_back(packed_in[i].contiguous());
      packed[i] = packed_keep.back().data_ptr<uint8_t>();
    }
  }

  DecodeStepParams p{};
  p.batch = d.batch;
  p.layers = d.layers;
  p.hidden = d.hidden;
  p.intermediate = d.inter;
  p.vocab = d.vocab;
  p.act_dtype = to_dtype(act);
  p.norm_dtype = to_dtype(norms.scalar_type());
  p.tokens = tp;
  p.state = state.data_ptr<float>();
  p.embeddings = embeddings.data_ptr();
  p.lower_bounds = lower_bounds.data_ptr<float>();
  p.norms = norms.data_ptr();
  p.down_norms = down_norms.data_ptr();
  p.packed = packed.data();
  p.w_scales = w_scales.data_ptr<float>();
  p.final_norms = final_norms.data_ptr();
  p.eps = static_cast<float>(eps);
  p.logits = logits.data_ptr();

  Cache& c = thread_cache();
  const int threads = std::max(1, cpu::max_threads());
  const std::vector<int64_t> key{d.batch, d.layers, d.hidden, d.inter, d.vocab, static_cast<int64_t>(act),
                                 static_cast<int64_t>(norms.scalar_type()), threads};
  if (c.key != key) {
    c.bytes = cpu::decode_workspace_bytes(p, threads);
    c.raw.reset(new char[c.bytes + 64]);
    c.workspace = c.raw.get() + (64 - reinterpret_cast<uintptr_t>(c.raw.get()) % 64) % 64;
    c.key = key;
    c.norms_ptr = c.down_ptr = c.final_ptr = nullptr;
    // Views for the silu*mul callback: u and t are the decode step's shared buffers.
    const auto opts = embeddings.options();
    c.silu.inter = d.inter;
    c.silu.u = at::from_blob(cpu::decode_silu_u(c.workspace, p), {d.batch, 1, 2 * d.inter}, opts);
    c.silu.t = at::from_blob(cpu::decode_silu_t(c.workspace, p), {d.batch, 1, d.inter}, opts);
    c.silu.tmp = at::empty({d.batch, 1, d.inter}, opts);
  }
  const bool f32_norms = norms.scalar_type() == at::kFloat;
  if (!f32_norms) {
    const bool stale = c.norms_ptr != norms.data_ptr() || c.down_ptr != down_norms.data_ptr() ||
                       c.final_ptr != final_norms.data_ptr() || c.norms_version != norms_in._version() ||
                       c.down_version != down_norms_in._version() || c.final_version != final_norms_in._version();
    if (stale) {
      c.norms_f32.resize(static_cast<size_t>(norms.numel()));
      c.down_f32.resize(static_cast<size_t>(down_norms.numel()));
      c.final_f32.resize(static_cast<size_t>(final_norms.numel()));
      cpu::decode_convert_norms(p, c.norms_f32.data(), c.down_f32.data(), c.final_f32.data());
      c.norms_ptr = norms.data_ptr();
      c.down_ptr = down_norms.data_ptr();
      c.final_ptr = final_norms.data_ptr();
      c.norms_version = norms_in._version();
      c.down_version = down_norms_in._version();
      c.final_version = final_norms_in._version();
    }
  }
  cpu::DecodeCpuArgs args{p,
                          f32_norms ? nullptr : c.norms_f32.data(),
                          f32_norms ? nullptr : c.down_f32.data(),
                          f32_norms ? nullptr : c.final_f32.data(),
                          &SiluMul::run,
                          &c.silu,
                          c.workspace};
  cpu::decode_step(args);
  return logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfree, CPU, m) { m.impl("decode_step", &decode_step_cpu); }

}  // namespace binding
}  // namespace mmfree
