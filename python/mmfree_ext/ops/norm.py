"""Fused RMSNorm ops: RMSNorm + int8 quantization, residual add, and the MLGRU swish gate.

Every op equals the function of the same name in :mod:`mmfree_ext.reference` (fp32
statistics, ``xn = (x * rstd) * w``, int8 codes rounded half away from zero). Inputs are
contiguous ``[..., K]`` tensors in float32 / bfloat16 / float16 / float64; norm weights are
``[K]`` in any of those dtypes. float64 inputs of :func:`rms_norm` and
:func:`rms_norm_swish_gate` are computed in fp64 throughout (so ``gradcheck`` is exact);
the quantizing ops round float64 inputs to fp32 first, like the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "rms_norm",
    "rms_norm_quant",
    "rms_norm_quant_multi",
    "rms_norm_swish_gate",
    "rms_norm_swish_gate_quant",
]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _inference_call(*tensors: torch.Tensor | None) -> bool:
    """True when no autograd graph can be needed (and we are not being traced).

    The ops' autograd formulas are Python (torch.library.register_autograd), and entering
    them costs ~8 us per call even under no_grad: as much as the whole kernel for a decode
    row. Inference calls skip that layer, exactly as the autograd kernel itself would
    before redispatching.
    """
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm followed by per-row absmax int8 quantization (the input side of BitLinear).

    Returns ``(x_q, x_scale)``: ``x_q`` int8 of x's shape and ``x_scale`` fp32 of shape
    ``x.shape[:-1]``, the dequantization multiplier ``amax / 127`` (``xn ~ x_q * x_scale``).
    """
    return torch.ops.mmfree.rms_norm_quant(x, weight, eps)


