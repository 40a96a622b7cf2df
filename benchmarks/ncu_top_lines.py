"""The source lines with the most warp-stall samples, from ``ncu --page source --csv``.

    ncu -i prof.ncu-rep --page source --csv --print-source sass > src.csv
    python benchmarks/ncu_top_lines.py src.csv 40

One table per kernel in the export (a header row starts each); for each, the top lines by
all warp-stall samples with their largest stall-reason columns.
"""

from __future__ import annotations

import csv
import sys


def _num(v: str) -> float:
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return 0.0


def tables(path: str) -> list[tuple[list[str], list[list[str]], str]]:
    out: list[tuple[list[str], list[list[str]], str]] = []
    title = ""
    with open(path, newline="", errors="replace") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if len(row) == 1:  # a kernel / file title line
                title = row[0]
                continue
            if any("Warp Stall Sampling" in c for c in row) and not any(_num(c) for c in row):
                out.append((row, [], title))
                continue
            if out:
                out[-1][1].append(row)
    return out


def main() -> None:
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    for header, rows, title in tables(path):
        idx = {c: i for i, c in enumerate(header)}
        key = next((c for c in header if c.startswith("Warp Stall Sampling (All")), None)
        if key is None:
            continue
        total = sum(_num(r[idx[key]]) for r in rows if len(r) > idx[key])
        print(f"## {title}  ({len(rows)} lines, {total:.0f} samples)")
        text_cols = [c for c in header if c in ("#", "Line", "Address", "Source", "File")]
        stall_cols = [c for c in header if "stall" in c.lower() and c != key and "Sampling" not in c]
        rows.sort(key=lambda r: -_num(r[idx[key]]) if len(r) > idx[key] else 0)
        for r in rows[:top]:
            if len(r) <= idx[key]:
                continue
            s = _num(r[idx[key]])
            if s == 0:
                break
            reasons = sorted(((c, _num(r[idx[c]])) for c in stall_cols if idx[c] < len(r)), key=lambda t: -t[1])
            reasons_s = ", ".join(f"{c}={v:.0f}" for c, v in reasons[:4] if v > 0)
            text = " | ".join(r[idx[c]].strip()[:110] for c in text_cols if idx[c] < len(r))
            print(f"{s:8.0f} {100 * s / max(total, 1):5.1f}%  {text}  [{reasons_s}]")
        print()


if __name__ == "__main__":
    main()
