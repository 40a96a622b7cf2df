// Backward passes of rms_norm and rms_norm_swish_gate on the CPU (baseline ISA, loops the
// compiler vectorizes). fp32 math (fp64 for float64 inputs). dweight is deterministic:
// partial sums over fixed blocks of kNormBackwardRowsPerPartial rows, added in block order,
// whatever the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/norm/norm_row_io.h"
#include "cpu/parallel.h"
#include "norm.h"

namespace mmfree {
namespace cpu {
namespace {

// Sums the per-block partials [nblk, k] in block order into dweight (weight's dtype).
template <class A>
void finish_dweight(const std::vector<A>& partial, int64_t nblk, int64_t k, void* dweight, DType w_dtype) {
  std::vector<A> total(static_cast<size_t>(k), A(0));
  for (int64_t b = 0; b < nblk; ++b) {
    const A* src = partial.data() + b * k;
    for (int64_t i = 0; i < k; ++i) total[i] += src[i];
  }
  norm_rows::store_row(dweight, w_dtype, 0, k, total.data());
}

// sum(a[i] * b[i]) in fp64 over eight independent lanes (as accurate as torch's cascade
// sums, and the lanes let the compiler vectorize a reduction it may not reorder).
template <class A>
double dot_f64(const A* a, const A* b, int64_t k) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    for (int j = 0; j < 8; ++j) lane[j] += static_cast<double>(a[i + j]) * static_cast<double>(b[i + j]);
  }
  for (; i < k; ++i) lane[0] += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

template <class A>
A rstd_of(const A* s, int64_t k, float eps) {
  const double ss = dot_f64(s, s, k);
  return static_cast<A>(1.0 / std::sqrt(ss / static_cast<double>(k) + static_cast<double>(eps)));
}

template <class A>
void rms_norm_backward_t(const RmsNormBackwardParams& p) {
  const int64_t k = p.k;
  const int64_t nblk = norm_backward_partial_rows(p.rows);
  std::vector<A> w(static_cast<size_t>(k));
  norm_rows::load_row(p.weight, p.w_dtype, 0, k, w.data());
  std::vector<A> partial(static_cast<size_t>(nblk * k), A(0));
  parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> s(k), dy(k), tmp(k);
    for (int64_t b = b0; b < b1; ++b) {
      A* dw = partial.data() + b * k;
      const int64_t r_end = std::min(p.rows, (b + 1) * kNormBackwardRowsPerPartial);
      for (int64_t r = b * kNormBackwardRowsPerPartial; r < r_end; ++r) {
        norm_rows::load_row(p.x, p.dtype, r * k, k, s.data());
        if (p.residual != nullptr) {
          norm_rows::load_row(p.residual, p.dtype, r * k, k, tmp.data());
          for (int64_t i = 0; i < k; ++i) s[i] += tmp[i];
        }
        norm_rows::load_row(p.grad_y, p.dtype, r * k, k, dy.data());
        const A rstd = rstd_of(s.data(), k, p.eps);
        for (int64_t i = 0; i < k; ++i) {
          dw[i] += dy[i] * (s[i] * rstd);
          tmp[i] = dy[i] * w[i];  // gradient on the normalized sum
        }
        const double dot = dot_f64(tmp.data(), s.data(), k);
        const A c = static_cast<A>(rstd * rstd * rstd * dot / static_cast<double>(k));
        for (int64_t i = 0; i < k; ++i) s[i] = rstd * tmp[i] - s[i] * c;
        if (p.grad_residual != nullptr) {
          norm_rows::load_row(p.grad_residual, p.dtype, r * k, k, tmp.data());
          for (int64_t i = 0; i < k; ++i) s[i] += tmp[i];
        }
        norm_rows::store_row(p.dx, p.dtype, r * k, k, s.data());
      }
    }
  });
  finish_dweight(partial, nblk, k, p.dweight, p.w_dtype);
}

template <class A>
void swish_gate_backward_t(const RmsNormSwishGateBackwardParams& p) {
  const int64_t k = p.k;
  const int64_t nblk = norm_backward_partial_rows(p.rows);
  std::vector<A> w(static_cast<size_t>(k));
  norm_rows::load_row(p.weight, p.w_dtype, 0, k, w.data());
  std::vector<A> partial(static_cast<size_t>(nblk * k), A(0));
  parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> g(k), h(k), dy(k), gg(k);
    for (int64_t b = b0; b < b1; ++b) {
      A* dw = partial.data() + b * k;
      const int64_t r_end = std::min(p.rows, (b + 1) * kNormBackwardRowsPerPartial);
      for (int64_t r = b * kNormBackwardRowsPerPartial; r < r_end; ++r) {
        norm_rows::load_row(p.g, p.dtype, r * k, k, g.data());
        norm_rows::load_row(p.h, p.dtype, r * k, k, h.data());
        norm_rows::load_row(p.grad_y, p.dtype, r * k, k, dy.data());
        const A rstd = rstd_of(g.data(), k, p.eps);
        for (int64_t i = 0; i < k; ++i) {
          const A sig = A(1) / (A(1) + std::exp(-h[i]));
          const A sl = h[i] * sig;
          const A gn = g[i] * rstd;
          dw[i] += dy[i] * sl * gn;
          gg[i] = dy[i] * sl * w[i];  // gradient on the normalized g
          h[i] = dy[i] * (gn * w[i]) * (sig * (A(1) + h[i] * (A(1) - sig)));  // dh, in place
        }
        const double dot = dot_f64(gg.data(), g.data(), k);
        const A c = static_cast<A>(rstd * rstd * rstd * dot / static_cast<double>(k));
        for (int64_t i = 0; i < k; ++i) g[i] = rstd * gg[i] - g[i] * c;
        norm_rows::store_row(p.dg, p.dtype, r * k, k, g.data());
        norm_rows::store_row(p.dh, p.dtype, r * k, k, h.data());
      }
    }
  });
  finish_dweight(partial, nblk, k, p.dweight, p.w_dtype);
}

}  // namespace

void rms_norm_backward(const RmsNormBackwardParams& p) {
  if (p.k == 0) return;
  if (p.dtype == DType::kFloat64) {
    rms_norm_backward_t<double>(p);
  } else {
    rms_norm_backward_t<float>(p);
  }
}

void rms_norm_swish_gate_backward(const RmsNormSwishGateBackwardParams& p) {
  if (p.k == 0) return;
  if (p.dtype == DType::kFloat64) {
    swish_gate_backward_t<double>(p);
  } else {
    swish_gate_backward_t<float>(p);
  }
}

}  // namespace cpu
}  // namespace mmfree
