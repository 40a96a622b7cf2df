// MLGRU gated scan (SPEC.md section 2): the gating (sigmoid, lower bound, silu) fused into
// the recurrence h_t = f_t * h_{t-1} + c_t, forward and backward, CPU and CUDA.
//
// Layout: the B*T tokens are one flat sequence of N tokens of D channels, cut into S
// independent sequences. Without cu_seqlens, S = B and sequence s is tokens [s*T, (s+1)*T);
// with cu_seqlens (varlen, B == 1) sequence s is tokens [cu[s], cu[s+1]). All kernels work
// on that flat view, so batch and varlen share one code path.
//
// The state is fp32 ("state dtype"), except for float64 inputs (CPU only, for gradcheck),
// which compute in float64. lower_bound, h0, h_last and their gradients use the state dtype.
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mmfree {

// Which CUDA algorithm to run (tests force one; the CPU ignores it).
enum class MlgruPath : int {
  kAuto = 0,        // backward: lanes for long sequences that fill the GPU; else (and the
                    // forward) v2's sequential or chunked
  kSequential = 1,  // v2: one thread per (sequence, channel vector), scanning all of T
  kChunked = 2,     // v2: time-lanes of one sequence across a CTA, scanned per token
  kLanes = 3,       // v4: lanes of consecutive tokens per thread, one 32-bit word of a row each
                    // (where the layout allows 32-bit accesses; else as kAuto)
};

// Which CUDA kernel generation runs (the CPU ignores it). Kept selectable so one benchmark
// run can compare them (bench_mlgru); the workspace sizes cover every variant.
enum class MlgruVariant : int {
  kBest = 0,  // v2: fwd U = 2 tokens/thread, streaming loads, next tile prefetched during the
              // scan, 2 CTAs/SM; bwd U*V = 8 values (1 token of 16-bit), no register cap
  kV1 = 1,    // the first kernels (fwd U*V = 32 values, bwd 16 with 255 registers, 1 CTA/SM)
  kV2U4 = 2,  // v2 alternative: fwd U = 4 with prefetch at 1 CTA/SM (no spill), bwd capped at
              // 128 registers for 2 CTAs/SM (spills ~200 B)
};

struct MlgruSeqs {
  int64_t num_seqs = 0;              // S
  int64_t seq_len = 0;               // T of every sequence when cu_seqlens is null
  const int64_t* cu_seqlens = nullptr;  // [S+1] token offsets (varlen) or null
  int64_t tokens = 0;                // N = B*T
  int64_t dim = 0;                   // D
};

struct MlgruScanParams {
  MlgruSeqs seqs;
  DType dtype;              // of i, f, h
  const void* i;            // [N, D]
  const void* f;            // [N, D]
  const void* lower_bound;  // [D] state dtype, or null (layer 0: f_t = sigmoid(f))
  const void* h0;           // [S, D] state dtype, or null (zeros)
  const uint8_t* mask;      // [N], 0 = padding (c_t = 0, the state still decays), or null
  void* h;                  // [N, D] out, input dtype
  void* h_last;             // [S, D] out, state dtype
  MlgruPath path = MlgruPath::kAuto;
  float* workspace = nullptr;  // CUDA: mlgru_workspace_floats(...) floats
  MlgruVariant variant = MlgruVariant::kBest;
};

struct MlgruScanBwdParams {
  MlgruSeqs seqs;
  DType dtype;
  const void* i;
  const void* f;
  const void* lower_bound;
  const void* h0;
  const uint8_t* mask;
  const void* grad_h;        // [N, D] input dtype
  const void* grad_h_last;   // [S, D] state dtype
  void* grad_i;              // [N, D] input dtype
  void* grad_f;              // [N, D] input dtype
  void* grad_lower_bound;    // [D] state dtype (always written; zero-cost to skip is not worth a flag)
  void* grad_h0;             // [S, D] state dtype (always written)
  MlgruPath path = MlgruPath::kAuto;
  float* workspace = nullptr;  // CUDA: mlgru_bwd_workspace_floats(...) floats
  MlgruVariant variant = MlgruVariant::kBest;
};

// Tokens per chunk of the chunked CUDA path and of the CPU backward's checkpoints.
constexpr int64_t kMlgruChunk = 64;

namespace cpu {
void mlgru_scan(const MlgruScanParams& p);
void mlgru_scan_backward(const MlgruScanBwdParams& p);
}  // namespace cpu

#if defined(MMFREE_WITH_CUDA)
namespace cuda {
// Workspace sizes (in floats) the caller allocates for a launch with these shapes.
int64_t mlgru_workspace_floats(const MlgruSeqs& seqs, DType dtype, MlgruPath path);
int64_t mlgru_bwd_workspace_floats(const MlgruSeqs& seqs, DType dtype, MlgruPath path);
cudaError_t mlgru_scan(const MlgruScanParams& p, cudaStream_t stream);
cudaError_t mlgru_scan_backward(const MlgruScanBwdParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace mmfree
