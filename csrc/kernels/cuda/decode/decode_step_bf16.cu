// The persistent decode-step kernels for __nv_bfloat16 activations (decode_kernel.cuh).
#include "cuda/decode/decode_kernel.cuh"

namespace mmfree {
namespace cuda {
namespace decode {
template cudaError_t launch_typed<__nv_bfloat16>(const KParams&, int, cudaStream_t);
}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
