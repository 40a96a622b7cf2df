"""ncu target for the MLGRU scan: forward, then backward, twice, at B=4 T=2048 D=2560 bf16.

Profile the second iteration (per iteration: the forward, the backward's checkpoint pass, the
backward, the dL/dlb reduction):

    ncu -k regex:mlgru --launch-skip 4 --launch-count 4 python3 benchmarks/ncu_mlgru.py
"""

from __future__ import annotations

import torch

import mmfree_ext  # noqa: F401  (registers torch.ops.mmfree)

B, T, D = 4, 2048, 2560


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ncu_mlgru.py needs a CUDA device")
    i = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    f = (torch.randn(B, T, D, device="cuda") + 2).bfloat16()
    lb = torch.rand(D, device="cuda") * 0.5
    gh = torch.randn_like(i)
    ghl = torch.zeros(B, D, device="cuda")
    for _ in range(2):
        torch.ops.mmfree.mlgru_scan(i, f, lb, None, None, None)
        torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, None, None, None, 0)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
