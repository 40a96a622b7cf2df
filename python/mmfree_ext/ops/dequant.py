"""Per-row int8 (de)quantization passes of BitLinear's backward: the int8 activations back to a
float dtype (the dW operand), and a gradient to int8 per row (the opt-in int8 dX's dY)."""

from __future__ import annotations

import torch

__all__ = ["dequantize_rows", "quantize_rows_int8"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def dequantize_rows(x_q: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x_q * x_scale[..., None]`` in ``dtype``: the product in fp32, rounded once.

    ``x_q`` is a contiguous int8 ``[..., K]`` tensor and ``x_scale`` fp32 of shape
    ``x_q.shape[:-1]`` (what :func:`mmfree_ext.ops.rms_norm_quant` returns). Equal bit for bit
    to ``torch.mul(x_q, x_scale[..., None], out=torch.empty(..., dtype=dtype))``; on CUDA one
    vectorized pass (16-byte loads and stores).
    """
    return torch.ops.mmfree.dequantize_rows(x_q, x_scale, dtype)


@torch.library.register_fake("mmfree::dequantize_rows")
def _dequantize_rows_fake(x_q: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    torch._check(x_q.dtype == torch.int8, lambda: f"mmfree: argument 'x_q' must have dtype int8, got {x_q.dtype}")
    torch._check(x_q.dim() >= 1, lambda: "mmfree: argument 'x_q' must have at least 1 dimension [..., K]")
    torch._check(
        x_scale.dtype == torch.float32,
        lambda: f"mmfree: argument 'x_scale' must have dtype float32, got {x_scale.dtype}",
    )
    torch._check(
        x_scale.shape == x_q.shape[:-1],
        lambda: f"mmfree: argument 'x_scale' must have shape {tuple(x_q.shape[:-1])}, got {tuple(x_scale.shape)}",
    )
    torch._check(dtype in _FLOATS, lambda: f"mmfree: argument 'dtype' must be a floating dtype, got {dtype}")
    return torch.empty_like(x_q, dtype=dtype)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 codes of ``x [..., N]`` (float32, bfloat16 or float16).

    Returns ``(q, scale)``: ``q`` int8 of ``x``'s shape, ``scale`` fp32 of shape ``x.shape[:-1]``,
    with ``scale = max|x| / 127`` per row (1 where that is 0: an all-zero row, or fp32
    subnormals small enough to underflow it) and
    ``q = round_half_even(x / scale)`` in ``[-127, 127]``; a row holding a NaN or an inf gets
    ``scale`` NaN and codes 0. Equal bit for bit to :func:`mmfree_ext.reference.quantize_rows_int8`.
    On CUDA one kernel (one block per row); it is the dY side of ``bitlinear(..., int8_dx=True)``.
    """
    return torch.ops.mmfree.quantize_rows_int8(x)


@torch.library.register_fake("mmfree::quantize_rows_int8")
def _quantize_rows_int8_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(
        x.dtype in (torch.float32, torch.bfloat16, torch.float16),
        lambda: f"mmfree: argument 'x' must have dtype float32, bfloat16 or float16, got {x.dtype}",
    )
    torch._check(x.dim() >= 1, lambda: "mmfree: argument 'x' must have at least 1 dimension [..., N]")
    return torch.empty(x.shape, dtype=torch.int8, device=x.device), x.new_empty(x.shape[:-1], dtype=torch.float32)
