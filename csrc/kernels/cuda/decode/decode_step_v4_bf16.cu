// The v4 (batch 1, sm_90 clusters) persistent decode-step kernel for __nv_bfloat16 activations
// (decode_kernel_v4.cuh), in its own file so that the build compiles it beside the others.
#include "cuda/decode/decode_kernel_v4.cuh"

namespace mmfree {
namespace cuda {
namespace decode {
template cudaError_t launch_v4<__nv_bfloat16>(const KParams&, int, cudaStream_t);
}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
