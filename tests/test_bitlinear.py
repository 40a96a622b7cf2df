"""BitLinear training step that quantizes once per step (mmfree::bitlinear_forward/_backward).

The exact path must equal mmfree::ternary_linear / ternary_linear_backward bit for bit (same
kernels, the quantization done once instead of twice); the opt-in int8 dX must equal the
exact backward applied to the row-quantized dY, and its product error must stay inside the
int8 rounding bound.
"""

from __future__ import annotations

import pytest
import torch

import mmfree_ext
from conftest import DEVICES
from mmfree_ext import reference
from mmfree_ext.nn import BitLinear
from mmfree_ext.ops.bitlinear import DX_ENV, bitlinear, int8_dx_default

EPS = 1e-6


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, device: str = "cpu"):
    torch.manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
    g = (1.0 + 0.1 * torch.randn(k, device=device)).to(dtype)
    return x, w, g


def _int8_dx_case(m: int, k: int, n: int, dtype: torch.dtype, device: str):
    """Inputs, a dY, and the saved tensors of a forward with W_q^T packed (the int8 dX needs it):
    (x, w, g, dy, saved) with bitlinear_backward(dy, *saved, int8_dx)."""
    x, w, g = _inputs(m, k, n, dtype, device)
    dy = torch.randn(m, n, device=device).to(dtype)
    _, packed, w_scale, x_q, x_scale, packed_t = torch.ops.mmfree.bitlinear_forward(x, w, g, EPS, True)
    return x, w, g, dy, (x, x_q, x_scale, packed, w_scale, packed_t, g, EPS, w.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_forward_saves_what_the_ops_compute(device: str, dtype: torch.dtype) -> None:
    x, w, g = _inputs(37, 300, 70, dtype, device)
    x = x.reshape(37, 1, 300)
    y, packed, w_scale, x_q, x_scale, packed_t = torch.ops.mmfree.bitlinear_forward(x, w, g, EPS, True)
    assert torch.equal(y, torch.ops.mmfree.ternary_linear(x, w, g, EPS)) and y.dtype == dtype
    ref_packed, ref_scale = torch.ops.mmfree.quantize_ternary(w)
    assert torch.equal(packed, ref_packed) and torch.equal(w_scale, ref_scale)
    xf = x.float() if dtype == torch.float64 else x
    gf = g.float() if dtype == torch.float64 else g
    ref_q, ref_s = torch.ops.mmfree.rms_norm_quant(xf, gf, EPS)
    assert torch.equal(x_q, ref_q) and torch.equal(x_scale, ref_s)
    assert x_q.dtype == torch.int8 and x_q.shape == x.shape and x_scale.shape == (37, 1)
    # packed_t holds exactly W_q^T, packed along N.
    w_codes = torch.ops.mmfree.unpack_ternary(packed, 300)
    assert torch.equal(torch.ops.mmfree.unpack_ternary(packed_t, 70), w_codes.t())
    # Without with_transposed nothing is packed.
    assert torch.ops.mmfree.bitlinear_forward(x, w, g, EPS)[5].shape[0] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_exact_backward_equals_ternary_linear_backward(device: str, dtype: torch.dtype) -> None:
    x, w, g = _inputs(33, 200, 48, dtype, device)
    dy = torch.randn(33, 48, device=device).to(dtype)
    _, packed, w_scale, x_q, x_scale, packed_t = torch.ops.mmfree.bitlinear_forward(x, w, g, EPS)
    ours = torch.ops.mmfree.bitlinear_backward(dy, x, x_q, x_scale, packed, w_scale, packed_t, g, EPS, w.dtype)
    theirs = torch.ops.mmfree.ternary_linear_backward(dy, x, w, g, EPS)
    for name, o, t in zip(("x", "weight", "norm_weight"), ours, theirs, strict=True):
        assert o.dtype == t.dtype and torch.equal(o, t), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_with_no_output_features(device: str, dtype: torch.dtype) -> None:
    """N = 0: dY [M, 0] holds no elements to infer M from; dX and dg are the gradients of an
    empty sum (zeros), through autograd and the explicit backward ops."""
    x, w, g = _inputs(7, 256, 0, dtype, device)
    leaves = [t.clone().requires_grad_() for t in (x, w, g)]
    y = mmfree_ext.ternary_linear(*leaves, EPS)
    assert y.shape == (7, 0)
    y.sum().backward()
    for t in leaves:
        assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))
    dy = torch.empty(7, 0, device=device, dtype=dtype)
    dx, dw, dg = torch.ops.mmfree.ternary_linear_backward(dy, x, w, g, EPS)
    assert torch.equal(dx, torch.zeros_like(x)) and dw.shape == (0, 256) and torch.equal(dg, torch.zeros_like(g))
    packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
    dx, dg = torch.ops.mmfree.ternary_linear_packed_backward(dy, x, packed, w_scale, g, EPS)
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(dg, torch.zeros_like(g))


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_matches_ternary_linear(device: str) -> None:
    x, w, g = _inputs(20, 130, 24, torch.float32, device)
    x = x.reshape(4, 5, 130)
    dy = torch.randn(4, 5, 24, device=device)
    a = [t.clone().requires_grad_() for t in (x, w, g)]
    b = [t.clone().requires_grad_() for t in (x, w, g)]
    ya = bitlinear(*a, EPS, int8_dx=False)
    ya.backward(dy)
    yb = torch.ops.mmfree.ternary_linear(*b, EPS)
    yb.backward(dy)
    assert torch.equal(ya, yb)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta.grad, tb.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dx_is_the_exact_backward_of_the_quantized_dy(device: str, dtype: torch.dtype) -> None:
    x, w, g, dy, args = _int8_dx_case(40, 260, 150, dtype, device)
    dy[3] = 0  # an all-zero row
    dx8, dw8, dg8 = torch.ops.mmfree.bitlinear_backward(dy, *args, True)
    dx, dw, _ = torch.ops.mmfree.bitlinear_backward(dy, *args, False)
    assert torch.equal(dw8, dw)  # dW does not use the quantized dY
    assert dx8.dtype == dtype and dg8.dtype == dtype
    # The exact backward, run in fp32 on the dequantized dY, is what the int8 path computes.
    q, s = reference.quantize_rows_int8(dy)
    dy_deq = q.float() * s.unsqueeze(-1)
    x32, g32 = x.float(), g.float()
    _, p32, ws32, xq32, xs32, pt32 = torch.ops.mmfree.bitlinear_forward(x32, w.float(), g32, EPS)
    want_dx, _, want_dg = torch.ops.mmfree.bitlinear_backward(
        dy_deq, x32, xq32, xs32, p32, ws32, pt32, g32, EPS, w.dtype
    )
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(dx8.float(), want_dx, **tol)
    torch.testing.assert_close(dg8.float(), want_dg.float(), **tol)
    # It is an approximation of the exact dX: close, not equal.
    assert not torch.equal(dx8, dx)
    rel = (dx8.float() - dx.float()).norm() / dx.float().norm()
    assert rel < 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dx_is_its_three_ops_bit_for_bit(device: str, dtype: torch.dtype) -> None:
    """int8 dX = rms_norm_backward(ternary_matmul(quantize_rows_int8(dY), W_q^T)), nothing else."""
    x, _, g, dy, args = _int8_dx_case(48, 320, 264, dtype, device)
    dx8, _, dg8 = torch.ops.mmfree.bitlinear_backward(dy, *args, True)
    packed_t, w_scale = args[5], args[4]
    q, s = torch.ops.mmfree.quantize_rows_int8(dy)
    dxn = torch.ops.mmfree.ternary_matmul(q, s, packed_t, w_scale, dtype)
    want_dx, want_dg = torch.ops.mmfree.rms_norm_backward(dxn, x, g, EPS, None, None)
    assert torch.equal(dx8, want_dx) and torch.equal(dg8, want_dg)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k,n", [(64, 300, 200), (7, 2560, 129)])
