"""CPU benchmark of issue 14, one script for the lead's quiet-machine run (benchmarks/cpu_run.sh).

Sections (``--sections``, all by default):

* ``gemv``: M=1 ternary_matmul at the 4 products of each MMfreeLM size (h->h for i/f/g/o, h->2I
  gate, I->h down, h->V lm_head), 1 and 2 threads, hot (one weight copy) and cold (weights
  rotated over copies filling 2x the last-level cache, read from sysfs), against llama.cpp's
  TQ2_0 through ggml-python (when installed) and torch bf16/fp32 F.linear (hot). Ours and the
  baselines are timed interleaved, rep by rep, so machine noise hits them alike; medians.
* ``gemm``: M=512 at the 2.7B shapes against torch bf16 F.linear (oneDNN, AMX-BF16 where the
  CPU has it), 2 threads.
* ``gemm_t``: the training dX product ``ternary_matmul_t`` (fp32 grad [M, N] @ W [N, K]) at
  M=512 and 2048 on the 2.7B shapes: the AMX-BF16 path, the AVX path (ext cap vnni), torch bf16
  and fp32 ``grad @ W``, interleaved.
* ``mlgru``: the MLGRU scan B=1 T=512 D=1024 fp32; ``norm``: rms_norm_quant / rms_norm rows.
* ``decode``: tokens/s at batch 1 through the public ``generate()`` (370M fp32 and bf16, 1.3B
  and 2.7B fp32; random packed weights).

Read bandwidth (2 threads, a 1 GiB torch.sum) is measured first; GB/s columns divide the bytes
each case must read by its median time.

    python benchmarks/bench_cpu.py --json cpu.json
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ggml_tq2
import mmfree_ext
from mmfree_ext import reference as ref

SHAPES = {
    "370M": {"h": 1024, "I": 2816},
    "1.3B": {"h": 2048, "I": 5632},
    "2.7B": {"h": 2560, "I": 6912},
}
VOCAB = 32000


def llc_bytes() -> int:
    """Size of the largest (last-level) CPU cache from sysfs; 96 MiB if it cannot be read."""
    best_level, best = -1, 0
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            level = int(Path(d, "level").read_text())
            text = Path(d, "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        size = int(text[:-1] if text[-1] in "KMG" else text) * mult
        if level > best_level or (level == best_level and size > best):
            best_level, best = level, size
    return best or (96 << 20)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, min_seconds: float = 0.3) -> dict[str, float]:
    """Median microseconds of each fn, timed in turn within every repetition."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_end = time.perf_counter() + min_seconds
    r = 0
    while r < reps or time.perf_counter() < t_end:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        r += 1
        if r >= 20 * reps:
            break
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def read_bandwidth(threads: int) -> float:
    torch.set_num_threads(threads)
    a = torch.ones(1 << 28)
    us = interleaved({"sum": lambda: a.sum()}, reps=5, min_seconds=0.0)["sum"]
    return a.numel() * 4 / us / 1e3


def gemv_rows(threads_list: list[int], sizes: list[str], cold_bytes: int) -> list[dict]:
    rows = []
    for size in sizes:
        h, inter = SHAPES[size]["h"], SHAPES[size]["I"]
        for name, k, n in (("ifgo", h, h), ("gate", h, 2 * inter), ("down", inter, h), ("lm_head", h, VOCAB)):
            rows += gemv_shape(size, name, k, n, threads_list, cold_bytes)
    return rows


