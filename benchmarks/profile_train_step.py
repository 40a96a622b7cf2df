"""GPU-time profile of one training step of MMfreeLM (eager, or ``--compile``): where its kernels go.

Builds the model of ``--size`` as ``bench_train_model.py`` does (random latent bf16 weights,
AdamW, batch B x T of random tokens, :func:`mmfree_ext.train.step.train_step`), runs
``--warmup`` steps, then records one step under ``torch.profiler`` and sums the device time
of every kernel by name. Prints the top kernels and the totals per family (ours, cuBLAS /
cuDNN, generic ``at::native`` elementwise / copy / reduce, the optimizer, other), the glue
that issue 12 wants gone being the ``at::native`` family; and the step's wall time beside the
sum of its kernels (a wall time well above it: the step waits on the host). ``--compile``
compiles the loss function as ``bench_train_model.py --modes compiled`` does (fullgraph).
JSON out with ``--json``.

    python benchmarks/profile_train_step.py --size 370M --json profile_370m.json
    python benchmarks/profile_train_step.py --device cpu --size tiny --batch 1 --seq 32   # smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mmfree_ext.train.bench import random_latent_model
from mmfree_ext.train.data import Batch
from mmfree_ext.train.step import build_optimizer, lm_loss_sum, train_step

FAMILIES = [
    ("optimizer", re.compile(r"multi_tensor|adam|Adam|foreach", re.I)),
    ("ours", re.compile(r"mmfree")),
    ("cuBLAS/cuDNN", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|cudnn|sm90_|sm80_", re.I)),
    ("at::native", re.compile(r"at::native|elementwise|vectorized|reduce_kernel|copy|Memcpy|Memset|fill", re.I)),
]


def family(name: str) -> str:
    for fam, pat in FAMILIES:
        if pat.search(name):
            return fam
    return "other"


def short(name: str, width: int = 110) -> str:
    """A kernel name without its template noise, cut to width."""
    s = re.sub(r"\s+", " ", name)
    return s if len(s) <= width else s[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="370M")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--compile", action="store_true", help="torch.compile the loss function (fullgraph)")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--host",
        action="store_true",
        help="also print where the host's time goes: self CPU time per op and per CUDA runtime call",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_latent_model(args.size, device, dtype)
    model.train()
    opt = build_optimizer(model, 1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), generator=gen)
    mb = Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), None).to(device)
    tokens = args.batch * args.seq

    loss_fn = torch.compile(lm_loss_sum, fullgraph=True) if args.compile else lm_loss_sum

    def step() -> None:
        train_step(model, opt, [mb], tokens, loss_fn=loss_fn)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    wall_ms = 1e3 * (time.perf_counter() - t0) / 3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if device.type == "cuda":
            # "Optimizer.step#AdamW.step"-style names are user annotations mirrored on the GPU
            # timeline: they span kernels already counted.
            if ev.device_type != torch.autograd.DeviceType.CUDA or "#" in ev.name:
                continue
            us = ev.device_time
        else:  # CPU smoke run: the aten ops' self time stands in for kernels
            if not ev.name.startswith("aten::") and not ev.name.startswith("mmfree::"):
                continue
            us = ev.self_cpu_time_total
        per_name[ev.name][0] += us
        per_name[ev.name][1] += 1
    total = sum(v[0] for v in per_name.values())
    fam_us: dict[str, float] = defaultdict(float)
    for name, (us, _) in per_name.items():
        fam_us[family(name)] += us
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    mode = "compiled" if args.compile else "eager"
    head = f"one {mode} training step, {args.size}, batch {args.batch} x {args.seq}, {dtype}"
    print(f"{head}: {total / 1e3:.1f} ms of kernels, {wall_ms:.1f} ms wall (mean of 3 unprofiled steps)")
    print("\n| family | ms | share |\n| --- | ---: | ---: |")
    for fam, us in sorted(fam_us.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {us / 1e3:.2f} | {100 * us / max(total, 1e-9):.1f}% |")
    print(f"\n| kernel (top {args.top} by GPU time) | family | calls | ms | share |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, (us, calls) in rows[: args.top]:
        print(f"| `{short(name)}` | {family(name)} | {calls} | {us / 1e3:.2f} | {100 * us / max(total, 1e-9):.1f}% |")
    host_rows = _host_table(prof, args.top) if args.host else []
    glue = [(n, v) for n, v in rows if family(n) == "at::native"][: args.top]
    print(f"\n| at::native kernel (top {args.top}) | calls | ms |\n| --- | ---: | ---: |")
    for name, (us, calls) in glue:
        print(f"| `{short(name)}` | {calls} | {us / 1e3:.2f} |")
    if args.json:
        out = {
            "size": args.size,
            "mode": mode,
            "wall_ms": wall_ms,
            "batch": args.batch,
            "seq": args.seq,
            "total_ms": total / 1e3,
            "families_ms": {k: v / 1e3 for k, v in fam_us.items()},
            "kernels": [{"name": n, "family": family(n), "calls": c, "ms": us / 1e3} for n, (us, c) in rows],
        }
        if host_rows:
            out["host"] = host_rows
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


def _host_table(prof: profile, top: int) -> list[dict]:
    """Self CPU time per host event (ops, autograd nodes, CUDA runtime calls), printed and returned.

    The step is host-bound when this total is near its wall time: the rows say which op calls
    and which runtime calls (cudaLaunchKernel, ...) the host spends it on.
    """
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        if ev.device_type != torch.autograd.DeviceType.CPU or "#" in ev.key:
            continue
        per[ev.key][0] += ev.self_cpu_time_total
        per[ev.key][1] += ev.count
    total = sum(v[0] for v in per.values())
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    print(f"\n| host event (top {top} by self CPU time; all: {total / 1e3:.1f} ms) | calls | ms | us/call |")
    print("| --- | ---: | ---: | ---: |")
    for name, (us, calls) in rows:
        print(f"| `{short(name, 80)}` | {calls} | {us / 1e3:.2f} | {us / max(calls, 1):.1f} |")
    return [{"name": n, "calls": c, "ms": us / 1e3} for n, (us, c) in rows]


if __name__ == "__main__":
    raise SystemExit(main())
