// The one door from the op bindings into torch: everything here goes through the LibTorch
// stable ABI (torch/csrc/stable, torch/headeronly and the C shims they wrap), so the
// compiled bindings load into every torch from the target release on (TORCH_TARGET_VERSION,
// set by CMake to 2.11; see csrc/bindings/README.md for the porting recipe). Nothing in
// csrc/bindings includes ATen, c10 or torch/library.h.
//
// What the stable ABI has no C++ wrapper for at 2.11, and how this file fills it in:
//  - aten ops outside torch/csrc/stable/ops.h (mm, mul, rsqrt, ...): called by name through
//    torch_call_dispatcher (call_op below), which is itself part of the stable C shim;
//  - calls between our own ops (ternary_linear -> rms_norm_quant): the same call_op;
//  - ops with a Scalar argument cannot be called that way (StableIValue has no Scalar), so
//    the few places that need one use the Tensor overload with a 0-dim tensor instead;
//  - error texts: STD_TORCH_CHECK prefixes the function, file and line, so MMFREE_CHECK
//    throws the bare message (std::runtime_error -> RuntimeError in Python), as TORCH_CHECK did;
//  - formatting shapes, devices and dtypes into messages (c10's operator<< is not stable):
//    the operator<< overloads below print them exactly as c10 did ("[2, 3]", "cuda:0", "Float");
//  - the current CUDA stream: the stable shim aoti_torch_get_current_cuda_stream (2.11
//    predates torch::stable::accelerator::Stream::nativeHandle).
#pragma once

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#if !defined(TORCH_TARGET_VERSION)
#error "build the bindings with -DTORCH_TARGET_VERSION (CMake sets it): the wheel must not depend on the build's torch"
#endif

