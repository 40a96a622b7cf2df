"""The cluster split-K GEMM behind torch.ops.mmfree.ternary_matmul for small M
(csrc/kernels/cuda/ternary/gemm_split_k.cu), forced with MMFREE_TERNARY_SPLITK=<CTAs per
cluster> and checked exactly against integer references and bitwise against the unsplit
path (MMFREE_TERNARY_SPLITK=off).

Needs an sm_90 GPU and a build whose CUDA arch list has 90 (thread-block clusters); skipped
elsewhere. The grid hits the kernel's tails: M around its 32- and 64-row tiles, N not a
multiple of the 128-wide tile, K with partial 128-weight blocks and x rows that are not
16-byte aligned (K = 100, 6913: byte loads), and more ranks than k-tiles (K = 100 with 8
CTAs per cluster leaves 7 of them an empty slice of K).
"""

from __future__ import annotations

import pytest
import torch

import mmfree_ext
from mmfree_ext import reference as ref

pytestmark = pytest.mark.cuda

M_GRID = [2, 3, 8, 16, 17, 33, 64, 65, 128, 200, 256]
# (N, K): tails of both (N = 200 is not a multiple of 128 or of 4, K = 100 / 6913 leave
# partial blocks), and the 2.7B shapes.
NK_TAILS = [(200, 100), (130, 6913), (2560, 2560)]
MODEL_SHAPES = [(2560, 2560), (13824, 2560), (2560, 6912), (7680, 2560)]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPLIT_KERNEL = "gemm_split_k_kernel"


def _has_clusters() -> bool:
    if not mmfree_ext.cuda_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    return any(a.startswith("90") for a in mmfree_ext.build_info()["cuda_archs"])


@pytest.fixture(autouse=True)
def _needs_sm90() -> None:
    if not _has_clusters():
        pytest.skip("needs an sm_90 GPU and a build with arch 90 (thread-block clusters)")


def _op(x_q, x_scale, packed, w_scale, dtype):
    return torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed, w_scale, dtype)


def _inputs(m: int, n: int, k: int):
    """Random int8 activations (full range, -128 included), ternary weights and their packing."""
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
    return x_q, w_q, ref.pack_ternary(w_q)


