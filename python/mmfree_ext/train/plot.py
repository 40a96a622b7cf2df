"""``mmfree plot RUN_DIR``: loss and throughput curves of a run's ``metrics.jsonl`` as PNGs."""

from __future__ import annotations

import json
import os

__all__ = ["plot_run", "read_metrics"]


def read_metrics(run_dir: str) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` (raises naming the file if it is missing or empty)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist: RUN_DIR must be the out_dir of an `mmfree train` run")
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    if not records:
        raise ValueError(f"{path!r} holds no records yet")
    return records


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write ``loss.png`` and ``throughput.png`` (into ``out_dir``, default RUN_DIR); returns the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("mmfree plot needs matplotlib: pip install matplotlib (or mmfree-ext[train])") from None
    records = read_metrics(run_dir)
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    steps = [r["step"] for r in records]
    paths = []
    for name, key, ylabel in (("loss", "loss", "loss (nats/token)"), ("throughput", "tokens_per_s", "tokens/s")):
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(steps, [r[key] for r in records], lw=1.2)
        if name == "loss" and len(records) >= 20:
            k = max(2, len(records) // 20)
            vals = [r["loss"] for r in records]
            smooth = [
                sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))
            ]
            ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{os.path.basename(os.path.abspath(run_dir))}: {name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
