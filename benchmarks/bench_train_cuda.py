"""BitLinear training step (forward + backward) on CUDA vs bf16 nn.Linear, same run.

Times y = layer(x); y.backward(dy) for a [M, K] bf16 input and an [N, K] bf16 latent
weight (all three gradients produced), and its peak memory above the inputs. Compared:

* ``mmfree bitlinear (exact dX)``: ours, issue 11 (the weight ternarized and packed once per
  step, the forward's int8 activations saved for dW; int8 tensor-core forward, dX from the
  packed codes on bf16 tensor cores, dW by cuBLAS, fused RMSNorm backward);
* ``mmfree bitlinear (int8 dX)``: the same with the opt-in int8 dX (dY quantized per row,
  the int8 ternary GEMM against W_q^T packed once per step);
* ``mmfree ternary_linear (requant)``: the op before issue 11 (quantizes W twice and
  recomputes norm + quant of x in the backward);
* ``bf16 nn.Linear``: F.linear, the dense baseline of the issue (no norm, no quantization);
* ``reference.bit_linear``: the package's pure-PyTorch reference (SPEC.md section 1);
* ``paper BitLinear (eager)``: the paper's unfused BitLinear re-implemented in eager
  PyTorch (RMSNorm, STE activation and weight quantization, bf16 F.linear). The paper's
  Triton FusedBitLinear is not installable here; SPEC.md's anchor for it is 2820 us.

A per-stage breakdown of ours follows (each stage timed alone).

    python benchmarks/bench_train_cuda.py --json train_cuda.json
    python benchmarks/bench_train_cuda.py --device cpu --small   # smoke run (no GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmfree_ext  # noqa: F401  (registers torch.ops.mmfree.*)
from common import time_cpu, time_cuda
from mmfree_ext import reference
from mmfree_ext.ops.bitlinear import bitlinear

EPS = 1e-6


def paper_bitlinear(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The paper's unfused BitLinear (STE via x + (q(x) - x).detach()), in x's dtype."""
    xf = x.float()
    xn = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS) * g.float()).to(x.dtype)
    scale = 127.0 / xn.abs().amax(-1, keepdim=True).clamp_(min=1e-5)
    x_q = (xn * scale).round().clamp(-128, 127) / scale
    x_q = xn + (x_q - xn).detach()
    w_scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    w_q = (w * w_scale).round().clamp(-1, 1) / w_scale
    w_q = w + (w_q - w).detach()
    return F.linear(x_q, w_q)


def time_us(fn: Callable[[], object], device: str, **kw: object) -> float:
    """Median microseconds of fn on the device (CUDA events; perf_counter on CPU)."""
    if device == "cpu":
        return statistics.median(time_cpu(fn, warmup=1, reps=3, min_seconds=0.0))
    return statistics.median(time_cuda(fn, warmup=3, reps=15, **kw))


