"""dequantize_rows: x_q * x_scale[..., None] in fp32 rounded once, equal to torch.mul bit for bit."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _codes(rows: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-128, 128, (rows, k), dtype=torch.int8, device=device)
    s = torch.rand(rows, device=device) * 0.05 + 1e-3
    return q, s


def _torch_mul(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.mul(q, s.unsqueeze(-1), out=torch.empty(q.shape, dtype=dtype, device=q.device))


def _assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal bit for bit, NaNs in the same places."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    nan = ref.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan], ref[~nan])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# K % 16 == 0 takes the CUDA vector path (rows then end mid-block); others the element path.
@pytest.mark.parametrize(("rows", "k"), [(1, 1), (37, 100), (5, 6913), (130, 2560), (3, 16), (257, 48)])
def test_matches_torch_mul(device: str, dtype: torch.dtype, rows: int, k: int) -> None:
    q, s = _codes(rows, k, device)
    _assert_same(torch.ops.mmfree.dequantize_rows(q, s, dtype), _torch_mul(q, s, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_nan_and_zero_rows(device: str) -> None:
    """docs/numerics.md: a NaN row (codes 0, scale NaN) dequantizes to NaN, an all-zero row
    (codes 0, the clamped finite scale) to exact zeros; leading dims are kept."""
    q, s = _codes(4 * 6, 2560, device)
    q[1], s[1] = 0, float("nan")
    q[2], s[2] = 0, 1e-5 / 127
    q, s = q.view(4, 6, 2560), s.view(4, 6)
    out = torch.ops.mmfree.dequantize_rows(q, s, torch.bfloat16)
    _assert_same(out, _torch_mul(q, s, torch.bfloat16))
    assert out[0, 1].isnan().all() and (out[0, 2] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("k", [32, 100])
def test_cuda_misaligned_and_empty(k: int) -> None:
    q, s = _codes(9, k, "cuda")
    buf = torch.empty(q.numel() + 1, dtype=torch.int8, device="cuda")
    qm = buf[1:].view(q.shape)  # contiguous, one byte past a 16-byte boundary: the element path
    qm.copy_(q)
    _assert_same(torch.ops.mmfree.dequantize_rows(qm, s, torch.bfloat16), _torch_mul(q, s, torch.bfloat16))
    empty = torch.ops.mmfree.dequantize_rows(q[:0], s[:0], torch.float32)
    assert empty.shape == (0, k) and empty.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    q, s = _codes(6, 130, device)
    torch.library.opcheck(torch.ops.mmfree.dequantize_rows, (q, s, torch.bfloat16))


def test_rejects_bad_input() -> None:
    q, s = _codes(4, 8, "cpu")
    with pytest.raises(RuntimeError, match="'x_q' must have dtype"):
        torch.ops.mmfree.dequantize_rows(q.float(), s, torch.bfloat16)
    with pytest.raises(RuntimeError, match="'x_scale' must have dtype"):
        torch.ops.mmfree.dequantize_rows(q, s.double(), torch.bfloat16)
    with pytest.raises(RuntimeError, match="'x_scale' must have shape"):
        torch.ops.mmfree.dequantize_rows(q, s[:3], torch.bfloat16)
    with pytest.raises(RuntimeError, match="'x_q' must be contiguous"):
        torch.ops.mmfree.dequantize_rows(q.t(), s, torch.bfloat16)
    with pytest.raises(RuntimeError, match="'dtype' must be a floating dtype"):
        torch.ops.mmfree.dequantize_rows(q, s, torch.int32)
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        torch.ops.mmfree.dequantize_rows(q[0, 0], s[0], torch.bfloat16)
