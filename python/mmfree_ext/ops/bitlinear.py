"""BitLinear training step that ternarizes and packs the latent weight once per step.

* :func:`bitlinear` - the training BitLinear (RMSNorm -> int8 activations x absmean-ternary
  weight) whose forward saves the packed weight, its scale and the int8 activations
  ``x_q`` + ``x_scale`` for the backward; the backward re-quantizes nothing.
* dX is exact by default (bf16 tensor cores on CUDA, exact ternary products, fp32
  accumulation). ``int8_dx=True`` (or ``MMFREE_BITLINEAR_DX=int8``) quantizes dY per row to
  int8 (absmax / 127, SwitchBack-style) and runs the int8 ternary GEMM against ``W_q^T``
  (packed once per step as well): an approximation whose elementwise error on
  ``dY @ (W_q * w_scale)`` is at most ``w_scale * sum_n |W_q[n, k]| * max_n |dY[m, n]| / 254``.

Memory: the saved ``x_q`` is 1 byte per activation (+4 bytes per row), half of the bf16 ``x``
that ``nn.Linear`` keeps; recomputing it in the backward would cost another RMSNorm + quant
pass over ``x`` (benchmarks/NOTES.md, issue 11 scope 2).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ._common import packed_row_bytes

__all__ = ["DX_ENV", "bitlinear", "int8_dx_default"]

#: Environment variable choosing the default dX product: "exact" (default) or "int8".
DX_ENV = "MMFREE_BITLINEAR_DX"


def int8_dx_default() -> bool:
    """Whether ``MMFREE_BITLINEAR_DX`` asks for the int8 dX ("int8"); "exact" or unset: no."""
    value = os.environ.get(DX_ENV, "exact")
    if value not in ("exact", "int8"):
        raise ValueError(f"mmfree: {DX_ENV} must be 'exact' or 'int8', got {value!r}")
    return value == "int8"


def bitlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float = 1e-6,
    int8_dx: bool | None = None,
) -> torch.Tensor:
    """Training BitLinear ``[..., K] -> [..., N]`` on a latent float ``weight`` [N, K].

    Same values and gradients as :func:`mmfree_ext.ternary_linear` (STE, SPEC.md section 1),
    with the weight quantized once per step. ``int8_dx``: int8 dY x ternary dX product
    (approximate); ``None`` reads ``MMFREE_BITLINEAR_DX``.
    """
    if int8_dx is None:
        int8_dx = int8_dx_default()
    return torch.ops.mmfree.bitlinear_forward(x, weight, norm_weight, eps, bool(int8_dx))[0]


# ---- fake kernels ---------------------------------------------------------------------------


@torch.library.register_fake("mmfree::bitlinear_forward")
def _bitlinear_forward_fake(
    x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float, with_transposed: bool = False
) -> tuple[torch.Tensor, ...]:
    torch._check(x.dim() >= 1, lambda: "mmfree: argument 'x' must have at least 1 dim [..., K]")
    k = x.shape[-1]
    torch._check(
        weight.dim() == 2 and weight.shape[1] == k,
        lambda: f"mmfree: argument 'weight' must be [N, K] with K={k}, got {tuple(weight.shape)}",
    )
    torch._check(
        norm_weight.dim() == 1 and norm_weight.shape[0] == k,
        lambda: f"mmfree: argument 'norm_weight' must have K={k} elements, got {tuple(norm_weight.shape)}",
    )
    n = weight.shape[0]
    y = x.new_empty((*x.shape[:-1], n))
    packed = x.new_empty((n, packed_row_bytes(k)), dtype=torch.uint8)
    w_scale = x.new_empty((), dtype=torch.float32)
    x_q = x.new_empty(x.shape, dtype=torch.int8)
    x_scale = x.new_empty(x.shape[:-1], dtype=torch.float32)
    packed_t = x.new_empty((k if with_transposed else 0, packed_row_bytes(max(n, 1))), dtype=torch.uint8)
    return y, packed, w_scale, x_q, x_scale, packed_t


@torch.library.register_fake("mmfree::bitlinear_backward")
def _bitlinear_backward_fake(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    packed_t: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight_dtype: torch.dtype,
    int8_dx: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(x_q.shape == x.shape, lambda: "mmfree: argument 'x_q' must have x's shape")
    k = x.shape[-1]
    return (
        torch.empty_like(x),
        x.new_empty((packed.shape[0], k), dtype=weight_dtype),
        torch.empty_like(norm_weight),
    )


# ---- autograd -----------------------------------------------------------------------------


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, norm_weight, eps, with_transposed = inputs
    _, packed, w_scale, x_q, x_scale, packed_t = output
    ctx.save_for_backward(x, x_q, x_scale, packed, w_scale, packed_t, norm_weight)
    # Only y carries a gradient: without this the engine fills zeros for the other five
    # outputs every step (an x_q-sized int8 and a packed-sized uint8 tensor per layer; 480
    # fill kernels in one 370M step).
    ctx.set_materialize_grads(False)
    ctx.eps = eps
    ctx.int8_dx = with_transposed
    ctx.weight_dtype = weight.dtype


def _backward(ctx: Any, grad: torch.Tensor | None, *unused: Any) -> tuple:
    if grad is None:  # no gradient reached y (grads are not materialized)
        return None, None, None, None, None
    x, x_q, x_scale, packed, w_scale, packed_t, norm_weight = ctx.saved_tensors
    gx, gw, gg = torch.ops.mmfree.bitlinear_backward(
        grad.contiguous(),
        x,
        x_q,
        x_scale,
        packed,
        w_scale,
        packed_t,
        norm_weight,
        ctx.eps,
        ctx.weight_dtype,
        ctx.int8_dx,
    )
    return gx, gw, gg, None, None


torch.library.register_autograd("mmfree::bitlinear_forward", _backward, setup_context=_setup_context)
