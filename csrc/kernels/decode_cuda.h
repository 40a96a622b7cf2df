// CUDA entry points of the fused decode step (csrc/kernels/decode.h says what it computes;
// cuda/decode/decode_step.cu how). Torch-free and host-only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "decode.h"

namespace mmfree {
namespace cuda {

// Batch rows per launch of the persistent kernel; larger batches run in slices of this many.
constexpr int kDecodeMaxBatch = 64;
// Layers the kernel takes (the packed-weight pointers travel as a kernel parameter, 4 KB).
constexpr int kDecodeMaxLayers = 64;

// Why the fused CUDA step cannot run these parameters, or nullptr when it can. (It needs the
// norm rows on the 16-byte vector path of the standalone norm kernels: h and I multiples of
// 16 / sizeof(activation), at most 2048 vectors, norm weights in the activation dtype or fp32,
// 16-byte aligned tensors.)
const char* decode_step_unsupported(const DecodeStepParams& p);

// Whether decode_step runs its batch-1 v3 kernel for p on the current device: the one fused
// kernel that measured faster than the op-by-op step (benchmarks/NOTES.md, "v3"), so the
// binding's auto rule takes the fused path only where this holds.
bool decode_step_v3_runs(const DecodeStepParams& p);

// Bytes of device scratch `decode_step` needs (activations between the phases, the int8
// codes, one grid-barrier counter).
size_t decode_step_workspace_bytes(const DecodeStepParams& p);

// One decode step: one persistent kernel launch per kDecodeMaxBatch rows. `workspace` holds
// decode_step_workspace_bytes(p) bytes (256-byte aligned); stream-ordered, graph-capturable.
cudaError_t decode_step(const DecodeStepParams& p, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace mmfree
