"""The training step's new ops against what they replace, same run.

* lm_head + loss: ``ternary_linear_cross_entropy`` (chunked, gradients formed with the loss)
  against the materialized path ``F.cross_entropy(ternary_linear(x, W, g).float(), labels)``,
  forward + backward: median time and peak memory above the inputs (CUDA:
  ``torch.cuda.max_memory_allocated``; CPU: not measured here, see bench_train_memory_cpu.py).
* GLU activation: ``silu_mul`` forward and backward against ``F.silu(gate) * v`` and its
  autograd backward, with the bytes each must move (forward reads 2I and writes I elements
  per row, backward reads 3I and writes 2I) so the table prints GB/s and % of copy bandwidth.

    PYTHONPATH=python python benchmarks/bench_trainstep.py --device cuda [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import mmfree_ext  # noqa: F401
from common import Case, bench, median_us, print_table, save_json
from mmfree_ext.ops import silu_mul, ternary_linear, ternary_linear_cross_entropy


def _loss_inputs(m: int, k: int, v: int, dtype: torch.dtype, device: str):
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, k, device=device) * 0.02).to(dtype).requires_grad_()
    g = torch.ones(k, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (m,), device=device)
    return x, w, g, labels


def _fused_step(x, w, g, labels):
    ternary_linear_cross_entropy(x, w, g, labels).backward()


def _materialized_step(x, w, g, labels):
    F.cross_entropy(ternary_linear(x, w, g).float(), labels).backward()


def _peak_bytes(step, args, device: str) -> int | None:
    """Peak CUDA memory one step allocates above what was live before it."""
    if not device.startswith("cuda"):
        return None
    for t in args[:3]:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def loss_rows(device: str, m: int, k: int, v: int, dtype: torch.dtype) -> list[dict]:
    args = _loss_inputs(m, k, v, dtype, device)
    out = []
    variants = (
        ("fused ternary_linear_cross_entropy", _fused_step),
        ("materialized + F.cross_entropy", _materialized_step),
    )
    for name, step in variants:
        peak = _peak_bytes(step, args, device)
        us = median_us(lambda step=step: step(*args), device, warmup=2, reps=10)
        out.append({"case": name, "M": m, "K": k, "V": v, "dtype": str(dtype), "ms": us / 1e3,
                    "peak_GiB": None if peak is None else peak / 2**30})  # fmt: skip
    return out


def silu_rows(device: str, rows: int, inter: int, dtype: torch.dtype):
    u = torch.randn(rows, 2 * inter, device=device, dtype=dtype)
    dy = torch.randn(rows, inter, device=device, dtype=dtype)
    es = u.element_size()
    shape = f"rows={rows} I={inter} {str(dtype).replace('torch.', '')}"

    def torch_fwd():
        gate, v = u.chunk(2, dim=-1)
        return F.silu(gate) * v

    ut = u.detach().clone().requires_grad_()
    gate_t, v_t = ut.chunk(2, dim=-1)
    y_t = F.silu(gate_t) * v_t
    cases = [
        Case("silu_mul fwd", shape, lambda: torch.ops.mmfree.silu_mul(u), baseline=torch_fwd,
             baseline_name="F.silu(g)*v", bytes=3 * rows * inter * es),
        Case("silu_mul bwd", shape, lambda: torch.ops.mmfree.silu_mul_backward(dy, u),
             baseline=lambda: torch.autograd.grad(y_t, ut, dy, retain_graph=True),
             baseline_name="torch autograd", bytes=5 * rows * inter * es),
    ]  # fmt: skip
    silu_mul(u)  # import check of the wrapper
    return [bench(c, device) for c in cases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--m", type=int, default=None, help="rows of the loss case (default 8192 on CUDA, 512 on CPU)")
    ap.add_argument("--k", type=int, default=2560)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    m = a.m or (8192 if cuda else 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    loss = loss_rows(a.device, m, a.k, a.v, dtype)
    print("\n## lm_head + cross entropy, forward + backward")
    print(f"{'case':<38} {'M':>6} {'K':>6} {'V':>6} {'dtype':>15} {'ms':>9} {'peak GiB':>9}")
    for r in loss:
        peak = "-" if r["peak_GiB"] is None else f"{r['peak_GiB']:.2f}"
        print(f"{r['case']:<38} {r['M']:>6} {r['K']:>6} {r['V']:>6} {r['dtype']:>15} {r['ms']:>9.2f} {peak:>9}")
    silu = silu_rows(a.device, 8192 if cuda else 512, 6912 if cuda else 1024, dtype)
    print_table(silu, "silu_mul")
    if a.json:
        save_json(silu, a.json, meta={"loss": loss, "device": a.device})


if __name__ == "__main__":
    main()
