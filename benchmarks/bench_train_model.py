"""Model-level training step: MMfreeLM against a bf16 Llama of the same size, same run.

The step is ``mmfree_ext.train.step.train_step`` (the one ``mmfree train`` runs, also
``mmfree bench --train``): bf16 parameters, AdamW (fused on CUDA), gradient clipping, batch
B x T of random tokens, summed cross entropy over the batch. Each case: 3 warm-up steps, then
``--steps`` timed steps between two device synchronizations; peak = max allocated memory of
the steps (parameters, gradients, optimizer state, activations; the memory counter is reset
after the model is built). Eager, and with the loss function under ``torch.compile``
(fullgraph for ours; the Llama graph is compiled with breaks allowed), and ``graphs``: the same
compile with ``mode="reduce-overhead"`` (forward and backward replayed as CUDA graphs, for both
models).

Baseline: transformers ``LlamaForCausalLM`` with our h and L, intermediate 8/3*h rounded up to
256, h/128 heads, SDPA attention (skipped with a note when transformers is not installed).

    python benchmarks/bench_train_model.py --device cuda --json train_model.json
    python benchmarks/bench_train_model.py --device cpu --sizes tiny --batch 2 --seq 64 --steps 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback

import torch

from mmfree_ext.train.bench import bench_train_step


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# mode -> (torch.compile or not, its mode)
_MODES = {"eager": (False, None), "compiled": (True, None), "graphs": (True, "reduce-overhead")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", nargs="+", default=["370M", "1.3B"])
    p.add_argument("--models", nargs="+", default=["mmfree", "llama"], choices=["mmfree", "llama"])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=list(_MODES),
                   help="compiled: torch.compile of the loss; graphs: the same with mode='reduce-overhead' "
                        "(CUDA graphs)")  # fmt: skip
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results, notes = [], []
    llama_ok = _has_transformers()
    if "llama" in args.models and not llama_ok:
        notes.append("transformers is not installed: the Llama baseline is skipped")
        print("note: " + notes[-1])
    print(f"training step on {device}, batch {args.batch} x {args.seq}, {args.steps} timed steps, AdamW")
    print(f"{'size':>6} {'model':>7} {'mode':>8} {'tokens/s':>11} {'step ms':>9} {'peak GiB':>9} {'warm-up s':>9}")
    for size in args.sizes:
        for model in args.models:
            if model == "llama" and not llama_ok:
                continue
            for mode in args.modes:
                torch._dynamo.reset()
                try:
                    compiled, compile_mode = _MODES[mode]
                    r = bench_train_step(size, device, model_kind=model, batch=args.batch, seq_len=args.seq,
                                         steps=args.steps, warmup=args.warmup, compile=compiled,
                                         compile_mode=compile_mode)  # fmt: skip
                    r["mode"] = mode
                except Exception as exc:  # one failing case (OOM, a compile error) must not hide the others
                    traceback.print_exc(limit=3)
                    results.append({"size": size, "model": model, "mode": mode, "error": repr(exc)})
                    print(f"{size:>6} {model:>7} {mode:>8}  failed: {exc!r}"[:200])
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                results.append(r)
                _save(args.json, results, notes)  # after every case: a time-boxed call keeps what it measured
                peak = f"{r['peak_memory_gib']:9.2f}" if r["peak_memory_gib"] is not None else f"{'-':>9}"
                print(f"{size:>6} {model:>7} {mode:>8} {r['tokens_per_s']:11,.0f} {r['step_ms']:9.1f} "
                      f"{peak} {r['warmup_s']:9.1f}", flush=True)  # fmt: skip
    for size in args.sizes:
        for mode in args.modes:
            ours = [r for r in results if r.get("size") == size and r["model"] == "mmfree"
                    and r["mode"] == mode and "error" not in r]  # fmt: skip
            base = [r for r in results if r.get("size") == size and r["model"] == "llama"
                    and r["mode"] == mode and "error" not in r]  # fmt: skip
            if ours and base:
                peaks = ""
                if ours[0]["peak_memory_gib"] is not None:
                    peaks = f", peak {ours[0]['peak_memory_gib']:.2f} vs {base[0]['peak_memory_gib']:.2f} GiB"
                ratio = ours[0]["tokens_per_s"] / base[0]["tokens_per_s"]
                print(f"{size} {mode}: ours / Llama tokens/s {ratio:.2f}x{peaks}")
    _save(args.json, results, notes)
    return 0


def _save(path: str | None, results: list[dict], notes: list[str]) -> None:
    if not path:
        return
    cuda = torch.cuda.is_available()
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else platform.processor(),
            "notes": notes}  # fmt: skip
    with open(path, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=2)


if __name__ == "__main__":
    sys.exit(main())
