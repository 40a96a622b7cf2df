"""Ternary linear benchmarks: ternary_matmul / ternary_linear against torch's F.linear.

CPU: M=1 (decode GEMV; weights rotate over copies larger than the last-level cache, so every
call streams them from DRAM) against fp32 and bf16 F.linear; M=64/512 (prefill GEMM) against
bf16 and fp32 F.linear; one training step (fwd+bwd) of ternary_linear against
reference.bit_linear, with peak memory. CUDA: M=1/4/8/16/512/2048/4096 against bf16 cuBLAS
F.linear (L2 flushed by the harness).

    python benchmarks/bench_ternary.py --device cpu --json cpu.json
    python benchmarks/bench_ternary.py --device cuda --json cuda.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ggml_tq2  # llama.cpp's TQ2_0 through ggml-python (optional baseline)
import mmfree_ext
from bench_cpu import llc_bytes
from common import Case, Row, bench, print_table, save_json
from mmfree_ext import reference as ref

COLD_BYTES = 2 * llc_bytes()  # twice this CPU's last-level cache (sysfs): every call streams from DRAM


def _packed_copies(n: int, k: int, device: str, min_bytes: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    w = torch.randn(n, k, device=device) * 0.02
    packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
    copies = max(1, -(-min_bytes // packed.numel()))
    return [packed] + [packed.clone() for _ in range(copies - 1)], w_scale


def _rotating(fn, items: list):
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(items)
        return fn(items[state["i"]])

    return run


def matmul_cases(m: int, k: int, n: int, device: str, baselines: list[torch.dtype]) -> list[Case]:
    min_bytes = COLD_BYTES if device == "cpu" else 0  # CUDA: the harness flushes L2
    packed_list, w_scale = _packed_copies(n, k, device, min_bytes)
    x = torch.randn(m, k, device=device)
    x_q, x_scale = ref.rms_norm_quant(x.cpu(), torch.ones(k))
    x_q, x_scale = x_q.to(device), x_scale.to(device)
    wbytes = packed_list[0].numel()
    nbytes = wbytes + m * k + 2 * m * n
    ours = _rotating(lambda p: torch.ops.mmfree.ternary_matmul(x_q, x_scale, p, w_scale, torch.bfloat16), packed_list)
    shape = f"M={m} {k}->{n}"
    cases = []
    for dtype in baselines:
        wd = torch.randn(n, k, device=device, dtype=dtype)
        xd = x.to(dtype)
        cases.append(
            Case(
                "ternary_matmul",
                shape,
                ours,
                baseline=lambda xd=xd, wd=wd: F.linear(xd, wd),
                baseline_name=f"F.linear {str(dtype).split('.')[-1]}",
                bytes=nbytes,
                flops=2.0 * m * n * k,
                extra={"weight_bytes": wbytes},
            )
        )
    if device == "cpu" and ggml_tq2.available() and k % 256 == 0:
        # Same weights in TQ2_0, as many copies as ours span, rotated the same way.
        w = torch.ops.mmfree.unpack_ternary(packed_list[0], k).float().numpy()
        copies = len(packed_list)
        tq2 = ggml_tq2.TQ2Matmul(w, x.numpy(), copies=copies, threads=torch.get_num_threads())
        cases.append(
            Case(
                "ternary_matmul",
                shape,
                ours,
                baseline=tq2,
                baseline_name="ggml TQ2_0",
                bytes=nbytes,
                flops=2.0 * m * n * k,
                extra={"weight_bytes": wbytes, "ggml_weight_bytes": tq2.weight_bytes},
            )
        )
    return cases


def layer_case(m: int, k: int, n: int, device: str) -> Case:
    """The whole inference layer (RMSNorm + int8 quant + product) against bf16 F.linear."""
    packed_list, w_scale = _packed_copies(n, k, device, COLD_BYTES if device == "cpu" else 0)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    g = torch.ones(k, device=device, dtype=torch.bfloat16)
    wd = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    ours = _rotating(lambda p: torch.ops.mmfree.ternary_linear_packed(x, p, w_scale, g, 1e-6), packed_list)
    return Case(
        "ternary_linear_packed",
        f"M={m} {k}->{n}",
        ours,
        baseline=lambda: F.linear(x, wd),
        baseline_name="F.linear bf16",
        bytes=packed_list[0].numel() + 2 * m * (k + n),
        flops=2.0 * m * n * k,
    )


def train_case(m: int, k: int, n: int, device: str, dtype: torch.dtype) -> Case:
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device=device) * 0.02).to(dtype).requires_grad_()
    g = torch.ones(k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)

    def step(fn):
        def run() -> None:
            x.grad = w.grad = g.grad = None
            fn(x, w, g).backward(dy)

        return run

    return Case(
        "ternary_linear fwd+bwd",
        f"M={m} {k}->{n} {str(dtype).split('.')[-1]}",
        step(lambda a, b, c: torch.ops.mmfree.ternary_linear(a, b, c, 1e-6)),
        baseline=step(lambda a, b, c: ref.bit_linear(a, b, c, 1e-6)),
        baseline_name="reference.bit_linear",
        flops=6.0 * m * n * k,
    )


_PEAK_SCRIPT = r"""
import sys, torch
import mmfree_ext
from mmfree_ext import reference as ref
which, m, k, n, dtype = sys.argv[1], *map(int, sys.argv[2:5]), getattr(torch, sys.argv[5])
torch.set_num_threads(1)
x = torch.randn(m, k, dtype=dtype, requires_grad=True)
w = (torch.randn(n, k) * 0.02).to(dtype).requires_grad_()
g = torch.ones(k, dtype=dtype, requires_grad=True)
dy = torch.randn(m, n, dtype=dtype)
fn = (lambda: torch.ops.mmfree.ternary_linear(x, w, g, 1e-6)) if which == "ours" else (lambda: ref.bit_linear(x, w, g))
fn().backward(dy)  # warm-up: one-time allocations (thread pools, caches) happen here
x.grad = w.grad = g.grad = None
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
saved = []
def pack(t):
    ours = t.data_ptr() in (x.data_ptr(), w.data_ptr(), g.data_ptr())
    saved.append(0 if ours else t.untyped_storage().nbytes())
    return t
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    y = fn()
y.backward(dy)
print(sum(saved), status("VmHWM:") - base)
"""


def peak_memory(m: int, k: int, n: int, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Per implementation, in a fresh process: bytes autograd saves beyond the inputs, and how far
    one fwd+bwd step (after a warm-up step) raises the resident set above where it started."""
    out = {}
    for which in ("ours", "reference"):
        res = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, which, str(m), str(k), str(n), str(dtype).split(".")[-1]],
            capture_output=True,
            text=True,
            check=True,
        )
        saved, peak = (int(v) for v in res.stdout.split())
        out[which] = {"saved_MiB": saved / 2**20, "step_peak_rss_MiB": peak / 2**20}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="M=1 cases only")
    args = parser.parse_args()
    dev = args.device
    rows: list[Row] = []
    decode_shapes = [(2560, 2560), (2560, 13824), (6912, 2560), (2560, 32000)]
    meta: dict = {"isa": mmfree_ext.cpu_isa(), "threads": torch.get_num_threads()}
    if dev == "cpu":
        for k, n in decode_shapes[:3]:
            rows += [bench(c, dev) for c in matmul_cases(1, k, n, dev, [torch.float32, torch.bfloat16])]
        rows.append(bench(layer_case(1, 2560, 13824, dev), dev))
        if not args.quick:
            for m in (64, 512):
                rows += [bench(c, dev, reps=3) for c in matmul_cases(m, 2560, 13824, dev, [torch.bfloat16])]
            rows.append(bench(train_case(2048, 2560, 2560, dev, torch.float32), dev, warmup=1, reps=3))
            meta["train_memory_M2048_2560x2560_fp32"] = peak_memory(2048, 2560, 2560, torch.float32)
    else:
        for k, n in decode_shapes:
            rows += [bench(c, dev) for c in matmul_cases(1, k, n, dev, [torch.bfloat16])]
        for m in (4, 8, 16, 512, 2048, 4096):
            rows += [bench(c, dev) for c in matmul_cases(m, 2560, 13824, dev, [torch.bfloat16])]
        rows.append(bench(layer_case(1, 2560, 13824, dev), dev))
        rows.append(bench(train_case(8192, 2560, 13824, dev, torch.bfloat16), dev, warmup=2, reps=10))
    print_table(rows, f"ternary ({dev})")
    if "train_memory_M2048_2560x2560_fp32" in meta:
        print("training step memory (MiB):", json.dumps(meta["train_memory_M2048_2560x2560_fp32"]))
    if args.json:
        save_json(rows, args.json, meta)


if __name__ == "__main__":
    main()
