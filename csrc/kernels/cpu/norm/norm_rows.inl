// Generic row math of the CPU norm kernels, written once over a vector-traits class VT
// (Scalar: W=1, Avx2: W=8, Avx512: W=16) and included by each ISA source *inside its
// anonymous namespace*, so every instantiation is private to the file compiled with the
// matching flags. Include only <cstdint>/<cstring>-level headers before it.
//
// VT provides: V, W, zero, set1, load/store (fp32), load_bf16/store_bf16, load_f16/store_f16,
// add, sub, mul, div, fma, max, min, abs, hsum, hmax, round_away, round_nearest, pow2i,
// round_to_bf16, round_to_f16, store_i8 (integral, in-range values).
//
// Tails are handled by copying into a zero-padded W-element buffer, so the tail runs the
// very same vector math as the body (and zeros are neutral for sum-of-squares and amax).

// The per-vector helpers must inline into the row loops (a call per vector, with __m256
// arguments, costs more than the math).
#define MMFREE_NORM_INLINE inline __attribute__((always_inline))

inline float fmax_(float a, float b) { return a > b ? a : b; }

// Typed row access for element dtype D.
template <class VT, DType D> struct Io;
template <class VT> struct Io<VT, DType::kFloat32> {
  using E = float;
  static typename VT::V load(const E* p) { return VT::load(p); }
  static void store(E* p, typename VT::V v) { VT::store(p, v); }
  static typename VT::V round(typename VT::V v) { return v; }
};
template <class VT> struct Io<VT, DType::kBFloat16> {
  using E = uint16_t;
  static typename VT::V load(const E* p) { return VT::load_bf16(p); }
  static void store(E* p, typename VT::V v) { VT::store_bf16(p, v); }
  static typename VT::V round(typename VT::V v) { return VT::round_to_bf16(v); }
};
template <class VT> struct Io<VT, DType::kFloat16> {
  using E = uint16_t;
  static typename VT::V load(const E* p) { return VT::load_f16(p); }
  static void store(E* p, typename VT::V v) { VT::store_f16(p, v); }
  static typename VT::V round(typename VT::V v) { return VT::round_to_f16(v); }
};
// float64 reaches the vector paths only in the quantizing ops, which (like the reference)
// compute in fp32: round each element to fp32 on load. An fp32 value is exact in fp64.
template <class VT> struct Io<VT, DType::kFloat64> {
  using E = double;
  static typename VT::V load(const E* p) {
    float buf[VT::W];
    for (int i = 0; i < VT::W; ++i) buf[i] = static_cast<float>(p[i]);
    return VT::load(buf);
  }
  static void store(E* p, typename VT::V v) {
    float buf[VT::W];
    VT::store(buf, v);
    for (int i = 0; i < VT::W; ++i) p[i] = buf[i];
  }
  static typename VT::V round(typename VT::V v) { return v; }
};

// Load W elements, or the first n (< W) zero-padded.
template <class VT, class IO>
MMFREE_NORM_INLINE typename VT::V load_n(const typename IO::E* p, int64_t n) {
  if (n >= VT::W) return IO::load(p);
  typename IO::E buf[VT::W];
  std::memset(buf, 0, sizeof(buf));
  std::memcpy(buf, p, static_cast<size_t>(n) * sizeof(typename IO::E));
  return IO::load(buf);
}

template <class VT, class IO>
MMFREE_NORM_INLINE void store_n(typename IO::E* p, typename VT::V v, int64_t n) {
  if (n >= VT::W) {
    IO::store(p, v);
    return;
  }
  typename IO::E buf[VT::W];
  IO::store(buf, v);
  std::memcpy(p, buf, static_cast<size_t>(n) * sizeof(typename IO::E));
}

template <class VT>
MMFREE_NORM_INLINE void store_i8_n(int8_t* p, typename VT::V v, int64_t n) {
  if (n >= VT::W) {
    VT::store_i8(p, v);
    return;
  }
  int8_t buf[VT::W];
  VT::store_i8(buf, v);
  std::memcpy(p, buf, static_cast<size_t>(n));
}

// Four independent accumulators (hides the add/max latency); ld(i, n) gives a vector,
// op folds it into an accumulator. kMax: accumulators combine by max, else by sum.
template <class VT, bool kMax = false, class Ld, class Op>
typename VT::V reduce4(int64_t k, const Ld& ld, const Op& op) {
  using V = typename VT::V;
  constexpr int W = VT::W;
  V a0 = VT::zero(), a1 = VT::zero(), a2 = VT::zero(), a3 = VT::zero();
  int64_t i = 0;
  for (; i + 4 * W <= k; i += 4 * W) {
    a0 = op(a0, ld(i, W));
    a1 = op(a1, ld(i + W, W));
    a2 = op(a2, ld(i + 2 * W, W));
    a3 = op(a3, ld(i + 3 * W, W));
  }
  for (; i < k; i += W) a0 = op(a0, ld(i, k - i));
  if constexpr (kMax) return VT::max(VT::max(a0, a1), VT::max(a2, a3));
  return VT::add(VT::add(a0, a1), VT::add(a2, a3));
}

