"""The one place where the model layer calls the mmfree ops.

Every compute step of :class:`~mmfree_ext.models.modeling.MMfreeLMForCausalLM` goes through a
function here, so the model file reads as the math of SPEC section 2 and the op signatures
live in one spot. Two paths:

* training / latent weights: BitLinear's ``ternary_linear`` (STE autograd), ``mlgru_scan``, the
  fused RMSNorm (+ residual add), output gate and GLU ``silu_mul`` ops (all with autograd), and
  the lm_head fused with the cross entropy (``ternary_linear_cross_entropy``);
* inference / packed weights: fused RMSNorm + int8 quantization feeding ``ternary_matmul``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.glu import silu_mul_ternary_linear
from ..ops.loss import ternary_linear_cross_entropy

mm = torch.ops.mmfree


# ----------------------------------------------------------------------------------------
# Training path (differentiable)
# ----------------------------------------------------------------------------------------


def layer_lower_bounds(lower_bounds: Tensor) -> Tensor:
    """Per-layer forget-gate lower bounds fp32 ``[L, h]``: ``lb = softmax(lower_bounds, 0)``,
    ``cumsum(lb, 0) - lb[0]`` (SPEC section 2; row 0 is exactly 0).

    The softmax over the layer axis runs on the transposed tensor: torch's CPU softmax over a
    non-last dim of a small [L, h] tensor takes milliseconds, more than a whole decode step.
    """
    lb = torch.softmax(lower_bounds.float().t(), dim=-1).t()
    return torch.cumsum(lb, dim=0) - lb[0]


def swish_gate(g: Tensor, h: Tensor, weight: Tensor, eps: float) -> Tensor:
    """MLGRU output gate ``RMSNorm(g) * w * silu(h)`` (fp32 inside, g's dtype out), with autograd."""
    return mm.rms_norm_swish_gate(g, h, weight, eps)


def silu_mul(u: Tensor) -> Tensor:
    """The GLU's ``silu(u[.., :I]) * u[.., I:]`` in u's dtype, fused, with autograd."""
    return mm.silu_mul(u)


def glu_down(u: Tensor, weight: Tensor, norm_weight: Tensor, eps: float) -> Tensor:
    """down_proj(silu_mul(u)) on latent weights; autograd keeps u, not the [.., I] activation."""
    return silu_mul_ternary_linear(u, weight, norm_weight, eps)


def bit_linear_cross_entropy(x: Tensor, weight: Tensor, norm_weight: Tensor, labels: Tensor, eps: float) -> Tensor:
    """Mean cross entropy of the BitLinear lm_head's logits against ``labels`` (-100 ignored),
    chunked over rows: the fp32 ``[rows, V]`` logits are never formed for all rows at once."""
    return ternary_linear_cross_entropy(x, weight, norm_weight, labels, eps)


def bit_linear_train(x: Tensor, weight: Tensor, norm_weight: Tensor, eps: float) -> Tensor:
    """BitLinear on latent weights (quantized forward, straight-through backward)."""
    return mm.ternary_linear(x, weight, norm_weight, eps)


def mlgru_scan(
    i: Tensor,
    f: Tensor,
    lower_bound: Tensor | None,
    h0: Tensor | None,
    mask: Tensor | None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MLGRU recurrence (returns ``h [B, T, D]`` and the fp32 state ``h_last [B, D]``; with
    ``cu_seqlens``, B == 1 and the state restarts at every offset, ``h_last [S, D]``)."""
    return mm.mlgru_scan(i, f, lower_bound, h0, mask, cu_seqlens)


# ----------------------------------------------------------------------------------------
# Inference path (packed weights, fused quantization)
# ----------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(RMSNorm(x + residual), x + residual)``; the sum is what the next residual add reads."""
    return mm.rms_norm(x, weight, eps, residual)


def rms_norm_quant(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm then per-row int8 quantization: ``(x_q int8, x_scale fp32)``."""
    return mm.rms_norm_quant(x, weight, eps)


def rms_norm_quant_multi(x: Tensor, weights: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`rms_norm_quant` for ``P`` norm weights ``[P, K]`` sharing one rstd: ``[P, ..]`` outputs."""
    return mm.rms_norm_quant_multi(x, weights, eps)


def swish_gate_quant(
    g: Tensor, h: Tensor, weight: Tensor, eps: float, norm_weight: Tensor, norm_eps: float
) -> tuple[Tensor, Tensor]:
    """MLGRU output gate fused with the o_proj's input RMSNorm and int8 quantization."""
    return mm.rms_norm_swish_gate_quant(g, h, weight, eps, norm_weight, norm_eps)


def ternary_matmul(x_q: Tensor, x_scale: Tensor, packed: Tensor, w_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``(acc * x_scale[row]) * w_scale`` with ``acc = x_q @ W_q^T`` exact in int32."""
    return mm.ternary_matmul(x_q, x_scale, packed, w_scale, out_dtype)


def ternary_matmul_grouped(
    x_q: Tensor, x_scale: Tensor, packed: list[Tensor], w_scale: list[Tensor], out_dtype: torch.dtype
) -> Tensor:
    """``ternary_matmul`` of group ``g`` of ``x_q [G, ..., K]`` with ``packed[g]``; one GEMV
    launch for all groups at decode sizes (the MLGRU's i/f/g projections)."""
    return mm.ternary_matmul_grouped(x_q, x_scale, packed, w_scale, out_dtype)


def bit_linear_packed(x: Tensor, packed: Tensor, w_scale: Tensor, norm_weight: Tensor, eps: float) -> Tensor:
    """Inference BitLinear on packed 2-bit weights, output in x's dtype."""
    return mm.ternary_linear_packed(x, packed, w_scale, norm_weight, eps)


def quantize_ternary(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Ternarize + pack a latent weight: ``(packed uint8, w_scale 0-dim fp32)``."""
    return mm.quantize_ternary(weight)
