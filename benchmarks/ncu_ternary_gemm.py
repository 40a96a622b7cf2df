"""One ternary_matmul per (impl, M, K->N) given on the command line, for ncu to profile.

    ncu -k regex:gemm_sm90_kernel --section SpeedOfLight --section WarpStateStats \
        python benchmarks/ncu_ternary_gemm.py sm90_int8:2048:2560:2560 sm90_int8:8192:2560:13824

Each argument is IMPL:M:K:N with IMPL a value of MMFREE_TERNARY_GEMM (auto, mma, sm90,
sm90_int8); bf16 output, random int8 activations and ternary weights, one warm-up call first
(so ncu's -c / --launch-skip can pick the timed one).
"""

from __future__ import annotations

import os
import sys

import torch

import mmfree_ext  # noqa: F401 (registers torch.ops.mmfree)
from mmfree_ext import reference as ref


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for spec in argv:
        impl, m, k, n = spec.split(":")
        m, k, n = int(m), int(k), int(n)
        x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
        packed = ref.pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda"))
        x_scale = torch.rand(m, device="cuda") * 0.02 + 1e-3
        w_scale = torch.full((), 0.05, device="cuda")
        os.environ["MMFREE_TERNARY_GEMM"] = impl
        for _ in range(2):
            torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed, w_scale, torch.bfloat16)
        torch.cuda.synchronize()
        print(f"ran {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