def _int_acc(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact accumulators: float64 products and sums are exact here (|acc| <= 128 K << 2^53)."""
    return torch.matmul(x_q.double(), w_q.double().t()).to(torch.int64)


def _kernels_run(fn) -> list[str]:
    """Names of the CUDA kernels `fn` launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not names:  # every op launches a kernel: no event at all means no profiler (CUPTI is
        # taken, e.g. under compute-sanitizer), not a kernel choice
        pytest.skip("torch.profiler recorded no CUDA kernel (CUPTI unavailable)")
    return names


@pytest.mark.parametrize("splits", ["2", "8"])
@pytest.mark.parametrize(("n", "k"), NK_TAILS)
@pytest.mark.parametrize("m", M_GRID)
def test_exact_accumulators(monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int, splits: str) -> None:
    """Scales of 1 and fp32 output: the output is float(acc), exact for |acc| < 2^24."""
    monkeypatch.setenv("MMFREE_TERNARY_SPLITK", splits)
    x_q, w_q, packed = _inputs(m, n, k)
    torch.full((m, n), float("nan"), device="cuda")  # a NaN block for the output to reuse
    out = _op(x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert not out.isnan().any(), "kernel left outputs unwritten"
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("m", [2, 8, 17, 64, 200])
@pytest.mark.parametrize(("n", "k"), [MODEL_SHAPES[2], (200, 100)])
def test_bitwise_equal_to_unsplit_and_reference(
    monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int, dtype: torch.dtype
) -> None:
    """Random scales: the split path (forced, and the automatic choice) gives exactly the
    unsplit kernel's output, which is the reference's (float(acc) * x_scale) * w_scale."""
    x_q, _, packed = _inputs(m, n, k)
    x_scale = torch.rand(m, device="cuda") * 0.02 + 1e-3
    w_scale = torch.rand((), device="cuda") * 0.1 + 1e-3
    outs = {}
    for mode in ["off", "auto", "3", "8"]:
        monkeypatch.setenv("MMFREE_TERNARY_SPLITK", mode)
        outs[mode] = _op(x_q, x_scale, packed, w_scale, dtype)
    want = ref.ternary_matmul(x_q, x_scale, packed, w_scale, k, out_dtype=dtype)
    for mode, out in outs.items():
        assert out.dtype == dtype
        assert torch.equal(out, want), f"MMFREE_TERNARY_SPLITK={mode}"


# (M, N, K) where the automatic choice measured the split kernel faster (launch.h,
# gemm_split_k.cu's split_k_count) and where it did not.
AUTO_SPLIT = [(m, n, k) for m in (4, 8, 16) for n, k in MODEL_SHAPES] + [
    (64, 2560, 2560),
    (64, 2560, 6912),
    (64, 7680, 2560),
    (128, 2560, 6912),
    (128, 2560, 2560),
    (256, 2560, 6912),
]
AUTO_UNSPLIT = [(1, 2560, 2560), (2, 2560, 6912), (64, 13824, 2560), (128, 7680, 2560), (256, 2560, 2560)]


@pytest.mark.parametrize(("m", "n", "k"), AUTO_SPLIT + AUTO_UNSPLIT)
def test_automatic_choice(monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int) -> None:
    """The automatic choice launches the split kernel exactly where it measured faster, and
    MMFREE_TERNARY_SPLITK=off never does (so the tests above compare two different kernels)."""
    x_q, _, packed = _inputs(m, n, k)
    args = (x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.bfloat16)
    monkeypatch.setenv("MMFREE_TERNARY_SPLITK", "auto")
    split = any(SPLIT_KERNEL in name for name in _kernels_run(lambda: _op(*args)))
    assert split == ((m, n, k) in AUTO_SPLIT)
    monkeypatch.setenv("MMFREE_TERNARY_SPLITK", "off")
    assert not any(SPLIT_KERNEL in name for name in _kernels_run(lambda: _op(*args)))


def test_forced_split_takes_the_split_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFREE_TERNARY_SPLITK", "4")
    x_q, _, packed = _inputs(3, 300, 1000)
    names = _kernels_run(
        lambda: _op(x_q, torch.ones(3, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    )
    assert any(SPLIT_KERNEL in name for name in names), names


def test_extreme_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """x = -128 everywhere and all-(+1) / all-(-1) / all-zero weight rows: |acc| = 128 K in
    every rank's partial sum."""
    monkeypatch.setenv("MMFREE_TERNARY_SPLITK", "8")
    m, k, n = 40, 6913, 48
    x_q = torch.full((m, k), -128, dtype=torch.int8, device="cuda")
    w_q = torch.tensor([1, -1, 0], dtype=torch.int8).repeat(n // 3).view(n, 1).expand(n, k).contiguous().cuda()
    out = _op(x_q, torch.ones(m, device="cuda"), ref.pack_ternary(w_q), torch.ones((), device="cuda"), torch.float32)
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


def test_cuda_graph_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split launch (a cluster launch, no workspace) replays from a CUDA graph."""
    monkeypatch.setenv("MMFREE_TERNARY_SPLITK", "auto")
    m, n, k = 16, 2560, 6912
    x_q, _, packed = _inputs(m, n, k)
    x_scale = torch.rand(m, device="cuda") + 0.5
    w_scale = torch.full((), 0.05, device="cuda")
    _op(x_q, x_scale, packed, w_scale, torch.bfloat16)  # the attribute call happens outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _op(x_q, x_scale, packed, w_scale, torch.bfloat16)
    x_q.copy_(torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref.ternary_matmul(x_q, x_scale, packed, w_scale, k, out_dtype=torch.bfloat16))


def test_linear_packed_matches_unsplit(monkeypatch: pytest.MonkeyPatch) -> None:
    """ternary_linear_packed (norm + quant + product) on the split path equals the unsplit one."""
    m, n, k = 8, 2560, 2560
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
    packed, w_scale = ref.pack_ternary(w_q), torch.full((), 0.05, device="cuda")
    g = 1.0 + 0.1 * torch.randn(k, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    outs = []
    for mode in ["off", "auto"]:
        monkeypatch.setenv("MMFREE_TERNARY_SPLITK", mode)
        outs.append(torch.ops.mmfree.ternary_linear_packed(x, packed, w_scale, g, 1e-6))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("bad", ["0", "9", "yes", "16"])
def test_bad_override_is_an_error(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("MMFREE_TERNARY_SPLITK", bad)
    x_q, _, packed = _inputs(8, 64, 128)
    with pytest.raises(RuntimeError, match=r"MMFREE_TERNARY_SPLITK must be 'auto', 'off' or 1\.\.8"):
        _op(x_q, torch.ones(8, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