def gemv_shape(size: str, name: str, k: int, n: int, threads_list: list[int], cold_bytes: int) -> list[dict]:
    """One product shape: hot/cold x threads, ours against ggml TQ2_0 and torch F.linear."""
    rows = []
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    packed = ref.pack_ternary(w)
    copies = [packed] + [packed.clone() for _ in range(max(1, -(-cold_bytes // packed.numel())) - 1)]
    x = torch.randn(1, k)
    x_q, x_s = ref.rms_norm_quant(x, torch.ones(k))
    ws = torch.ones(())
    wb, wf = w.to(torch.bfloat16), w.float()
    xb = x.to(torch.bfloat16)
    g = None
    if ggml_tq2.available():
        gcopies = max(1, -(-cold_bytes // (n * k // 256 * 66)))
        g = ggml_tq2.TQ2Matmul(w.float().numpy(), x.numpy(), copies=gcopies)
    state = {"i": 0}

    def ours_hot() -> None:
        torch.ops.mmfree.ternary_matmul(x_q, x_s, packed, ws, torch.float32)

    def ours_cold() -> None:
        state["i"] = (state["i"] + 1) % len(copies)
        torch.ops.mmfree.ternary_matmul(x_q, x_s, copies[state["i"]], ws, torch.float32)

    for threads in threads_list:
        torch.set_num_threads(threads)
        hot = {"ours": ours_hot, "torch_bf16": lambda: F.linear(xb, wb), "torch_fp32": lambda: F.linear(x, wf)}
        cold = {"ours": ours_cold}
        if g is not None:
            g.threads = threads
            hot["ggml_tq2"] = lambda: g(0)
            cold["ggml_tq2"] = lambda: g()
        th = interleaved(hot, reps=50)
        tc = interleaved(cold, reps=50)
        row = {
            "size": size,
            "product": name,
            "shape": f"{k}->{n}",
            "threads": threads,
            "weight_bytes": packed.numel(),
            "hot_us": {k2: round(v, 1) for k2, v in th.items()},
            "cold_us": {k2: round(v, 1) for k2, v in tc.items()},
            "cold_GBps": round(packed.numel() / tc["ours"] / 1e3, 2),
        }
        if g is not None:
            row["vs_ggml_hot"] = round(th["ggml_tq2"] / th["ours"], 2)
            row["vs_ggml_cold"] = round(tc["ggml_tq2"] / tc["ours"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if g is not None:
        g.close()
    return rows


def gemm_rows(threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    h, inter = SHAPES["2.7B"]["h"], SHAPES["2.7B"]["I"]
    return [gemm_shape(512, k, n, threads) for k, n in ((h, h), (h, 2 * inter), (inter, h), (h, VOCAB))]


def gemm_shape(m: int, k: int, n: int, threads: int) -> dict:
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    packed = ref.pack_ternary(w)
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    x_s = torch.rand(m)
    xb, wb = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    t = interleaved(
        {
            "ours": lambda: torch.ops.mmfree.ternary_matmul(x_q, x_s, packed, torch.ones(()), torch.bfloat16),
            "torch_bf16": lambda: F.linear(xb, wb),
        },
        reps=5,
        min_seconds=0.0,
    )
    row = {
        "shape": f"M={m} {k}->{n}",
        "threads": threads,
        "ours_ms": round(t["ours"] / 1e3, 2),
        "torch_bf16_ms": round(t["torch_bf16"] / 1e3, 2),
        "speedup": round(t["torch_bf16"] / t["ours"], 2),
        "ours_TOPs": round(2 * m * n * k / t["ours"] / 1e6, 2),
        "path": "amx" if mmfree_ext.cpu_features()["use_amx_int8"] else mmfree_ext.cpu_isa(),
    }
    print(json.dumps(row), flush=True)
    return row


def gemm_t_rows(threads: int, ms: list[int]) -> list[dict]:
    torch.set_num_threads(threads)
    h, inter = SHAPES["2.7B"]["h"], SHAPES["2.7B"]["I"]
    # (N, K): the grad's width N is the forward's out_features, K its in_features.
    return [gemm_t_shape(m, n, k, threads) for m in ms for n, k in ((h, h), (2 * inter, h), (h, inter))]


def gemm_t_shape(m: int, n: int, k: int, threads: int) -> dict:
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    packed = ref.pack_ternary(w)
    grad = torch.randn(m, n)
    gb, wb, wf = grad.bfloat16(), w.bfloat16(), w.float()
    ws = torch.ones(())

    def ours(ext: str) -> Callable[[], object]:
        def run() -> object:
            mmfree_ext.set_cpu_ext(ext)
            return torch.ops.mmfree.ternary_matmul_t(grad, packed, ws, k)

        return run

    t = interleaved(
        {
            "amx": ours("amx"),
            "avx": ours("vnni"),
            "torch_bf16": lambda: gb @ wb,
            "torch_fp32": lambda: grad @ wf,
        },
        reps=3,
        min_seconds=0.0,
    )
    mmfree_ext.set_cpu_ext("amx")
    row = {
        "shape": f"M={m} N={n} K={k}",
        "threads": threads,
        "amx_bf16_path": bool(mmfree_ext.cpu_features()["use_amx_bf16"]),
        **{f"{name}_ms": round(v / 1e3, 2) for name, v in t.items()},
        "amx_TFLOPs": round(2 * m * n * k / t["amx"] / 1e6, 3),
    }
    print(json.dumps(row), flush=True)
    return row


def mlgru_rows(threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    b, t, d = 1, 512, 1024
    i, f = torch.randn(b, t, d), torch.randn(b, t, d)
    lb = torch.rand(d)
    us = interleaved({"scan": lambda: torch.ops.mmfree.mlgru_scan(i, f, lb, None, None, None)}, reps=30)["scan"]
    nbytes = 3 * b * t * d * 4
    row = {
        "case": f"mlgru_scan B={b} T={t} D={d} fp32",
        "threads": threads,
        "us": round(us, 1),
        "GBps": round(nbytes / us / 1e3, 2),
    }
    print(json.dumps(row), flush=True)
    return [row]


def norm_rows(threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    m, k = 512, 2560
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.ones(k, dtype=torch.bfloat16)
    us = interleaved({"q": lambda: torch.ops.mmfree.rms_norm_quant(x, w, 1e-6)}, reps=30)["q"]
    rows.append(
        {
            "case": f"rms_norm_quant [{m}, {k}] bf16",
            "threads": threads,
            "us": round(us, 1),
            "GBps": round(m * k * 3 / us / 1e3, 2),
        }
    )
    xf = torch.randn(m, k)
    us = interleaved({"n": lambda: torch.ops.mmfree.rms_norm(xf, torch.ones(k), 1e-6, xf)}, reps=30)["n"]
    rows.append(
        {
            "case": f"rms_norm+residual [{m}, {k}] fp32",
            "threads": threads,
            "us": round(us, 1),
            "GBps": round(m * k * 16 / us / 1e3, 2),
        }
    )
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def decode_rows(threads: int, sizes: list[tuple[str, torch.dtype]], new_tokens: int) -> list[dict]:
    from mmfree_ext.models.bench import random_packed_model
    from mmfree_ext.models.generation import generate

    torch.set_num_threads(threads)
    rows = []
    for size, dtype in sizes:
        model = random_packed_model(size, "cpu", dtype)
        prompt = [list(range(1, 17))]
        generate(model, prompt, 4)  # warm-up: workspace, caches
        res = generate(model, prompt, new_tokens)
        row = {
            "size": size,
            "dtype": str(dtype).split(".")[-1],
            "threads": threads,
            "batch": 1,
            "decode_tok_s": round(res.decode_tokens_per_second, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--sections", default="gemv,gemm,gemm_t,mlgru,norm,decode")
    parser.add_argument("--gemm-t-m", default="512,2048", help="M values of the gemm_t section")
    parser.add_argument("--sizes", default="370M,1.3B,2.7B")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--decode-tokens", type=int, default=48)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    sizes = args.sizes.split(",")
    threads_list = [int(t) for t in args.threads.split(",")]
    top = max(threads_list)
    llc = llc_bytes()
    out: dict = {
        "cpu_features": mmfree_ext.cpu_features(),
        "llc_bytes": llc,
        "ggml_tq2": ggml_tq2.available(),
        "read_GBps": {t: round(read_bandwidth(t), 2) for t in threads_list},
    }
    print(json.dumps({k: out[k] for k in ("llc_bytes", "ggml_tq2", "read_GBps")}), flush=True)
    if "gemv" in sections:
        out["gemv"] = gemv_rows(threads_list, sizes, 2 * llc)
    if "gemm" in sections:
        out["gemm"] = gemm_rows(top)
    if "gemm_t" in sections:
        out["gemm_t"] = gemm_t_rows(top, [int(m) for m in args.gemm_t_m.split(",")])
    if "mlgru" in sections:
        out["mlgru"] = mlgru_rows(top)
    if "norm" in sections:
        out["norm"] = norm_rows(top)
    if "decode" in sections:
        todo = [(s, torch.float32) for s in sizes]
        if "370M" in sizes:
            todo.insert(1, ("370M", torch.bfloat16))
        out["decode"] = decode_rows(top, todo, args.decode_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print_summary(out)


def print_summary(out: dict) -> None:
    print(f"\n== CPU summary (LLC {out['llc_bytes'] >> 20} MiB, read {out['read_GBps']} GB/s) ==")
    for r in out.get("gemv", []):
        hot, cold = r["hot_us"], r["cold_us"]
        g = (
            f" ggml {hot.get('ggml_tq2', float('nan')):.0f}/{cold.get('ggml_tq2', float('nan')):.0f}"
            if "ggml_tq2" in hot
            else ""
        )
        ratio = f" x{r['vs_ggml_hot']}/x{r['vs_ggml_cold']}" if "vs_ggml_hot" in r else ""
        print(
            f"gemv {r['size']:>4} {r['product']:<7} {r['shape']:>12} t{r['threads']}: "
            f"ours {hot['ours']:.0f}/{cold['ours']:.0f} us"
            f" ({r['cold_GBps']} GB/s cold){g}{ratio} bf16 {hot['torch_bf16']:.0f} fp32 {hot['torch_fp32']:.0f}"
        )
    for r in out.get("gemm", []):
        print(
            f"gemm {r['shape']}: ours {r['ours_ms']} ms ({r['path']}), "
            f"torch bf16 {r['torch_bf16_ms']} ms, x{r['speedup']}"
        )
    for r in out.get("gemm_t", []):
        print(
            f"gemm_t {r['shape']}: amx {r['amx_ms']} ms, avx {r['avx_ms']} ms, "
            f"torch bf16 {r['torch_bf16_ms']} ms, fp32 {r['torch_fp32_ms']} ms"
        )
    for r in out.get("mlgru", []) + out.get("norm", []):
        print(f"{r['case']}: {r['us']} us ({r['GBps']} GB/s)")
    for r in out.get("decode", []):
        print(f"decode {r['size']} {r['dtype']} batch 1: {r['decode_tok_s']} tok/s")


if __name__ == "__main__":
    main()
