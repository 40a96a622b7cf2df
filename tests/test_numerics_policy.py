"""The NaN/inf and all-zero-row policy of docs/numerics.md, and regression tests for the
bugs the fuzz tests (tests/test_fuzz_*.py) found, on every CPU ISA path and on CUDA."""

from __future__ import annotations

import pytest
import torch

import mmfree_ext
from conftest import DEVICES
from mmfree_ext import reference as ref

ISAS = ["scalar", "avx2", "avx512"]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest):
    mmfree_ext.set_cpu_isa(request.param)
    if mmfree_ext.cpu_isa() != request.param:
        pytest.skip(f"{request.param} not available here")
    yield request.param
    mmfree_ext.set_cpu_isa("avx512")


def _rows(k: int, device: str) -> torch.Tensor:
    """Row 0 finite, row 1 a NaN early (a plain max drops it), row 2 an inf late, row 3 zeros,
    row 4 a NaN in the last (tail) element."""
    x = torch.randn(5, k, device=device)
    x[1, 0] = NAN
    x[2, k - 2] = INF
    x[3] = 0.0
    x[4, k - 1] = NAN
    return x


def _check_rows(x_q: torch.Tensor, x_scale: torch.Tensor) -> None:
    x_q, x_scale = x_q.cpu(), x_scale.cpu()
    assert torch.isfinite(x_scale[0]) and bool((x_q[0] != 0).any())
    for r in (1, 2, 4):  # a NaN or inf in the row: codes 0, scale NaN
        assert torch.isnan(x_scale[r]), f"row {r}: scale {x_scale[r]}"
        assert torch.equal(x_q[r], torch.zeros_like(x_q[r])), f"row {r}: codes {x_q[r].unique()}"
    # All-zero row: codes 0 and the finite scale 1e-5 / 127 (no NaN).
    assert torch.equal(x_q[3], torch.zeros_like(x_q[3]))
    assert x_scale[3].item() == pytest.approx(1e-5 / 127, rel=1e-6)


