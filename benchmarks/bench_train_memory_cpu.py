"""Peak memory of one CPU training step (forward + backward) with and without the fused loss.

"fused": ``lm_loss`` (``model(inputs, labels=targets, shift_labels=False).loss``, the lm_head
fused with the cross entropy, chunked over rows); "materialized": the same model's fp32
logits ``[B*T, V]`` then ``F.cross_entropy``. Each variant runs in its own process: one
warm-up step, then the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` = 5) and
one timed step runs; the figure is ``VmHWM - VmRSS`` before the step (Linux only), i.e. the
step's own peak above what was resident (model, inputs, allocator caches), with glibc told to
serve large blocks from mmap so that RSS follows live memory. Also reported: the bytes that
autograd saves for the backward (saved_tensors_hooks, each storage once, parameters excluded).

    PYTHONPATH=python python benchmarks/bench_train_memory_cpu.py [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from mmfree_ext.models import MMfreeLMConfig, MMfreeLMForCausalLM


def lm_loss(model: MMfreeLMForCausalLM, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of ``batch [B, T+1]`` through the fused lm_head + cross entropy."""
    return model(batch[:, :-1], labels=batch[:, 1:], shift_labels=False).loss


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(variant: str, hidden: int, layers: int, vocab: int, batch: int, seq: int) -> dict:
    torch.manual_seed(0)
    cfg = MMfreeLMConfig.from_dict(
        {"model_type": "hgrn_bit", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers}
    )
    model = MMfreeLMForCausalLM(cfg, init_seed=0)
    data = torch.randint(0, vocab, (batch, seq + 1))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if variant == "fused":
            loss = lm_loss(model, data)
        else:
            logits = model(data[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, vocab), data[:, 1:].reshape(-1))
        loss.backward()
        return float(loss.detach())

    step()  # warm-up: lazy inits, allocator caches
    model.zero_grad(set_to_none=True)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    # What the forward keeps alive for the backward: every tensor autograd saves, each storage
    # once, parameters excluded (they live anyway). Deterministic, unlike RSS.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return {"variant": variant, "loss": loss, "step_s": seconds, "peak_above_rss_MiB": (peak - rss0) / 1024,
            "saved_for_backward_MiB": sum(saved.values()) / 2**20,
            "logits_fp32_MiB": batch * seq * vocab * 4 / 2**20}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    dims = (a.hidden, a.layers, a.vocab, a.batch, a.seq)
    if a.child:
        print(json.dumps(_child(a.child, *dims)))
        return
    rows = []
    for variant in ("fused", "materialized"):
        cmd = [sys.executable, __file__, "--child", variant, "--hidden", str(a.hidden), "--layers", str(a.layers),
               "--vocab", str(a.vocab), "--batch", str(a.batch), "--seq", str(a.seq)]  # fmt: skip
        # Large blocks straight from mmap and back to the OS on free: RSS then follows live memory
        # (glibc's dynamic threshold would otherwise keep freed blocks resident, at random).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"CPU training step, h={a.hidden} L={a.layers} V={a.vocab} B={a.batch} T={a.seq} fp32")
    print(f"{'variant':<14} {'loss':>8} {'step s':>8} {'peak above RSS MiB':>20} {'saved for bwd MiB':>18}")
    for r in rows:
        print(f"{r['variant']:<14} {r['loss']:>8.4f} {r['step_s']:>8.2f} {r['peak_above_rss_MiB']:>20.1f} "
              f"{r['saved_for_backward_MiB']:>18.1f}")  # fmt: skip
    print(f"(one fp32 [B*T, V] logits tensor: {rows[0]['logits_fp32_MiB']:.1f} MiB)")
    if a.json:
        Path(a.json).write_text(json.dumps({"dims": vars(a), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
