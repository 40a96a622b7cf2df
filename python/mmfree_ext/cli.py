"""The ``mmfree`` command line (also ``python -m mmfree_ext``).

Subcommands: ``demo`` (train, pack, generate, compare; no download), ``train`` (a config file
and/or flags; torchrun or one process), ``plot`` (a training run's curves), ``generate`` (a
local checkpoint folder), ``convert`` (pack a checkpoint to 2 bits), ``bench`` (model
throughput on random weights at a named size; ``--train`` for the training step), ``eval``
(perplexity of a checkpoint on a text file, latent vs packed) and ``info`` (build and CPU
features).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

__all__ = ["build_parser", "main"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def _device(name: str) -> torch.device:
    from ._native import cuda_available

    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: no CUDA device is available")
    return torch.device(name)


def _cmd_info(args: argparse.Namespace) -> int:
    from . import build_info, cpu_features

    print(json.dumps({"build_info": build_info(), "cpu_features": cpu_features()}, indent=2, default=str))
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(
        seconds=args.seconds,
        device=args.device,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        seed=args.seed,
        threads=args.threads,
    )
    run_demo(settings)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import ConfigError, run_training
    from .train.config import config_from_args

    try:
        cfg = config_from_args(args)
        if args.print_config:
            import json as _json

            print(_json.dumps(cfg.to_dict(), indent=2))
            return 0
        run_training(cfg)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_run

    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print("wrote " + ", ".join(paths))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .models import MMfreeLMForCausalLM, generate, load_tokenizer, model_memory_bytes

    device = _device(args.device)
    dtype = _DTYPES[args.dtype] if args.dtype else None
    model = MMfreeLMForCausalLM.from_pretrained(args.model, device=device, dtype=dtype, pack=not args.no_pack)
    cfg = model.config
    tok = load_tokenizer(args.model, cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
    print(f"loaded {args.model}: {model_memory_bytes(model) / 2**20:.1f} MiB on {device}", file=sys.stderr)
    prompt_ids = tok.encode(args.prompt)
    generated: list[int] = []
    shown = ""

    def stream(_b: int, token: int) -> None:
        nonlocal shown
        generated.append(token)
        text = tok.decode(generated)
        if text.startswith(shown):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text

    sys.stdout.write(args.prompt)
    stops = [cfg.eos_token_id] if cfg.eos_token_id is not None and not args.ignore_eos else []
    res = generate(
        model,
        [prompt_ids],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_tokens=stops,
        on_token=stream,
        decode_mode=args.decode_mode,
    )
    sys.stdout.write("\n")
    print(
        f"[{len(prompt_ids)} prompt tokens in {res.prefill_seconds * 1e3:.1f} ms; "
        f"{res.decode_steps} decode steps at {res.decode_tokens_per_second:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .models import MMfreeLMForCausalLM, model_memory_bytes, save_packed

    t0 = time.perf_counter()
    model = MMfreeLMForCausalLM.from_pretrained(args.model_dir, device=_device(args.device))
    before = model_memory_bytes(model)
    save_packed(model, args.out_dir)
    after = model_memory_bytes(model)
    print(
        f"packed {model.num_bit_linears()} BitLinear layers: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB; "
        f"wrote {args.out_dir} in {time.perf_counter() - t0:.1f}s"
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .models.bench import bench_decode, bench_prefill, random_packed_model

    device = _device(args.device)
    if args.compile_mode != "default" and not args.train:
        raise SystemExit("error: --compile-mode applies to --train (with --compile)")
    if args.train:
        from .train.bench import bench_train_step

        if args.compile_mode != "default" and not args.compile:
            raise SystemExit("error: --compile-mode needs --compile")
        mode = None if args.compile_mode == "default" else args.compile_mode
        r = bench_train_step(
            args.config, device, batch=args.train_batch, seq_len=args.train_seq, steps=args.train_steps,
            compile=args.compile, compile_mode=mode, dtype=_DTYPES[args.dtype] if args.dtype else None,
        )  # fmt: skip
        how = "eager" if not args.compile else ("compiled" if mode is None else f"compiled, {mode}")
        print(
            f"{args.config} training step on {device} ({r['dtype']}, {how}), "
            f"batch {args.train_batch} x {args.train_seq}: {r['tokens_per_s']:,.0f} tokens/s"
            + (f", peak memory {r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "")
        )
        return 0
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = random_packed_model(args.config, device, dtype)
    from .models import model_memory_bytes

    mem = model_memory_bytes(model)
    print(f"{args.config} packed on {device} ({dtype}): model memory {mem / 2**20:.1f} MiB ({mem:,} bytes)")
    for batch in args.batch:
        tps = bench_decode(model, batch, args.tokens, mode=args.decode_mode)
        print(f"  decode batch {batch:3d}: {tps:10.1f} tok/s ({tps / batch:8.1f} tok/s per sequence)")
    if args.prefill:
        tps = bench_prefill(model, 1, args.prefill)
        print(f"  prefill {args.prefill} tokens: {tps:10.1f} tok/s")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval import evaluate_checkpoint

    try:
        with open(args.text, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise SystemExit(f"error: --text {args.text}: {exc.strerror}") from exc
    try:
        report = evaluate_checkpoint(
            args.model,
            text,
            window=args.window,
            stride=args.stride if args.stride is not None else max(1, args.window // 2),
            device=_device(args.device),
            dtype=_DTYPES[args.dtype] if args.dtype else None,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print("\n".join(report.lines()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report.to_dict(), fh, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfree", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train a small byte-level model, pack it, generate, compare to the reference")
    d.add_argument("--seconds", type=float, default=60.0, help="training time (default 60)")
    d.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    d.add_argument("--hidden-size", type=int, default=None)
    d.add_argument("--num-layers", type=int, default=None)
    d.add_argument("--batch-size", type=int, default=None)
    d.add_argument("--seq-len", type=int, default=None)
    d.add_argument("--max-new-tokens", type=int, default=200)
    d.add_argument("--prompt", default="Return the ")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    d.set_defaults(func=_cmd_demo)

    from .train.config import add_config_flags

    t = sub.add_parser(
        "train",
        help="train on local data (torchrun --nproc_per_node=N -m mmfree_ext train CONFIG, or one process)",
        description="Train an MMfreeLM: FSDP2 over torchrun ranks (or one plain process), local text/jsonl/"
        "parquet data packed into rows with document boundaries, sharded checkpoints with exact resume. "
        "Settings come from the TOML file CONFIG (sections [model] [data] [train] [optim] [checkpoint] [log]) "
        "and the --section.key flags, which override it.",
    )
    t.add_argument("config", nargs="?", default=None, help="TOML config file (optional: flags alone also work)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_config_flags(t)
    t.set_defaults(func=_cmd_train)

    pl = sub.add_parser("plot", help="write loss.png and throughput.png of a training run folder")
    pl.add_argument("run_dir", help="the out_dir of an `mmfree train` run (holds metrics.jsonl)")
    pl.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR)")
    pl.set_defaults(func=_cmd_plot)

    g = sub.add_parser("generate", help="generate text from a local checkpoint folder")
    g.add_argument("--model", required=True, help="local folder with config.json and weights")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="compute dtype (default: as stored)")
    g.add_argument("--decode-mode", default="auto", choices=["auto", "eager", "cuda_graph", "compile"])
    g.add_argument("--no-pack", action="store_true", help="keep latent weights (slow path)")
    g.add_argument("--ignore-eos", action="store_true")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser("convert", help="pack a checkpoint's BitLinear weights to 2 bits and save it")
    c.add_argument("model_dir")
    c.add_argument("out_dir")
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=_cmd_convert)

    b = sub.add_parser("bench", help="decode/prefill throughput on random weights at a named size")
    b.add_argument("--config", default="tiny", help="tiny, 370M, 1.3B or 2.7B")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    b.add_argument("--batch", type=int, nargs="+", default=[1])
    b.add_argument("--tokens", type=int, default=64, help="decode steps timed per batch size")
    b.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens")
    b.add_argument("--decode-mode", default="auto", choices=["auto", "eager", "cuda_graph", "compile"])
    b.add_argument("--train", action="store_true", help="time the training step (the one `mmfree train` runs)")
    b.add_argument("--train-batch", type=int, default=4, help="--train: rows per step (default 4)")
    b.add_argument("--train-seq", type=int, default=2048, help="--train: tokens per row (default 2048)")
    b.add_argument("--train-steps", type=int, default=10, help="--train: timed steps after 3 warm-up steps")
    b.add_argument("--compile", action="store_true", help="--train: torch.compile the loss (fullgraph)")
    b.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead"],
                   help="--train --compile: torch.compile mode (reduce-overhead: CUDA graphs)")  # fmt: skip
    b.set_defaults(func=_cmd_bench)

    e = sub.add_parser("eval", help="perplexity of a checkpoint on a text file (sliding window), latent vs packed")
    e.add_argument("--model", required=True, help="local folder with config.json and weights")
    e.add_argument("--text", required=True, help="UTF-8 text file to score")
    e.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default window/2)")
    e.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward (default 1; same result)")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="compute dtype (default: as stored)")
    e.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    e.set_defaults(func=_cmd_eval)

    i = sub.add_parser("info", help="print build_info() and cpu_features()")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
