"""Ternary linear family: the int8 x ternary product and the BitLinear ops built on it.

* :func:`ternary_matmul` - ``y = (float(x_q @ W_q^T) * x_scale) * w_scale`` from packed weights.
* :func:`ternary_matmul_t` - ``grad @ (W_q * w_scale)`` from packed weights (the backward product).
* :func:`ternary_linear` - training BitLinear on a latent float weight, with the STE backward of
  SPEC.md section 1 (grads for x, weight and norm_weight).
* :func:`ternary_linear_packed` - inference BitLinear on packed weights (grads for x and norm_weight).

Under autograd, ``ternary_linear`` runs the once-per-step BitLinear of :mod:`.bitlinear` (the
packed weight and the int8 activations are saved, nothing is re-quantized); the explicit
``ternary_linear_backward`` op and ``ternary_linear_packed``'s backward recompute the int8
activations from ``x``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import check_packed_shape
from .bitlinear import bitlinear

__all__ = ["ternary_linear", "ternary_linear_packed", "ternary_matmul", "ternary_matmul_grouped", "ternary_matmul_t"]

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def ternary_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Ternary product of int8 activations and packed ternary weights.

    ``x_q`` int8 ``[..., K]`` (contiguous), ``x_scale`` fp32 ``[...]``, ``packed`` uint8
    ``[N, ceil(K/128)*32]``, ``w_scale`` fp32 with one element. Returns ``[..., N]`` in
    ``out_dtype`` (float32, bfloat16 or float16): ``(float(acc) * x_scale[row]) * w_scale``
    with ``acc`` the exact integer product.
    """
    return torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed, w_scale, out_dtype)


