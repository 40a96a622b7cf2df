"""Benchmark of the fused RMSNorm ops against the torch composite they replace.

Baselines (same run, same inputs): torch eager running the reference composite
(``mmfree_ext.reference``: the exact functions the ops must equal) and, on CUDA with
``--compile``, ``torch.compile`` of that composite. Every case declares the bytes it must
move (inputs read once, outputs written once), so the table shows GB/s and % of the
measured copy bandwidth.

    python benchmarks/bench_norm.py --device cuda --json norm_cuda.json [--compile]
    python benchmarks/bench_norm.py --device cpu
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

import mmfree_ext
from common import Case, bench, copy_bandwidth, print_table, save_json
from mmfree_ext import reference as ref

EPS = 1e-6


def _maybe_compile(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any] | None:
    return torch.compile(fn, dynamic=False) if enabled else None


def _graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn captured in a CUDA graph: a decode-sized call is timed without Python's launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def cases(device: str, m: int, n: int, dtype: torch.dtype, compile_baseline: bool) -> list[Case]:
    """The op family at one shape: ours vs the eager composite (and torch.compile of it)."""
    el = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(m, n, device=device).to(dtype)
    res = torch.randn(m, n, device=device).to(dtype)
    h = (torch.randn(m, n, device=device) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
    ws = torch.stack([w, w * 0.5, w * 2])
    shape = f"M={m} N={n} {str(dtype).removeprefix('torch.')}"
    scales = 4 * m

    out: list[Case] = []

    def add(name: str, fn: Callable[[], Any], composite: Callable[[], Any], nbytes: float) -> None:
        out.append(Case(name, shape, fn, baseline=composite, baseline_name="torch eager", bytes=nbytes))
        if device == "cuda" and m == 1:
            # Decode: both sides replayed from CUDA graphs, so the kernels are timed, not Python.
            out.append(
                Case(
                    name + " (graph)",
                    shape,
                    _graphed(fn),
                    baseline=_graphed(composite),
                    baseline_name="eager in graph",
                    bytes=nbytes,
                )
            )
        compiled = _maybe_compile(composite, compile_baseline)
        if compiled is not None:
            out.append(Case(name, shape, fn, baseline=compiled, baseline_name="torch.compile", bytes=nbytes))

    add(
        "rms_norm_quant",
        lambda: mmfree_ext.rms_norm_quant(x, w, EPS),
        lambda: ref.rms_norm_quant(x, w, EPS),
        m * n * (el + 1) + scales,
    )
    add(
        "rms_norm_quant_multi P=3",
        lambda: mmfree_ext.rms_norm_quant_multi(x, ws, EPS),
        lambda: ref.rms_norm_quant_multi(x, list(ws), EPS),
        m * n * (el + 3) + 3 * scales,
    )
    add(
        "rms_norm +residual",
        lambda: mmfree_ext.rms_norm(x, w, EPS, res),
        lambda: ref.rms_norm(x, w, EPS, res),
        4 * m * n * el,
    )
    add(
        "rms_norm_swish_gate",
        lambda: mmfree_ext.rms_norm_swish_gate(x, h, w, EPS),
        lambda: ref.rms_norm_swish_gate(x, h, w, EPS),
        3 * m * n * el,
    )
    add(
        "rms_norm_swish_gate_quant",
        lambda: mmfree_ext.rms_norm_swish_gate_quant(x, h, w, EPS, w, EPS),
        lambda: ref.rms_norm_quant(ref.rms_norm_swish_gate(x, h, w, EPS), w, EPS),
        m * n * (2 * el + 1) + scales,
    )
    if m > 1:
        # Training step of a residual RMSNorm: forward + backward through both outputs.
        xg, rg, wg = (t.clone().requires_grad_(True) for t in (x, res, w.float()))
        gy = torch.randn(m, n, device=device).to(dtype)

        def fwd_bwd(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
            def run() -> None:
                y, r = fn(xg, wg, EPS, rg)
                torch.autograd.backward((y, r), (gy, gy))

            return run

        # fwd reads x, res, writes y, r; bwd reads dy, dr, x, res, writes dx, dres.
        out.append(
            Case(
                "rms_norm +residual fwd+bwd",
                shape,
                fwd_bwd(mmfree_ext.rms_norm),
                baseline=fwd_bwd(ref.rms_norm),
                baseline_name="torch eager",
                bytes=10 * m * n * el,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the composite (CUDA)")
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.device == "cuda":
        shapes = [(8192, 2560, torch.bfloat16), (8192, 6912, torch.bfloat16), (1, 2560, torch.bfloat16)]
    else:
        shapes = [
            (1, 2560, torch.bfloat16),
            (512, 2560, torch.bfloat16),
            (1, 2560, torch.float32),
            (512, 2560, torch.float32),
        ]
    print(
        f"device {args.device}, copy bandwidth {copy_bandwidth(args.device):.1f} GB/s, "
        f"threads {torch.get_num_threads()}, cpu path {mmfree_ext.cpu_isa()}"
    )
    rows = []
    for m, n, dtype in shapes:
        with torch.no_grad() if m == 1 else torch.enable_grad():
            rows += [bench(c, args.device) for c in cases(args.device, m, n, dtype, args.compile)]
    print_table(rows, title=f"fused RMSNorm ops ({args.device})")
    if args.json:
        save_json(rows, args.json, meta={"cpu_isa": mmfree_ext.cpu_isa(), "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
