"""Ternary matmul on CUDA vs bf16 cuBLAS (F.linear), same shapes, same run.

Decode GEMV (M = 1, 4, 8, 16) is judged by bandwidth: bytes = packed weights + int8
activations + scales + bf16 output, printed as GB/s and % of the measured copy bandwidth.
Prefill GEMM (M = 512, 2048, 4096) is judged by TOPS (2*M*N*K) against bf16 F.linear.
``--small-m`` times M = 1..512 on the four 2.7B shapes: the automatic choice (cluster split-K
on sm_90), the unsplit kernels (MMFREE_TERNARY_SPLITK=off) and forced splits below M = 8.
``--splitk-sweep`` is the one-run table for the split-K decisions (issues 11 and 13): M in
{1, ..., 2048} x the four 2.7B shapes, bf16 F.linear against the automatic choice, the
small-M cluster split-K kernel forced to 2 / 4 / 8 CTAs (M <= 512) and, from M = 128, the
wgmma kernel unsplit and forced to split 2 / 3 / 4 / 8 ways (MMFREE_TERNARY_SM90_SPLITK), and
its int8-weight form (MMFREE_TERNARY_GEMM=sm90_int8) unsplit and at 2 / 4 ways; L2 flushed
before every timed run, about 40 s on an H200.
``--gemm-sweep`` times the tensor-core kernels (mma.sync and, on sm_90, the wgmma one in its
decoding and its int8-weight form, forced through MMFREE_TERNARY_GEMM) and the dispatcher's
pick over M = 128..8192 on the four 2.7B shapes, with the % of the int8 peak;
benchmarks/plot_gemm_ratio.py turns its JSON into docs/gemm_ratio_vs_m.png.

    python benchmarks/bench_ternary_cuda.py --device cuda --json ternary_cuda.json
    python benchmarks/bench_ternary_cuda.py --gemm-sweep --json gemm_sweep.json
    python benchmarks/bench_ternary_cuda.py --small-m --json small_m.json
    python benchmarks/bench_ternary_cuda.py --splitk-sweep --json splitk_sweep.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmfree_ext  # registers torch.ops.mmfree.*
from common import Case, Row, bench, print_table, save_json
from mmfree_ext import reference as ref

# (N, K) of the 2.7B model: MLGRU projections, GLU gate (2I = 13824), down, LM head.
GEMV_SHAPES = [(13824, 2560), (2560, 6912), (2560, 2560), (32000, 2560)]
GEMV_ROWS = [1, 4, 8, 16]
GEMM_SHAPES = [(2560, 2560), (13824, 2560), (2560, 6912)]
GEMM_ROWS = [512, 2048, 4096]
SWEEP_SHAPES = [(2560, 2560), (13824, 2560), (2560, 6912), (32000, 2560)]
SWEEP_ROWS = [128, 512, 2048, 4096, 8192]
# --small-m: issue 13's four 2.7B products (MLGRU i/f/g fused 2560->7680, o 2560->2560, GLU
# gate+up 2560->13824, down 6912->2560) over the decode / small-batch range.
SMALL_M_SHAPES = [(2560, 2560), (13824, 2560), (2560, 6912), (7680, 2560)]
SMALL_M_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
SPLITK_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048]
# --splitk-sweep modes: name -> the environment the op reads at every call (unset = auto).
SPLITK_ENV = ("MMFREE_TERNARY_GEMM", "MMFREE_TERNARY_SPLITK", "MMFREE_TERNARY_SM90_SPLITK")
# Dense int8 tensor-core peak of the H200 used for "% of peak" (the figure; the
# boost-clock datasheet value is 1979 TOPS).
INT8_PEAK_TOPS = 1580.0


def make_case(m: int, n: int, k: int, device: str) -> Case:
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    x_scale = torch.rand(m, device=device) * 0.02 + 1e-3
    packed = ref.pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8)).to(device)
    w_scale = torch.full((), 0.05, device=device)
    x_bf16 = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w_bf16 = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    nbytes = packed.numel() + x_q.numel() + 4 * m + 4 + 2 * m * n
    return Case(
        name="ternary_matmul",
        shape=f"M={m} {k}->{n}",
        fn=lambda: torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed, w_scale, torch.bfloat16),
        baseline=lambda: F.linear(x_bf16, w_bf16),
        baseline_name="bf16 F.linear",
        bytes=float(nbytes),
        flops=2.0 * m * n * k,
        extra={"M": m, "N": n, "K": k, "baseline_bytes": 2 * (m * k + n * k + m * n)},
    )


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Runs dense matmuls for a while first: an idle H100 starts at low clocks, and the first
    cases timed (the M = 1 GEMVs) measured 2-7x slow without this."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def gemm_sweep(device: str) -> list[Row]:
    """Each impl of MMFREE_TERNARY_GEMM (the env var is read at every call) against bf16
    F.linear timed in the same case."""
    impls = ["mma", "auto"]
    if torch.cuda.get_device_capability() == (9, 0) and any(
        a.startswith("90") for a in mmfree_ext.build_info()["cuda_archs"]
    ):
        # sm90_int8_notail: the int8-weight form without its tail-wave split (the same kernel
        # as sm90_int8 wherever the tiles fill whole waves).
        impls[1:1] = ["sm90", "sm90_int8", "sm90_int8_notail"]
    rows: list[Row] = []
    keys = ("MMFREE_TERNARY_GEMM", "MMFREE_TERNARY_SM90_TAIL")
    saved = {key: os.environ.get(key) for key in keys}
    try:
        for m in SWEEP_ROWS:
            for n, k in SWEEP_SHAPES:
                case = make_case(m, n, k, device)
                for impl in impls:
                    os.environ["MMFREE_TERNARY_GEMM"] = impl.removesuffix("_notail")
                    os.environ["MMFREE_TERNARY_SM90_TAIL"] = "off" if impl.endswith("_notail") else "auto"
                    case.name = f"ternary_matmul[{impl}]"
                    case.extra["impl"] = impl
                    row = bench(case, device)
                    row.extra["pct_int8_peak"] = 100.0 * (row.tflops or 0.0) / INT8_PEAK_TOPS
                    rows.append(row)
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val
    return rows


def small_m_sweep(device: str) -> list[Row]:
    """ternary_matmul at M = 1..512 on the four 2.7B shapes: the automatic choice (split-K on
    sm_90 where tiles are few), the unsplit selection of before (MMFREE_TERNARY_SPLITK=off),
    and below M = 8 (GEMV territory) the split kernel forced at 2, 4 and 8 CTAs per cluster;
    each against bf16 F.linear timed in the same case."""
    modes = ["auto", "off"]
    rows: list[Row] = []
    saved = os.environ.get("MMFREE_TERNARY_SPLITK")
    try:
        for n, k in SMALL_M_SHAPES:
            w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device)
            packed = ref.pack_ternary(w_q)
            w_bf16 = torch.randn(n, k, device=device, dtype=torch.bfloat16)
            w_scale = torch.full((), 0.05, device=device)
            for m in SMALL_M_ROWS:
                x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
                x_scale = torch.rand(m, device=device) * 0.02 + 1e-3
                x_bf16 = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                base_us = None
                for mode in modes + (["2", "4", "8"] if m < 8 else []):
                    os.environ["MMFREE_TERNARY_SPLITK"] = mode  # read by the op at every call
                    case = Case(
                        name=f"ternary_matmul[splitk={mode}]",
                        shape=f"M={m} {k}->{n}",
                        fn=lambda a=(x_q, x_scale, packed, w_scale): torch.ops.mmfree.ternary_matmul(
                            *a, torch.bfloat16
                        ),
                        baseline=(lambda a=(x_bf16, w_bf16): F.linear(*a)) if base_us is None else None,
                        baseline_name="bf16 F.linear",
                        bytes=float(packed.numel() + x_q.numel() + 4 * m + 2 * m * n),
                        flops=2.0 * m * n * k,
                        extra={"M": m, "N": n, "K": k, "mode": mode},
                    )
                    row = bench(case, device)
                    if base_us is None:
                        base_us = row.baseline_us
                    else:  # one bf16 timing per case, shared by the modes
                        row.baseline_name, row.baseline_us, row.speedup = "bf16 F.linear", base_us, base_us / row.us
                    rows.append(row)
    finally:
        if saved is None:
            os.environ.pop("MMFREE_TERNARY_SPLITK", None)
        else:
            os.environ["MMFREE_TERNARY_SPLITK"] = saved
    return rows


def splitk_modes(m: int, sm90: bool) -> dict[str, dict[str, str]]:
    """The settings timed at M = m: auto; the small-M split kernel forced (M <= 512); the
    wgmma kernel unsplit and split (M >= 128, sm_90 builds only)."""
    modes: dict[str, dict[str, str]] = {"auto": {}}
    if m <= 512:
        for s in ("2", "4", "8"):
            modes[f"sk{s}"] = {"MMFREE_TERNARY_SPLITK": s}
    if m >= 128 and sm90:
        modes["sm90"] = {"MMFREE_TERNARY_GEMM": "sm90", "MMFREE_TERNARY_SM90_SPLITK": "off"}
        for s in ("2", "3", "4", "8"):
            modes[f"sm90s{s}"] = {"MMFREE_TERNARY_GEMM": "sm90", "MMFREE_TERNARY_SM90_SPLITK": s}
        modes["i8"] = {"MMFREE_TERNARY_GEMM": "sm90_int8", "MMFREE_TERNARY_SM90_SPLITK": "off"}
        for s in ("2", "4"):
            modes[f"i8s{s}"] = {"MMFREE_TERNARY_GEMM": "sm90_int8", "MMFREE_TERNARY_SM90_SPLITK": s}
    return modes


def splitk_sweep(device: str) -> list[Row]:
    """One row per (shape, M, mode), each with the same-case bf16 F.linear time."""
    sm90 = torch.cuda.get_device_capability() == (9, 0) and any(
        a.startswith("90") for a in mmfree_ext.build_info()["cuda_archs"]
    )
    saved = {k: os.environ.get(k) for k in SPLITK_ENV}
    rows: list[Row] = []
    try:
        for n, k in SMALL_M_SHAPES:
            packed = ref.pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device))
            w_bf16 = torch.randn(n, k, device=device, dtype=torch.bfloat16)
            w_scale = torch.full((), 0.05, device=device)
            for m in SPLITK_ROWS:
                x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
                x_scale = torch.rand(m, device=device) * 0.02 + 1e-3
                x_bf16 = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                base_us = None
                for mode, env in splitk_modes(m, sm90).items():
                    for key in SPLITK_ENV:  # read by the op at every call
                        os.environ.pop(key, None)
                    os.environ.update(env)
                    case = Case(
                        name=f"ternary_matmul[{mode}]",
                        shape=f"M={m} {k}->{n}",
                        fn=lambda a=(x_q, x_scale, packed, w_scale): torch.ops.mmfree.ternary_matmul(
                            *a, torch.bfloat16
                        ),
                        baseline=(lambda a=(x_bf16, w_bf16): F.linear(*a)) if base_us is None else None,
                        baseline_name="bf16 F.linear",
                        flops=2.0 * m * n * k,
                        extra={"M": m, "N": n, "K": k, "mode": mode, "env": env},
                    )
                    row = bench(case, device)
                    if base_us is None:
                        base_us = row.baseline_us
                    else:  # one bf16 timing per case, shared by the modes
                        row.baseline_name, row.baseline_us, row.speedup = "bf16 F.linear", base_us, base_us / row.us
                    rows.append(row)
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val
    return rows


def print_splitk(rows: list[Row]) -> None:
    """One line per (shape, M): bf16 us, then each mode's us and (in brackets) bf16/ours."""
    by_case: dict[tuple[int, int, int], dict[str, Row]] = {}
    for r in rows:
        e = r.extra
        by_case.setdefault((e["K"], e["N"], e["M"]), {})[e["mode"]] = r
    names = ["auto", "sk2", "sk4", "sk8", "sm90", "sm90s2", "sm90s3", "sm90s4", "sm90s8", "i8", "i8s2", "i8s4"]
    print(f"\n{'K->N':>11} {'M':>5} {'bf16':>7} " + " ".join(f"{n:>13}" for n in names) + "  best")
    for (k, n, m), modes in sorted(by_case.items()):
        cells = [f"{modes[x].us:>7.1f}({modes[x].speedup:>4.2f})" if x in modes else f"{'-':>13}" for x in names]
        best = min(modes.values(), key=lambda r: r.us)
        print(
            f"{str(k) + '->' + str(n):>11} {m:>5} {modes['auto'].baseline_us:>7.1f} "
            + " ".join(cells)
            + f"  {best.extra['mode']}"
        )


