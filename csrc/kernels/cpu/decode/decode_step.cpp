// The fused CPU decode step (see decode_cpu.h for the threading and memory scheme).
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "common/ternary_format.h"
#include "cpu/decode/decode_cpu.h"
#include "cpu/norm/norm_row_io.h"
#include "cpu/norm/norm_serial.h"
#include "cpu/parallel.h"
#include "cpu/ternary/ternary_cpu.h"
#include "mlgru.h"
#include "norm.h"
#include "ternary.h"

namespace mmfree {
namespace cpu {
namespace {

using ternary_detail::PreparedX;
using ternary_detail::RowsPlan;

constexpr size_t kAlign = 64;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

size_t act_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Offsets of every buffer in the workspace: the shared outputs of the products first, then
// one block per thread.
struct Layout {
  size_t ifg, o_out, u, t, down, shared_end;
  size_t xres0, xres1, a, hout, hlast, scratch, xq, xs, prep, sums, per_thread;
};

Layout layout_of(const DecodeStepParams& p) {
  const size_t es = act_size(p.act_dtype);
  const size_t B = static_cast<size_t>(p.batch), h = static_cast<size_t>(p.hidden);
  const size_t I = static_cast<size_t>(p.intermediate);
  Layout l{};
  size_t o = 0;
  auto take = [&o](size_t bytes) {
    const size_t at = o;
    o += align_up(bytes);
    return at;
  };
  l.ifg = take(3 * B * h * es);
  l.o_out = take(B * h * es);
  l.u = take(2 * B * I * es);
  l.t = take(B * I * es);
  l.down = take(B * h * es);
  l.shared_end = o;
  o = 0;
  l.xres0 = take(B * h * es);
  l.xres1 = take(B * h * es);
  l.a = take(B * h * es);
  l.hout = take(B * h * es);
  l.hlast = take(B * h * 4);
  l.scratch = take(std::max(h, I) * 4);
  l.xq = take(std::max(3 * B * h, B * I));
  l.xs = take(3 * B * 4);
  // Prepared activations: room for either layout, so a workspace stays valid when the ISA
  // cap changes between steps (the tests switch paths on one cached workspace).
  auto prepared = [](int64_t k) {
    return static_cast<size_t>(std::max(ternary_detail::prepared_row_bytes(ternary_detail::XLayout::kPadded, k),
                                        ternary_detail::prepared_row_bytes(ternary_detail::XLayout::kGemv512, k)));
  };
  const size_t prep_h = prepared(p.hidden), prep_i = prepared(p.intermediate);
  l.prep = take(std::max(3 * B * prep_h, B * prep_i));
  l.sums = take(3 * B * 4);
  l.per_thread = o;
  return l;
}

// Output rows [n0, n1) of thread tid out of nt, in multiples of 16 (whole GEMM tiles, and
// no two threads writing one cache line of fp32 outputs).
void split_rows(int64_t n, int tid, int nt, int64_t* n0, int64_t* n1) {
  const int64_t units = (n + 15) / 16;
  *n0 = std::min(n, units * tid / nt * 16);
  *n1 = std::min(n, units * (tid + 1) / nt * 16);
}

// Rows [n0, n1) of out[B, N] = ternary_matmul(x_q[B, K], x_scale, W, w_scale).
void matmul_part(const RowsPlan& plan, const int8_t* x_q, const float* x_scale, int64_t batch, int64_t k,
                 const uint8_t* packed, const float* w_scale, void* out, DType out_dtype, int64_t n, int64_t n0,
                 int64_t n1, int8_t* prep, int32_t* sums) {
  if (n0 >= n1) return;
  const int64_t stride = ternary_detail::prepared_row_bytes(plan.layout, k);
  for (int64_t b = 0; b < batch; ++b) sums[b] = ternary_detail::prepare_x_row(plan.layout, x_q + b * k, k, prep + b * stride);
  const TernaryMatmulParams tp{x_q, k, x_scale, packed, w_scale, out, out_dtype, batch, n, k};
  const PreparedX px{prep, stride, ternary::blocks_per_row(k) * ternary::kBlockWeights, sums};
  plan.body(tp, px, n0, n1);
}

struct Team {
  const DecodeCpuArgs* args;
  RowsPlan plan;
  Layout lay;
  TeamBarrier* barrier;
};

void run_thread(const Team& team, int tid, int nt) {
  const DecodeCpuArgs& A = *team.args;
  const DecodeStepParams& p = A.p;
  const Layout& L = team.lay;
  const DType dt = p.act_dtype;
  const int64_t B = p.batch, h = p.hidden, I = p.intermediate, V = p.vocab;
  const size_t es = act_size(dt);
  char* ws = static_cast<char*>(A.workspace);
  char* mine = ws + L.shared_end + static_cast<size_t>(tid) * L.per_thread;
  char* ifg = ws + L.ifg;
  char* o_out = ws + L.o_out;
  char* u = ws + L.u;
  char* t = ws + L.t;
  char* down = ws + L.down;
  char* xres[2] = {mine + L.xres0, mine + L.xres1};
  char* a = mine + L.a;
  char* hout = mine + L.hout;
  float* hlast = reinterpret_cast<float*>(mine + L.hlast);
  float* scratch = reinterpret_cast<float*>(mine + L.scratch);
  int8_t* xq = reinterpret_cast<int8_t*>(mine + L.xq);
  float* xs = reinterpret_cast<float*>(mine + L.xs);
  int8_t* prep = reinterpret_cast<int8_t*>(mine + L.prep);
  int32_t* sums = reinterpret_cast<int32_t*>(mine + L.sums);
  const float* norms = A.norms_f32 ? A.norms_f32 : static_cast<const float*>(p.norms);
  const float* down_norms = A.down_norms_f32 ? A.down_norms_f32 : static_cast<const float*>(p.down_norms);
  const float* final_norms = A.final_norms_f32 ? A.final_norms_f32 : static_cast<const float*>(p.final_norms);
  TeamBarrier& barrier = *team.barrier;

  auto rms_norm = [&](const void* x, const void* residual, void* y, void* residual_out, const float* w32) {
    RmsNormParams np{x, residual, dt, nullptr, DType::kFloat32, B, h, p.eps, y, residual_out};
    norm_serial::rms_norm(np, w32);
  };
  auto quant = [&](const void* x, int64_t k, const float* w32, int64_t num_w) {
    RmsNormQuantParams qp{x, dt, nullptr, DType::kFloat32, num_w, B, k, p.eps, xq, xs};
    norm_serial::rms_norm_quant(qp, w32);
  };
  auto product = [&](const RowsPlan& plan, int64_t k, int64_t n, int mat, void* out, const int8_t* x_q,
                     const float* x_scale) {
    int64_t n0, n1;
    split_rows(n, tid, nt, &n0, &n1);
    matmul_part(plan, x_q, x_scale, B, k, p.packed[mat], p.w_scales + mat, out, dt, n, n0, n1, prep, sums);
  };

  // Embedding rows: x = embeddings[tokens].
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(xres[0] + b * h * es, static_cast<const char*>(p.embeddings) + p.tokens[b] * h * es, h * es);
  }
  int cur = 0;
  for (int64_t layer = 0; layer < p.layers; ++layer) {
    const float* nw = norms + layer * kDecodeNormsPerLayer * h;
    const int base = static_cast<int>(layer * kDecodeMatsPerLayer);
    // a, x = rms_norm(delta, attn_norm, residual=x)   (layer 0: a = rms_norm(x))
    if (layer == 0) {
      rms_norm(xres[cur], nullptr, a, xres[cur ^ 1], nw + kNormAttn * h);
    } else {
      rms_norm(down, xres[cur], a, xres[cur ^ 1], nw + kNormAttn * h);
    }
    cur ^= 1;
    // i, f, g = ternary_matmul(q[p], s[p], W_p): the 3h output rows split over the team.
    quant(a, h, nw + kNormI * h, 3);
    {
      int64_t r0, r1;
      split_rows(3 * h, tid, nt, &r0, &r1);
      for (int g = 0; g < 3; ++g) {
        const int64_t n0 = std::max(r0, g * h) - g * h, n1 = std::min(r1, (g + 1) * h) - g * h;
        matmul_part(team.plan, xq + g * B * h, xs + g * B, B, h, p.packed[base + g], p.w_scales + base + g,
                    ifg + g * B * h * es, dt, h, n0, n1, prep + g * B * ternary_detail::prepared_row_bytes(team.plan.layout, h),
                    sums + g * B);
      }
    }
    barrier.wait(nt);  // 1: i, f, g complete
    {
      MlgruScanParams mp{};
      mp.seqs.num_seqs = B;
      mp.seqs.seq_len = 1;
      mp.seqs.tokens = B;
      mp.seqs.dim = h;
      mp.dtype = dt;
      mp.i = ifg;
      mp.f = ifg + B * h * es;
      mp.lower_bound = layer > 0 ? p.lower_bounds + layer * h : nullptr;
      mp.h0 = p.state + layer * B * h;
      mp.h = hout;
      mp.h_last = hlast;
      mlgru_scan(mp);  // serial inside the team
    }
    {
      RmsNormSwishGateParams sp{};
      sp.g = ifg + 2 * B * h * es;
      sp.h = hout;
      sp.dtype = dt;
      sp.w_dtype = DType::kFloat32;
      sp.rows = B;
      sp.k = h;
      sp.eps = p.eps;
      sp.norm_w_dtype = DType::kFloat32;
      sp.norm_eps = p.eps;
      sp.x_q = xq;
      sp.x_scale = xs;
      norm_serial::rms_norm_swish_gate_quant(sp, nw + kNormGateOut * h, nw + kNormO * h, scratch);
    }
    product(team.plan, h, h, base + kMatO, o_out, xq, xs);
    barrier.wait(nt);  // 2: o_proj complete; every thread has read state[layer]
    if (tid == 0) std::memcpy(p.state + layer * B * h, hlast, static_cast<size_t>(B * h) * 4);
    // m, x = rms_norm(x_attn, mlp_norm, residual=x); u = ternary_linear_packed(m, W_gate, gate_norm)
    rms_norm(o_out, xres[cur], a, xres[cur ^ 1], nw + kNormMlp * h);
    cur ^= 1;
    quant(a, h, nw + kNormGateProj * h, 1);
    product(team.plan, h, 2 * I, base + kMatGate, u, xq, xs);
    barrier.wait(nt);  // 3: u complete
    if (tid == 0) A.silu_mul(A.silu_ctx, u, t);
    barrier.wait(nt);  // 4: t complete
    quant(t, I, down_norms + layer * I, 1);
    product(team.plan, I, h, base + kMatDown, down, xq, xs);
    barrier.wait(nt);  // 5: delta complete
  }
  // xn = rms_norm(delta, final_norm, residual=x); logits = ternary_linear_packed(xn, lm_head)
  rms_norm(down, xres[cur], a, xres[cur ^ 1], final_norms);
  quant(a, h, final_norms + h, 1);
  product(team.plan, h, V, static_cast<int>(p.layers * kDecodeMatsPerLayer), p.logits, xq, xs);
}

[[noreturn]] void throw_team_too_large() { throw std::runtime_error("mmfree: decode_step team larger than max_threads()"); }

}  // namespace

size_t decode_workspace_bytes(const DecodeStepParams& p, int threads) {
  const Layout l = layout_of(p);
  return l.shared_end + static_cast<size_t>(std::max(threads, 1)) * l.per_thread;
}

void* decode_silu_u(void* workspace, const DecodeStepParams& p) {
  return static_cast<char*>(workspace) + layout_of(p).u;
}

void* decode_silu_t(void* workspace, const DecodeStepParams& p) {
  return static_cast<char*>(workspace) + layout_of(p).t;
}

void decode_convert_norms(const DecodeStepParams& p, float* norms_f32, float* down_norms_f32, float* final_norms_f32) {
  norm_rows::load_row(p.norms, p.norm_dtype, 0, p.layers * kDecodeNormsPerLayer * p.hidden, norms_f32);
  norm_rows::load_row(p.down_norms, p.norm_dtype, 0, p.layers * p.intermediate, down_norms_f32);
  norm_rows::load_row(p.final_norms, p.norm_dtype, 0, 2 * p.hidden, final_norms_f32);
}

void decode_step(const DecodeCpuArgs& args) {
  if (args.p.batch == 0) return;
  Team team{&args, ternary_detail::plan_rows(args.p.batch), {}, nullptr};
  team.lay = layout_of(args.p);
  const int max_nt = std::max(1, max_threads());
  TeamBarrier barrier;
  team.barrier = &barrier;
  parallel_team([&](int tid, int nt) {
    // The workspace holds max_threads() thread blocks; a larger team (not expected) leaves
    // the extra threads idle... which would deadlock the barrier, so it is refused up front.
    if (nt > max_nt) throw_team_too_large();
    run_thread(team, tid, nt);
  });
}

}  // namespace cpu
}  // namespace mmfree
