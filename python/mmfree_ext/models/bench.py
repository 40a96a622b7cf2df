"""Model-level throughput helpers (random weights at a named size), shared by ``mmfree bench``
and ``benchmarks/bench_model.py``."""

from __future__ import annotations

import time

import torch

from .config import named_config
from .generation import Decoder
from .modeling import MMfreeLMForCausalLM

__all__ = ["bench_decode", "bench_prefill", "random_packed_model"]


@torch.no_grad()
def random_packed_model(
    size: str, device: torch.device | str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> MMfreeLMForCausalLM:
    """A packed model of a named size with N(0, 0.02) latent weights (drawn on ``device``, one
    BitLinear at a time, so the latent copy of the whole model never exists at once)."""
    cfg = named_config(size)
    with torch.device("meta"):
        model = MMfreeLMForCausalLM(cfg, init_seed=None)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name == "model.lower_bounds":
            p.normal_(0.0, 1.0)
        else:
            p.normal_(0.0, 0.02)
    model.pack()
    return model.to(dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bench_decode(model: MMfreeLMForCausalLM, batch: int, steps: int, mode: str = "auto", warmup: int = 5) -> float:
    """Decode tokens/s (all sequences together) of ``steps`` greedy steps after a 16-token prefill."""
    device = model.device
    dec = Decoder(model, batch, mode)
    ids = torch.randint(0, model.config.vocab_size, (batch, 16), device=device)
    logits = dec.prefill(ids)
    tok = logits.argmax(-1)
    for _ in range(warmup):
        tok = dec.step(tok).argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = dec.step(tok).argmax(-1)
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


@torch.no_grad()
def bench_prefill(model: MMfreeLMForCausalLM, batch: int, tokens: int, reps: int = 3) -> float:
    """Prefill tokens/s: a forward of ``[batch, tokens]`` keeping only the last logits."""
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device=device)
    model(ids, logits_to_keep=1)
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return batch * tokens / best
