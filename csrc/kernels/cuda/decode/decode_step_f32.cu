// The persistent decode-step kernels for float activations (decode_kernel.cuh).
#include "cuda/decode/decode_kernel.cuh"

namespace mmfree {
namespace cuda {
namespace decode {
template cudaError_t launch_typed<float>(const KParams&, int, cudaStream_t);
}  // namespace decode
}  // namespace cuda
}  // namespace mmfree
