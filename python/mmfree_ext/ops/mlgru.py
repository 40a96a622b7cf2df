"""MLGRU gated scan (SPEC.md section 2): ``mlgru_scan`` with fused gating, and its backward.

The op takes the raw ``i`` and ``f`` projections and computes, with an fp32 state,
``f_t = lb + (1 - lb) * sigmoid(f)``, ``c_t = silu(i) * (1 - f_t)`` (0 where ``mask == 0``),
``h_t = f_t * h_{t-1} + c_t``. float64 inputs (CPU only) compute in float64 so that
``torch.autograd.gradcheck`` works; then ``lower_bound``, ``h0`` and ``h_last`` are float64 too.

Internal: ``torch.ops.mmfree.mlgru_scan_impl(..., path)`` is the same op with the CUDA
algorithm forced (0 auto, 1 sequential, 2 chunked, 3 lanes; the CPU ignores it), for tests and
benchmarks; ``mlgru_scan_backward(..., path)`` likewise.

Backward design: nothing but the inputs is saved. The reverse scan needs ``h_{t-1}``; the
output ``h`` is rounded to the input dtype, so using it would make bf16 gradients inexact.
The kernels recompute the states from the inputs instead (a checkpoint pass keeps the state
entering every chunk; each chunk is rebuilt on chip from its checkpoint). That costs one
extra read of ``i`` and ``f``, the same bytes as saving ``h`` in fp32 and reading it back.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["mlgru_scan"]

PATH_AUTO, PATH_SEQUENTIAL, PATH_CHUNKED, PATH_LANES = 0, 1, 2, 3


def mlgru_scan(
    i: torch.Tensor,
    f: torch.Tensor,
    lower_bound: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused MLGRU scan over ``[B, T, D]`` raw projections ``i`` and ``f``.

    Args:
        i, f: ``[B, T, D]`` float32/bfloat16/float16 (float64 on CPU), contiguous.
        lower_bound: ``[D]`` fp32 per-layer lower bound of the forget gate, or None (layer 0).
        h0: ``[B, D]`` fp32 initial state (``[S, D]`` with ``cu_seqlens``), or None (zeros).
        mask: ``[B, T]`` bool/int/float; 0 marks padding, where ``c_t = 0`` and the state
            still decays by ``f_t``.
        cu_seqlens: int32/int64 ``[S+1]`` offsets of S packed sequences (then B must be 1).

    Returns:
        ``(h, h_last)``: ``h`` ``[B, T, D]`` in the input dtype and ``h_last`` fp32 ``[B, D]``
        (``[S, D]`` with ``cu_seqlens``).
    """
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and torch._C._any_requires_grad(i, f, lower_bound, h0)
    ):
        return torch.ops.mmfree.mlgru_scan(i, f, lower_bound, h0, mask, cu_seqlens)
    # No gradient needed (decode, inference): skip the Python autograd kernel that
    # register_autograd installs (it walks the arguments, then redispatches to this same
    # place); on a T=1 decode step that host work is larger than the kernel.
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.mmfree.mlgru_scan(i, f, lower_bound, h0, mask, cu_seqlens)


def _state_dtype(i: torch.Tensor) -> torch.dtype:
    return torch.float64 if i.dtype == torch.float64 else torch.float32


def _num_seqs(i: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return i.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _check_fake(i: torch.Tensor, f: torch.Tensor, cu_seqlens: torch.Tensor | None) -> None:
    torch._check(i.dim() == 3, lambda: f"mmfree: argument 'i' must be 3-D, got shape {tuple(i.shape)}")
    torch._check(
        i.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64),
        lambda: f"mmfree: argument 'i' must be a floating tensor, got {i.dtype}",
    )
    torch._check(f.shape == i.shape, lambda: f"mmfree: argument 'f' must have the shape of 'i', got {f.shape}")
    torch._check(f.dtype == i.dtype, lambda: f"mmfree: argument 'f' must have dtype {i.dtype}, got {f.dtype}")
    if cu_seqlens is not None:
        torch._check(i.shape[0] == 1, lambda: "mmfree: argument 'cu_seqlens' (varlen) requires B == 1")


@torch.library.register_fake("mmfree::mlgru_scan")
def _mlgru_scan_fake(i, f, lower_bound=None, h0=None, mask=None, cu_seqlens=None):
    _check_fake(i, f, cu_seqlens)
    h_last = i.new_empty((_num_seqs(i, cu_seqlens), i.shape[2]), dtype=_state_dtype(i))
    return torch.empty_like(i), h_last


@torch.library.register_fake("mmfree::mlgru_scan_impl")
def _mlgru_scan_impl_fake(i, f, lower_bound, h0, mask, cu_seqlens, path):
    return _mlgru_scan_fake(i, f, lower_bound, h0, mask, cu_seqlens)


@torch.library.register_fake("mmfree::mlgru_scan_backward")
def _mlgru_scan_backward_fake(grad_h, grad_h_last, i, f, lower_bound, h0, mask, cu_seqlens, path=0):
    _check_fake(i, f, cu_seqlens)
    state = _state_dtype(i)
    n_seq = _num_seqs(i, cu_seqlens)
    return (
        torch.empty_like(i),
        torch.empty_like(i),
        i.new_empty((i.shape[2],), dtype=state),
        i.new_empty((n_seq, i.shape[2]), dtype=state),
    )


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    i, f, lower_bound, h0, mask, cu_seqlens = inputs[:6]
    ctx.path = inputs[6] if len(inputs) > 6 else PATH_AUTO
    ctx.has_lb = lower_bound is not None
    ctx.has_h0 = h0 is not None
    ctx.has_mask = mask is not None
    ctx.has_cu = cu_seqlens is not None
    ctx.save_for_backward(i, f, lower_bound, h0, mask, cu_seqlens)


def _backward(ctx: Any, grad_h: torch.Tensor | None, grad_h_last: torch.Tensor | None) -> tuple:
    i, f, lower_bound, h0, mask, cu_seqlens = ctx.saved_tensors
    if grad_h is None:
        grad_h = torch.zeros_like(i)
    if grad_h_last is None:
        grad_h_last = i.new_zeros((_num_seqs(i, cu_seqlens), i.shape[2]), dtype=_state_dtype(i))
    gi, gf, glb, gh0 = torch.ops.mmfree.mlgru_scan_backward(
        grad_h, grad_h_last, i, f, lower_bound, h0, mask, cu_seqlens, ctx.path
    )
    return gi, gf, glb if ctx.has_lb else None, gh0 if ctx.has_h0 else None, None, None


def _backward_impl(ctx: Any, grad_h: torch.Tensor | None, grad_h_last: torch.Tensor | None) -> tuple:
    return (*_backward(ctx, grad_h, grad_h_last), None)


torch.library.register_autograd("mmfree::mlgru_scan", _backward, setup_context=_setup_context)
torch.library.register_autograd("mmfree::mlgru_scan_impl", _backward_impl, setup_context=_setup_context)