def step_time_and_memory(
    step: Callable[[], None], leaves: list[torch.Tensor], device: str
) -> tuple[float, float | None]:
    """Median microseconds of one step and its peak memory (MiB) above what existed before
    (None on CPU, which has no allocator statistics)."""

    def run() -> None:
        for t in leaves:
            t.grad = None
        step()

    us = time_us(run, device, flush_l2=False)
    for t in leaves:
        t.grad = None
    if device == "cpu":
        return us, None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in leaves:
        t.grad = None
    return us, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run only")
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--k", type=int, default=2560)
    parser.add_argument("--n", type=int, default=13824)
    parser.add_argument("--small", action="store_true", help="M=256 K=320 N=448: checks the script end to end")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--quick", action="store_true", help="only ours (exact dX) and bf16 nn.Linear, then the stages (a short run)"
    )
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train_cuda needs a CUDA device (or --device cpu --small)")
    if device == "cpu":
        torch.set_num_threads(1)  # a smoke run on a shared machine: oversubscribed threads spin
    torch.manual_seed(0)
    m, k, n = (256, 320, 448) if args.small else (args.m, args.k, args.n)
    dt = torch.bfloat16
    x = torch.randn(m, k, device=device, dtype=dt).requires_grad_()
    w = (torch.randn(n, k, device=device) * 0.02).to(dt).requires_grad_()
    g = (1.0 + 0.1 * torch.randn(k, device=device)).to(dt).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dt)

    def requant_step() -> None:
        """The pre-issue-11 step: the forward op, then the explicit backward op that
        re-quantizes W and recomputes norm + quant of x (ternary_linear's autograd now runs
        the once-per-step bitlinear, so this calls the two ops directly)."""
        with torch.no_grad():
            torch.ops.mmfree.ternary_linear(x, w, g, EPS)
            gx, gw, gg = torch.ops.mmfree.ternary_linear_backward(dy, x, w, g, EPS)
        x.grad, w.grad, g.grad = gx, gw, gg

    cases = {
        "mmfree bitlinear (exact dX)": (lambda: bitlinear(x, w, g, EPS, int8_dx=False).backward(dy), [x, w, g]),
        "mmfree bitlinear (int8 dX)": (lambda: bitlinear(x, w, g, EPS, int8_dx=True).backward(dy), [x, w, g]),
        "mmfree ternary_linear (requant)": (requant_step, [x, w, g]),
        "bf16 nn.Linear": (lambda: F.linear(x, w).backward(dy), [x, w]),
        "paper BitLinear (eager)": (lambda: paper_bitlinear(x, w, g).backward(dy), [x, w, g]),
        "reference.bit_linear": (lambda: reference.bit_linear(x, w, g, EPS).backward(dy), [x, w, g]),
    }
    if args.quick:
        cases = {name: cases[name] for name in ("mmfree bitlinear (exact dX)", "bf16 nn.Linear")}
    rows = []
    print(f"\n## training step fwd+bwd, M={m} K={k} N={n}, bf16 (peak = memory above the inputs)")
    print(f"{'layer':<32} {'us':>10} {'peak MiB':>10} {'vs nn.Linear':>13}")
    results = {name: step_time_and_memory(fn, leaves, device) for name, (fn, leaves) in cases.items()}
    base_us = results["bf16 nn.Linear"][0]
    for name, (us, peak) in results.items():
        peak_s = "-" if peak is None else f"{peak:.1f}"
        print(f"{name:<32} {us:>10.1f} {peak_s:>10} {base_us / us:>12.2f}x")
        rows.append({"name": name, "us": us, "peak_mib": peak, "M": m, "K": k, "N": n})
    print("(peak on CPU: not measured)" if device == "cpu" else "")

    # Stage breakdown of ours (each timed alone, L2 flushed).
    with torch.no_grad():
        packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
        x_q, x_scale = torch.ops.mmfree.rms_norm_quant(x, g, EPS)
        dxn = torch.ops.mmfree.ternary_matmul_t(dy, packed, w_scale, k)
        dxn16 = dxn.to(dt)
        x_deq = (x_q * x_scale[:, None]).to(dt)
        fwd = torch.ops.mmfree.bitlinear_forward(x, w, g, EPS, True)
        saved = (x, *fwd[3:5], *fwd[1:3], fwd[5], g, EPS, dt)
        stages = {
            "bitlinear_forward (exact dX)": lambda: torch.ops.mmfree.bitlinear_forward(x, w, g, EPS, False),
            "bitlinear_forward (+W^T pack)": lambda: torch.ops.mmfree.bitlinear_forward(x, w, g, EPS, True),
            "bitlinear_backward (exact dX)": lambda: torch.ops.mmfree.bitlinear_backward(dy, *saved, False),
            "bitlinear_backward (int8 dX)": lambda: torch.ops.mmfree.bitlinear_backward(dy, *saved, True),
            "quantize_ternary(W)": lambda: torch.ops.mmfree.quantize_ternary(w),
            "rms_norm_quant(x)": lambda: torch.ops.mmfree.rms_norm_quant(x, g, EPS),
            "ternary_matmul (fwd GEMM)": lambda: torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed, w_scale, dt),
            "bf16 F.linear fwd (ref)": lambda: F.linear(x, w),
            "ternary_matmul_t (dX)": lambda: torch.ops.mmfree.ternary_matmul_t(dy, packed, w_scale, k),
            "bf16 dY @ W (ref)": lambda: dy @ w,
            "rms_norm_backward": lambda: torch.ops.mmfree.rms_norm_backward(dxn16, x, g, EPS),
            "x_deq = x_q * x_scale": lambda: torch.ops.mmfree.dequantize_rows(x_q, x_scale, dt),
            "x_deq via torch.mul (ref)": lambda: torch.mul(x_q, x_scale[:, None], out=torch.empty_like(x)),
            "dW = dY^T @ x_deq (cuBLAS)": lambda: dy.t() @ x_deq,
            "dY row quant (int8 dX)": lambda: torch.ops.mmfree.quantize_rows_int8(dy),
        }
        print(f"\n## stages of ours (M={m} K={k} N={n})")
        for name, fn in stages.items():
            us = time_us(fn, device)
            print(f"{name:<30} {us:>10.1f} us")
            rows.append({"name": f"stage: {name}", "us": us, "M": m, "K": k, "N": n})
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
