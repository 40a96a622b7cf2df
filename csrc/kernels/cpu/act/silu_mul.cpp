// CPU silu_mul (act.h): rows split across threads, each row a plain loop over fp32 values
// (the compiler vectorizes the fp32 and fp64 bodies; 16-bit types convert through the
// bit-exact helpers of float_convert.h).
#include <cmath>
#include <cstdint>

#include "act.h"
#include "common/float_convert.h"
#include "cpu/parallel.h"

namespace mmfree {
namespace cpu {
namespace {

// Element access through fp32 (or fp64 for double) without a per-element dtype switch.
template <class T> struct Io;
template <> struct Io<float> {
  using Acc = float;
  static float load(const float* p, int64_t i) { return p[i]; }
  static void store(float* p, int64_t i, float v) { p[i] = v; }
  static float round(float v) { return v; }
};
template <> struct Io<double> {
  using Acc = double;
  static double load(const double* p, int64_t i) { return p[i]; }
  static void store(double* p, int64_t i, double v) { p[i] = v; }
  static double round(double v) { return v; }
};
struct Bf16 { uint16_t bits; };
struct Fp16 { uint16_t bits; };
template <> struct Io<Bf16> {
  using Acc = float;
  static float load(const Bf16* p, int64_t i) { return bf16_bits_to_float(p[i].bits); }
  static void store(Bf16* p, int64_t i, float v) { p[i].bits = float_to_bf16_bits(v); }
  static float round(float v) { return bf16_bits_to_float(float_to_bf16_bits(v)); }
};
template <> struct Io<Fp16> {
  using Acc = float;
  static float load(const Fp16* p, int64_t i) { return fp16_bits_to_float(p[i].bits); }
  static void store(Fp16* p, int64_t i, float v) { p[i].bits = float_to_fp16_bits(v); }
  static float round(float v) { return fp16_bits_to_float(float_to_fp16_bits(v)); }
};

constexpr int64_t kGrainElements = 1 << 14;

int64_t row_grain(int64_t inter) { return inter >= kGrainElements ? 1 : kGrainElements / inter; }

template <class T>
void forward_rows(const SiluMulParams& p) {
  using A = typename Io<T>::Acc;
  const T* u = static_cast<const T*>(p.u);
  T* y = static_cast<T*>(p.y);
  const int64_t n = p.inter;
  parallel_for(0, p.rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = u + r * 2 * n;
      const T* v = g + n;
      T* out = y + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const A a = Io<T>::load(g, i);
        const A s = Io<T>::round(a / (A(1) + std::exp(-a)));  // silu, rounded to T as F.silu
        Io<T>::store(out, i, s * Io<T>::load(v, i));
      }
    }
  });
}

template <class T>
void backward_rows(const SiluMulBackwardParams& p) {
  using A = typename Io<T>::Acc;
  const T* dy = static_cast<const T*>(p.dy);
  const T* u = static_cast<const T*>(p.u);
  T* du = static_cast<T*>(p.du);
  const int64_t n = p.inter;
  parallel_for(0, p.rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = u + r * 2 * n;
      const T* v = g + n;
      const T* d = dy + r * n;
      T* dg = du + r * 2 * n;
      T* dv = dg + n;
      for (int64_t i = 0; i < n; ++i) {
        const A a = Io<T>::load(g, i);
        const A b = Io<T>::load(v, i);
        const A gy = Io<T>::load(d, i);
        const A sig = A(1) / (A(1) + std::exp(-a));
        Io<T>::store(dg, i, gy * b * sig * (A(1) + a * (A(1) - sig)));
        Io<T>::store(dv, i, gy * a * sig);
      }
    }
  });
}

}  // namespace

void silu_mul(const SiluMulParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: forward_rows<float>(p); break;
    case DType::kFloat64: forward_rows<double>(p); break;
    case DType::kBFloat16: forward_rows<Bf16>(p); break;
    case DType::kFloat16: forward_rows<Fp16>(p); break;
  }
}

void silu_mul_backward(const SiluMulBackwardParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: backward_rows<float>(p); break;
    case DType::kFloat64: backward_rows<double>(p); break;
    case DType::kBFloat16: backward_rows<Bf16>(p); break;
    case DType::kFloat16: backward_rows<Fp16>(p); break;
  }
}

}  // namespace cpu
}  // namespace mmfree
