// The token range of one sequence of the flat [N, D] view (mlgru.h) for the MLGRU scan
// kernels (mlgru_scan.cu): varlen offsets clamped so a corrupt cu_seqlens stays in bounds.
#pragma once

#include <cstdint>

#include "mlgru.h"

namespace mmfree {
namespace cuda {
namespace mlgru {

struct Range {
  int64_t begin, end;
};

// Token range of sequence s. Varlen offsets are clamped into [0, N] and made non-decreasing
// so a corrupt cu_seqlens cannot send the kernels out of bounds (it is not checked on CUDA:
// that would need a host sync).
__device__ __forceinline__ Range seq_range(const MlgruSeqs& q, int64_t s) {
  if (q.cu_seqlens == nullptr) return {s * q.seq_len, (s + 1) * q.seq_len};
  int64_t b = q.cu_seqlens[s], e = q.cu_seqlens[s + 1];
  b = b < 0 ? 0 : (b > q.tokens ? q.tokens : b);
  e = e < b ? b : (e > q.tokens ? q.tokens : e);
  return {b, e};
}

// Where the checkpoint of tile j of a sequence starting at token `begin` lives: slot
// floor(begin/tile) + s + j is unique over all (s, j) (see mlgru_bwd_workspace_floats).
__device__ __forceinline__ int64_t checkpoint_slot(int64_t begin, int64_t s, int64_t j, int64_t tile) {
  return begin / tile + s + j;
}

}  // namespace mlgru
}  // namespace cuda
}  // namespace mmfree
