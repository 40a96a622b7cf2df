"""300-step bf16 training run of our model against mmfree_ext.reference, same run, same batches.

Three runs from one initialization and one batch sequence (the demo corpus: standard-library
docstrings, byte-level), AdamW as the demo trainer (betas 0.9/0.95, weight decay 0.01 on
matrices, warm-up then cosine, grad-norm clip 1.0):

* ``ours_bf16``: MMfreeLMForCausalLM in bf16, loss through ``lm_loss`` (fused ops);
* ``ref_bf16``: ReferenceMMfreeLM in bf16 (plain torch), ``F.cross_entropy`` of its logits;
* ``ref_fp32``: the reference in fp32.

The band is measured, not assumed: ``|ref_bf16 - ref_fp32|`` (smoothed over ``--smooth``
steps) is how far bf16 rounding alone moves the reference's own curve. Pass when the smoothed
``|ours_bf16 - ref_bf16|`` stays within ``2 x max band + 0.02`` at every step. Writes JSON and a
PNG (needs matplotlib; skipped with a note without it).

    PYTHONPATH=python python benchmarks/loss_curve_vs_reference.py [--device cuda] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from mmfree_ext._corpus import stdlib_docstrings
from mmfree_ext.models import ByteTokenizer, MMfreeLMConfig, MMfreeLMForCausalLM
from mmfree_ext.reference import ReferenceMMfreeLM

DOCS = Path(__file__).resolve().parents[1] / "docs"
# CPU: short windows, because the reference's per-token scan backs up in O(T^2) (each step's
# index backward writes a full [B, T, D] gradient): at T = 64 one reference step takes ~8 s here.
_SIZES = {"cpu": {"hidden": 64, "layers": 2, "batch": 16, "seq": 16},
          "cuda": {"hidden": 768, "layers": 8, "batch": 32, "seq": 256}}  # fmt: skip


def lm_loss(model: MMfreeLMForCausalLM, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of ``batch [B, T+1]`` through the fused lm_head + cross entropy."""
    return model(batch[:, :-1], labels=batch[:, 1:], shift_labels=False).loss


def _batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen).tolist()
        out.append(torch.stack([data[s : s + seq + 1] for s in starts]))
    return out


def _train(model: torch.nn.Module, loss_fn, batches: list[torch.Tensor], device: str, lr: float) -> list[float]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))  # fmt: skip
    steps, losses = len(batches), []
    for step, b in enumerate(batches):
        scale = min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        loss = loss_fn(b.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _smooth(xs: list[float], n: int) -> list[float]:
    return [sum(xs[max(0, i - n + 1) : i + 1]) / (i + 1 - max(0, i - n + 1)) for i in range(len(xs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--smooth", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    for key in ("hidden", "layers", "batch", "seq"):
        ap.add_argument(f"--{key}", type=int, default=None)
    ap.add_argument("--out", default=str(DOCS / "loss_curve_vs_reference"), help="path prefix of the .json / .png")
    a = ap.parse_args()
    sizes = dict(_SIZES["cuda" if a.device.startswith("cuda") else "cpu"])
    sizes.update({k: getattr(a, k) for k in sizes if getattr(a, k) is not None})

    tok = ByteTokenizer()
    data = torch.tensor(list(stdlib_docstrings().encode("utf-8")), dtype=torch.long)
    batches = _batches(data, a.steps, sizes["batch"], sizes["seq"], a.seed)
    cfg = MMfreeLMConfig(vocab_size=tok.vocab_size, hidden_size=sizes["hidden"], num_hidden_layers=sizes["layers"],
                         bos_token_id=tok.BOS, eos_token_id=tok.EOS)  # fmt: skip
    init = ReferenceMMfreeLM(cfg).init_weights(a.seed).state_dict()
    v = cfg.vocab_size

    def ref_loss(model):
        def fn(b):
            logits, _ = model(b[:, :-1])
            return F.cross_entropy(logits.reshape(-1, v), b[:, 1:].reshape(-1))

        return fn

    curves, seconds = {}, {}
    for name in ("ours_bf16", "ref_bf16", "ref_fp32"):
        torch.manual_seed(a.seed)
        if name == "ours_bf16":
            model = MMfreeLMForCausalLM(cfg, init_seed=None)
            model.load_state_dict(init)
            model = model.to(a.device, torch.bfloat16)
            fn = lambda b, m=model: lm_loss(m, b)
        else:
            model = ReferenceMMfreeLM(cfg)
            model.load_state_dict(init)
            model = model.to(a.device, torch.bfloat16 if name == "ref_bf16" else torch.float32)
            fn = ref_loss(model)
        t0 = time.perf_counter()
        curves[name] = _train(model, fn, batches, a.device, a.lr)
        seconds[name] = time.perf_counter() - t0
        print(f"{name:<10} first {curves[name][0]:.4f} last {curves[name][-1]:.4f} ({seconds[name]:.1f}s)", flush=True)

    sm = {k: _smooth(c, a.smooth) for k, c in curves.items()}
    band = [abs(x - y) for x, y in zip(sm["ref_bf16"], sm["ref_fp32"], strict=True)]
    diff = [abs(x - y) for x, y in zip(sm["ours_bf16"], sm["ref_bf16"], strict=True)]
    limit = 2 * max(band) + 0.02
    tail = max(1, a.steps // 6)
    summary = {
        "max_band_ref_bf16_vs_fp32": max(band),
        "max_diff_ours_vs_ref_bf16": max(diff),
        "limit": limit,
        "mean_diff_last_steps": sum(diff[-tail:]) / tail,
        "mean_band_last_steps": sum(band[-tail:]) / tail,
        "last_smoothed": {k: s[-1] for k, s in sm.items()},
        "passed": max(diff) <= limit,
    }
    print(json.dumps(summary, indent=2))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": a.device, "torch": torch.__version__, "steps": a.steps, "lr": a.lr, "smooth": a.smooth,
            "sizes": sizes, "seconds": seconds}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "curves": curves}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)")
        return
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 1])
    for k, s in sm.items():
        ax.plot(s, label=k, lw=1.2)
    ax.set_ylabel(f"loss (mean of {a.smooth} steps)")
    ax.set_title(f"bf16 training vs reference, h={sizes['hidden']} L={sizes['layers']} "
                 f"B={sizes['batch']} T={sizes['seq']} ({a.device})")  # fmt: skip
    ax.legend()
    bx.plot(diff, label="|ours_bf16 - ref_bf16|")
    bx.plot(band, label="band: |ref_bf16 - ref_fp32|")
    bx.axhline(limit, color="k", ls="--", lw=0.8, label="limit")
    bx.set_xlabel("step")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