def rms_norm_quant_multi(
    x: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm_quant` for P norm weights sharing one input, in one pass over x.

    ``weights`` is ``[P, K]`` (or a sequence of P ``[K]`` tensors, stacked here). Returns
    ``x_q`` int8 ``[P, *x.shape]`` and ``x_scale`` fp32 ``[P, *x.shape[:-1]]``; slice p equals
    ``rms_norm_quant(x, weights[p], eps)``.
    """
    if not isinstance(weights, torch.Tensor):
        weights = torch.stack(list(weights))
    return torch.ops.mmfree.rms_norm_quant_multi(x, weights, eps)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with an optional fused residual add; differentiable in x, weight, residual.

    Returns ``(y, residual_out)``: ``y = RMSNorm(x + residual) * weight`` in x's dtype, the
    sum formed and normalized in fp32; ``residual_out = x + residual`` rounded to x's dtype
    (the next block's residual). Without ``residual``, ``residual_out`` is a copy of x (a
    custom op's outputs may not alias its inputs). ``residual`` must match x's dtype and shape.
    """
    if _inference_call(x, weight, residual):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.mmfree.rms_norm(x, weight, eps, residual)
    return torch.ops.mmfree.rms_norm(x, weight, eps, residual)


def rms_norm_swish_gate(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MLGRU output gate ``RMSNorm(g) * weight * silu(h)`` in g's dtype (the norm is on g).

    ``h`` must match g's dtype and shape. Differentiable in g, h and weight.
    """
    if _inference_call(g, h, weight):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.mmfree.rms_norm_swish_gate(g, h, weight, eps)
    return torch.ops.mmfree.rms_norm_swish_gate(g, h, weight, eps)


def rms_norm_swish_gate_quant(
    g: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    norm_weight: torch.Tensor,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The swish gate followed by o_proj's RMSNorm + int8 quantization, fused.

    Equals ``rms_norm_quant(rms_norm_swish_gate(g, h, weight, eps), norm_weight, norm_eps)``,
    including the rounding of the gate output to g's dtype (done in registers: the
    intermediate never reaches memory). Forward only.
    """
    return torch.ops.mmfree.rms_norm_swish_gate_quant(g, h, weight, eps, norm_weight, norm_eps)


# ---- fake (meta) kernels -------------------------------------------------------------------


def _check_rows(x: torch.Tensor, name: str) -> int:
    torch._check(x.dtype in _FLOATS, lambda: f"mmfree: argument '{name}' must be a floating tensor, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: f"mmfree: argument '{name}' must have at least 1 dimension [..., K]")
    torch._check(x.shape[-1] >= 1, lambda: f"mmfree: argument '{name}' must have a non-empty last dimension K")
    return x.shape[-1]


def _check_weight(w: torch.Tensor, name: str, k: int) -> None:
    torch._check(w.dtype in _FLOATS, lambda: f"mmfree: argument '{name}' must be a floating tensor, got {w.dtype}")
    torch._check(
        w.dim() == 1 and w.shape[0] == k,
        lambda: f"mmfree: argument '{name}' must be 1-D of size K={k}, got shape {tuple(w.shape)}",
    )


def _check_like(t: torch.Tensor, name: str, x: torch.Tensor, x_name: str) -> None:
    torch._check(t.dtype == x.dtype, lambda: f"mmfree: argument '{name}' must have the dtype of '{x_name}' ({x.dtype})")
    torch._check(
        t.shape == x.shape,
        lambda: f"mmfree: argument '{name}' must have the shape of '{x_name}' {tuple(x.shape)}, got {tuple(t.shape)}",
    )


@torch.library.register_fake("mmfree::rms_norm_quant")
def _rms_norm_quant_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_weight(weight, "weight", _check_rows(x, "x"))
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("mmfree::rms_norm_quant_multi")
def _rms_norm_quant_multi_fake(x: torch.Tensor, weights: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    k = _check_rows(x, "x")
    torch._check(
        weights.dim() == 2 and weights.shape[0] >= 1 and weights.shape[1] == k,
        lambda: f"mmfree: argument 'weights' must be 2-D [P, K] with K={k}, got shape {tuple(weights.shape)}",
    )
    p = weights.shape[0]
    return (
        x.new_empty((p, *x.shape), dtype=torch.int8),
        x.new_empty((p, *x.shape[:-1]), dtype=torch.float32),
    )


@torch.library.register_fake("mmfree::rms_norm")
def _rms_norm_fake(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_weight(weight, "weight", _check_rows(x, "x"))
    if residual is not None:
        _check_like(residual, "residual", x, "x")
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("mmfree::rms_norm_backward")
def _rms_norm_backward_fake(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    grad_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_weight(weight, "weight", _check_rows(x, "x"))
    _check_like(grad_y, "grad_y", x, "x")
    return torch.empty_like(x), torch.empty_like(weight)


@torch.library.register_fake("mmfree::rms_norm_swish_gate")
def _rms_norm_swish_gate_fake(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_weight(weight, "weight", _check_rows(g, "g"))
    _check_like(h, "h", g, "g")
    return torch.empty_like(g)


@torch.library.register_fake("mmfree::rms_norm_swish_gate_backward")
def _rms_norm_swish_gate_backward_fake(
    grad_y: torch.Tensor, g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_weight(weight, "weight", _check_rows(g, "g"))
    _check_like(h, "h", g, "g")
    _check_like(grad_y, "grad_y", g, "g")
    return torch.empty_like(g), torch.empty_like(h), torch.empty_like(weight)


@torch.library.register_fake("mmfree::rms_norm_swish_gate_quant")
def _rms_norm_swish_gate_quant_fake(
    g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float, norm_weight: torch.Tensor, norm_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    k = _check_rows(g, "g")
    _check_like(h, "h", g, "g")
    _check_weight(weight, "weight", k)
    _check_weight(norm_weight, "norm_weight", k)
    return torch.empty_like(g, dtype=torch.int8), g.new_empty(g.shape[:-1], dtype=torch.float32)


# ---- autograd ------------------------------------------------------------------------------


def _rms_norm_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, eps, residual = inputs
    ctx.eps = eps
    ctx.has_residual = residual is not None
    # With a residual, fp32/fp64 inputs keep the one sum residual_out = x + residual (an output
    # the next layer holds anyway, and exactly the sum the statistic was taken from) instead of
    # both summands: one [.., K] tensor less per norm. 16-bit inputs keep both summands: the
    # forward's statistic comes from their fp32 sum, and the 16-bit residual_out would move the
    # gradient by up to 100x torch's own error (tests/test_fuzz_norm.py caught it).
    ctx.sum_saved = residual is not None and x.dtype in (torch.float32, torch.float64)
    if ctx.sum_saved:
        ctx.save_for_backward(output[1], weight, None)
    else:
        ctx.save_for_backward(x, weight, residual)


def _rms_norm_backward(
    ctx: Any, grad_y: torch.Tensor | None, grad_residual_out: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    x, weight, residual = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    grad_res = grad_residual_out.contiguous() if grad_residual_out is not None else None
    dx, dweight = torch.ops.mmfree.rms_norm_backward(grad_y.contiguous(), x, weight, ctx.eps, residual, grad_res)
    # d(x + residual) flows identically into both summands.
    return dx, dweight, None, (dx if ctx.has_residual else None)


torch.library.register_autograd("mmfree::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)


def _swish_gate_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    g, h, weight, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(g, h, weight)


def _swish_gate_backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    g, h, weight = ctx.saved_tensors
    dg, dh, dweight = torch.ops.mmfree.rms_norm_swish_gate_backward(grad_y.contiguous(), g, h, weight, ctx.eps)
    return dg, dh, dweight, None


torch.library.register_autograd("mmfree::rms_norm_swish_gate", _swish_gate_backward, setup_context=_swish_gate_setup)
