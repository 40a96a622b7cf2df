"""The training step shared by ``mmfree train`` and the model-level benchmark
(``benchmarks/bench_train_model.py``, ``mmfree bench --train``): the loss, AdamW with its
parameter groups, the warmup + cosine schedule, and one optimizer step over micro-batches.

Gradient accumulation is exact across ranks: each micro-batch's summed cross entropy is
divided by the number of scored targets of the whole *global* batch (known to every rank from
the data order), times the world size because FSDP's reduce-scatter averages over ranks. The
summed gradient is then the gradient of the global batch's mean loss, whatever the split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import IGNORE, Batch

__all__ = ["StepResult", "build_optimizer", "lm_loss_sum", "lr_at", "train_step"]

LossFn = Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor]


def lm_loss_sum(model: nn.Module, input_ids: Tensor, labels: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Summed next-token cross entropy (fp32) over the targets that are not ``-100``.

    ``labels`` are aligned with the positions. A latent model forms the loss with the fused
    lm_head + cross-entropy op (no [B*T, V] logits); the op's mean is scaled back to a sum
    (0 for a micro-batch without targets, as ``reduction="sum"`` gives)."""
    out = model(input_ids, labels=labels, shift_labels=False, cu_seqlens=cu_seqlens)
    if out.logits is not None:  # packed model: the loss came from its logits
        return F.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
    n = (labels != IGNORE).sum()
    return torch.where(n > 0, out.loss * n, torch.zeros_like(out.loss))


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices only (not norms, embeddings, lower bounds).

    On CUDA the fused implementation (one kernel for all parameters) is used."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embeddings" not in name else no_decay).append(p)
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        eps=eps,
        fused=on_cuda or None,
    )


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine from ``peak`` to ``peak * min_ratio``
    at step ``total``."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    progress = min(1.0, step / max(total, 1))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * warm * (min_ratio + (1.0 - min_ratio) * cosine)


class StepResult:
    """``loss`` (this rank's share of the global mean loss, a 0-dim tensor: sum over ranks for the
    global value) and ``grad_norm`` (the global norm before clipping, a tensor or None)."""

    __slots__ = ("grad_norm", "loss")

    def __init__(self, loss: Tensor, grad_norm: Tensor | None) -> None:
        self.loss, self.grad_norm = loss, grad_norm


def _set_sync(model: nn.Module, sync: bool) -> None:
    fn = getattr(model, "set_requires_gradient_sync", None)  # FSDP2 modules
    if fn is not None:
        fn(sync)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    global_targets: int,
    *,
    loss_fn: LossFn = lm_loss_sum,
    world_size: int = 1,
    clip: float = 1.0,
    lr: float | None = None,
) -> StepResult:
    """One optimizer step: forward/backward of every micro-batch, gradient clipping, AdamW.

    ``global_targets`` is the number of scored targets in the global batch (all ranks, all
    micro-batches); ``lr`` (if given) is set on every parameter group first.
    """
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    scale = world_size / max(global_targets, 1)
    total = None
    n = len(micro_batches)
    for k, mb in enumerate(micro_batches):
        _set_sync(model, k == n - 1)  # reduce-scatter once, after the last micro-batch
        loss = loss_fn(model, mb.input_ids, mb.labels, mb.cu_seqlens) * scale
        loss.backward()
        part = loss.detach()
        total = part if total is None else total + part
    assert total is not None, "train_step needs at least one micro-batch"
    grad_norm = None
    if clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total / world_size, grad_norm)
