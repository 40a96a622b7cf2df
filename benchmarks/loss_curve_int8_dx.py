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
import os
import time
from pathlib import Path

import torch

from mmfree_ext._corpus import stdlib_docstrings
from mmfree_ext.models import ByteTokenizer, MMfreeLMConfig, MMfreeLMForCausalLM
from mmfree_ext.ops.bitlinear import DX_ENV
from mmfree_ext.training import train_for


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
    res = train_for(
        model,
        data,
        seconds=1e9,
        max_steps=args.steps,
        batch_size=args.batch,
        seq_len=args.seq,
        lr=args.lr,
        seed=seed,
        log=lambda s: None,
        progress=False,
    )
    secs = time.perf_counter() - t0
    tail = res.losses[-args.tail :]
    print(
        f"dx={dx} seed={seed}: {res.steps} steps in {secs:.0f}s, "
        f"mean loss of last {len(tail)}: {sum(tail) / len(tail):.4f}"
    )
    return {"dx": dx, "seed": seed, "steps": res.steps, "seconds": secs, "losses": res.losses}


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