// Sum of squares of the row: four-accumulator sums over blocks of 64 vectors, the block
// sums added up in order. Keeps the rounding error of wide rows near torch's cascade sum
// (one accumulator chain over all of K loses ~sqrt(K) ulps, even more on the scalar path).
template <class VT, class Ld>
float sum_squares(int64_t k, const Ld& ld) {
  using V = typename VT::V;
  constexpr int64_t kBlock = 64 * VT::W;
  V total = VT::zero();
  for (int64_t b = 0; b < k; b += kBlock) {
    const int64_t n = k - b < kBlock ? k - b : kBlock;
    total = VT::add(total, reduce4<VT>(n, [&](int64_t i, int64_t m) { return ld(b + i, m); },
                                       [](V a, V v) { return VT::fma(v, v, a); }));
  }
  return VT::hsum(total);
}

// Applies f(i, n) over the row in steps of W (n < W only for the tail).
template <class VT, class F>
void for_vecs(int64_t k, const F& f) {
  for (int64_t i = 0; i < k; i += VT::W) f(i, k - i < VT::W ? k - i : static_cast<int64_t>(VT::W));
}

// rstd = 1/sqrt(sum/K + eps): fp32 division, add, correctly rounded sqrt and division,
// the same operations as the reference (and the CUDA kernels).
inline float rstd_of(float sum_sq, int64_t k, float eps) {
  return 1.0f / __builtin_sqrtf(sum_sq / static_cast<float>(k) + eps);
}

// exp for the SiLU: Cephes-style range reduction + degree-6 polynomial (~1 ulp). The input
// is clamped so 2^n stays a normal number; sigmoid saturates long before that matters.
template <class VT>
MMFREE_NORM_INLINE typename VT::V exp_approx(typename VT::V x) {
  using V = typename VT::V;
  x = VT::min(VT::max(x, VT::set1(-87.3f)), VT::set1(88.3f));
  const V fx = VT::round_nearest(VT::mul(x, VT::set1(1.44269504088896341f)));
  x = VT::sub(x, VT::mul(fx, VT::set1(0.693359375f)));
  x = VT::sub(x, VT::mul(fx, VT::set1(-2.12194440e-4f)));
  const V z = VT::mul(x, x);
  V y = VT::set1(1.9875691500e-4f);
  y = VT::add(VT::mul(y, x), VT::set1(1.3981999507e-3f));
  y = VT::add(VT::mul(y, x), VT::set1(8.3334519073e-3f));
  y = VT::add(VT::mul(y, x), VT::set1(4.1665795894e-2f));
  y = VT::add(VT::mul(y, x), VT::set1(1.6666665459e-1f));
  y = VT::add(VT::mul(y, x), VT::set1(5.0000001201e-1f));
  y = VT::add(VT::add(VT::mul(y, z), x), VT::set1(1.0f));
  return VT::mul(y, VT::pow2i(fx));
}

// silu(h) = h * sigmoid(h), sigmoid = 1/(1+exp(-h)) (the reference's two roundings).
template <class VT>
MMFREE_NORM_INLINE typename VT::V silu(typename VT::V h) {
  using V = typename VT::V;
  const V nh = VT::sub(VT::zero(), h);
  // exp_approx clamps its input; scale by 1 + what lies past the clamp (exactly 1 below it)
  // so that exp overflows to inf from -h ~ 89 on, as expf does at 88.7: silu(-inf) = -inf * 0
  // = NaN and silu(-1e30) = -0 as in the reference (not -inf and -1e30 * exp(-88.3)).
  const V top = VT::set1(88.3f);
  const V over = VT::add(VT::set1(1.0f), VT::sub(VT::max(nh, top), top));
  const V e = VT::mul(exp_approx<VT>(nh), over);
  return VT::mul(h, VT::div(VT::set1(1.0f), VT::add(VT::set1(1.0f), e)));
}

template <class VT>
MMFREE_NORM_INLINE typename VT::V quant_code(typename VT::V xn, typename VT::V s) {
  const typename VT::V r = VT::round_away(VT::mul(xn, s));
  return VT::min(VT::max(r, VT::set1(-128.0f)), VT::set1(127.0f));
}

