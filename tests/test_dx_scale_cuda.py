"""Where w_scale enters the BitLinear dX on CUDA (ternary_linear_packed_backward /
bitlinear_backward / ternary_linear_backward).

* bf16 dY and x (the training step): cuBLAS writes the unscaled dY @ W_q in bf16 and the
  RMSNorm backward multiplies it by w_scale in fp32 as it reads it (rms_norm_backward_scaled):
  one rounding of the product, no fp32 [M, K] product and no scaling pass. Checked against
  float64 with the flash-attention rule: its error is at most a small multiple of the error of
  the other one-rounding order (fp32 product * w_scale rounded to bf16, then the norm
  backward), on shapes large enough for the error norms to be stable.
* fp16 (whose range the unscaled product would use up ~1 / w_scale sooner), and dY in another
  dtype than x (fp32 dY, bf16 x): fp32(dY @ W_q) * w_scale rounded once to x's dtype
  (mmfree::cuda::scale_cast), bit for bit what the fp32 op ternary_matmul_t gives cast to that
  dtype.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

EPS = 1e-6


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, norm_dtype: torch.dtype | None = None):
    torch.manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda").to(dtype)
    w = torch.randn(n, k, device="cuda") * 0.02
    g = (1.0 + 0.1 * torch.randn(k, device="cuda")).to(norm_dtype or dtype)
    dy = torch.randn(m, n, device="cuda").to(dtype)
    packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
    return x, g, dy, packed, w_scale


def _norm_backward_f64(dxn: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm's backward in float64 by autograd (the reference's norm computes in fp32)."""
    x = x.double().requires_grad_()
    g = g.double().requires_grad_()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS) * g
    y.backward(dxn.double())
    return x.grad, g.grad


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


# M*K not a multiple of the 8-element vector (37*100, 5*6913: the element tails), whole
# vectors, an fp32 norm weight on a bf16 x, and N = 33000 (three column panels at K = 300). No
# tiny shapes: with a few elements the two orders' error norms are noise (a ratio up to 14x).
@pytest.mark.parametrize(
    ("m", "k", "n", "norm_f32"),
    [(37, 100, 70, False), (5, 6913, 33, False), (64, 2560, 300, False), (64, 2560, 300, True), (9, 300, 33000, False)],
)
def test_bf16_dx_scaled_in_the_norm_within_one_rounding(m: int, k: int, n: int, norm_f32: bool) -> None:
    dtype = torch.bfloat16
    x, g, dy, packed, w_scale = _inputs(m, k, n, dtype, torch.float32 if norm_f32 else None)
    dx, dg = torch.ops.mmfree.ternary_linear_packed_backward(dy, x, packed, w_scale, g, EPS)
    assert dx.dtype == dtype and dg.dtype == g.dtype
    w_q = torch.ops.mmfree.unpack_ternary(packed, k).double()
    want_dx, want_dg = _norm_backward_f64(dy.double() @ w_q * w_scale.double(), x, g)
    # The other one-rounding order, through the public ops: fp32 product * w_scale in bf16.
    dxn = torch.ops.mmfree.ternary_matmul_t(dy, packed, w_scale, k).to(dtype)
    base_dx, base_dg = torch.ops.mmfree.rms_norm_backward(dxn, x, g, EPS, None, None)
    for name, got, base, want in (("dx", dx, base_dx, want_dx), ("dg", dg, base_dg, want_dg)):
        err, base_err = _rel(got, want), _rel(base, want)
        assert err <= 1.5 * base_err + 1e-6, f"{name}: error {err:.3g} against {base_err:.3g} for the other order"


def test_dx_scale_is_applied_once_and_after_the_product() -> None:
    """Doubling w_scale doubles dX and dg exactly (the product does not see the scale; a power
    of two is exact in fp32 and bf16)."""
    x, g, dy, packed, w_scale = _inputs(48, 1024, 200, torch.bfloat16)
    dx1, dg1 = torch.ops.mmfree.ternary_linear_packed_backward(dy, x, packed, w_scale, g, EPS)
    dx2, dg2 = torch.ops.mmfree.ternary_linear_packed_backward(dy, x, packed, w_scale * 2, g, EPS)
    assert torch.equal(dx2, dx1 * 2) and torch.equal(dg2, dg1 * 2)


@pytest.mark.parametrize(("m", "k", "n"), [(37, 100, 70), (5, 6913, 33), (64, 2560, 300), (1, 8, 5)])
@pytest.mark.parametrize(
    ("dy_dtype", "x_dtype"), [(torch.float16, torch.float16), (torch.float32, torch.bfloat16)], ids=["fp16", "fp32_dy"]
)
def test_scaled_product_cast_once(m: int, k: int, n: int, dy_dtype: torch.dtype, x_dtype: torch.dtype) -> None:
    """fp16, and an fp32 dY on a bf16 x: the scaled fp32 product rounded once to x's dtype."""
    x, g, dy, packed, w_scale = _inputs(m, k, n, x_dtype)
    dy = dy.to(dy_dtype)
    dx, dg = torch.ops.mmfree.ternary_linear_packed_backward(dy, x, packed, w_scale, g, EPS)
    dxn = torch.ops.mmfree.ternary_matmul_t(dy, packed, w_scale, k).to(x_dtype)  # one rounding
    want_dx, want_dg = torch.ops.mmfree.rms_norm_backward(dxn, x, g, EPS, None, None)
    assert torch.equal(dx, want_dx) and torch.equal(dg, want_dg)


def test_fp32_dx_equals_scaled_product_bit_for_bit() -> None:
    """fp32: the norm's in-kernel w_scale gives the bits of the fp32 op's scaled product."""
    x, g, dy, packed, w_scale = _inputs(33, 640, 96, torch.float32)
    dx, dg = torch.ops.mmfree.ternary_linear_packed_backward(dy, x, packed, w_scale, g, EPS)
    dxn = torch.ops.mmfree.ternary_matmul_t(dy, packed, w_scale, 640)
    want_dx, want_dg = torch.ops.mmfree.rms_norm_backward(dxn, x, g, EPS, None, None)
    assert torch.equal(dx, want_dx) and torch.equal(dg, want_dg)


@pytest.mark.parametrize(
    ("dy_dtype", "x_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16)],
)
def test_dx_nan_scale(dy_dtype: torch.dtype, x_dtype: torch.dtype) -> None:
    """A NaN w_scale (docs/numerics.md: a NaN in W) makes every dX element NaN, on both paths."""
    x = torch.randn(9, 256, device="cuda").to(x_dtype)
    packed, _ = torch.ops.mmfree.quantize_ternary(torch.randn(16, 256, device="cuda"))
    w_scale = torch.tensor(float("nan"), device="cuda")
    g = torch.ones(256, device="cuda", dtype=x_dtype)
    dy = torch.randn(9, 16, device="cuda").to(dy_dtype)
    dx, _ = torch.ops.mmfree.ternary_linear_packed_backward(dy, x, packed, w_scale, g, EPS)
    assert dx.isnan().all()


def test_dx_zero_rows() -> None:
    """M = 0: an empty dX, dg the sum over no rows (zeros). N = 0: test_bitlinear."""
    x, g, dy, packed, w_scale = _inputs(0, 256, 16, torch.bfloat16)
    dx, dg = torch.ops.mmfree.ternary_linear_packed_backward(dy, x, packed, w_scale, g, EPS)
    assert dx.shape == (0, 256) and torch.equal(dg, torch.zeros_like(dg))
