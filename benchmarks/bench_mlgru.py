"""MLGRU scan benchmark: mmfree mlgru_scan against the unfused PyTorch composite and fla-core.

Run: python benchmarks/bench_mlgru.py --device cuda --json out.json
(``--quick``: only the issue-12 target shapes, ours (auto) against the other kernel generation
(forward: the forced v4 lanes kernel, path=3; forward+backward: v2, path=2) and fla chunk_hgrn.)
Bytes counted: forward reads i, f and writes h (3 tensors); forward+backward adds the
backward's floor (reads i, f, grad_h, writes grad_i, grad_f): 8 tensors. fla-core's
``chunk_hgrn`` / ``fused_recurrent_hgrn`` (if importable) get their gating done in PyTorch,
as the paper's code does: ``x = silu(i) * (1 - f_t)``, ``g = log(f_t)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import mmfree_ext
from common import Case, bench, print_table, save_json
from mmfree_ext import reference as ref

try:
    from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
except Exception as exc:
    chunk_hgrn = fused_recurrent_hgrn = None
    print(f"note: fla.ops.hgrn not importable ({type(exc).__name__}: {exc}); fla baselines skipped")


def _inputs(b: int, t: int, d: int, dtype: torch.dtype, device: str, grad: bool = False):
    i = torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=grad)
    f = (torch.randn(b, t, d, device=device) + 2.0).to(dtype).requires_grad_(grad)
    lb = torch.rand(d, device=device) * 0.5
    return i, f, lb


def _fla_gates(i: torch.Tensor, f: torch.Tensor, lb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ft = lb + (1 - lb) * torch.sigmoid(f.float())
    x = (torch.nn.functional.silu(i.float()) * (1 - ft)).to(i.dtype)
    return x, torch.log(ft).to(i.dtype)


TARGET_SHAPES = [(4, 2048, 2560), (16, 2048, 2048)]


def _fwd_cases(device: str, dtype: torch.dtype, quick: bool = False) -> list[Case]:
    cases = []
    esize = torch.tensor([], dtype=dtype).element_size()
    shapes = [(4, 2048, 2560), (16, 2048, 2048), (1, 8192, 2560), (1, 1, 2560), (16, 1, 2560)]
    if device == "cpu":
        shapes = [(1, 512, 1024), (4, 2048, 2560)]
    if quick:
        shapes = TARGET_SHAPES
    for b, t, d in shapes:
        i, f, lb = _inputs(b, t, d, dtype, device)
        nbytes = 3 * b * t * d * esize
        shape = f"B={b} T={t} D={d}"
        ours = lambda i=i, f=f, lb=lb: mmfree_ext.mlgru_scan(i, f, lb)
        composite = lambda i=i, f=f, lb=lb: ref.mlgru_scan(i, f, lb)
        slow_base = t * b * d > (1 << 24) and device == "cpu"
        if not quick or chunk_hgrn is None:  # quick: ours is timed beside fla below
            cases.append(
                Case("mlgru_scan fwd", shape, ours, None if slow_base else composite, "torch composite", bytes=nbytes)
            )
        if device == "cuda" and not quick:
            for path, name in ((1, "sequential"), (2, "chunked"), (3, "lanes")):
                cases.append(
                    Case(
                        f"mlgru_scan fwd [{name}]",
                        shape,
                        lambda i=i, f=f, lb=lb, p=path: torch.ops.mmfree.mlgru_scan_impl(i, f, lb, None, None, None, p),
                        bytes=nbytes,
                    )
                )
        if device == "cuda" and t > 1:  # same-run A/B: auto (v2 forward) against the forced v4 lanes one
            cases.append(
                Case(
                    "mlgru_scan fwd",
                    shape,
                    ours,
                    lambda i=i, f=f, lb=lb: torch.ops.mmfree.mlgru_scan_impl(i, f, lb, None, None, None, 3),
                    "v4 lanes (path=3)",
                    bytes=nbytes,
                )
            )
        if device == "cuda":
            fla_fns = (
                ((chunk_hgrn, "fla chunk_hgrn"),)
                if quick
                else (
                    (chunk_hgrn, "fla chunk_hgrn"),
                    (fused_recurrent_hgrn, "fla fused_recurrent"),
                )
            )
            for fn, name in fla_fns:
                if fn is not None and t > 1:
                    cases.append(
                        Case(
                            "mlgru_scan fwd",
                            shape,
                            ours,
                            lambda i=i, f=f, lb=lb, fn=fn: fn(*_fla_gates(i, f, lb), None, True),
                            name,
                            bytes=nbytes,
                        )
                    )
    return cases


_GRAPH_CALLS = 100


def _graph_of(fn, calls: int) -> torch.cuda.CUDAGraph:
    """`calls` back-to-back calls of fn captured in one CUDA graph (warmed up first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def _decode_graph_rows(dtype: torch.dtype) -> list:
    """Decode steps (T=1) timed as kernels: CUDA-event timing of one Python call measures the
    host dispatch (wrapper, op checks, allocations), so replay _GRAPH_CALLS calls captured in
    one CUDA graph and divide. No L2 flush: a decode step's inputs come fresh from the
    previous projection. The composite baseline is captured the same way."""
    rows = []
    esize = torch.tensor([], dtype=dtype).element_size()
    for b, d in ((1, 2560), (16, 2560)):
        i, f, lb = _inputs(b, 1, d, dtype, "cuda")
        h0 = torch.randn(b, d, device="cuda")
        with torch.no_grad():
            ours = _graph_of(lambda i=i, f=f, lb=lb, h0=h0: mmfree_ext.mlgru_scan(i, f, lb, h0), _GRAPH_CALLS)
            try:
                base = _graph_of(lambda i=i, f=f, lb=lb, h0=h0: ref.mlgru_scan(i, f, lb, h0), _GRAPH_CALLS)
            except Exception as exc:  # a composite that syncs cannot be captured
                print(f"note: composite not capturable ({type(exc).__name__}); graph baseline skipped")
                base = None
        nbytes = (3 * b * d * esize + 2 * b * d * 4) * _GRAPH_CALLS  # i, f, h + h0, h_last (fp32)
        case = Case(
            f"mlgru_scan decode [graph/{_GRAPH_CALLS}]",
            f"B={b} T=1 D={d}",
            ours.replay,
            base.replay if base is not None else None,
            "torch composite",
            bytes=nbytes,
        )
        row = bench(case, "cuda", flush_l2=False)
        rows.append(
            dataclasses.replace(
                row,
                us=row.us / _GRAPH_CALLS,
                baseline_us=row.baseline_us / _GRAPH_CALLS if row.baseline_us is not None else None,
            )
        )
    return rows


def _fwd_bwd_cases(device: str, dtype: torch.dtype, quick: bool = False) -> list[Case]:
    """The whole autograd step the user pays: forward, then backward through autograd."""
    esize = torch.tensor([], dtype=dtype).element_size()
    shapes = TARGET_SHAPES if device == "cuda" else [(1, 512, 1024)]
    cases = []
    for b, t, d in shapes:
        i, f, lb = _inputs(b, t, d, dtype, device, grad=True)
        gh = torch.randn(b, t, d, device=device, dtype=dtype)

        def ours(i=i, f=f, lb=lb, gh=gh) -> None:
            h, _ = mmfree_ext.mlgru_scan(i, f, lb)
            torch.autograd.grad(h, (i, f), gh)

        def composite(i=i, f=f, lb=lb, gh=gh) -> None:
            h, _ = ref.mlgru_scan(i, f, lb)
            torch.autograd.grad(h, (i, f), gh)

        nbytes = 8 * b * t * d * esize
        shape = f"B={b} T={t} D={d}"
        base = composite if (device == "cpu" or t * b <= 4096) and not quick else None
        if not quick or chunk_hgrn is None:  # quick: ours is timed beside fla below
            cases.append(Case("mlgru_scan fwd+bwd", shape, ours, base, "torch composite", bytes=nbytes))
        if device == "cuda":

            def v2(i=i, f=f, lb=lb, gh=gh) -> None:
                h, _ = torch.ops.mmfree.mlgru_scan_impl(i, f, lb, None, None, None, 2)
                torch.autograd.grad(h, (i, f), gh)

            cases.append(Case("mlgru_scan fwd+bwd", shape, ours, v2, "v2 chunked (path=2)", bytes=nbytes))
        if device == "cuda" and chunk_hgrn is not None:

            def fla(i=i, f=f, lb=lb, gh=gh) -> None:
                o, _ = chunk_hgrn(*_fla_gates(i, f, lb), None, False)
                torch.autograd.grad(o, (i, f), gh)

            cases.append(Case("mlgru_scan fwd+bwd", shape, ours, fla, "fla chunk_hgrn", bytes=nbytes))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="only the target shapes, ours vs fla chunk_hgrn")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = [bench(c, args.device) for c in _fwd_cases(args.device, dtype, args.quick)]
    if args.device.startswith("cuda") and not args.quick:
        rows += _decode_graph_rows(dtype)
    print_table(rows, f"mlgru_scan forward ({args.dtype}, {args.device})")
    rows_b = [bench(c, args.device) for c in _fwd_bwd_cases(args.device, dtype, args.quick)]
    print_table(rows_b, f"mlgru_scan forward+backward ({args.dtype}, {args.device})")
    if args.json:
        save_json(rows + rows_b, args.json, {"bench": "mlgru", "dtype": args.dtype})


if __name__ == "__main__":
    main()
