"""The GLU activation ``silu(u[.., :I]) * u[.., I:]`` as one op with a fused backward.

Equals ``F.silu(gate) * v`` in u's dtype (silu rounded to u's dtype, then the product rounded:
the reference's two roundings); the backward forms both input gradients in fp32 and rounds
once. Autograd saves only ``u`` (the gate_proj output that the backward needs anyway): the
sigmoid is recomputed in the backward, which reads u once more instead of keeping a second
[.., I] tensor alive through the whole forward.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["silu_mul"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def silu_mul(u: torch.Tensor) -> torch.Tensor:
    """``silu(u[.., :I]) * u[.., I:]`` for a contiguous float ``u [.., 2I]``; differentiable in u."""
    return torch.ops.mmfree.silu_mul(u)


def _check_u(u: torch.Tensor) -> int:
    torch._check(u.dtype in _FLOATS, lambda: f"mmfree: argument 'u' must be a floating tensor, got {u.dtype}")
    torch._check(
        u.dim() >= 1 and u.shape[-1] % 2 == 0,
        lambda: f"mmfree: argument 'u' must be [..., 2*I] with an even last dim, got shape {tuple(u.shape)}",
    )
    return u.shape[-1] // 2


@torch.library.register_fake("mmfree::silu_mul")
def _silu_mul_fake(u: torch.Tensor) -> torch.Tensor:
    inter = _check_u(u)
    return u.new_empty((*u.shape[:-1], inter))


@torch.library.register_fake("mmfree::silu_mul_backward")
def _silu_mul_backward_fake(grad_y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    inter = _check_u(u)
    torch._check(grad_y.dtype == u.dtype, lambda: f"mmfree: argument 'grad_y' must have dtype {u.dtype}")
    torch._check(
        grad_y.shape == (*u.shape[:-1], inter),
        lambda: f"mmfree: argument 'grad_y' must have shape {(*u.shape[:-1], inter)}, got {tuple(grad_y.shape)}",
    )
    return torch.empty_like(u)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    (u,) = inputs
    ctx.save_for_backward(u)


def _backward(ctx: Any, grad_y: torch.Tensor) -> torch.Tensor:
    (u,) = ctx.saved_tensors
    return torch.ops.mmfree.silu_mul_backward(grad_y.contiguous(), u)


torch.library.register_autograd("mmfree::silu_mul", _backward, setup_context=_setup_context)
