"""Ternary weight packing: quantize_ternary / unpack_ternary (format: docs/packed_format.md)."""

from __future__ import annotations

import torch

from ._common import check_packed_shape, packed_row_bytes

__all__ = ["quantize_ternary", "unpack_ternary"]


def quantize_ternary(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarize a latent float weight [N, K] (absmean scale) and pack it to 2 bits.

    Returns ``(packed, scale)``: ``packed`` is uint8 [N, ceil(K/128)*32] in the canonical
    format and ``scale`` a 0-dim fp32 tensor, the dequantization multiplier mean(|W|).
    """
    return torch.ops.mmfree.quantize_ternary(weight)


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Decode packed ternary codes back to int8 weights [N, in_features] in {-1, 0, +1}."""
    return torch.ops.mmfree.unpack_ternary(packed, in_features)


@torch.library.register_fake("mmfree::quantize_ternary")
def _quantize_ternary_fake(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(weight.dim() == 2, lambda: f"mmfree: argument 'weight' must be 2-D, got {tuple(weight.shape)}")
    torch._check(
        weight.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64),
        lambda: f"mmfree: argument 'weight' must be a floating tensor, got {weight.dtype}",
    )
    rows, k = weight.shape
    packed = weight.new_empty((rows, packed_row_bytes(k)), dtype=torch.uint8)
    return packed, weight.new_empty((), dtype=torch.float32)


@torch.library.register_fake("mmfree::unpack_ternary")
def _unpack_ternary_fake(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    check_packed_shape(packed, in_features)
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.int8)
