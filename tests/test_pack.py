"""quantize_ternary / unpack_ternary: the canonical packed format on CPU and CUDA."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from mmfree_ext import reference as ref

K_GRID = [1, 3, 4, 5, 127, 128, 1000, 2560]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", K_GRID)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference(device: str, k: int, dtype: torch.dtype) -> None:
    w = torch.randn(37, k, device=device).to(dtype)
    packed, scale = torch.ops.mmfree.quantize_ternary(w)
    assert packed.dtype == torch.uint8 and packed.shape == (37, ref.packed_row_bytes(k))
    assert scale.dtype == torch.float32 and scale.dim() == 0
    # The scale is a mean: its summation order may differ from torch's in the last ulp.
    _, ref_scale = ref.ternarize(w.cpu())
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    # Given the kernel's own scale, the codes must be exactly the reference's.
    w_q = torch.clamp(ref.round_half_away(w.cpu().float() * (1.0 / scale.cpu())), -1, 1).to(torch.int8)
    assert torch.equal(packed.cpu(), ref.pack_ternary(w_q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", K_GRID)
def test_unpack_round_trip(device: str, k: int) -> None:
    w_q = torch.randint(-1, 2, (19, k), dtype=torch.int8)
    packed = ref.pack_ternary(w_q).to(device)
    out = torch.ops.mmfree.unpack_ternary(packed, k)
    assert out.device.type == device
    assert torch.equal(out.cpu(), w_q)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_then_unpack_is_ternarize(device: str) -> None:
    w = torch.randn(64, 300, device=device)
    packed, scale = torch.ops.mmfree.quantize_ternary(w)
    w_q, ref_scale = ref.ternarize(w.cpu())
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(torch.ops.mmfree.unpack_ternary(packed, 300).cpu(), w_q)


@pytest.mark.cuda
def test_cpu_and_cuda_pack_identically() -> None:
    w = torch.randn(129, 2560)
    p_cpu, s_cpu = torch.ops.mmfree.quantize_ternary(w)
    p_gpu, s_gpu = torch.ops.mmfree.quantize_ternary(w.cuda())
    assert torch.equal(s_cpu, s_gpu.cpu())
    assert torch.equal(p_cpu, p_gpu.cpu())


def test_zero_weight_scale_floor() -> None:
    packed, scale = torch.ops.mmfree.quantize_ternary(torch.zeros(3, 5))
    assert scale.item() == pytest.approx(1e-5)
    assert torch.equal(torch.ops.mmfree.unpack_ternary(packed, 5), torch.zeros(3, 5, dtype=torch.int8))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    w = torch.randn(8, 200, device=device)
    torch.library.opcheck(torch.ops.mmfree.quantize_ternary, (w,))
    packed, _ = torch.ops.mmfree.quantize_ternary(w)
    torch.library.opcheck(torch.ops.mmfree.unpack_ternary, (packed, 200))


# ---- bad input ---------------------------------------------------------------------------


def test_quantize_rejects_bad_input() -> None:
    with pytest.raises(RuntimeError, match="'weight' must be a floating tensor"):
        torch.ops.mmfree.quantize_ternary(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="'weight' must be 2-D"):
        torch.ops.mmfree.quantize_ternary(torch.ones(2, 3, 4))
    with pytest.raises(RuntimeError, match="'weight' must be contiguous"):
        torch.ops.mmfree.quantize_ternary(torch.ones(4, 6).t())
    with pytest.raises(RuntimeError, match="in_features >= 1"):
        torch.ops.mmfree.quantize_ternary(torch.ones(4, 0))


def test_unpack_rejects_bad_input() -> None:
    good = ref.pack_ternary(torch.zeros(2, 130, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="'packed' must have dtype"):
        torch.ops.mmfree.unpack_ternary(good.to(torch.int8), 130)
    with pytest.raises(RuntimeError, match="96 bytes per row"):
        torch.ops.mmfree.unpack_ternary(good, 300)
    with pytest.raises(RuntimeError, match="'in_features' must be >= 1"):
        torch.ops.mmfree.unpack_ternary(good, 0)
    with pytest.raises(RuntimeError, match="'packed' must be contiguous"):
        torch.ops.mmfree.unpack_ternary(torch.cat([good, good], 1)[:, ::2], 130)
    corrupt = good.clone()
    corrupt[0, 0] = 0xFF  # code 3
    with pytest.raises(RuntimeError, match="invalid 2-bit code"):
        torch.ops.mmfree.unpack_ternary(corrupt, 130)
    corrupt = good.clone()
    corrupt[1, 63] = 0x00  # a -1 in the padding (k >= 130)
    with pytest.raises(RuntimeError, match="invalid 2-bit code"):
        torch.ops.mmfree.unpack_ternary(corrupt, 130)


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("rows", "k", "dtype"),
    [
        (2048, 2560, torch.bfloat16),  # the abs-sum's 4-load loop, then its one-load tail
        (1024, 4096, torch.float32),  # the fp32 pack path (two 16-byte loads per run of 8)
        (1031, 6913, torch.float16),  # K not whole blocks: the element pack path
    ],
)
def test_cuda_packs_large_weights_as_cpu(rows: int, k: int, dtype: torch.dtype) -> None:
    """The vectorized CUDA passes (unrolled abs-sum, pair-of-words pack run back to front)
    give the CPU's scale and bytes exactly, also with an all-zero row and a NaN weight."""
    w = (torch.randn(rows, k) * 0.02).to(dtype)
    w[3] = 0
    w_nan = w.clone()
    w_nan[5, k - 1] = float("nan")
    for case in (w, w_nan):
        p_cpu, s_cpu = torch.ops.mmfree.quantize_ternary(case)
        p_gpu, s_gpu = torch.ops.mmfree.quantize_ternary(case.cuda())
        assert torch.equal(s_cpu, s_gpu.cpu()) or (s_cpu.isnan() and s_gpu.isnan().item())
        assert torch.equal(p_cpu, p_gpu.cpu())
