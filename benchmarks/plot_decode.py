"""Plots decode tokens/s vs batch against the bandwidth floor from bench_decode.py's JSON.

python benchmarks/plot_decode.py decode.json docs/decode_tokens_per_s.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("png")
    args = p.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, size in enumerate(sorted({r["size"] for r in rows})):
        rs = sorted((r for r in rows if r["size"] == size), key=lambda r: r["batch"])
        batches = [r["batch"] for r in rs]
        color = f"C{i}"
        ax.plot(batches, [r["tokens_per_s"] for r in rs], "o-", color=color, label=f"{size} generate()")
        ax.plot(batches, [r["floor_tokens_per_s"] for r in rs], "--", color=color, label=f"{size} bandwidth floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Packed MMfreeLM decode, bf16 ({data.get('device', 'GPU')})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