def test_int8_dx_product_within_rounding_bound(device: str, m: int, k: int, n: int) -> None:
    """|q(dY) @ W_q^T - dY @ W_q^T| * w_scale <= w_scale * sum_n |W_q[n, k]| * max|dY[m]| / 254 per element
    (each |dY - s q| <= s / 2 = max|dY[m]| / 254), plus fp32 rounding of the two products."""
    _, w, g = _inputs(m, k, n, torch.float32, device)
    dy = torch.randn(m, n, device=device) * torch.logspace(-3, 1, m, device=device).unsqueeze(-1)
    packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
    x = torch.randn(m, k, device=device)
    packed_t = torch.ops.mmfree.bitlinear_forward(x, w, g, EPS, True)[5]
    q, s = reference.quantize_rows_int8(dy)
    approx = torch.ops.mmfree.ternary_matmul(q, s, packed_t, w_scale, torch.float32)
    exact = torch.ops.mmfree.ternary_matmul_t(dy, packed, w_scale, k)
    w_abs = torch.ops.mmfree.unpack_ternary(packed, k).abs().float()  # [N, K]
    bound = w_scale * w_abs.sum(0).unsqueeze(0) * (dy.abs().amax(-1, keepdim=True) / 254.0)
    slack = 1e-5 * (dy.abs() @ w_abs) * w_scale + 1e-30
    assert ((approx - exact).abs() <= bound * (1 + 1e-4) + slack).all()
    assert (approx - exact).abs().max() > 0  # it does round


