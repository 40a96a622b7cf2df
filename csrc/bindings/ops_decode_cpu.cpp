// CPU implementation of mmfree::decode_step (schema in ops_decode.cpp, semantics in
// csrc/kernels/decode.h): the argument checks of check_decode_args (ops/decode.py) with the
// same messages, then the fused step of cpu/decode/ in one parallel team. The workspace, the
// fp32 copies of non-fp32 norm weights and the tensors the silu*mul callback runs on are
// cached per calling thread and rebuilt only when the shapes (or the norm tensors) change,
// so a step allocates nothing once warm. The stable ABI has no tensor version counter, so
// non-fp32 norm weights are converted again on every step (O(L * (8h + I)) elements, small
// next to the step's weight reads) into the cached buffers: an in-place change of the norm
// weights is always seen. Registered into _C only (CPU).
#if !defined(MMFREE_WITH_CUDA)

#include <algorithm>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "bindings/decode_checks.h"
#include "cpu/decode/decode_cpu.h"
#include "cpu/parallel.h"

namespace mmfree {
namespace binding {
namespace {

// The silu*mul callback: torch's own kernels on views of the workspace, shaped like the
// op-by-op path's u [B, 1, 2I] (so the same vectorized loop covers the same elements).
struct SiluMul {
  std::optional<Tensor> u, tmp, t;  // u over the workspace buffer, tmp [B, 1, I] owned, t over the buffer
  int64_t inter = 0;
  static void run(void* ctx, const void*, void*) {
    auto* s = static_cast<SiluMul*>(ctx);
    take(call_op<1>("aten::silu", "out", narrowed(*s->u, 2, 0, s->inter), *s->tmp)[0]);
    aten::mul_out(*s->t, *s->tmp, narrowed(*s->u, 2, s->inter, s->inter));
  }
};

// A [B, 1, n] CPU tensor over a workspace buffer (not owned).
Tensor workspace_view(void* data, int64_t batch, int64_t n, ScalarType dtype) {
  const std::vector<int64_t> sizes{batch, 1, n}, strides{n, n, 1};
  return torch::stable::from_blob(data, sizes, strides, Device(torch::headeronly::DeviceType::CPU), dtype);
}

// Everything kept between steps of one calling thread.
struct Cache {
  std::vector<int64_t> key;  // B, L, h, I, V, act dtype, norm dtype, threads
  std::unique_ptr<char[]> raw;
  char* workspace = nullptr;
  size_t bytes = 0;
  std::vector<float> norms_f32, down_f32, final_f32;
  SiluMul silu;
};

Cache& thread_cache() {
  thread_local Cache cache;
  return cache;
}

Tensor decode_step_cpu(const Tensor& tokens, const Tensor& state, const Tensor& embeddings_in,
                       const Tensor& lower_bounds_in, const Tensor& norms_in, const Tensor& down_norms_in,
                       const std::vector<Tensor>& packed_in, const Tensor& w_scales_in, const Tensor& final_norms_in,
                       double eps) {
  const DecodeDims d = check_decode_step_args(tokens, state, embeddings_in, lower_bounds_in, norms_in, down_norms_in, packed_in,
                            w_scales_in, final_norms_in);
  const ScalarType act = embeddings_in.scalar_type();
  Tensor logits = empty({d.batch, d.vocab}, act, embeddings_in);
  if (d.batch == 0) return logits;
  const Tensor tok = contig(tokens);
  const int64_t* tp = ptr<int64_t>(tok);
  for (int64_t b = 0; b < d.batch; ++b) {
    if (tp[b] < 0 || tp[b] >= d.vocab) {
      std::ostringstream o;
      o << "[";
      for (int64_t i = 0; i < d.batch; ++i) o << (i ? ", " : "") << tp[i];
      o << "]";
      MMFREE_CHECK(false, "mmfree: argument 'tokens' must be in [0, ", d.vocab, "), got ", o.str());
    }
  }
  const Tensor embeddings = contig(embeddings_in), lower_bounds = contig(lower_bounds_in);
  const Tensor norms = contig(norms_in), down_norms = contig(down_norms_in);
  const Tensor w_scales = contig(w_scales_in), final_norms = contig(final_norms_in);
  std::vector<Tensor> packed_keep;
  packed_keep.reserve(packed_in.size());
  std::vector<const uint8_t*> packed(packed_in.size());
  for (size_t i = 0; i < packed_in.size(); ++i) {
    packed_keep.push_back(contig(packed_in[i]));
    packed[i] = ptr<uint8_t>(packed_keep.back());
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
  p.state = ptr<float>(state);
  p.embeddings = embeddings.data_ptr();
  p.lower_bounds = ptr<float>(lower_bounds);
  p.norms = norms.data_ptr();
  p.down_norms = down_norms.data_ptr();
  p.packed = packed.data();
  p.w_scales = ptr<float>(w_scales);
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
    // Views for the silu*mul callback: u and t are the decode step's shared buffers.
    c.silu.inter = d.inter;
    c.silu.u = workspace_view(cpu::decode_silu_u(c.workspace, p), d.batch, 2 * d.inter, act);
    c.silu.t = workspace_view(cpu::decode_silu_t(c.workspace, p), d.batch, d.inter, act);
    c.silu.tmp = empty({d.batch, 1, d.inter}, act, embeddings);
  }
  const bool f32_norms = norms.scalar_type() == kFloat;
  if (!f32_norms) {  // every step: no version counter to tell an in-place change (see the top)
    c.norms_f32.resize(static_cast<size_t>(norms.numel()));
    c.down_f32.resize(static_cast<size_t>(down_norms.numel()));
    c.final_f32.resize(static_cast<size_t>(final_norms.numel()));
    cpu::decode_convert_norms(p, c.norms_f32.data(), c.down_f32.data(), c.final_f32.data());
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

STABLE_TORCH_LIBRARY_IMPL(mmfree, CPU, m) { m.impl("decode_step", TORCH_BOX(&decode_step_cpu)); }

}  // namespace binding
}  // namespace mmfree

#endif  // !MMFREE_WITH_CUDA
