"""The GLU activation op mmfree::silu_mul (and its backward) on CPU and CUDA.

The forward reproduces ``F.silu(gate) * v`` in u's dtype (the same two roundings); the
gradients follow STYLE.md's rule: their error against float64 autograd is at most twice that
of torch's own autograd in u's dtype, plus one ulp.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmfree_ext  # noqa: F401
from conftest import DEVICES
from mmfree_ext.ops import silu_mul

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# I = 1 and 3: the scalar CUDA kernel; 8, 64, 1000: the 16-byte vector kernel (bf16/fp32).
SHAPES = [(3, 2), (2, 5, 6), (4, 16), (7, 128), (3, 2000)]


def _torch_glu(u: torch.Tensor) -> torch.Tensor:
    gate, v = u.chunk(2, dim=-1)
    return F.silu(gate) * v


def _grad(fn, u: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    u = u.detach().clone().requires_grad_()
    fn(u).backward(dy)
    return u.grad


def _assert_close_to_truth(out, base, truth, what: str) -> None:
    out64, base64, truth64 = out.cpu().double(), base.cpu().double(), truth.cpu().double()
    assert torch.isfinite(out64).all(), what
    err = (out64 - truth64).abs().max().item()
    base_err = (base64 - truth64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * truth64.abs().max().item()
    assert err <= 2 * base_err + ulp, f"{what}: error {err:.3g} vs torch error {base_err:.3g} (ulp {ulp:.3g})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_torch(device, dtype, shape):
    u = (torch.randn(shape, device=device) * 3).to(dtype)
    y = silu_mul(u)
    want = _torch_glu(u)
    assert y.dtype == dtype and y.shape == want.shape
    if dtype == torch.float64:
        torch.testing.assert_close(y, want, rtol=1e-14, atol=1e-14)
    else:  # same two roundings; silu's fp32 exp may differ from torch's by an ulp
        _assert_close_to_truth(y, want, _torch_glu(u.double()), "y")
    dy = torch.randn(want.shape, device=device).to(dtype)
    got = _grad(silu_mul, u, dy)
    base = _grad(_torch_glu, u, dy)
    truth = _grad(_torch_glu, u.double(), dy.double())
    assert got.dtype == dtype and got.shape == u.shape
    _assert_close_to_truth(got, base, truth, "du")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_opcheck(device):
    u = torch.randn(3, 10, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (u,))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 32, device=device, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.mmfree.silu_mul.default, (x,))
        torch.library.opcheck(
            torch.ops.mmfree.silu_mul_backward.default, (torch.randn(4, 16, device=device).to(dtype), x.detach())
        )


def test_empty_rows():
    assert silu_mul(torch.empty(0, 8)).shape == (0, 4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(2, 5),), "even last dim"),
        ((torch.randn(4, 6).t(),), "must be contiguous"),
        ((torch.ones(2, 4, dtype=torch.int32),), "must be a floating tensor"),
    ],
)
def test_bad_arguments_name_the_argument(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mmfree.silu_mul(*args)


def test_backward_checks_grad_shape_and_dtype():
    u = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="'grad_y' must have shape"):
        torch.ops.mmfree.silu_mul_backward(torch.randn(2, 3), u)
    with pytest.raises(RuntimeError, match="'grad_y' must have dtype"):
        torch.ops.mmfree.silu_mul_backward(torch.randn(2, 4, dtype=torch.float64), u)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_ternary_linear_equals_the_two_ops(device, dtype):
    from mmfree_ext.ops import silu_mul_ternary_linear, ternary_linear

    u = torch.randn(2, 5, 2 * 72, device=device).to(dtype)
    w = (torch.randn(40, 72, device=device) * 0.05).to(dtype)
    nw = (1 + 0.2 * torch.randn(72, device=device)).to(dtype)
    dy = torch.randn(2, 5, 40, device=device).to(dtype)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (u, w, nw)]
        out = fn(*leaves)
        out.backward(dy)
        return [out.detach()] + [t.grad for t in leaves]

    fused = run(lambda a, b, c: silu_mul_ternary_linear(a, b, c, 1e-6))
    plain = run(lambda a, b, c: ternary_linear(silu_mul(a), b, c, 1e-6))
    for f, p in zip(fused, plain, strict=True):
        torch.testing.assert_close(f, p, rtol=0, atol=0)
    args = (u.requires_grad_(), w.requires_grad_(), nw.requires_grad_(), 1e-6)
    torch.library.opcheck(torch.ops.mmfree.silu_mul_ternary_linear.default, args)
