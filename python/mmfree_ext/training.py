"""A small, time-boxed training loop for byte-level MMfreeLMs (the demo's trainer).

Trains the latent weights through the trainable ops (BitLinear's ternary_linear with its
straight-through backward, mlgru_scan's autograd) with AdamW on random windows of a byte
corpus, for a given number of seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._progress import progress_bar
from .models import MMfreeLMForCausalLM

__all__ = ["TrainResult", "lm_loss", "train_for"]


def lm_loss(model: MMfreeLMForCausalLM, batch: Tensor) -> Tensor:
    """Next-token cross entropy of ``batch [B, T+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``).

    Latent models form it with the fused lm_head + cross-entropy op (no [B*T, V] logits);
    packed ones from their logits.
    """
    return model(batch[:, :-1], labels=batch[:, 1:], shift_labels=False).loss


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    losses: list[float] = field(default_factory=list)

    def smoothed(self, n: int = 5) -> tuple[float, float]:
        """(mean of the first n losses, mean of the last n losses)."""
        k = max(1, min(n, len(self.losses) // 2 or 1))
        return sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k


def train_for(
    model: MMfreeLMForCausalLM,
    data: Tensor,
    *,
    seconds: float,
    batch_size: int,
    seq_len: int,
    lr: float = 3e-3,
    warmup_steps: int = 10,
    seed: int = 0,
    max_steps: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    step_fn: Callable[[Tensor], Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place on windows of ``data`` (1-D int64 token ids) for ``seconds``.

    The learning rate warms up linearly, then follows a cosine over the (estimated) number
    of steps that fit in the time box. ``step_fn(batch) -> loss`` replaces :func:`lm_loss`
    (e.g. a compiled version). Returns the per-step losses.
    """
    device = model.device
    if data.numel() < seq_len + 2:
        raise ValueError(f"corpus of {data.numel()} tokens is shorter than one window ({seq_len + 1})")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    loss_fn = step_fn or (lambda b: lm_loss(model, b))
    model.train()
    result = TrainResult(steps=0, seconds=0.0, tokens=0)
    est_total = max_steps or 10**9
    log_every = max(seconds / 8, 1.0)
    next_log = log_every
    t0 = time.perf_counter()
    bar = progress_bar(None if max_steps is None else max_steps, "training", disable=not progress)
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if (max_steps is not None and result.steps >= max_steps) or (max_steps is None and elapsed >= seconds):
                break
            starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
            batch = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).to(device)
            step = result.steps
            if max_steps is None and step >= 3:
                est_total = max(step + 1, int(step * seconds / max(elapsed, 1e-9)))
            warm = min(1.0, (step + 1) / warmup_steps)
            cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(est_total, 1))))
            for group in opt.param_groups:
                group["lr"] = lr * warm * (0.1 + 0.9 * cosine)
            loss = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = float(loss.detach())
            result.losses.append(value)
            result.steps += 1
            result.tokens += batch_size * seq_len
            bar.update(1)
            bar.set_postfix_str(f"loss {value:.3f}")
            now = time.perf_counter() - t0
            if step == 0 or now >= next_log:
                msg = f"  step {step + 1:5d}  loss {value:.3f}  ({now:.1f}s)"
                if log is print:
                    bar.write(msg)  # above the progress bar
                else:
                    log(msg)
                next_log = now + log_every
    finally:
        bar.close()
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result
