"""GPU time of one decode step per kernel variant, in one process per model (H200 sessions).

``--mode time``: CUDA-graph replays (CUDA events) of ``mmfree::decode_step`` on the fused path
with the v4 batch-1 kernel (``MMFREE_DECODE_V4=force``: thread-block clusters of 8, and of 4),
the v3 kernel (the default), v3 off (``MMFREE_DECODE_V3=0``: v2 at batch 1), and of the
op-by-op packed forward; whether one v4 step equals one v3 step bit for bit on the full model
(logits and state); ``generate()`` tokens/s at batch 1 through v4, v3 and the op-by-op step.
One JSON line per (model, batch); a variant that fails records its error instead.
``--mode once``: one eager fused step per variant (v4, v3, v2), for ``ncu -k regex:decode``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os

import torch

from bench_decode import _decode_path, _generate_seconds, _graph_us, step_bytes
from mmfree_ext.models.bench import random_packed_model
from mmfree_ext.models.decode_plan import decode_weights

PEAK_BYTES_PER_S = 4.25e12

#: Kernel variant -> the environment that selects it on the fused path at batch 1.
VARIANTS = {
    "v4": {"MMFREE_DECODE_V4": "force", "MMFREE_DECODE_V4_CLUSTER": "8"},
    "v4c4": {"MMFREE_DECODE_V4": "force", "MMFREE_DECODE_V4_CLUSTER": "4"},
    "v3": {"MMFREE_DECODE_V4": "0", "MMFREE_DECODE_V3": "1"},
    "v2": {"MMFREE_DECODE_V4": "0", "MMFREE_DECODE_V3": "0"},
}


@contextlib.contextmanager
def _env(values: dict[str, str]):
    """Set environment variables for the calls inside, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _try(row: dict, key: str, fn, *args, **kwargs) -> None:
    """row[key] = fn(*args, **kwargs), or the error's text under key + '_error'."""
    try:
        row[key] = fn(*args, **kwargs)
    except RuntimeError as e:  # e.g. a refused cluster launch: record it, go on
        row[key + "_error"] = str(e).splitlines()[0][:200]


@torch.no_grad()
def _v4_equals_v3(w, tokens: torch.Tensor, state: torch.Tensor) -> bool:
    """One eager step of v4 and of v3 from the same state: logits and new state bitwise equal."""
    s4, s3 = state.clone(), state.clone()
    with _decode_path("fused"):
        with _env(VARIANTS["v4"]):
            l4 = w.step(tokens, s4)
        with _env(VARIANTS["v3"]):
            l3 = w.step(tokens, s3)
    return bool(torch.equal(l4, l3) and torch.equal(s4, s3))


def _generate_tok_s(model, prompts: list[list[int]], path: str, env: dict[str, str], new_tokens: int) -> float:
    """generate() tokens/s on one decode path and kernel: the long minus the short run."""
    with _decode_path(path), _env(env):
        _generate_seconds(model, prompts, 4)  # capture
        t_short = _generate_seconds(model, prompts, 8)
        t_long = _generate_seconds(model, prompts, new_tokens)
    return len(prompts) * (new_tokens - 8) / (t_long - t_short)


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
                for name in ("v4", "v3", "v2"):
                    with _env(VARIANTS[name]):
                        fused_step()
            torch.cuda.synchronize()
            continue
        row = {"size": size, "batch": b, "floor_us": step_bytes(model) / PEAK_BYTES_PER_S * 1e6}
        if b == 1:
            prompt_state = torch.randn(cfg.num_hidden_layers, b, cfg.hidden_size, device="cuda")
            _try(row, "v4_equals_v3", _v4_equals_v3, w, tokens, prompt_state)
        with _decode_path("fused"):  # the path and kernel are chosen at capture time
            for name in VARIANTS if b == 1 else ["v3"]:
                with _env(VARIANTS[name]):
                    _try(row, f"fused_{name}_us", _graph_us, fused_step, reps=50 if b < 64 else 10)
            if "fused_v4_us_error" in row:  # refused: measure it without the cooperative attribute
                with _env({**VARIANTS["v4"], "MMFREE_DECODE_V4_COOP": "0"}):
                    _try(row, "fused_v4_nocoop_us", _graph_us, fused_step, reps=50)
        row["ops_us"] = _graph_us(functools.partial(model, tokens.view(-1, 1), state), reps=10)
        if b == 1:
            gen = torch.Generator().manual_seed(0)
            prompts = torch.randint(0, cfg.vocab_size, (b, 4), generator=gen).tolist()
            runs = (("v4", "fused", VARIANTS["v4"]), ("v3", "fused", VARIANTS["v3"]), ("ops", "ops", {}))
            for name, path, env in runs:
                if path == "fused" and f"fused_{name}_us" not in row:
                    continue  # the kernel failed eagerly above: do not capture it in a graph
                _try(row, f"generate_{name}_tok_s", _generate_tok_s, model, prompts, path, env, new_tokens)
        print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["1.3B", "2.7B"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--mode", choices=["time", "once"], default="time")
    p.add_argument("--tokens", type=int, default=48, help="generate(): new tokens of the long run (short: 8)")
    args = p.parse_args()
    for size in args.configs:
        run_model(size, args.batch, args.mode, args.tokens)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
