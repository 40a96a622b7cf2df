"""What a person watching a run sees: the progress line, ``metrics.jsonl``, TensorBoard.

Only rank 0 writes. Per-step losses stay on the device until a flush (every ``log.every``
steps), so logging does not synchronize the GPU on every step.
"""

from __future__ import annotations

import json
import os
import resource
from typing import Any

import torch

from .._progress import progress_bar

__all__ = ["MetricsWriter", "peak_memory_gib"]

METRICS_FILE = "metrics.jsonl"


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory of ``device``, or the process's peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class MetricsWriter:
    """Appends one JSON record per step to ``OUT_DIR/metrics.jsonl`` (rank 0), drives the bar."""

    def __init__(
        self,
        out_dir: str,
        enabled: bool,
        total_steps: int | None,
        start_step: int,
        progress: bool,
        tensorboard: bool,
    ) -> None:
        self.enabled = enabled
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.bar = None
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._truncate_after(start_step)
        self.bar = progress_bar(total_steps, "training", disable=not progress)
        if start_step and total_steps:
            self.bar.update(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start_step + 1)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop their old records."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as fh:
            keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.writelines(keep)

    def write(self, records: list[dict[str, Any]]) -> None:
        if not self.enabled or not records:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
        last = records[-1]
        if self.bar is not None:
            self.bar.update(len(records))
            self.bar.set_postfix_str(
                f"loss {last['loss']:.3f} | {_fmt_rate(last['tokens_per_s'])} tok/s | {last['memory_gib']:.2f} GiB"
            )
        if self.tb is not None:
            for r in records:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_gib"):
                    if r.get(key) is not None:
                        self.tb.add_scalar(f"train/{key}", r[key], r["step"])

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
