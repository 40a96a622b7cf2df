"""nn.Modules of mmfree-ext: RMSNorm, BitLinear (trainable) and PackedBitLinear (inference).

State-dict keys follow the released MMfreeLM checkpoints (SPEC.md section 3): a BitLinear
holds ``weight`` [out, in] and ``norm.weight`` [in]. A PackedBitLinear holds ``packed``
(uint8 [out, ceil(in/128)*32]), ``w_scale`` (fp32, 0-dim) and ``norm.weight``; it also loads
a state dict with a latent ``weight`` (quantized and packed on load).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers the fake kernels and autograd)
from .ops._common import packed_row_bytes
from .ops.bitlinear import bitlinear

__all__ = ["BitLinear", "PackedBitLinear", "RMSNorm"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale ``weight`` [hidden_size] (no bias).

    Statistics in fp32, output in the input dtype (see :func:`mmfree_ext.reference.rms_norm`).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mmfree.rms_norm(x, self.weight, self.eps)[0]

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class BitLinear(nn.Module):
    """Drop-in BitLinear (MMfreeLM's dense layer): RMSNorm -> int8 x ternary weights.

    Trainable: the latent ``weight`` [out_features, in_features] is ternarized (absmean) on
    every forward, and the backward uses the straight-through estimator. The optional bias
    (off in MMfreeLM) is added after the product. The weight is ternarized and packed once per
    step (the backward reuses it and the saved int8 activations). ``int8_dx=True`` opts into
    the approximate int8 dX product (dY quantized per row to int8, SwitchBack-style);
    ``None`` (default) follows ``MMFREE_BITLINEAR_DX`` ("exact" unless set to "int8").
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        eps: float = 1e-6,
        device: Any = None,
        dtype: Any = None,
        int8_dx: bool | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        self.int8_dx = int8_dx
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.norm = RMSNorm(in_features, eps, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialization for weight and bias; the norm scale starts at 1."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.ones_(self.norm.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = bitlinear(x, self.weight, self.norm.weight, self.eps, self.int8_dx)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def pack(self) -> PackedBitLinear:
        """A frozen PackedBitLinear computing the same forward (bit for bit)."""
        return PackedBitLinear.from_bitlinear(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedBitLinear(nn.Module):
    """Inference BitLinear on 2-bit packed ternary weights (8x fewer bytes than bf16).

    Buffers ``packed`` (uint8) and ``w_scale`` (fp32, 0-dim) are frozen; ``norm.weight`` (and
    the optional ``bias``) stay parameters, so gradients flow to the input and the norm.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        eps: float = 1e-6,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        # Zero codes are weight 0 (code 1 = 0b01 in every bit pair): a fresh layer outputs 0.
        self.register_buffer(
            "packed", torch.full((out_features, packed_row_bytes(in_features)), 0x55, dtype=torch.uint8, device=device)
        )
        self.register_buffer("w_scale", torch.ones((), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.norm = RMSNorm(in_features, eps, device=device, dtype=dtype)

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer: BitLinear) -> PackedBitLinear:
        """Quantize and pack a trained BitLinear (same device and norm dtype)."""
        w = layer.weight.detach()
        out = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.eps, w.device, w.dtype)
        packed, w_scale = torch.ops.mmfree.quantize_ternary(w.contiguous())
        out.packed.copy_(packed)
        out.w_scale.copy_(w_scale)
        out.norm.weight.copy_(layer.norm.weight.detach())
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach())
        return out

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.mmfree.ternary_linear_packed(x, self.packed, self.w_scale, self.norm.weight, self.eps)
        return y if self.bias is None else y + self.bias

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A latent-weight checkpoint (key `weight`, as the released models have) is ternarized
        # and packed here, exactly as BitLinear(...).pack() would.
        key = prefix + "weight"
        if key in state_dict and prefix + "packed" not in state_dict:
            w = state_dict.pop(key)  # type: ignore[attr-defined]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"size mismatch for {key}: expected {(self.out_features, self.in_features)}, got {tuple(w.shape)}"
                )
            else:
                packed, w_scale = torch.ops.mmfree.quantize_ternary(w.to(self.packed.device).contiguous())
                state_dict[prefix + "packed"] = packed  # type: ignore[index]
                state_dict[prefix + "w_scale"] = w_scale  # type: ignore[index]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
