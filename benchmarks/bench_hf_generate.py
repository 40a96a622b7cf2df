"""transformers generate() vs our generate() on the same packed model (random weights at a named
size): end-to-end greedy tokens/s, batch sizes as an axis, both timed in the same run.

What it measures is the cost of going through GenerationMixin (logits processors, stopping
criteria, the MMfreeCache, a host sync per step) on top of the same decode step (on CUDA both
replay the same CUDA graph). Tokens are checked equal before any time is reported.

    PYTHONPATH=python python benchmarks/bench_hf_generate.py --config 2.7B --device cuda --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import mmfree_ext.hf as mh
from mmfree_ext.models import generate
from mmfree_ext.models.bench import random_packed_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``reps`` timed calls after one untimed warm-up (graph capture, allocator)."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="tiny, 370M, 1.3B or 2.7B")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    native = random_packed_model(args.config, device, dtype)
    model = mh.HGRNBitForCausalLM.from_native(native)
    vocab = native.config.vocab_size
    rows = []
    for batch in args.batch:
        ids = torch.randint(3, vocab, (batch, args.prompt), device=device)
        n = args.tokens

        def run_hf(ids=ids, n=n):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None)

        def run_native(ids=ids, n=n):
            return generate(native, ids.tolist(), n)

        got = run_hf()[:, args.prompt :].tolist()
        want = run_native().tokens
        if got != want:
            raise SystemExit(f"batch {batch}: transformers generate() and ours disagree; not timing")
        t_hf = _time(run_hf, device, args.reps)
        t_native = _time(run_native, device, args.reps)
        row = {
            "config": args.config,
            "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
            "batch": batch,
            "prompt": args.prompt,
            "new_tokens": n,
            "hf_tok_s": batch * n / t_hf,
            "native_tok_s": batch * n / t_native,
            "hf_overhead_us_per_step": (t_hf - t_native) / n * 1e6,
        }
        rows.append(row)
        print(
            f"{args.config} packed {row['dtype']} on {device}, batch {batch:3d}, {args.prompt}+{n} tokens: "
            f"transformers generate {row['hf_tok_s']:9.1f} tok/s, ours {row['native_tok_s']:9.1f} tok/s "
            f"({row['hf_overhead_us_per_step']:+.0f} us/step)"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
