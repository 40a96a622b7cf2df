"""GPU time of one decode step per kernel variant, in one process per model (H200 sessions).

``--mode time``: CUDA-graph replays (CUDA events) of ``mmfree::decode_step`` on the fused path
with the v3 batch-1 kernel (default), with v3 off (``MMFREE_DECODE_V3=0``: v2 at batch 1),
and of the op-by-op packed forward, plus ``generate()`` tokens/s at batch 1 through the fused
and the op-by-op step; one JSON line per (model, batch).
``--mode once``: one eager fused step per variant (v3, then v2), for ``ncu -k regex:decode``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch

from bench_decode import _decode_path, _generate_seconds, _graph_us, step_bytes
from mmfree_ext.models.bench import random_packed_model
from mmfree_ext.models.decode_plan import decode_weights

PEAK_BYTES_PER_S = 4.25e12


def _v3(on: bool) -> None:
    os.environ["MMFREE_DECODE_V3"] = "1" if on else "0"


@torch.no_grad()
def run_model(size: str, batches: list[int], mode: str, new_tokens: int) -> None:
    """One model's rows (``--mode time``) or profiled steps (``--mode once``)."""
    model = random_packed_model(size, "cuda", torch.bfloat16)
    cfg = model.config
    w = decode_weights(model)
    for b in batches:
        tokens = torch.randint(0, cfg.vocab_size, (b,), device="cuda")
        state = torch.zeros(cfg.num_hidden_layers, b, cfg.hidden_size, device="cuda")
        fused_step = functools.partial(w.step, tokens, state)
        if mode == "once":
            with _decode_path("fused"):
                for on in (True, False):
                    _v3(on)
                    fused_step()
            torch.cuda.synchronize()
            continue
        row = {"size": size, "batch": b, "floor_us": step_bytes(model) / PEAK_BYTES_PER_S * 1e6}
        with _decode_path("fused"):  # the path and kernel are chosen at capture time
            _v3(True)
            row["fused_us"] = _graph_us(fused_step, reps=50 if b < 64 else 10)
            if b == 1:
                _v3(False)
                row["fused_v2_us"] = _graph_us(fused_step, reps=20)
                _v3(True)
        row["ops_us"] = _graph_us(functools.partial(model, tokens.view(-1, 1), state), reps=10)
        if b == 1:
            gen = torch.Generator().manual_seed(0)
            prompts = torch.randint(0, cfg.vocab_size, (b, 4), generator=gen).tolist()
            for path in ("fused", "ops"):
                with _decode_path(path):
                    _generate_seconds(model, prompts, 4)  # capture
                    t_short = _generate_seconds(model, prompts, 8)
                    t_long = _generate_seconds(model, prompts, new_tokens)
                row[f"generate_{path}_tok_s"] = b * (new_tokens - 8) / (t_long - t_short)
        print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["1.3B", "2.7B"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--mode", choices=["time", "once"], default="time")
    p.add_argument("--tokens", type=int, default=48, help="generate(): new tokens of the long run (short: 8)")
    args = p.parse_args()
    for size in args.configs:
        run_model(size, args.batch, args.mode, args.tokens)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
