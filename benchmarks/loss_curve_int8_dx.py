"""Does the opt-in int8 dX (MMFREE_BITLINEAR_DX=int8) train like the exact dX?

Trains the demo's byte-level MMfreeLM on the demo corpus (standard-library docstrings) with
the same seed, data order and initialization, once with the exact dX and once with the
int8 dX, and as a noise yardstick a second seed with the exact dX (and the int8 dX). Writes
the per-step losses as JSON and a PNG of the smoothed curves.

    python benchmarks/loss_curve_int8_dx.py --steps 500 --json docs/loss_curve_int8_dx.json \
        --png docs/loss_curve_int8_dx.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmfree_ext._corpus import stdlib_docstrings
from mmfree_ext.models import ByteTokenizer, MMfreeLMConfig, MMfreeLMForCausalLM
from mmfree_ext.ops.bitlinear import DX_ENV


def run(data: torch.Tensor, args: argparse.Namespace, dx: str, seed: int) -> dict:
    """One training run with MMFREE_BITLINEAR_DX=dx; returns its losses and timing."""
    os.environ[DX_ENV] = dx
    tok = ByteTokenizer()
    cfg = MMfreeLMConfig(
        vocab_size=tok.vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        bos_token_id=tok.BOS,
        eos_token_id=tok.EOS,
    )
    torch.manual_seed(seed)
    model = MMfreeLMForCausalLM(cfg, init_seed=seed).to(args.device)
    t0 = time.perf_counter()
    losses = train(model, data, args, seed)
    secs = time.perf_counter() - t0
    tail = losses[-args.tail :]
    print(
        f"dx={dx} seed={seed}: {len(losses)} steps in {secs:.0f}s, "
        f"mean loss of last {len(tail)}: {sum(tail) / len(tail):.4f}"
    )
    return {"dx": dx, "seed": seed, "steps": len(losses), "seconds": secs, "losses": losses}


def train(model: MMfreeLMForCausalLM, data: torch.Tensor, args: argparse.Namespace, seed: int) -> list[float]:
    """The demo trainer's loop (AdamW betas 0.9/0.95, weight decay 0.01 on the >= 2-D
    non-embedding weights, 10 warmup steps then a cosine to 0.1 x lr, grad-norm clip 1.0) on
    random byte windows drawn from a seeded generator: same seed, same batches."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and "embeddings" not in n]
    rest = [p for n, p in named if not (p.dim() >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95)
    )
    model.train()
    losses = []
    for step in range(args.steps):
        starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s : s + args.seq + 1] for s in starts.tolist()]).to(args.device)
        warm = min(1.0, (step + 1) / 10)
        cosine = 0.5 * (1.0 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = args.lr * warm * (0.1 + 0.9 * cosine)
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def smooth(xs: list[float], n: int) -> list[float]:
    """Trailing mean over n steps."""
    out, acc = [], 0.0
    for i, v in enumerate(xs):
        acc += v
        if i >= n:
            acc -= xs[i - n]
        out.append(acc / min(i + 1, n))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the first is the comparison seed")
    parser.add_argument("--noise-exact-only", action="store_true", help="other seeds: exact dX only (saves time)")
    parser.add_argument("--tail", type=int, default=50, help="final loss = mean of the last this-many steps")
    parser.add_argument("--json", default="docs/loss_curve_int8_dx.json")
    parser.add_argument("--png", default="docs/loss_curve_int8_dx.png")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = torch.tensor(list(stdlib_docstrings().encode("utf-8")), dtype=torch.long)
    plan = [
        (dx, s)
        for s in args.seeds
        for dx in ("exact", "int8")
        if not (args.noise_exact_only and s != args.seeds[0] and dx == "int8")
    ]
    runs = [run(data, args, dx, seed) for dx, seed in plan]
    os.environ.pop(DX_ENV, None)

    def final(r: dict) -> float:
        tail = r["losses"][-args.tail :]
        return sum(tail) / len(tail)

    by = {(r["dx"], r["seed"]): final(r) for r in runs}
    s0 = args.seeds[0]
    summary = {"int8_minus_exact_same_seed": by[("int8", s0)] - by[("exact", s0)]}
    if len(args.seeds) > 1:
        s1 = args.seeds[1]
        summary["exact_seed_to_seed"] = by[("exact", s1)] - by[("exact", s0)]
        if ("int8", s1) in by:
            summary["int8_minus_exact_seed2"] = by[("int8", s1)] - by[("exact", s1)]
    print(json.dumps(summary, indent=1))
    cfg = {k: getattr(args, k) for k in ("device", "steps", "hidden", "layers", "batch", "seq", "lr", "tail")}
    out = {"config": cfg, "torch": torch.__version__, "summary": summary, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        style = "-" if r["dx"] == "exact" else "--"
        ax.plot(smooth(r["losses"], 20), style, label=f"{r['dx']} dX, seed {r['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (20-step mean)")
    ax.set_title(f"int8 vs exact dX: h={args.hidden} L={args.layers}, batch {args.batch}x{args.seq}, {args.device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
