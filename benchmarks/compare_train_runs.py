"""Compare `mmfree train` runs (their metrics.jsonl): throughput per GPU, scaling, peak memory,
and how closely each loss curve follows a reference run's (issue 19's table).

    python benchmarks/compare_train_runs.py --ref 1gpu=runs/a --run 2gpu=runs/b:2 --json out.json

``--run NAME=DIR:WORLD`` (WORLD = the number of GPUs the run used; the reference's is given
the same way). Throughput is the median ``tokens_per_s`` of the steps after ``--skip`` (the
first steps hold the warm-up and compilation); ``tokens/s per GPU`` divides it by WORLD, and
the scaling efficiency is per-GPU throughput relative to the reference's. Loss curves are
compared step by step where both runs logged the step: the largest relative difference and
the largest difference of the 10-step running means.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _load(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no metrics.jsonl (did the run start?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _parse(spec: str) -> tuple[str, str, int]:
    name, _, rest = spec.partition("=")
    run_dir, _, world = rest.rpartition(":") if ":" in rest else (rest, "", "1")
    if not name or not run_dir:
        raise SystemExit(f"--run {spec!r}: expected NAME=DIR[:WORLD]")
    return name, run_dir, int(world or 1)


def _smooth(xs: list[float], n: int = 10) -> list[float]:
    return [statistics.fmean(xs[max(0, i - n + 1) : i + 1]) for i in range(len(xs))]


def summarize(records: list[dict], world: int, skip: int) -> dict:
    timed = [r["tokens_per_s"] for r in records if r.get("step", 0) > skip and r.get("tokens_per_s")]
    tps = statistics.median(timed) if timed else float("nan")
    return {
        "steps": len(records),
        "world": world,
        "tokens_per_s": tps,
        "tokens_per_s_per_gpu": tps / world,
        "peak_gib": max((r.get("memory_gib", 0.0) for r in records), default=0.0),
        "final_loss": records[-1]["loss"] if records else float("nan"),
    }


def curve_gap(ref: list[dict], run: list[dict]) -> dict:
    a = {r["step"]: r["loss"] for r in ref}
    b = {r["step"]: r["loss"] for r in run}
    steps = sorted(set(a) & set(b))
    if not steps:
        return {"common_steps": 0}
    la, lb = [a[s] for s in steps], [b[s] for s in steps]
    rel = [abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True)]
    sm = [abs(x - y) for x, y in zip(_smooth(la), _smooth(lb), strict=True)]
    return {
        "common_steps": len(steps),
        "first_step": steps[0],
        "max_rel_diff": max(rel),
        "max_smoothed_abs_diff": max(sm),
        "mean_abs_diff_last_50": statistics.fmean(abs(x - y) for x, y in zip(la[-50:], lb[-50:], strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True, help="NAME=DIR[:WORLD] of the reference run (1 GPU)")
    p.add_argument("--run", action="append", default=[], help="NAME=DIR[:WORLD], repeatable")
    p.add_argument("--skip", type=int, default=10, help="steps left out of the throughput median")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    ref_name, ref_dir, ref_world = _parse(args.ref)
    ref = _load(ref_dir)
    base = summarize(ref, ref_world, args.skip)
    rows = [{"name": ref_name, **base}]
    for spec in args.run:
        name, run_dir, world = _parse(spec)
        recs = _load(run_dir)
        s = summarize(recs, world, args.skip)
        s["scaling_efficiency"] = s["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
        s["vs_ref"] = curve_gap(ref, recs)
        rows.append({"name": name, **s})
    print(f"{'run':>16} {'GPUs':>4} {'tok/s':>10} {'tok/s/GPU':>10} {'eff':>6} {'peak GiB':>9} {'max rel dloss':>13}")
    for r in rows:
        eff = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else "-"
        gap = r.get("vs_ref", {}).get("max_rel_diff")
        gap_s = f"{gap:.2e}" if gap is not None else "-"
        print(
            f"{r['name']:>16} {r['world']:>4} {r['tokens_per_s']:>10.0f} {r['tokens_per_s_per_gpu']:>10.0f}"
            f" {eff:>6} {r['peak_gib']:>9.2f} {gap_s:>13}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