def print_small_m(rows: list[Row]) -> None:
    """One line per (M, shape): auto, off, the best forced split below M = 8, bf16, ratios."""
    by_case: dict[tuple[int, int, int], dict[str, Row]] = {}
    for r in rows:
        e = r.extra
        by_case.setdefault((e["M"], e["K"], e["N"]), {})[e["mode"]] = r
    head = f"{'M':>4} {'K->N':>11} {'auto us':>8} {'off us':>8} {'forced':>12} {'bf16 us':>8} {'auto x':>7}"
    print(f"\n{head} {'target':>6}")
    for (m, k, n), modes in sorted(by_case.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        auto, off = modes["auto"], modes["off"]
        forced = [modes[s] for s in ("2", "4", "8") if s in modes]
        best = min(forced, key=lambda r: r.us) if forced else None
        fstr = f"{best.us:.1f}@{best.extra['mode']}" if best else "-"
        target = "1.5x" if 2 <= m <= 64 else ("1.0x" if 128 <= m <= 256 else "-")
        print(
            f"{m:>4} {str(k) + '->' + str(n):>11} {auto.us:>8.1f} {off.us:>8.1f} {fstr:>12} "
            f"{auto.baseline_us:>8.1f} {auto.speedup:>7.2f} {target:>6}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="only cuda is meaningful here")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true", help="M=1 and M=512 only")
    parser.add_argument("--gemm-sweep", action="store_true", help="only the prefill GEMM sweep (M = 128..8192)")
    parser.add_argument("--small-m", action="store_true", help="only the small-M sweep (M = 1..512, split-K)")
    parser.add_argument(
        "--splitk-sweep", action="store_true", help="only the split-K decision table (M = 1..2048, every split mode)"
    )
    args = parser.parse_args()
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit("bench_ternary_cuda needs a CUDA device (--device cuda)")
    torch.manual_seed(0)
    warm_up_gpu()
    if args.splitk_sweep:
        t0 = time.perf_counter()
        rows = splitk_sweep(args.device)
        print_splitk(rows)
        print(f"\n{len(rows)} timings in {time.perf_counter() - t0:.0f} s")
        if args.json:
            save_json(rows, args.json, {"bench": "ternary_cuda_splitk_sweep"})
        return
    if args.small_m:
        rows = small_m_sweep(args.device)
        print_table(rows, "small-M ternary_matmul (bf16 out) vs bf16 F.linear")
        print_small_m(rows)
        if args.json:
            save_json(rows, args.json, {"bench": "ternary_cuda_small_m"})
        return
    if args.gemm_sweep:
        rows = gemm_sweep(args.device)
        print_table(rows, f"prefill GEMM sweep (bf16 out) vs bf16 F.linear; int8 peak {INT8_PEAK_TOPS:.0f} TOPS")
        print(f"\n{'impl':<9} {'M':>5} {'K->N':>12} {'us':>9} {'bf16 us':>9} {'ratio':>6} {'TOPS':>7} {'%peak':>6}")
        for r in rows:
            e = r.extra
            print(
                f"{e['impl']:<9} {e['M']:>5} {str(e['K']) + '->' + str(e['N']):>12} {r.us:>9.1f} "
                f"{r.baseline_us:>9.1f} {r.speedup:>6.2f} {r.tflops:>7.0f} {e['pct_int8_peak']:>6.1f}"
            )
        if args.json:
            save_json(rows, args.json, {"bench": "ternary_cuda_gemm_sweep", "int8_peak_tops": INT8_PEAK_TOPS})
        return
    gemv_rows = [1] if args.quick else GEMV_ROWS
    gemm_rows = [512] if args.quick else GEMM_ROWS

    gemv = [bench(make_case(m, n, k, args.device), args.device) for m in gemv_rows for n, k in GEMV_SHAPES]
    print_table(gemv, "decode GEMV (bf16 out) vs bf16 F.linear")
    gemm = [bench(make_case(m, n, k, args.device), args.device) for m in gemm_rows for n, k in GEMM_SHAPES]
    print_table(gemm, "prefill GEMM (bf16 out) vs bf16 F.linear")
    rows: list[Row] = gemv + gemm
    if args.json:
        save_json(rows, args.json, {"bench": "ternary_cuda"})


if __name__ == "__main__":
    main()
