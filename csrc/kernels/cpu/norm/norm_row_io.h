// Whole-row conversion between a typed buffer and an fp32/fp64 work array, for the
// baseline-ISA CPU code (float64 forward, backward passes). The dtype switch sits outside
// the element loop so the loops vectorize.
#pragma once

#include <cstdint>

#include "common/float_convert.h"

namespace mmfree {
namespace cpu {
namespace norm_rows {

template <class A>
void load_row(const void* base, DType t, int64_t offset, int64_t k, A* out) {
  switch (t) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(base) + offset;
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<A>(p[i]);
      break;
    }
    case DType::kFloat64: {
      const double* p = static_cast<const double*>(base) + offset;
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<A>(p[i]);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<A>(bf16_bits_to_float(p[i]));
      break;
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<A>(fp16_bits_to_float(p[i]));
      break;
    }
  }
}

template <class A>
void store_row(void* base, DType t, int64_t offset, int64_t k, const A* in) {
  switch (t) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(base) + offset;
      for (int64_t i = 0; i < k; ++i) p[i] = static_cast<float>(in[i]);
      break;
    }
    case DType::kFloat64: {
      double* p = static_cast<double*>(base) + offset;
      for (int64_t i = 0; i < k; ++i) p[i] = static_cast<double>(in[i]);
      break;
    }
    case DType::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < k; ++i) p[i] = float_to_bf16_bits(static_cast<float>(in[i]));
      break;
    }
    case DType::kFloat16: {
      uint16_t* p = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < k; ++i) p[i] = float_to_fp16_bits(static_cast<float>(in[i]));
      break;
    }
  }
}

}  // namespace norm_rows
}  // namespace cpu
}  // namespace mmfree
