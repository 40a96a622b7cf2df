"""Model-level throughput of the packed MMfreeLM (random weights at the paper's sizes).

CUDA: decode tokens/s at batch 1, 8, 64 for 1.3B and 2.7B (CUDA-graph decode step, eager as
the baseline), prefill of 2048 tokens of 2.7B against mmfree_ext.reference in bf16, packed
model memory. CPU: 370M batch-1 decode (eager). Bytes per decode step = the packed weights
and norms every token must read (the embedding table is not counted: one row per token).

    python benchmarks/bench_model.py --device cuda --json model.json
    python benchmarks/bench_model.py --device cpu --configs 370M
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Case, Row, bench, print_table, save_json
from mmfree_ext.models import MMfreeLMForCausalLM, model_memory_bytes, named_config
from mmfree_ext.models.bench import random_packed_model
from mmfree_ext.models.generation import Decoder
from mmfree_ext.reference import ReferenceMMfreeLM


def _step_bytes(model: MMfreeLMForCausalLM) -> int:
    emb = model.model.embeddings.weight
    return model_memory_bytes(model) - emb.numel() * emb.element_size()


def decode_rows(size: str, device: str, batches: list[int], dtype: torch.dtype, mode: str) -> list[Row]:
    model = random_packed_model(size, device, dtype)
    mem = model_memory_bytes(model)
    print(f"{size}: packed model memory {mem / 2**30:.3f} GiB ({mem:,} bytes) on {device}")
    rows = []
    for batch in batches:
        fast = Decoder(model, batch, mode)
        eager = Decoder(model, batch, "eager")
        ids = torch.randint(0, model.config.vocab_size, (batch, 4), device=device)
        tok = fast.prefill(ids).argmax(-1)
        eager.prefill(ids)
        case = Case(
            name=f"decode {size} ({fast.mode})",
            shape=f"batch {batch}",
            fn=lambda fast=fast, tok=tok: fast.step(tok),
            baseline=(lambda eager=eager, tok=tok: eager.step(tok)) if fast.mode != "eager" else None,
            baseline_name="eager step",
            bytes=_step_bytes(model),
            extra={"model_bytes": mem},
        )
        row = bench(case, device)
        row.extra["tokens_per_s"] = batch / (row.us * 1e-6)
        if row.baseline_us:
            row.extra["eager_tokens_per_s"] = batch / (row.baseline_us * 1e-6)
        print(f"  batch {batch:3d}: {row.extra['tokens_per_s']:10.1f} tok/s")
        rows.append(row)
    del model
    return rows


@torch.no_grad()
def prefill_row(size: str, device: str, tokens: int, dtype: torch.dtype) -> Row:
    """Our packed model vs the reference (same random weights, both in ``dtype``)."""
    cfg = named_config(size)
    reference = _random_reference(cfg, device, dtype)
    with torch.device("meta"):
        ours = MMfreeLMForCausalLM(cfg, init_seed=None)
    ours.load_state_dict(reference.state_dict(), assign=True)
    ours = ours.pack()
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=device)
    flops = 2.0 * tokens * sum(p.numel() for n, p in reference.named_parameters() if n.endswith("proj.weight"))
    case = Case(
        name=f"prefill {size}",
        shape=f"1 x {tokens} tokens, {str(dtype).split('.')[-1]}",
        fn=lambda: ours(ids, logits_to_keep=1),
        baseline=lambda: reference(ids),
        baseline_name="reference",
        flops=flops,
    )
    row = bench(case, device, warmup=1, reps=3)
    row.extra["tokens_per_s"] = tokens / (row.us * 1e-6)
    return row


def _random_reference(cfg, device: str, dtype: torch.dtype) -> ReferenceMMfreeLM:
    """The reference model at ``cfg`` with N(0, 0.02) weights drawn on ``device`` (no CPU copy)."""
    with torch.device("meta"):  # its CPU init runs on meta tensors: free
        model = ReferenceMMfreeLM(cfg.to_dict())
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "model.lower_bounds":
                p.normal_()
            else:
                p.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--configs", nargs="+", default=None, help="default: 1.3B 2.7B on CUDA, 370M on CPU")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 8 64 on CUDA, 1 on CPU")
    p.add_argument("--prefill", type=int, default=2048, help="prefill length for the 2.7B comparison (0 = skip)")
    p.add_argument("--mode", default="auto", choices=["auto", "eager", "cuda_graph", "compile"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    configs = args.configs or (["1.3B", "2.7B"] if cuda else ["370M"])
    batches = args.batch or ([1, 8, 64] if cuda else [1])
    rows: list[Row] = []
    for size in configs:
        rows += decode_rows(size, args.device, batches, dtype, args.mode)
        if cuda:
            torch.cuda.empty_cache()
    print_table(rows, "decode step (bytes = packed weights read per step)")
    if cuda and args.prefill:
        pre = prefill_row("2.7B", args.device, args.prefill, dtype)
        print_table([pre], f"prefill {args.prefill} tokens")
        print(f"  ours {pre.extra['tokens_per_s']:.0f} tok/s")
        rows.append(pre)
    for r in rows:
        print(f"{r.name:<28} {r.shape:<28} {r.extra.get('tokens_per_s', 0):10.1f} tok/s")
    if args.json:
        save_json(rows, args.json, {"bench": "model"})


if __name__ == "__main__":
    main()
