"""The training loop of ``mmfree train`` (and of ``mmfree demo``, which is a preset of it).

One loop for every launch: a plain process or ``torchrun`` ranks, CPU or CUDA, FSDP or not.
Each step takes its rows from :class:`~mmfree_ext.train.data.PackedRows` (world-size
independent order), runs :func:`~mmfree_ext.train.step.train_step` (the same step as the
benchmark), logs, and saves a sharded checkpoint when due. A resumed run continues the same
sequence of steps: the data position, optimizer, schedule and RNG come from the checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..models import MMfreeLMConfig, MMfreeLMForCausalLM
from .config import TrainConfig, TrainSection
from .data import PackedRows, build_corpus, cached_corpus
from .metrics import MetricsWriter, peak_memory_gib
from .parallel import Runtime, build_model, model_config, resolve_precision, setup_runtime, teardown
from .state import checkpoint_dir, export_model, find_latest, load_checkpoint, read_train_state, save_checkpoint
from .step import build_optimizer, lm_loss_sum, lr_at, train_step

__all__ = ["TrainResult", "run_training"]


@dataclass
class TrainResult:
    """What a run did: ``losses`` holds the global mean loss of every step run in this call."""

    start_step: int
    steps: int
    seconds: float
    tokens: int
    tokens_per_s: float
    peak_memory_gib: float
    losses: list[float] = field(default_factory=list)
    model: MMfreeLMForCausalLM | None = None
    config: MMfreeLMConfig | None = None
    checkpoint: str | None = None
    exports: dict[str, str] = field(default_factory=dict)

    def smoothed(self, n: int = 5) -> tuple[float, float]:
        """(mean of the first n losses, mean of the last n losses)."""
        k = max(1, min(n, len(self.losses) // 2 or 1))
        return sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k


def run_training(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Validate ``cfg``, set up the ranks, train, checkpoint, export; returns :class:`TrainResult`."""
    threads = torch.get_num_threads()
    rt = setup_runtime(cfg)  # applies train.threads
    finished = False
    try:
        result = _run(cfg, rt, log)
        finished = True
        return result
    finally:
        teardown(rt, finished)
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _check_compile_mode(t: TrainSection, rt: Runtime, fsdp: bool, micro: int) -> bool:
    """Whether the step runs as CUDA graphs (train.compile_mode = reduce-overhead), after checking
    what that needs: the replayed graphs reuse their output memory, so a second micro-batch's
    backward would overwrite the first one's gradients before they are summed."""
    if t.compile_mode == "default":
        return False
    where = f"train.compile_mode = {t.compile_mode!r}"
    if not t.compile:
        raise ValueError(f"{where} needs train.compile = true")
    if rt.device.type != "cuda":
        raise ValueError(f"{where} needs a CUDA device (CUDA graphs), got {rt.device}")
    if fsdp:
        raise ValueError(f"{where} is not supported under FSDP (train.fsdp); use the default mode")
    if micro * rt.world_size != t.global_batch:
        raise ValueError(
            f"{where} needs one micro-batch per step (train.micro_batch = 0 or global_batch / world size), "
            f"got micro_batch {micro} for global_batch {t.global_batch} on {rt.world_size} rank(s)"
        )
    return True


