"""rms_norm's CUDA backward: the register path (16-bit / fp32 rows, K a multiple of the 16-byte
vector, K <= 1024 vectors) and the element path it falls back to, against the fp64 truth
with the tolerance rule of test_norm (error <= 2x the CPU reference's + 1 ulp)."""

from __future__ import annotations

import pytest
import torch

import mmfree_ext
from mmfree_ext import reference as ref
from test_norm import EPS, _grads, _misaligned, _norm64, assert_close_to_truth

pytestmark = pytest.mark.cuda

# (rows, K): rows not a multiple of the 8-row partial group; K = 8 (one vector), 100 and 6913
# (no whole vectors: element path), 2560 / 6912 / 8192 (2, 4 vectors per thread), 8200 (past
# the register path's 1024 vectors for 16-bit rows).
SHAPES = [(1, 8), (9, 100), (70, 2560), (17, 6912), (5, 6913), (9, 8192), (3, 8200)]


def _check(rows: int, k: int, dtype: torch.dtype, w_dtype: torch.dtype, residual: bool, misalign: bool) -> None:
    x = torch.randn(rows, k).to(dtype)
    r = torch.randn(rows, k).to(dtype)
    w = (1.0 + 0.5 * torch.randn(k)).to(w_dtype)
    gy, gr = torch.randn(rows, k), torch.randn(rows, k)
    dev = [t.cuda() for t in (x, w, r)]
    if misalign:
        dev = [_misaligned(t) for t in dev]
    if residual:
        ours = _grads(lambda x, w, r: mmfree_ext.rms_norm(x, w, EPS, r), dev, [gy.cuda(), gr.cuda()])
        base = _grads(lambda x, w, r: ref.rms_norm(x, w, EPS, r), [x, w, r], [gy, gr])
        truth = _grads(lambda x, w, r: (_norm64(x + r, w, EPS), x + r), [x.double(), w.double(), r.double()],
                       [gy.double(), gr.double()])  # fmt: skip
    else:
        ours = _grads(lambda x, w: mmfree_ext.rms_norm(x, w, EPS)[0], dev[:2], [gy.cuda()])
        base = _grads(lambda x, w: ref.rms_norm(x, w, EPS)[0], [x, w], [gy])
        truth = _grads(lambda x, w: _norm64(x, w, EPS), [x.double(), w.double()], [gy.double()])
    for o, b, t in zip(ours, base, truth, strict=True):
        assert o.dtype == b.dtype and o.shape == b.shape
        assert_close_to_truth(o, b, t)


@pytest.mark.parametrize(("rows", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_shapes(rows: int, k: int, dtype: torch.dtype) -> None:
    _check(rows, k, dtype, dtype, residual=False, misalign=False)


@pytest.mark.parametrize(("rows", "k"), [(9, 2560), (33, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_residual_fp32_weight(rows: int, k: int, dtype: torch.dtype) -> None:
    """x + residual formed in fp32, grad_residual added, an fp32 norm weight with 16-bit rows."""
    _check(rows, k, dtype, torch.float32, residual=True, misalign=False)


def test_backward_misaligned_takes_the_element_path() -> None:
    _check(11, 2560, torch.bfloat16, torch.bfloat16, residual=True, misalign=True)


def test_backward_nan_and_zero_rows() -> None:
    """A NaN row gives a NaN dx row and NaN dweight (as on the CPU); an all-zero row a finite one."""
    k = 2560
    x = torch.randn(20, k).to(torch.bfloat16)
    x[4] = 0
    x[7, 11] = float("nan")
    w = (1.0 + 0.5 * torch.randn(k)).to(torch.bfloat16)
    gy = torch.randn(20, k).to(torch.bfloat16)
    dx_c, dw_c = torch.ops.mmfree.rms_norm_backward(gy, x, w, EPS, None, None)
    dx_g, dw_g = torch.ops.mmfree.rms_norm_backward(gy.cuda(), x.cuda(), w.cuda(), EPS, None, None)
    assert torch.equal(dx_g.isnan().cpu(), dx_c.isnan()) and torch.equal(dw_g.isnan().cpu(), dw_c.isnan())
    assert dx_g[7].isnan().all() and dw_g.isnan().all()
    assert dx_g[4].isfinite().all()
    torch.testing.assert_close(dx_g[4].cpu().float(), dx_c[4].float(), rtol=1e-2, atol=1e-2)