def ternary_matmul_grouped(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    packed: list[torch.Tensor],
    w_scale: list[torch.Tensor],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``G`` ternary products of one shape in one call: ``out[g] = ternary_matmul(x_q[g],
    x_scale[g], packed[g], w_scale[g])``.

    ``x_q`` int8 ``[G, ..., K]``, ``x_scale`` fp32 ``[G, ...]``, ``G`` packed weights with the
    same ``[N, ceil(K/128)*32]`` shape and ``G`` scales. Returns ``[G, ..., N]``. On CUDA,
    decode-sized products (fewer than 8 rows each, ``G <= 4``) share one GEMV launch, e.g. the
    i/f/g projections of an MLGRU decode step fed by :func:`rms_norm_quant_multi`.
    """
    return torch.ops.mmfree.ternary_matmul_grouped(x_q, x_scale, list(packed), list(w_scale), out_dtype)


def ternary_matmul_t(grad: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """``grad [..., N] @ (W_q * w_scale) [N, K]`` in fp32, read from the packed weights."""
    return torch.ops.mmfree.ternary_matmul_t(grad, packed, w_scale, in_features)


def ternary_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float = 1e-6,
    int8_dx: bool | None = None,
) -> torch.Tensor:
    """Training BitLinear: RMSNorm -> int8 activations x absmean-ternarized ``weight`` [N, K].

    Output ``[..., N]`` in x's dtype; differentiable in ``x``, ``weight`` and ``norm_weight``
    with the straight-through estimator (SPEC.md section 1). Runs
    :func:`mmfree_ext.ops.bitlinear.bitlinear` (the weight is quantized once per step, the
    int8 activations are saved for dW); ``int8_dx`` opts into the approximate int8 dX
    (``None``: ``MMFREE_BITLINEAR_DX``). ``torch.ops.mmfree.ternary_linear`` is the same
    function with a backward that re-quantizes.
    """
    return bitlinear(x, weight, norm_weight, eps, int8_dx)


def ternary_linear_packed(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Inference BitLinear on packed ternary weights; differentiable in ``x`` and ``norm_weight``."""
    return torch.ops.mmfree.ternary_linear_packed(x, packed, w_scale, norm_weight, eps)


# ---- fake kernels ---------------------------------------------------------------------------


def _check_x(x: torch.Tensor) -> None:
    torch._check(x.dtype in _FLOAT_DTYPES, lambda: f"mmfree: argument 'x' must be a floating tensor, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: "mmfree: argument 'x' must have at least 1 dim [..., K]")


def _check_norm_weight(norm_weight: torch.Tensor, k: int) -> None:
    torch._check(
        norm_weight.dim() == 1 and norm_weight.shape[0] == k,
        lambda: f"mmfree: argument 'norm_weight' must have K={k} elements, got {tuple(norm_weight.shape)}",
    )


def _check_weight(weight: torch.Tensor, k: int) -> None:
    torch._check(
        weight.dim() == 2 and weight.shape[1] == k,
        lambda: f"mmfree: argument 'weight' must be [N, K] with K={k}, got {tuple(weight.shape)}",
    )


@torch.library.register_fake("mmfree::ternary_matmul")
def _ternary_matmul_fake(
    x_q: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    torch._check(x_q.dtype == torch.int8, lambda: f"mmfree: argument 'x_q' must have dtype int8, got {x_q.dtype}")
    torch._check(x_q.dim() >= 1, lambda: "mmfree: argument 'x_q' must have at least 1 dim [..., K]")
    torch._check(x_scale.shape == x_q.shape[:-1], lambda: "mmfree: argument 'x_scale' must have x_q's leading dims")
    torch._check(out_dtype in _OUT_DTYPES, lambda: f"mmfree: 'out_dtype' must be fp32/bf16/fp16, got {out_dtype}")
    check_packed_shape(packed, x_q.shape[-1])
    return x_q.new_empty((*x_q.shape[:-1], packed.shape[0]), dtype=out_dtype)


@torch.library.register_fake("mmfree::ternary_matmul_grouped")
def _ternary_matmul_grouped_fake(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    packed: list[torch.Tensor],
    w_scale: list[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    torch._check(x_q.dtype == torch.int8, lambda: f"mmfree: argument 'x_q' must have dtype int8, got {x_q.dtype}")
    torch._check(x_q.dim() >= 2, lambda: "mmfree: argument 'x_q' must be [G, ..., K] with at least 2 dims")
    torch._check(
        len(packed) == x_q.shape[0] and len(w_scale) == x_q.shape[0],
        lambda: "mmfree: ternary_matmul_grouped needs one 'packed' and one 'w_scale' per group",
    )
    torch._check(x_scale.shape == x_q.shape[:-1], lambda: "mmfree: argument 'x_scale' must have x_q's leading dims")
    torch._check(out_dtype in _OUT_DTYPES, lambda: f"mmfree: 'out_dtype' must be fp32/bf16/fp16, got {out_dtype}")
    for p in packed:
        check_packed_shape(p, x_q.shape[-1])
        torch._check(p.shape[0] == packed[0].shape[0], lambda: "mmfree: every 'packed' must have the same N rows")
    return x_q.new_empty((*x_q.shape[:-1], packed[0].shape[0]), dtype=out_dtype)


@torch.library.register_fake("mmfree::ternary_matmul_t")
def _ternary_matmul_t_fake(
    grad: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, in_features: int
) -> torch.Tensor:
    check_packed_shape(packed, in_features)
    torch._check(grad.shape[-1] == packed.shape[0], lambda: "mmfree: argument 'grad' must have N=packed.shape[0]")
    return grad.new_empty((*grad.shape[:-1], in_features), dtype=torch.float32)


@torch.library.register_fake("mmfree::ternary_linear")
def _ternary_linear_fake(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_x(x)
    _check_weight(weight, x.shape[-1])
    _check_norm_weight(norm_weight, x.shape[-1])
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("mmfree::ternary_linear_backward")
def _ternary_linear_backward_fake(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_x(x)
    _check_weight(weight, x.shape[-1])
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(norm_weight)


@torch.library.register_fake("mmfree::ternary_linear_packed")
def _ternary_linear_packed_fake(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, norm_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    _check_x(x)
    check_packed_shape(packed, x.shape[-1])
    _check_norm_weight(norm_weight, x.shape[-1])
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.register_fake("mmfree::ternary_linear_packed_backward")
def _ternary_linear_packed_backward_fake(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_x(x)
    check_packed_shape(packed, x.shape[-1])
    return torch.empty_like(x), torch.empty_like(norm_weight)


# ---- autograd -----------------------------------------------------------------------------


def _packed_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, packed, w_scale, norm_weight, eps = inputs
    ctx.save_for_backward(x, packed, w_scale, norm_weight)
    ctx.eps = eps


def _packed_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, packed, w_scale, norm_weight = ctx.saved_tensors
    gx, gg = torch.ops.mmfree.ternary_linear_packed_backward(
        grad.contiguous(), x, packed, w_scale, norm_weight, ctx.eps
    )
    return gx, None, None, gg, None


# mmfree::ternary_linear's autograd kernel is the once-per-step BitLinear (ops/bitlinear.py):
# under autograd the op runs mmfree::bitlinear_forward, which saves the packed weight and the
# int8 activations, and its backward mmfree::bitlinear_backward (dX exact unless
# MMFREE_BITLINEAR_DX=int8). The values and gradients are those of ternary_linear +
# ternary_linear_backward bit for bit (tests/test_bitlinear.py); ternary_linear_backward
# stays a public op. An Autograd-key kernel rather than register_autograd, because the
# forward must return the saved tensors, which ternary_linear's schema cannot.
_AUTOGRAD_LIB = torch.library.Library("mmfree", "IMPL")  # kept alive: owns the kernel


def _ternary_linear_autograd(
    x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    return bitlinear(x, weight, norm_weight, eps)


_AUTOGRAD_LIB.impl("ternary_linear", _ternary_linear_autograd, "Autograd")
torch.library.register_autograd("mmfree::ternary_linear_packed", _packed_backward, setup_context=_packed_setup_context)