def test_int8_dx_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, _ = _inputs(16, 96, 40, torch.float32)
    dy = torch.randn(16, 40)

    def grad_x(**kw: object) -> torch.Tensor:
        layer = BitLinear(96, 40, **kw)
        with torch.no_grad():
            layer.weight.copy_(w)
        xl = x.clone().requires_grad_()
        layer(xl).backward(dy)
        return xl.grad

    monkeypatch.delenv(DX_ENV, raising=False)
    assert not int8_dx_default()
    exact = grad_x()
    int8 = grad_x(int8_dx=True)
    assert not torch.equal(exact, int8)
    monkeypatch.setenv(DX_ENV, "int8")
    assert int8_dx_default() and torch.equal(grad_x(), int8)
    assert torch.equal(grad_x(int8_dx=False), exact)  # the argument wins over the env
    monkeypatch.setenv(DX_ENV, "fp8")
    with pytest.raises(ValueError, match=DX_ENV):
        grad_x()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    x, w, g = _inputs(6, 130, 7, torch.float32, device)
    dy = torch.randn(6, 7, device=device)
    xg, wg, gg = (t.clone().requires_grad_() for t in (x, w, g))
    for flag in (False, True):
        torch.library.opcheck(torch.ops.mmfree.bitlinear_forward, (xg, wg, gg, EPS, flag))
        _, packed, w_scale, x_q, x_scale, packed_t = torch.ops.mmfree.bitlinear_forward(x, w, g, EPS, flag)
        torch.library.opcheck(
            torch.ops.mmfree.bitlinear_backward,
            (dy, x, x_q, x_scale, packed, w_scale, packed_t, g, EPS, torch.float32, flag),
        )


