// The v3 (batch 1) persistent decode-step kernel for float activations (decode_kernel_v3.cuh),
// in its own file so that the build compiles it beside the v1/v2 kernels.
#include "cuda/decode/decode_kernel_v3.cuh"

namespace mmfree {
namespace cuda {
namespace decode {
template cudaError_t launch_v3<float>(const KParams&, int, cudaStream_t);
}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
