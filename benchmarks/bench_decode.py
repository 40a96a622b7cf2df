"""Decode throughput against the memory-bandwidth floor (issue 13), through the public generate().

For each size (random weights, bf16, packed) and batch: tokens/s of ``generate()`` (greedy;
the per-token cost is the difference of a long and a short run, so prefill, graph capture and
setup cancel; ``MMFREE_DECODE_CUDA`` as set, default auto), the GPU time of one
``mmfree::decode_step`` on its fused path (``MMFREE_DECODE_CUDA=fused``; CUDA events over
replays of a captured step) and per layer, the op-by-op packed forward in the same run as the baseline,
and the bandwidth floor: bytes every step must read (packed weights + norm vectors; one
embedding row per token is negligible) / 4.25 TB/s (H200 HBM3e peak).

    python benchmarks/bench_decode.py --json decode.json
    python benchmarks/plot_decode.py decode.json docs/decode_tokens_per_s.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

from mmfree_ext.models import model_memory_bytes
from mmfree_ext.models.bench import random_packed_model
from mmfree_ext.models.decode_plan import decode_weights
from mmfree_ext.models.generation import generate

PEAK_BYTES_PER_S = 4.25e12


def step_bytes(model) -> int:
    emb = model.model.embeddings.weight
    return model_memory_bytes(model) - emb.numel() * emb.element_size()


def _generate_seconds(model, prompts: list[list[int]], new_tokens: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, prompts, new_tokens, decode_mode="auto")
    torch.cuda.synchronize()
    return time.perf_counter() - t0


@contextlib.contextmanager
def _decode_path(path: str):
    """Force the CUDA decode_step's path (fused / ops) for the calls inside."""
    old = os.environ.get("MMFREE_DECODE_CUDA")
    os.environ["MMFREE_DECODE_CUDA"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["MMFREE_DECODE_CUDA"]
        else:
            os.environ["MMFREE_DECODE_CUDA"] = old


@torch.no_grad()
def _graph_us(fn, reps: int = 50) -> float:
    """GPU time of ``fn`` per call: replays of one captured call, timed with CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


@torch.no_grad()
def measure(model, size: str, batch: int, short: int, long: int) -> dict:
    cfg = model.config
    w = decode_weights(model)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch, 4), generator=gen).tolist()
    _generate_seconds(model, prompts, 4)  # warm-up: graph capture, allocator
    t_short = min(_generate_seconds(model, prompts, short) for _ in range(2))
    t_long = min(_generate_seconds(model, prompts, long) for _ in range(2))
    per_token_s = (t_long - t_short) / (long - short)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
    state = torch.zeros(cfg.num_hidden_layers, batch, cfg.hidden_size, device="cuda")
    with _decode_path("fused"):  # the path is chosen at capture time
        fused_us = _graph_us(lambda: w.step(tokens, state))
    # The op-by-op packed forward (what the fused op must equal): ~13 kernels per layer.
    composite_us = _graph_us(lambda: model(tokens.view(-1, 1), state), reps=10)
    nbytes = step_bytes(model)
    floor_us = nbytes / PEAK_BYTES_PER_S * 1e6
    row = {
        "size": size,
        "batch": batch,
        "tokens_per_s": batch / per_token_s,
        "generate_step_us": per_token_s * 1e6,
        "fused_step_gpu_us": fused_us,
        "fused_tokens_per_s_gpu": batch / (fused_us * 1e-6),
        "gpu_us_per_layer": fused_us / cfg.num_hidden_layers,
        "composite_step_gpu_us": composite_us,
        "bytes_per_step": nbytes,
        "floor_us": floor_us,
        "floor_tokens_per_s": batch / (floor_us * 1e-6),
        "fraction_of_floor": floor_us / (per_token_s * 1e6),
        "fraction_of_floor_gpu": floor_us / fused_us,
    }
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["1.3B", "2.7B"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--short", type=int, default=16, help="new tokens of the short generate() run")
    p.add_argument("--long", type=int, default=144, help="new tokens of the long generate() run")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for size in args.configs:
        model = random_packed_model(size, "cuda", torch.bfloat16)
        for b in args.batch:
            rows.append(measure(model, size, b, args.short, args.long))
            print(f"  {size} batch {b}: {rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)
        del model
        torch.cuda.empty_cache()
    print(
        f"{'model':<6} {'batch':>5} {'tok/s':>10} {'gen us/step':>11} {'fused GPU us':>12} {'us/layer':>9} "
        f"{'op-by-op us':>11} {'MB/step':>8} {'floor us':>9} {'of floor':>8}"
    )
    for r in rows:
        print(
            f"{r['size']:<6} {r['batch']:>5} {r['tokens_per_s']:>10.0f} {r['generate_step_us']:>11.1f} "
            f"{r['fused_step_gpu_us']:>12.1f} {r['gpu_us_per_layer']:>9.2f} {r['composite_step_gpu_us']:>11.1f} "
            f"{r['bytes_per_step'] / 1e6:>8.1f} {r['floor_us']:>9.1f} {r['fraction_of_floor']:>8.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "decode", "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
