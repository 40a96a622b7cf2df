"""Shape rules shared by the op wrappers and their fake (meta) kernels."""

from __future__ import annotations

import torch

#: Weights per packed block along K and bytes per block (csrc/kernels/common/ternary_format.h).
BLOCK_WEIGHTS = 128
BLOCK_BYTES = 32


def packed_row_bytes(in_features: int) -> int:
    """Bytes per output row of a packed ternary tensor: ceil(K / 128) * 32."""
    return (in_features + BLOCK_WEIGHTS - 1) // BLOCK_WEIGHTS * BLOCK_BYTES


def check_packed_shape(packed: torch.Tensor, in_features: int) -> None:
    """Fake-kernel check that ``packed`` matches ``in_features`` (mirrors the C++ check)."""
    torch._check(packed.dtype == torch.uint8, lambda: f"mmfree: argument 'packed' must be uint8, got {packed.dtype}")
    torch._check(packed.dim() == 2, lambda: f"mmfree: argument 'packed' must be 2-D, got {tuple(packed.shape)}")
    torch._check(in_features >= 1, lambda: f"mmfree: argument 'in_features' must be >= 1, got {in_features}")
    torch._check(
        packed.shape[1] == packed_row_bytes(in_features),
        lambda: (
            f"mmfree: argument 'packed' must have {packed_row_bytes(in_features)} bytes per row "
            f"for in_features={in_features}, got shape {tuple(packed.shape)}"
        ),
    )
