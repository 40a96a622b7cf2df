"""Plots the prefill GEMM's speed relative to bf16 cuBLAS against M, from the JSON of
``bench_ternary_cuda.py --gemm-sweep``: one panel per 2.7B shape, one line per kernel
(mma.sync, sm_90a wgmma in its two forms, the dispatcher's pick), ratio = bf16 F.linear time
/ ours. ``--impls`` keeps some lines only (e.g. without ``auto`` where the JSON predates the
current dispatch rule).

    python benchmarks/plot_gemm_ratio.py gemm_sweep.json --out docs/gemm_ratio_vs_m.png

Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(path: str) -> tuple[dict, dict[tuple[int, int], dict[str, list[tuple[int, float]]]]]:
    """Returns the JSON's meta and {(K, N): {impl: [(M, ratio), ...]}} sorted by M."""
    data = json.loads(Path(path).read_text())
    series: dict[tuple[int, int], dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in data["rows"]:
        e = row["extra"]
        series[(e["K"], e["N"])][e["impl"]].append((e["M"], row["speedup"]))
    for by_impl in series.values():
        for points in by_impl.values():
            points.sort()
    return data["meta"], series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="output of bench_ternary_cuda.py --gemm-sweep --json")
    parser.add_argument("--out", default="docs/gemm_ratio_vs_m.png")
    parser.add_argument("--impls", nargs="+", default=None, help="lines to draw (default: all in the JSON)")
    parser.add_argument("--note", default="", help="appended to the title")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, series = load(args.json)
    shapes = sorted(series, key=lambda kn: (kn[0], kn[1]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), sharey=True)
    labels = {
        "mma": "mma.sync (sm_80+)",
        "sm90": "wgmma, decode in pipeline (sm_90a)",
        "sm90_int8": "wgmma, int8 weights (sm_90a)",
        "sm90_int8_notail": "wgmma, int8 weights, no tail split",
        "auto": "dispatch",
    }
    for ax, (k, n) in zip(axes, shapes, strict=True):
        for impl, points in series[(k, n)].items():
            if args.impls is not None and impl not in args.impls:
                continue
            ms, ratios = zip(*points, strict=True)
            ax.plot(ms, ratios, marker="o", label=labels.get(impl, impl), linestyle="--" if impl == "auto" else "-")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.axhline(1.3, color="green", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{k} -> {n}")
        ax.set_xlabel("M (tokens)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("bf16 F.linear time / ternary time")
    axes[0].legend(fontsize=8)
    note = f", {args.note}" if args.note else ""
    fig.suptitle(f"ternary_matmul vs bf16 cuBLAS, {meta.get('gpu', '?')} (dotted: the 1.3x target){note}")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