@pytest.mark.parametrize("int8_dx", [False, True])
def test_torch_compile_fullgraph(int8_dx: bool) -> None:
    layer = BitLinear(96, 64, int8_dx=int8_dx)
    x = torch.randn(3, 5, 96)
    compiled = torch.compile(layer, fullgraph=True)
    y_comp = compiled(x)
    y_eager = layer(x)
    assert torch.equal(y_comp, y_eager)
    y_comp.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    y_eager.sum().backward()
    for gc, ge in zip(grads, (p.grad for p in layer.parameters()), strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


def test_rejects_bad_input() -> None:
    x, w, g = _inputs(6, 130, 7, torch.float32)
    dy = torch.randn(6, 7)
    _, packed, w_scale, x_q, x_scale, packed_t = torch.ops.mmfree.bitlinear_forward(x, w, g, EPS)
    with pytest.raises(RuntimeError, match="packed_t"):  # int8 dX without the transposed pack
        torch.ops.mmfree.bitlinear_backward(dy, x, x_q, x_scale, packed, w_scale, packed_t, g, EPS, torch.float32, True)
    with pytest.raises(RuntimeError, match="x_q"):
        torch.ops.mmfree.bitlinear_backward(
            dy, x, x_q.float(), x_scale, packed, w_scale, packed_t, g, EPS, torch.float32, False
        )
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.mmfree.bitlinear_backward(
            dy[:, :5], x, x_q, x_scale, packed, w_scale, packed_t, g, EPS, torch.float32
        )
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.mmfree.bitlinear_forward(x, w[:, :100], g, EPS)
    with pytest.raises(RuntimeError, match="weight_dtype"):
        torch.ops.mmfree.bitlinear_backward(dy, x, x_q, x_scale, packed, w_scale, packed_t, g, EPS, torch.int32)


@pytest.mark.cuda
@pytest.mark.parametrize("gemm", ["mma", "sm90"])
@pytest.mark.parametrize("m,k,n", [(300, 640, 2560), (1024, 2560, 8192)])
def test_cuda_int8_dx_equals_cpu(monkeypatch: pytest.MonkeyPatch, gemm: str, m: int, k: int, n: int) -> None:
    """The transposed pack and the int8 dX product on CUDA (each GEMM kernel forced) equal the
    CPU's exactly (int32 accumulators, same rescale); dX after the norm backward to fp32 noise."""
    sm90 = torch.cuda.get_device_capability() == (9, 0) and any(
        a.startswith("90") for a in mmfree_ext.build_info()["cuda_archs"]
    )
    if gemm == "sm90" and not sm90:
        pytest.skip("the wgmma kernel needs an sm_90 GPU and a build with arch 90")
    monkeypatch.setenv("MMFREE_TERNARY_GEMM", gemm)
    x, w, g = _inputs(m, k, n, torch.float32)
    dy = torch.randn(m, n)
    outs = {}
    # mean|W| is summed in another order on each device, so w_scale may differ by an ulp: the
    # product is compared on the same int8 dY and the same scales (the CPU's), exactly.
    q, s = reference.quantize_rows_int8(dy)
    w_scale = torch.ops.mmfree.bitlinear_forward(x, w, g, EPS, True)[2]
    for dev in ("cpu", "cuda"):
        xd, wd, gd, dyd = (t.to(dev) for t in (x, w, g, dy))
        fwd = torch.ops.mmfree.bitlinear_forward(xd, wd, gd, EPS, True)
        prod = torch.ops.mmfree.ternary_matmul(q.to(dev), s.to(dev), fwd[5], w_scale.to(dev), torch.float32)
        saved = (xd, fwd[3], fwd[4], fwd[1], fwd[2], fwd[5], gd, EPS, torch.float32)
        outs[dev] = (fwd[5].cpu(), prod.cpu(), torch.ops.mmfree.bitlinear_backward(dyd, *saved, True)[0].cpu(), fwd[2])
    assert torch.equal(outs["cpu"][0], outs["cuda"][0])
    torch.testing.assert_close(outs["cuda"][3].cpu(), outs["cpu"][3], rtol=2.5e-7, atol=0)
    assert torch.equal(outs["cpu"][1], outs["cuda"][1])
    torch.testing.assert_close(outs["cuda"][2], outs["cpu"][2], rtol=1e-4, atol=1e-5)