// Quantizes a row given by xn(i, n) (the normalized values): amax pass, then codes.
template <class VT, class Xn>
void quantize_row(int64_t k, const Xn& xn, int8_t* q, float* scale) {
  using V = typename VT::V;
  // min(|v|, inf) turns a NaN into +inf (min returns its second operand when one is NaN,
  // on every ISA here), so the max keeps it: a plain max would drop a NaN met early.
  const V inf = VT::set1(__builtin_inff());
  const V m = reduce4<VT, true>(k, xn, [&](V a, V v) { return VT::max(a, VT::min(VT::abs(v), inf)); });
  float amax = VT::hmax(m);
  if (!(amax < __builtin_inff())) {  // a NaN or inf in the row: codes 0, scale NaN (docs/numerics.md)
    std::memset(q, 0, static_cast<size_t>(k));
    *scale = __builtin_nanf("");
    return;
  }
  amax = fmax_(amax, 1e-5f);
  const V s = VT::set1(127.0f / amax);
  for_vecs<VT>(k, [&](int64_t i, int64_t n) { store_i8_n<VT>(q + i, quant_code<VT>(xn(i, n), s), n); });
  *scale = amax / 127.0f;
}

template <class VT, DType D>
void quant_rows_t(const RmsNormQuantParams& p, const float* w32, int64_t r0, int64_t r1) {
  using V = typename VT::V;
  using IO = Io<VT, D>;
  const int64_t k = p.k;
  const auto* x = static_cast<const typename IO::E*>(p.x);
  for (int64_t r = r0; r < r1; ++r) {
    const typename IO::E* xr = x + r * k;
    auto ld = [&](int64_t i, int64_t n) { return load_n<VT, IO>(xr + i, n); };
    const V rstd = VT::set1(rstd_of(sum_squares<VT>(k, ld), k, p.eps));
    for (int64_t w = 0; w < p.num_weights; ++w) {
      const float* wr = w32 + w * k;
      auto xn = [&](int64_t i, int64_t n) {
        return VT::mul(VT::mul(ld(i, n), rstd), load_n<VT, Io<VT, DType::kFloat32>>(wr + i, n));
      };
      quantize_row<VT>(k, xn, p.x_q + (w * p.rows + r) * k, p.x_scale + w * p.rows + r);
    }
  }
}

template <class VT, DType D>
void rms_norm_rows_t(const RmsNormParams& p, const float* w32, int64_t r0, int64_t r1) {
  using V = typename VT::V;
  using IO = Io<VT, D>;
  using F32 = Io<VT, DType::kFloat32>;
  const int64_t k = p.k;
  const auto* x = static_cast<const typename IO::E*>(p.x);
  const auto* res = static_cast<const typename IO::E*>(p.residual);
  auto* y = static_cast<typename IO::E*>(p.y);
  auto* res_out = static_cast<typename IO::E*>(p.residual_out);
  for (int64_t r = r0; r < r1; ++r) {
    const typename IO::E* xr = x + r * k;
    const typename IO::E* rr = res ? res + r * k : nullptr;
    typename IO::E* ror = res_out + r * k;
    // The fp32 sum x + residual; residual_out (its rounded copy) is written on the way.
    auto sum = [&](int64_t i, int64_t n) {
      const V v = load_n<VT, IO>(xr + i, n);
      return rr ? VT::add(v, load_n<VT, IO>(rr + i, n)) : v;
    };
    auto sum_store = [&](int64_t i, int64_t n) {
      const V v = sum(i, n);
      store_n<VT, IO>(ror + i, v, n);
      return v;
    };
    float ss;
    if (rr) {
      ss = sum_squares<VT>(k, sum_store);
    } else {
      std::memcpy(ror, xr, static_cast<size_t>(k) * sizeof(typename IO::E));
      ss = sum_squares<VT>(k, sum);
    }
    const V rstd = VT::set1(rstd_of(ss, k, p.eps));
    typename IO::E* yr = y + r * k;
    for_vecs<VT>(k, [&](int64_t i, int64_t n) {
      store_n<VT, IO>(yr + i, VT::mul(VT::mul(sum(i, n), rstd), load_n<VT, F32>(w32 + i, n)), n);
    });
  }
}

// The gate value ((g*rstd)*w) * silu(h) of one vector, in fp32.
template <class VT, class IO>
MMFREE_NORM_INLINE typename VT::V gate_value(const typename IO::E* g, const typename IO::E* h, const float* w, typename VT::V rstd,
                          int64_t i, int64_t n) {
  const typename VT::V gn = VT::mul(VT::mul(load_n<VT, IO>(g + i, n), rstd), load_n<VT, Io<VT, DType::kFloat32>>(w + i, n));
  return VT::mul(gn, silu<VT>(load_n<VT, IO>(h + i, n)));
}

