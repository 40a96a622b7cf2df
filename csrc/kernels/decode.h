// One decode step of the packed MMfreeLM (SPEC.md section 2 with T = 1), as one op:
//   logits[B, V] = lm_head(norm(layers(embeddings[tokens], state)))   state updated in place.
// The result must be bit-identical to the op-by-op packed path of the model
// (python/mmfree_ext/models/modeling.py, packed branch) on the same device: the same
// roundings to the activation dtype at the same places, the same int8 codes, the same fp32
// state update. Layer l (delta = previous layer's MLP output, none for l = 0):
//   a, x   = rms_norm(delta, attn_norm, residual=x)         (l = 0: a = rms_norm(x))
//   q, s   = rms_norm_quant_multi(a, [i_norm, f_norm, g_norm])
//   i,f,g  = ternary_matmul(q[p], s[p], W_p)  in the activation dtype
//   h      = mlgru step(i, f, lower_bound[l] (l > 0), state[l]) -> state[l] (fp32), h (act dtype)
//   q, s   = rms_norm_swish_gate_quant(g, h, out_norm, o_norm)
//   x_attn = ternary_matmul(q, s, W_o)
//   m, x   = rms_norm(x_attn, mlp_norm, residual=x)
//   u      = ternary_linear_packed(m, W_gate, gate_norm)     [B, 2I]
//   t      = silu(u[:, :I]) * u[:, I:]                         (each op rounded to the act dtype)
//   delta  = ternary_linear_packed(t, W_down, down_norm)
// then xn = rms_norm(delta, final_norm, residual=x), logits = ternary_linear_packed(xn,
// W_lm_head, lm_head_norm).
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mmfree {

// Rows of the per-layer norm-weight tensor `norms [L, kDecodeNormsPerLayer, h]`.
enum DecodeNorm : int {
  kNormAttn = 0,      // model.layers.l.attn_norm
  kNormI = 1,         // attn.i_proj.norm
  kNormF = 2,         // attn.f_proj.norm
  kNormG = 3,         // attn.g_proj.norm
  kNormGateOut = 4,   // attn.g_norm (the output gate's RMSNorm)
  kNormO = 5,         // attn.o_proj.norm
  kNormMlp = 6,       // mlp_norm
  kNormGateProj = 7,  // mlp.gate_proj.norm
};
constexpr int kDecodeNormsPerLayer = 8;

// Order of the packed weights of one layer in `packed` (layer l at l * 6); lm_head is last.
enum DecodeMat : int { kMatI = 0, kMatF = 1, kMatG = 2, kMatO = 3, kMatGate = 4, kMatDown = 5 };
constexpr int kDecodeMatsPerLayer = 6;

struct DecodeStepParams {
  int64_t batch, layers, hidden, intermediate, vocab;
  DType act_dtype;                // embeddings, activations and logits
  DType norm_dtype;               // every norm weight (norms, down_norms, final_norms)
  const int64_t* tokens;          // [B], each in [0, V)
  float* state;                   // [L, B, h] fp32, read and written in place
  const void* embeddings;         // [V, h]
  const float* lower_bounds;      // [L, h] per-layer forget-gate lower bounds (row 0 unused)
  const void* norms;              // [L, kDecodeNormsPerLayer, h]
  const void* down_norms;         // [L, I]
  const uint8_t* const* packed;   // host array of L * 6 + 1 device pointers, canonical format
  const float* w_scales;          // [L * 6 + 1] on the device, same order as `packed`
  const void* final_norms;        // [2, h]: model.norm, lm_head.norm
  float eps;
  void* logits;                   // [B, V] act_dtype
};

}  // namespace mmfree
