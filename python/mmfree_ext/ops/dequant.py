"""Dequantization of per-row int8 activations (the dW operand of BitLinear's backward)."""

from __future__ import annotations

import torch

__all__ = ["dequantize_rows"]

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