@pytest.mark.parametrize("k", [7, 64, 129, 1000])
def test_quant_nan_rows_cpu_isas(isa: str, k: int) -> None:
    """Regression: the row max dropped a NaN (max returns its second operand), so a NaN row
    got a finite scale and codes -128 (NaN converted to int8)."""
    x = _rows(k, "cpu")
    w = torch.ones(k)
    _check_rows(*mmfree_ext.rms_norm_quant(x, w))
    q, s = mmfree_ext.rms_norm_quant_multi(x, torch.stack([w, 2 * w]))
    for p in range(2):
        _check_rows(q[p], s[p])
    _check_rows(*mmfree_ext.rms_norm_swish_gate_quant(x, torch.ones_like(x), w, 1e-6, w, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [7, 64, 129, 1000, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quant_nan_rows(device: str, k: int, dtype: torch.dtype) -> None:
    """The same policy on every device and dtype (CUDA: warp, block and generic kernels)."""
    x = _rows(k, device).to(dtype)
    for w in (torch.ones(k, device=device), torch.ones(k, device=device, dtype=torch.float64)):
        _check_rows(*mmfree_ext.rms_norm_quant(x, w))
        q, s = mmfree_ext.rms_norm_quant_multi(x, torch.stack([w, 2 * w]))
        _check_rows(q[1], s[1])
        _check_rows(*mmfree_ext.rms_norm_swish_gate_quant(x, torch.ones_like(x), w, 1e-6, w, 1e-6))
    q_ref, s_ref = ref.rms_norm_quant(x.cpu(), torch.ones(k))
    _check_rows(q_ref, s_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_weight_row_and_product(device: str) -> None:
    """A NaN in the norm weight poisons every row; the NaN scale reaches the product."""
    x = torch.randn(3, 40, device=device)
    w = torch.ones(40, device=device)
    w[5] = NAN
    x_q, x_scale = mmfree_ext.rms_norm_quant(x, w)
    assert torch.isnan(x_scale).all() and not bool(x_q.any())
    packed, w_scale = mmfree_ext.quantize_ternary(torch.randn(8, 40, device=device))
    y = mmfree_ext.ternary_matmul(x_q, x_scale, packed, w_scale)
    assert torch.isnan(y).all()


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows_give_exact_zero_products(device: str) -> None:
    x = torch.zeros(4, 300, device=device)
    x_q, x_scale = mmfree_ext.rms_norm_quant(x, torch.ones(300, device=device))
    packed, w_scale = mmfree_ext.quantize_ternary(torch.randn(16, 300, device=device))
    y = mmfree_ext.ternary_matmul(x_q, x_scale, packed, w_scale)
    assert torch.equal(y.cpu(), torch.zeros(4, 16))
    y2 = mmfree_ext.ternary_linear_packed(x, packed, w_scale, torch.ones(300, device=device))
    assert torch.equal(y2.cpu(), torch.zeros(4, 16))


def test_silu_of_minus_inf_is_nan_cpu_isas(isa: str) -> None:
    """Regression: the CPU exp clamped -h = inf to 88.3, so silu(-inf) = -inf instead of
    the reference's -inf * sigmoid(-inf) = -inf * 0 = NaN."""
    k = 40
    g = torch.randn(2, k)
    h = torch.randn(2, k)
    h[0, 3], h[1, k - 1], h[1, 0] = -INF, INF, -200.0
    y = mmfree_ext.rms_norm_swish_gate(g, h, torch.ones(k))
    y_ref = ref.rms_norm_swish_gate(g, h, torch.ones(k))
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.isnan(y[0, 3])
    assert torch.equal(y.isinf(), y_ref.isinf())
    assert y[1, 0].item() == pytest.approx(y_ref[1, 0].item(), abs=1e-30)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_weight_scale_matches_reference(device: str) -> None:
    """Regression (reference): an empty weight's scale is 1e-5 (the kernels'), not NaN."""
    _, s = mmfree_ext.quantize_ternary(torch.zeros(0, 5, device=device))
    _, s_ref = ref.quantize_ternary(torch.zeros(0, 5))
    assert s.item() == s_ref.item() == pytest.approx(1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_scan_with_no_steps_matches_reference(device: str) -> None:
    """Regression (reference): T = 0 raised in torch.stack; the state passes through."""
    i = torch.zeros(2, 0, 5, device=device)
    h0 = torch.randn(2, 5, device=device)
    h, h_last = mmfree_ext.mlgru_scan(i, i, None, h0)
    h_ref, last_ref = ref.mlgru_scan(i.cpu(), i.cpu(), None, h0.cpu())
    assert h.shape == h_ref.shape == (2, 0, 5)
    assert torch.equal(h_last.cpu(), last_ref) and torch.equal(last_ref, h0.cpu())


def test_silu_of_huge_negative_is_zero_cpu_isas(isa: str) -> None:
    """Regression: past the exp clamp sigmoid stayed at exp(-88.3), so silu(-1e30) was
    -1e30 * 5e-39 = -5e-9 (and times an inf weight -inf, not the reference's NaN)."""
    g = torch.ones(1, 3)
    h = torch.tensor([[-1e30, -100.0, -88.0]])
    y = mmfree_ext.rms_norm_swish_gate(g, h, torch.ones(3))
    y_ref = ref.rms_norm_swish_gate(g, h, torch.ones(3))
    assert y[0, 0].item() == 0.0 and abs(y[0, 1].item()) < 1e-38
    assert y[0, 2].item() == pytest.approx(y_ref[0, 2].item(), rel=1e-5)
    y_inf = mmfree_ext.rms_norm_swish_gate(g, h, torch.tensor([float("inf")] * 3))
    assert torch.isnan(y_inf[0, 0]) and torch.isnan(ref.rms_norm_swish_gate(g, h, torch.full((3,), INF))[0, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_scan_of_infinite_inputs_matches_reference(device: str) -> None:
    """Regression (CPU): silu(-inf) in the scan was -inf (clamped exp), the reference NaN;
    silu(-1e30) was -1e30 * exp(-88), the reference -0."""
    i = torch.tensor([INF, -INF, -1e30, 3.0], device=device).view(4, 1, 1)
    f = torch.zeros(4, 1, 1, device=device)
    h, h_last = mmfree_ext.mlgru_scan(i, f)
    h_ref, last_ref = ref.mlgru_scan(i.cpu(), f.cpu())
    assert torch.equal(h.cpu().isnan(), h_ref.isnan()) and torch.equal(h.cpu().isinf(), h_ref.isinf())
    assert torch.equal(h_last.cpu().isnan(), last_ref.isnan())
    assert h[2].item() == 0.0
    assert h[3].item() == pytest.approx(h_ref[3].item(), rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", [0, 1, 3], ids=["auto", "sequential", "lanes"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scan_with_forget_gate_inputs_past_the_exp_cap(device: str, dtype: torch.dtype, path: int) -> None:
    """Regression (CUDA, 16-bit inputs): a forget-gate input below -87.34 gave 1 - sigmoid(f) = 0
    (the fast reciprocal returns 0 for divisors of 2^126 and more), so c_t, dL/di and a dL/dlb
    term of that token were 0; the reference keeps c_t = silu(i) (1 - lb) there."""
    f_vals = torch.tensor([-86.0, -87.2, -87.5, -88.0, -100.0, -1e4, 3.0, -87.9])
    t, d = f_vals.numel(), 64
    i = torch.linspace(-3, 3, d).expand(1, t, d).to(dtype).to(device)
    f = f_vals.view(1, t, 1).expand(1, t, d).contiguous().to(dtype).to(device)
    lb = torch.full((d,), 0.25, device=device)
    leaves = [x.clone().requires_grad_(True) for x in (i, f, lb)]
    h, h_last = torch.ops.mmfree.mlgru_scan_impl(*leaves, None, None, None, path)
    ref_leaves = [x.detach().cpu().float().requires_grad_(True) for x in (i, f, lb)]
    rh, rhl = ref.mlgru_scan(*ref_leaves)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 1.6e-2)
    torch.testing.assert_close(h.cpu().float(), rh, rtol=tol, atol=tol)
    torch.testing.assert_close(h_last.cpu(), rhl, rtol=tol, atol=tol)
    assert (h[0, 1:6].abs().amax(-1) > 0.1).all()  # c_t = silu(i) * 0.75 is there, not 0
    gh = torch.randn(1, t, d, generator=torch.Generator().manual_seed(0))
    torch.autograd.backward([h], [gh.to(dtype).to(device)])
    torch.autograd.backward([rh], [gh.to(dtype).float()])
    for name, ours, want in zip(("i", "f", "lower_bound"), leaves, ref_leaves, strict=True):
        scale = max(1.0, want.grad.abs().max().item())
        torch.testing.assert_close(ours.grad.cpu().float(), want.grad, rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [255, 1021, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ternary_scale_of_a_constant_weight_is_exact(device: str, k: int, dtype: torch.dtype) -> None:
    """Regression (CPU): mean|W| summed in float lanes of 128 sequential adds and drifted
    ~12 ulps on constant rows (fuzz: K = 1021); double lanes make it exact here."""
    for v in (1.415, 0.0371, 3.0e-3):
        w = torch.full((3, k), v, device=device).to(dtype)
        _, scale = mmfree_ext.quantize_ternary(w)
        assert scale.item() == w[0, 0].float().item()