template <class VT, class IO>
float row_rstd(const typename IO::E* xr, int64_t k, float eps) {
  auto ld = [&](int64_t i, int64_t n) { return load_n<VT, IO>(xr + i, n); };
  return rstd_of(sum_squares<VT>(k, ld), k, eps);
}

template <class VT, DType D>
void swish_gate_rows_t(const RmsNormSwishGateParams& p, const float* w32, int64_t r0, int64_t r1) {
  using IO = Io<VT, D>;
  const int64_t k = p.k;
  const auto* g = static_cast<const typename IO::E*>(p.g);
  const auto* h = static_cast<const typename IO::E*>(p.h);
  auto* y = static_cast<typename IO::E*>(p.y);
  for (int64_t r = r0; r < r1; ++r) {
    const typename IO::E* gr = g + r * k;
    const typename IO::E* hr = h + r * k;
    const typename VT::V rstd = VT::set1(row_rstd<VT, IO>(gr, k, p.eps));
    typename IO::E* yr = y + r * k;
    for_vecs<VT>(k, [&](int64_t i, int64_t n) { store_n<VT, IO>(yr + i, gate_value<VT, IO>(gr, hr, w32, rstd, i, n), n); });
  }
}

template <class VT, DType D>
void swish_gate_quant_rows_t(const RmsNormSwishGateParams& p, const float* w32, const float* nw32, float* scratch,
                             int64_t r0, int64_t r1) {
  using V = typename VT::V;
  using IO = Io<VT, D>;
  using F32 = Io<VT, DType::kFloat32>;
  const int64_t k = p.k;
  const auto* g = static_cast<const typename IO::E*>(p.g);
  const auto* h = static_cast<const typename IO::E*>(p.h);
  for (int64_t r = r0; r < r1; ++r) {
    const typename IO::E* gr = g + r * k;
    const typename IO::E* hr = h + r * k;
    const V rstd = VT::set1(row_rstd<VT, IO>(gr, k, p.eps));
    // The gate output, rounded to g's dtype as the unfused pair would store it; kept in
    // fp32 scratch (L1) while its own sum of squares accumulates.
    auto gate = [&](int64_t i, int64_t n) {
      const V v = IO::round(gate_value<VT, IO>(gr, hr, w32, rstd, i, n));
      store_n<VT, F32>(scratch + i, v, n);
      return v;
    };
    const V rstd2 = VT::set1(rstd_of(sum_squares<VT>(k, gate), k, p.norm_eps));
    auto xn = [&](int64_t i, int64_t n) {
      return VT::mul(VT::mul(load_n<VT, F32>(scratch + i, n), rstd2), load_n<VT, F32>(nw32 + i, n));
    };
    quantize_row<VT>(k, xn, p.x_q + r * k, p.x_scale + r);
  }
}

// Dtype dispatch of the four workers; the ISA file wraps these in its entry functions.
#define MMFREE_NORM_DISPATCH(dtype, fn, ...)                                           \
  switch (dtype) {                                                                   \
    case DType::kFloat32: fn<VT_, DType::kFloat32>(__VA_ARGS__); break;              \
    case DType::kBFloat16: fn<VT_, DType::kBFloat16>(__VA_ARGS__); break;            \
    case DType::kFloat16: fn<VT_, DType::kFloat16>(__VA_ARGS__); break;              \
    case DType::kFloat64: fn<VT_, DType::kFloat64>(__VA_ARGS__); break;              \
  }

// The entry functions of one ISA file (placed in namespace norm_rows, outside the
// anonymous namespace that holds the instantiations).
#define MMFREE_NORM_ENTRIES(suffix)                                                                      \
  void quant_##suffix(const RmsNormQuantParams& p, const float* w32, int64_t r0, int64_t r1) {           \
    MMFREE_NORM_DISPATCH(p.x_dtype, quant_rows_t, p, w32, r0, r1)                                        \
  }                                                                                                      \
  void rms_norm_##suffix(const RmsNormParams& p, const float* w32, int64_t r0, int64_t r1) {             \
    MMFREE_NORM_DISPATCH(p.dtype, rms_norm_rows_t, p, w32, r0, r1)                                       \
  }                                                                                                      \
  void swish_gate_##suffix(const RmsNormSwishGateParams& p, const float* w32, int64_t r0, int64_t r1) {  \
    MMFREE_NORM_DISPATCH(p.dtype, swish_gate_rows_t, p, w32, r0, r1)                                     \
  }                                                                                                      \
  void swish_gate_quant_##suffix(const RmsNormSwishGateParams& p, const float* w32, const float* nw32,  \
                                 float* scratch, int64_t r0, int64_t r1) {                               \
    MMFREE_NORM_DISPATCH(p.dtype, swish_gate_quant_rows_t, p, w32, nw32, scratch, r0, r1)                \
  }
