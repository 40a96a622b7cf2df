"""The decoded-panel dX's scale pass on CUDA (mmfree::cuda::scale_cast, inside
ternary_linear_packed_backward / bitlinear_backward): dxn = fp32(dY @ W_q) * w_scale rounded
once to x's dtype, bit for bit what the fp32 op ternary_matmul_t gives cast to that dtype; the
fused norm backward then sees the same dxn, so dX and dg are equal too."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

EPS = 1e-6


# M*K not a multiple of the 8-element vector (37*100, 5*6913: the element tail), and whole vectors.
@pytest.mark.parametrize(("m", "k", "n"), [(37, 100, 70), (5, 6913, 33), (64, 2560, 300), (1, 8, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_panel_dx_scale_equals_fp32_product_cast(m: int, k: int, n: int, dtype: torch.dtype) -> None:
    torch.manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda").to(dtype)
    w = torch.randn(n, k, device="cuda") * 0.02
    g = (1.0 + 0.1 * torch.randn(k, device="cuda")).to(dtype)
    dy = torch.randn(m, n, device="cuda").to(dtype)
    packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
    dx, dg = torch.ops.mmfree.ternary_linear_packed_backward(dy, x, packed, w_scale, g, EPS)
    dxn = torch.ops.mmfree.ternary_matmul_t(dy, packed, w_scale, k).to(dtype)  # fp32 * w_scale, one rounding
    ref_dx, ref_dg = torch.ops.mmfree.rms_norm_backward(dxn, x, g, EPS, None, None)
    assert torch.equal(dx, ref_dx) and torch.equal(dg, ref_dg)


def test_panel_dx_scale_nan_scale() -> None:
    """A NaN w_scale (docs/numerics.md: a NaN in W) makes every dX element NaN."""
    x = torch.randn(9, 256, device="cuda").to(torch.bfloat16)
    packed, _ = torch.ops.mmfree.quantize_ternary(torch.randn(16, 256, device="cuda"))
    w_scale = torch.tensor(float("nan"), device="cuda")
    g = torch.ones(256, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(9, 16, device="cuda").to(torch.bfloat16)
    dx, _ = torch.ops.mmfree.ternary_linear_packed_backward(dy, x, packed, w_scale, g, EPS)
    assert dx.isnan().all()