def _stop_now(rt: Runtime, local: bool) -> bool:
    """Rank 0's time-box decision, shared by every rank (they must stop at the same step)."""
    if not rt.distributed or rt.world_size == 1:
        return local
    flag = torch.tensor([1 if local else 0], device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _run(cfg: TrainConfig, rt: Runtime, log: Callable[[str], None] | None) -> TrainResult:
    t, d = cfg.train, cfg.data
    torch.manual_seed(t.seed)
    if d.source == "synthetic":
        mc = model_config(cfg, 258)
        corpus = build_corpus(d, t.seed, mc.vocab_size)
    else:
        if d.source == "files":
            corpus = cached_corpus(d, os.path.join(t.out_dir, "data_cache"), rt.is_main, rt.barrier)
        else:
            corpus = build_corpus(d, t.seed)
        mc = model_config(cfg, corpus.vocab_size, corpus.bos, corpus.eos)
    rows = PackedRows(corpus, d.seq_len, t.seed)
    model, inner, fsdp = build_model(cfg, mc, rt)
    o = cfg.optim
    opt = build_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    if rt.device.type == "cuda":  # the peak of training (as the benchmark counts it), not of the fp32 init
        torch.cuda.reset_peak_memory_stats(rt.device)

    start_step, elapsed_before, meta = 0, 0.0, None
    resume = cfg.checkpoint.resume
    path = find_latest(t.out_dir) if resume == "auto" else (None if resume == "none" else resume)
    if path is not None:
        saved_model = read_train_state(path).get("config", {}).get("model")
        if saved_model is not None and saved_model != cfg.to_dict()["model"]:
            raise ValueError(
                f"checkpoint {path!r} was trained with [model] {saved_model}, this config has "
                f"{cfg.to_dict()['model']}; set checkpoint.resume = none or another train.out_dir"
            )
        meta = load_checkpoint(path, model, opt, rt)
        start_step, elapsed_before = int(meta["step"]), float(meta.get("elapsed", 0.0))
        if meta.get("global_batch") != t.global_batch or meta.get("seq_len") != d.seq_len:
            raise ValueError(
                f"checkpoint {path!r} was trained with global_batch {meta.get('global_batch')} x seq_len "
                f"{meta.get('seq_len')}; this config has {t.global_batch} x {d.seq_len} "
                "(the data position would not match)"
            )

    micro = t.micro_batch or t.global_batch // rt.world_size
    graphs = _check_compile_mode(t, rt, fsdp, micro)
    loss_fn = lm_loss_sum
    if t.compile and not fsdp:
        loss_fn = torch.compile(lm_loss_sum, fullgraph=True, mode="reduce-overhead" if graphs else None)
    tokens_per_step = t.global_batch * d.seq_len
    total = t.steps or 10**9
    writer = MetricsWriter(t.out_dir, rt.is_main, t.steps or None, start_step, cfg.log.progress, cfg.log.tensorboard)
    say = log or writer.print
    if rt.is_main and cfg.log.summary:
        n_params = sum(p.numel() for p in inner.parameters())
        say(
            f"model h={mc.hidden_size} L={mc.num_hidden_layers} I={mc.intermediate_size} vocab={mc.vocab_size} "
            f"({n_params / 1e6:.2f}M params), {resolve_precision(cfg, rt.device)} on {rt.device} x {rt.world_size}"
            f"{' (FSDP2)' if fsdp else ''}; data {corpus.tokens.shape[0]:,} tokens in "
            f"{corpus.num_documents:,} documents, "
            f"{rows.num_rows:,} rows of {d.seq_len}; batch {t.global_batch} rows ({micro} per micro-batch)"
            + (f"; resumed from {path} at step {start_step}" if path else "")
        )

    model.train()
    losses: list[float] = []
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None, float]] = []
    print_every = cfg.log.print_every
    time_print = max(t.max_seconds / 8, 1.0) if (t.max_seconds and not print_every) else 0.0
    if not print_every and not time_print:
        print_every = max(1, (t.steps - start_step) // 8)
    next_print = time_print
    last_ckpt = path
    t0 = time.perf_counter()
    window_t, window_steps, steady_tokens, steady_time = t0, 0, 0, 0.0
    step = start_step
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if (t.steps and step >= t.steps) or (t.stop_after and step >= t.stop_after):
                break
            if t.max_seconds and _stop_now(rt, elapsed_before + elapsed >= t.max_seconds):
                break
            if not t.steps and step - start_step >= 3:
                done = step - start_step
                total = max(step + 1, int(start_step + done * (t.max_seconds - elapsed_before) / max(elapsed, 1e-9)))
            batches = [rows.make_batch(r) for r in rows.rank_micro_batches(
                step, t.global_batch, rt.rank, rt.world_size, micro)]  # fmt: skip
            if graphs:  # a few cu_seqlens shapes, not one recorded graph per document layout
                batches = [b.with_bucketed_cu_seqlens() for b in batches]
            batches = [b.to(rt.device) for b in batches]
            lr = lr_at(step, total, o.lr, o.warmup_steps, o.min_lr_ratio)
            if graphs:  # a new CUDA-graph generation: the last step's outputs are consumed
                torch.compiler.cudagraph_mark_step_begin()
            res = train_step(
                model,
                opt,
                batches,
                rows.target_tokens(rows.global_rows(step, t.global_batch)),
                loss_fn=loss_fn,
                world_size=rt.world_size,
                clip=t.clip,
                lr=lr,
            )
            pending.append((step, res.loss, res.grad_norm, lr))
            step += 1
            window_steps += 1
            flush = step % cfg.log.every == 0 or step in (t.steps, t.stop_after)
            if flush:
                records = _flush(pending, rt, tokens_per_step, window_t, window_steps, t0, elapsed_before)
                now = time.perf_counter()
                if window_t > t0:  # every window after the first (which holds compilation and warm-up)
                    steady_tokens += window_steps * tokens_per_step
                    steady_time += now - window_t
                window_t, window_steps = now, 0
                losses.extend(r["loss"] for r in records)
                writer.write(records)
                r = records[-1]
                due = (print_every and (step % print_every == 0 or step == start_step + 1)) or (
                    time_print and (step == start_step + 1 or now - t0 >= next_print)
                )
                if due and rt.is_main:
                    say(f"  step {step:5d}  loss {r['loss']:.3f}  ({now - t0:.1f}s)")
                    if time_print:
                        next_print = now - t0 + time_print
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                last_ckpt = _save(cfg, model, opt, rt, step, elapsed_before + time.perf_counter() - t0, total)
        if pending:  # a time-boxed run stopped between two flushes
            records = _flush(pending, rt, tokens_per_step, window_t, window_steps, t0, elapsed_before)
            losses.extend(r["loss"] for r in records)
            writer.write(records)
        seconds = time.perf_counter() - t0
        if (
            cfg.checkpoint.at_end
            and step > start_step
            and not (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
        ):
            last_ckpt = _save(cfg, model, opt, rt, step, elapsed_before + seconds, total)
        exports: dict[str, str] = {}
        if cfg.checkpoint.export:
            exports = export_model(model, mc, os.path.join(t.out_dir, "export"), rt, d.tokenizer)
    finally:
        writer.close()
    ran = step - start_step
    rate = steady_tokens / steady_time if steady_time > 0 else ran * tokens_per_step / max(seconds, 1e-9)
    mem = peak_memory_gib(rt.device)
    if rt.is_main and cfg.log.summary:
        say(
            f"done: steps {start_step}..{step} in {seconds:.1f}s, {rate:,.0f} tokens/s"
            f"{' (after the first log window)' if steady_time > 0 else ''}, peak memory {mem:.2f} GiB"
            + (f"; checkpoint {last_ckpt}" if last_ckpt else "")
        )
    model.eval()
    return TrainResult(
        start_step, ran, seconds, ran * tokens_per_step, rate, mem, losses, inner, mc, last_ckpt, exports
    )


def _flush(
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None, float]],
    rt: Runtime,
    tokens_per_step: int,
    window_t: float,
    window_steps: int,
    t0: float,
    elapsed_before: float,
) -> list[dict[str, Any]]:
    """Bring the pending steps' losses to the host (one sync, one all-reduce) as records."""
    loss = torch.stack([p[1].float() for p in pending])
    norms = [p[2] for p in pending]
    has_norm = all(n is not None for n in norms)
    if has_norm:
        loss = torch.cat([loss, torch.stack([n.float() for n in norms])])
    if rt.distributed and rt.world_size > 1:
        n = len(pending)
        part = loss.clone()
        part[n:] = 0  # the norms are already global
        dist.all_reduce(part)
        loss = torch.cat([part[:n], loss[n:]])
    values = loss.tolist()
    now = time.perf_counter()
    rate = window_steps * tokens_per_step / max(now - window_t, 1e-9)
    mem = peak_memory_gib(rt.device)
    out = []
    for k, (step, _, _, lr) in enumerate(pending):
        out.append(
            {
                "step": step + 1,
                "loss": values[k],
                "grad_norm": values[len(pending) + k] if has_norm else None,
                "lr": lr,
                "tokens": (step + 1) * tokens_per_step,
                "tokens_per_s": rate,
                "memory_gib": mem,
                "elapsed_s": elapsed_before + now - t0,
            }
        )
    pending.clear()
    return out


def _save(cfg: TrainConfig, model, opt, rt: Runtime, step: int, elapsed: float, total: int) -> str:
    path = checkpoint_dir(cfg.train.out_dir, step)
    state = {
        "step": step,
        "rows_consumed": step * cfg.train.global_batch,
        "tokens": step * cfg.train.global_batch * cfg.data.seq_len,
        "global_batch": cfg.train.global_batch,
        "seq_len": cfg.data.seq_len,
        "schedule_total_steps": total,
        "elapsed": elapsed,
        "config": cfg.to_dict(),
    }
    save_checkpoint(path, model, opt, state, rt, cfg.checkpoint.keep)
    return path