namespace mmfree {
namespace binding {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Device = torch::stable::Device;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kChar = ScalarType::Char;  // int8
constexpr ScalarType kByte = ScalarType::Byte;  // uint8
constexpr ScalarType kInt = ScalarType::Int;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kBool = ScalarType::Bool;

// ---- messages ---------------------------------------------------------------------------

inline std::ostream& operator<<(std::ostream& os, IntArrayRef a) {
  os << '[';
  for (size_t i = 0; i < a.size(); ++i) os << (i ? ", " : "") << a[i];
  return os << ']';
}

inline std::ostream& operator<<(std::ostream& os, const std::vector<int64_t>& a) { return os << IntArrayRef(a); }

inline std::ostream& operator<<(std::ostream& os, const Device& d) {
  if (d.is_cpu()) return os << "cpu";
  os << (d.is_cuda() ? "cuda" : "device_type_" + std::to_string(static_cast<int>(d.type())));
  if (d.has_index()) os << ':' << static_cast<int>(d.index());
  return os;
}

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream oss;
  ((oss << args), ...);
  return oss.str();
}

// TORCH_CHECK's replacement: the bare message, raised as RuntimeError in Python.
#define MMFREE_CHECK(cond, ...)                                          \
  do {                                                                   \
    if (!(cond)) throw std::runtime_error(::mmfree::binding::str(__VA_ARGS__)); \
  } while (0)

// ---- tensors ----------------------------------------------------------------------------

// at::empty(sizes, like.options().dtype(dtype)): on like's device.
inline Tensor empty(IntArrayRef sizes, ScalarType dtype, const Tensor& like) {
  return torch::stable::empty(sizes, dtype, std::nullopt, like.device());
}

inline Tensor zeros(IntArrayRef sizes, ScalarType dtype, const Tensor& like) {
  return torch::stable::full(sizes, 0.0, dtype, std::nullopt, like.device());
}

// A 0-dim tensor holding v: the stand-in for a Scalar argument (see the header comment).
inline Tensor scalar_tensor(double v, ScalarType dtype, const Tensor& like) {
  return torch::stable::full({}, v, dtype, std::nullopt, like.device());
}

// A 0-dim CPU tensor holding v: the stand-in for a Scalar operand of a *binary* elementwise
// op (TensorIterator treats a CPU 0-dim operand of a binary op as a scalar on every device,
// as it does the wrapped number a Scalar argument becomes). Ternary ops (clamp.Tensor,
// addcmul) refuse a CPU operand next to CUDA tensors: give them scalar_tensor(v, dtype, like).
inline Tensor cpu_scalar(double v, ScalarType dtype) {
  return torch::stable::full({}, v, dtype, std::nullopt, Device(torch::headeronly::DeviceType::CPU));
}

inline Tensor to(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

// t.contiguous() (named apart from torch::stable::contiguous, which ADL also finds).
inline Tensor contig(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// t.narrow(dim, start, length) for a const t (torch::stable::narrow takes a mutable handle).
inline Tensor narrowed(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  Tensor view = t;
  return torch::stable::narrow(view, dim, start, length);
}

// t.view(dtype) (torch::stable::view(t, dtype) is missing from the torch 2.13 headers: called
// by name, so the bindings build against every torch >= 2.11).
inline Tensor view_dtype(const Tensor& t, ScalarType dtype);

inline std::vector<int64_t> sizes_vec(const Tensor& t) {
  const IntArrayRef s = t.sizes();
  return std::vector<int64_t>(s.begin(), s.end());
}

inline std::vector<int64_t> sizes_with_last(const Tensor& t, int64_t last) {
  std::vector<int64_t> out = sizes_vec(t);
  out.back() = last;
  return out;
}

inline int64_t size_at(const Tensor& t, int64_t dim) { return t.size(dim < 0 ? dim + t.dim() : dim); }

template <typename T>
T* ptr(const Tensor& t) {
  return t.mutable_data_ptr<T>();
}

// ---- calling ops through the dispatcher --------------------------------------------------

// Calls op.overload with args (converted to StableIValues; tensors are new references the
// callee takes over) and returns the stack, whose first entries hold the results: owning
// references the caller must take() (a returned `out` tensor too).
template <size_t NumReturns, typename... Args>
std::array<StableIValue, std::max(NumReturns, sizeof...(Args))> call_op(const char* op, const char* overload,
                                                                         const Args&... args) {
  std::array<StableIValue, std::max(NumReturns, sizeof...(Args))> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
  return stack;
}

inline Tensor take(StableIValue v) { return torch::stable::detail::to<Tensor>(v); }

template <typename... Args>
Tensor call_tensor_op(const char* op, const char* overload, const Args&... args) {
  return take(call_op<1>(op, overload, args...)[0]);
}

inline Tensor view_dtype(const Tensor& t, ScalarType dtype) { return call_tensor_op("aten::view", "dtype", t, dtype); }

// The aten ops the bindings use beyond torch/csrc/stable/ops.h.
namespace aten {
inline Tensor mm(const Tensor& a, const Tensor& b) { return call_tensor_op("aten::mm", "", a, b); }
inline void mm_out(const Tensor& out, const Tensor& a, const Tensor& b) { take(call_op<1>("aten::mm", "out", a, b, out)[0]); }
// 16-bit operands with fp32 accumulation and output (at::mm_out(out, a, b, kFloat)).
inline void mm_dtype_out(const Tensor& out, const Tensor& a, const Tensor& b, ScalarType out_dtype) {
  take(call_op<1>("aten::mm", "dtype_out", a, b, out_dtype, out)[0]);
}
inline Tensor mul(const Tensor& a, const Tensor& b) { return call_tensor_op("aten::mul", "Tensor", a, b); }
inline void mul_(const Tensor& a, const Tensor& b) { take(call_op<1>("aten::mul_", "Tensor", a, b)[0]); }
inline void mul_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  take(call_op<1>("aten::mul", "out", a, b, out)[0]);
}
inline Tensor div(const Tensor& a, const Tensor& b) { return call_tensor_op("aten::div", "Tensor", a, b); }
inline Tensor add(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b, -1.0); }  // a - (-1)b, exact
inline Tensor sub(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b); }
inline Tensor rsqrt(const Tensor& a) { return call_tensor_op("aten::rsqrt", "", a); }
inline Tensor silu(const Tensor& a) { return call_tensor_op("aten::silu", "", a); }
inline Tensor sum_keepdim(const Tensor& a, int64_t dim) {
  return torch::stable::sum(a, std::vector<int64_t>{dim}, true);
}
inline Tensor sum0(const Tensor& a) { return torch::stable::sum(a, std::vector<int64_t>{0}, false); }
inline Tensor t(const Tensor& a) { return torch::stable::transpose(a, 0, 1); }
inline Tensor abs(const Tensor& a) { return call_tensor_op("aten::abs", "", a); }
inline Tensor gt(const Tensor& a, const Tensor& b) { return call_tensor_op("aten::gt", "Tensor", a, b); }
inline Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  return call_tensor_op("aten::where", "self", cond, a, b);
}
inline void round_(const Tensor& a) { take(call_op<1>("aten::round_", "", a)[0]); }
inline void clamp_(const Tensor& a, const Tensor& lo, const Tensor& hi) {
  take(call_op<1>("aten::clamp_", "Tensor", a, std::optional<Tensor>(lo), std::optional<Tensor>(hi))[0]);
}
}  // namespace aten

// ---- CUDA ---------------------------------------------------------------------------------

#if defined(MMFREE_WITH_CUDA)
// c10::cuda::CUDAGuard: makes t's device current for the scope.
class CudaGuard {
 public:
  explicit CudaGuard(const Tensor& t) : guard_(t.get_device_index()) {}

 private:
  torch::stable::accelerator::DeviceGuard guard_;
};

inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

#define MMFREE_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                   \
    const cudaError_t mmfree_err_ = (expr);                                                              \
    MMFREE_CHECK(mmfree_err_ == cudaSuccess, "mmfree: CUDA error in ", #expr, ": ", cudaGetErrorString(mmfree_err_)); \
  } while (0)
#endif

}  // namespace binding
}  // namespace mmfree
