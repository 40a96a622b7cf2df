"""Shared timing helpers for the Python benchmarks.

Conventions (nvbench / llm.c style): every case declares the bytes it must move and the
FLOPs it must do, so each result prints GB/s and its fraction of the measured copy
bandwidth; CUDA timings use events with the L2 flushed before every run, a warm-up that
is not timed, and the median over repeats; CPU timings use perf_counter medians. Results
print as an aligned table and can be saved as JSON for comparison between runs.

Usage::

    from common import Case, bench, copy_bandwidth, print_table, save_json
    rows = [bench(Case("rms_norm_quant", "M=8192 N=2560", fn, baseline=torch_fn,
                       bytes=..., flops=...), device="cuda")]
    print_table(rows)
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Case:
    """One benchmark case: our function and, optionally, a baseline timed in the same run."""

    name: str
    shape: str
    fn: Callable[[], Any]
    baseline: Callable[[], Any] | None = None
    baseline_name: str = "torch"
    bytes: float = 0.0
    flops: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    name: str
    shape: str
    device: str
    us: float
    baseline_name: str | None
    baseline_us: float | None
    speedup: float | None
    gbps: float | None
    pct_of_copy_bw: float | None
    tflops: float | None
    extra: dict[str, Any]


_L2_FLUSH: dict[str, torch.Tensor] = {}
_SLEEP_CYCLES = 200_000  # ~100 us at H100 clocks


def _flush_l2(device: torch.device) -> None:
    key = str(device)
    if key not in _L2_FLUSH:
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        _L2_FLUSH[key] = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device=device)
    _L2_FLUSH[key].zero_()


def time_cuda(fn: Callable[[], Any], *, warmup: int = 10, reps: int = 50, flush_l2: bool = True) -> list[float]:
    """Times fn on the current CUDA stream with events; returns microseconds per run."""
    device = torch.device("cuda", torch.cuda.current_device())
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    stops = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush_l2:
            _flush_l2(device)
        # Keep the GPU busy while the CPU launches fn: otherwise a kernel shorter than the
        # Python + dispatcher launch path is timed with the launch gap in it (the M = 1
        # GEMVs read 2-7x slow and erratic).
        torch.cuda._sleep(_SLEEP_CYCLES)
        starts[i].record()
        fn()
        stops[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, stops, strict=True)]


def time_cpu(fn: Callable[[], Any], *, warmup: int = 3, reps: int = 20, min_seconds: float = 0.2) -> list[float]:
    """Times fn with perf_counter; runs at least `reps` times and about `min_seconds` in all."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(out) < reps or (time.perf_counter() < t_end and len(out) < 10 * reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def median_us(fn: Callable[[], Any], device: str, **kw: Any) -> float:
    """Median time of fn in microseconds on `device` ('cpu' or 'cuda')."""
    times = time_cuda(fn, **kw) if device.startswith("cuda") else time_cpu(fn, **kw)
    return statistics.median(times)


_COPY_BW: dict[str, float] = {}


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + bytes written), cached per device."""
    if device in _COPY_BW:
        return _COPY_BW[device]
    if not device.startswith("cuda"):
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), device)
    _COPY_BW[device] = nbytes / (us * 1e-6) / 1e9
    return _COPY_BW[device]


def bench(case: Case, device: str, **kw: Any) -> Row:
    """Times a case (and its baseline) on `device` and derives bandwidth and ratios."""
    us = median_us(case.fn, device, **kw)
    base_us = median_us(case.baseline, device, **kw) if case.baseline is not None else None
    gbps = case.bytes / (us * 1e-6) / 1e9 if case.bytes else None
    peak = copy_bandwidth(device) if case.bytes else None
    return Row(
        name=case.name,
        shape=case.shape,
        device=device,
        us=us,
        baseline_name=case.baseline_name if case.baseline is not None else None,
        baseline_us=base_us,
        speedup=(base_us / us) if base_us else None,
        gbps=gbps,
        pct_of_copy_bw=(100.0 * gbps / peak) if gbps and peak else None,
        tflops=(case.flops / (us * 1e-6) / 1e12) if case.flops else None,
        extra=dict(case.extra),
    )


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[Row], title: str | None = None) -> None:
    """Prints rows as an aligned table: ours, baseline, speedup, GB/s and % of copy bandwidth."""
    if title:
        print(f"\n## {title}")
    header = f"{'case':<30} {'shape':<30} {'dev':<5} {'ours us':>10} {'baseline':>18} {'base us':>10} "
    header += f"{'speedup':>8} {'GB/s':>8} {'%copy':>6} {'TFLOP/s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.name:<30} {r.shape:<30} {r.device:<5} {r.us:>10.2f} {r.baseline_name or '-':>18} "
            f"{_fmt(r.baseline_us, '>10.2f'):>10} {_fmt(r.speedup, '>7.2f'):>8} {_fmt(r.gbps, '>8.1f'):>8} "
            f"{_fmt(r.pct_of_copy_bw, '>5.1f'):>6} {_fmt(r.tflops, '>8.2f'):>8}"
        )


def save_json(rows: list[Row], path: str, meta: dict[str, Any] | None = None) -> None:
    """Writes rows (and device/torch metadata) as JSON."""
    info: dict[str, Any] = {"torch": torch.__version__, **(meta or {})}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    with open(path, "w") as fh:
        json.dump({"meta": info, "rows": [asdict(r) for r in rows]}, fh, indent=2)
