"""quantize_rows_int8: per-row absmax int8 codes of a gradient, equal bit for bit to the reference."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from mmfree_ext import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    (q, s), (wq, ws) = got, want
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == wq.shape and s.shape == ws.shape
    assert torch.equal(q, wq)
    assert torch.equal(s.isnan(), ws.isnan())
    assert torch.equal(s[~ws.isnan()], ws[~ws.isnan()])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# cols a multiple of the 16-byte vector (8 bf16/fp16, 4 fp32) take the CUDA vector path,
# the others (100 for 16-bit dtypes, 6913, 1) the element path.
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (37, 100), (5, 6913), (130, 2560), (3, 16), (9, 13824)])
def test_matches_reference(device: str, dtype: torch.dtype, rows: int, cols: int) -> None:
    # Scales over six decades, so rows differ in their max and ties of x / s appear.
    x = (torch.randn(rows, cols, device=device) * torch.logspace(-3, 3, rows, device=device).unsqueeze(-1)).to(dtype)
    _assert_same(torch.ops.mmfree.quantize_rows_int8(x), reference.quantize_rows_int8(x))


@pytest.mark.parametrize("device", DEVICES)
def test_rounding_ties_go_to_even(device: str) -> None:
    # max 127 -> s = 1 exactly, so x / s is x: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, -127.0]], device=device)
    q, s = torch.ops.mmfree.quantize_rows_int8(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, -2, 0, 4, -127]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_nan_inf_rows_and_leading_dims(device: str, dtype: torch.dtype) -> None:
    """docs/numerics.md: an all-zero row gets scale 1 and codes 0; a row holding a NaN or an
    inf gets scale NaN and codes 0 (its dX comes out NaN, never a finite guess)."""
    x = torch.randn(2, 4, 64, device=device).to(dtype)
    x[0, 1] = 0
    x[0, 2, 5] = float("nan")
    x[1, 3, 63] = float("-inf")
    q, s = torch.ops.mmfree.quantize_rows_int8(x)
    _assert_same((q, s), reference.quantize_rows_int8(x))
    assert s.shape == (2, 4) and q.shape == x.shape
    assert s[0, 1] == 1.0 and (q[0, 1] == 0).all()
    assert s[0, 2].isnan() and (q[0, 2] == 0).all()
    assert s[1, 3].isnan() and (q[1, 3] == 0).all()
    assert torch.isfinite(s[0, 0]) and q[0, 0].abs().max() == 127


@pytest.mark.parametrize("device", DEVICES)
def test_subnormal_rows(device: str) -> None:
    """fp32 subnormals: a row whose max / 127 underflows to 0 takes scale 1 and codes 0 (as a
    zero row; its values are below 1e-43); a row of larger subnormals keeps its own scale."""
    tiny = torch.tensor([[8e-44, 0.0, -5e-44, 1.4e-45], [1e-39, -3e-40, 0.0, 2e-41]], device=device)
    q, s = torch.ops.mmfree.quantize_rows_int8(tiny)
    _assert_same((q, s), reference.quantize_rows_int8(tiny))
    assert s[0] == 1.0 and (q[0] == 0).all()
    assert 0 < s[1] < 1e-40 and q[1, 0] == 127 and q[1, 2] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_dequantized_within_half_a_step(device: str) -> None:
    x = torch.randn(33, 300, device=device)
    q, s = torch.ops.mmfree.quantize_rows_int8(x)
    err = (q.float() * s.unsqueeze(-1) - x).abs()
    # s / 2 plus the fp32 rounding of q * s (|q| <= 127: up to 127 * 2^-24 of s).
    assert (err <= s.unsqueeze(-1) * (0.5 + 2e-5)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_non_contiguous(device: str) -> None:
    q, s = torch.ops.mmfree.quantize_rows_int8(torch.empty(0, 8, device=device))
    assert q.shape == (0, 8) and s.shape == (0,)
    q, s = torch.ops.mmfree.quantize_rows_int8(torch.empty(3, 0, device=device))
    assert q.shape == (3, 0) and torch.equal(s, torch.ones(3, device=device))
    x = torch.randn(40, 24, device=device)
    _assert_same(torch.ops.mmfree.quantize_rows_int8(x.t()), reference.quantize_rows_int8(x.t()))


@pytest.mark.cuda
def test_cuda_misaligned_takes_the_element_path() -> None:
    x = torch.randn(9, 64, device="cuda", dtype=torch.bfloat16)
    buf = torch.empty(x.numel() + 1, device="cuda", dtype=torch.bfloat16)
    xm = buf[1:].view(x.shape)  # 2 bytes past a 16-byte boundary
    xm.copy_(x)
    _assert_same(torch.ops.mmfree.quantize_rows_int8(xm), reference.quantize_rows_int8(x))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    x = torch.randn(6, 130, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.mmfree.quantize_rows_int8, (x,))


def test_rejects_bad_input() -> None:
    with pytest.raises(RuntimeError, match="'x' must have dtype float32, bfloat16 or float16"):
        torch.ops.mmfree.quantize_rows_int8(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="'x' must have dtype"):
        torch.ops.mmfree.quantize_rows_int8(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        torch.ops.mmfree.quantize_rows_int8(torch.tensor(1.0))
