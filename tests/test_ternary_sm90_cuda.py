"""The sm_90a int8 wgmma GEMM behind torch.ops.mmfree.ternary_matmul (gemm_sm90.cu), forced
with MMFREE_TERNARY_GEMM=sm90 (the producer decodes the packed weights) and =sm90_int8 (the
weights expanded to int8 in a workspace first, then copied like the activations): every test
runs for both, checked exactly against integer references.

Needs an sm_90 GPU (H100/H200) and a build whose CUDA arch list has 90; skipped elsewhere
(module-level ``cuda`` mark plus a capability check). The grid hits every tile tail of the
kernel: M around its 128-row tile, N around its 128/256-wide tiles, K with partial 16-byte
chunks and partial 128-weight blocks, and x rows that are not 16-byte aligned (K = 100,
6913: the producer's byte-load path).
"""

from __future__ import annotations

import re

import pytest
import torch

import mmfree_ext
from mmfree_ext import reference as ref

pytestmark = pytest.mark.cuda

M_GRID = [128, 129, 300, 4096, 8193]
N_GRID = [8, 2560, 13824, 32001]
K_GRID = [64, 100, 2560, 6913]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _has_sm90_kernel() -> bool:
    if not mmfree_ext.cuda_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    return any(a.startswith("90") for a in mmfree_ext.build_info()["cuda_archs"])


@pytest.fixture(autouse=True, params=["sm90", "sm90_int8"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if not _has_sm90_kernel():
        pytest.skip("needs an sm_90 GPU and a build with arch 90 (the wgmma kernel)")
    monkeypatch.setenv("MMFREE_TERNARY_GEMM", request.param)
    return request.param


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


def _covering_grid() -> list[tuple[int, int, int]]:
    """Every M with every N and every K would be 80 products up to 8193 x 32001 x 6913; this
    sample pairs every value of each axis with every value of each other axis at least once
    (34 products, every tail combination of two axes, the largest corners included)."""
    grid = set()
    for i, m in enumerate(M_GRID):
        for j, n in enumerate(N_GRID):
            grid.add((m, n, K_GRID[(i + j) % len(K_GRID)]))
        for q, k in enumerate(K_GRID):
            grid.add((m, N_GRID[(i + q) % len(N_GRID)], k))
    for j, n in enumerate(N_GRID):
        for q, k in enumerate(K_GRID):
            grid.add((M_GRID[(j + q) % len(M_GRID)], n, k))
    return sorted(grid)


_GRID = _covering_grid()


@pytest.mark.parametrize(("m", "n", "k"), _GRID)
def test_exact_accumulators(m: int, n: int, k: int) -> None:
    """Scales of 1 and fp32 output: the output is float(acc), exact for |acc| < 2^24 (here
    |acc| <= 128 * 6913)."""
    x_q, w_q, packed = _inputs(m, n, k)
    torch.full((m, n), float("nan"), device="cuda")  # leaves NaNs for the output to reuse
    out = _op(x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert not out.isnan().any(), "kernel left outputs unwritten"
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(128, 2560, 2560), (300, 13824, 2560), (513, 2560, 6912), (200, 777, 300)])
def test_scaled_matches_reference_bitwise(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    """Random scales: bit-identical to the reference's (float(acc) * x_scale) * w_scale."""
    x_q, _, packed = _inputs(m, n, k)
    x_scale = torch.rand(m, device="cuda") * 0.02 + 1e-3
    w_scale = torch.rand((), device="cuda") * 0.1 + 1e-3
    out = _op(x_q, x_scale, packed, w_scale, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, ref.ternary_matmul(x_q, x_scale, packed, w_scale, k, out_dtype=dtype))


def test_same_bits_as_mma_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    m, n, k = 1024, 2560, 2560
    x_q, _, packed = _inputs(m, n, k)
    x_scale = torch.rand(m, device="cuda") * 0.02 + 1e-3
    w_scale = torch.full((), 0.037, device="cuda")
    wgmma = _op(x_q, x_scale, packed, w_scale, torch.bfloat16)
    monkeypatch.setenv("MMFREE_TERNARY_GEMM", "mma")
    assert torch.equal(wgmma, _op(x_q, x_scale, packed, w_scale, torch.bfloat16))


def test_extreme_values() -> None:
    """x = -128 everywhere against all-(+1), all-(-1) and all-zero rows: |acc| = 128 K."""
    m, k, n = 130, 6913, 258
    x_q = torch.full((m, k), -128, dtype=torch.int8, device="cuda")
    w_q = torch.tensor([1, -1, 0], dtype=torch.int8, device="cuda").repeat(n // 3).view(n, 1).expand(n, k)
    packed = ref.pack_ternary(w_q.contiguous())
    out = _op(x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


def test_misaligned_activations() -> None:
    """x_q starting one byte off 16-byte alignment (K a multiple of 16): the byte-load path."""
    m, k, n = 200, 256, 300
    x_q, w_q, packed = _inputs(m, n, k)
    buf = torch.empty(m * k + 1, dtype=torch.int8, device="cuda")
    x_off = buf[1:].view(m, k)
    x_off.copy_(x_q)
    out = _op(x_off, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


def test_grouped_large_m() -> None:
    """The grouped op at prefill sizes runs each group on the wgmma kernel."""
    g, m, n, k = 3, 256, 640, 2560
    x_q = torch.randint(-128, 128, (g, m, k), dtype=torch.int8, device="cuda")
    x_scale = torch.rand(g, m, device="cuda") * 0.02 + 1e-3
    ws = [torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda") for _ in range(g)]
    packed = [ref.pack_ternary(w) for w in ws]
    w_scale = [torch.full((), 0.01 * (i + 1), device="cuda") for i in range(g)]
    out = torch.ops.mmfree.ternary_matmul_grouped(x_q, x_scale, packed, w_scale, torch.bfloat16)
    for i in range(g):
        want = ref.ternary_matmul(x_q[i], x_scale[i], packed[i], w_scale[i], k, out_dtype=torch.bfloat16)
        assert torch.equal(out[i], want)


def _assert_graph_replays(m: int, n: int, k: int) -> None:
    """The product captured in a CUDA graph (after a warm-up outside it) and replayed with new
    activations gives the reference's bits each time."""
    x_q, _, packed = _inputs(m, n, k)
    x_scale = torch.rand(m, device="cuda") * 0.02 + 1e-3
    w_scale = torch.full((), 0.05, device="cuda")
    static_x = x_q.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture (first-launch attribute setup)
        _op(static_x, x_scale, packed, w_scale, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _op(static_x, x_scale, packed, w_scale, torch.bfloat16)
    for _ in range(2):
        new_x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        want = ref.ternary_matmul(new_x, x_scale, packed, w_scale, k, out_dtype=torch.bfloat16)
        assert torch.equal(static_out, want)


def test_cuda_graph_capture() -> None:
    _assert_graph_replays(512, 2560, 2560)


def test_torch_compile_fullgraph() -> None:
    torch._dynamo.reset()

    def f(x_q, x_scale, packed, w_scale):
        return torch.relu(_op(x_q, x_scale, packed, w_scale, torch.float32)) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    for m in (256, 300):
        x_q, _, packed = _inputs(m, 512, 640)
        x_scale = torch.rand(m, device="cuda") + 0.01
        w_scale = torch.full((), 0.3, device="cuda")
        assert torch.equal(compiled(x_q, x_scale, packed, w_scale), f(x_q, x_scale, packed, w_scale))


def test_opcheck() -> None:
    m = 300
    x_q, _, packed = _inputs(m, 264, 200)
    args = (x_q, torch.rand(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.bfloat16)
    torch.library.opcheck(torch.ops.mmfree.ternary_matmul, args)


def test_bad_impl_name_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFREE_TERNARY_GEMM", "wgmma")
    x_q, _, packed = _inputs(128, 16, 64)
    with pytest.raises(RuntimeError, match="MMFREE_TERNARY_GEMM must be"):
        _op(x_q, torch.ones(128, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)


# Split-K inside the wgmma kernel (MMFREE_TERNARY_SM90_SPLITK): a cluster of S CTAs per
# tile along K, reduced through distributed shared memory. Issue 11's tail grid at the
# sizes where tiles are few (M up to 512). The launch keeps S <= the k-tiles (K = 64 / 100:
# one k-tile, unsplit; K = 300 with S = 8: 3 ranks); M = 128 with N = 2560 takes the
# 256-wide split tile (10 tiles x S fit one wave), N = 32001 the 128-wide one.
SPLIT_M = [128, 129, 300, 512]
SPLITS = ["2", "3", "4", "8"]
_SPLIT_KERNEL = re.compile(r"gemm_sm90_kernel<\d+, (true|false), [\w:]+, (true|false), (true|false), (true|false)>")


def _split_grid() -> list[tuple[int, int, int, str]]:
    """Every (M, N) and every (M, K) and (N, K) pair at least once, the split count cycling."""
    grid = set()
    for i, m in enumerate(SPLIT_M):
        for j, n in enumerate(N_GRID):
            grid.add((m, n, K_GRID[(i + j) % len(K_GRID)]))
        for q, k in enumerate(K_GRID):
            grid.add((m, N_GRID[(i + q + 1) % len(N_GRID)], k))
    for j, n in enumerate(N_GRID):
        for q, k in enumerate(K_GRID):
            grid.add((SPLIT_M[(j + q) % len(SPLIT_M)], n, k))
    return [(m, n, k, SPLITS[i % len(SPLITS)]) for i, (m, n, k) in enumerate(sorted(grid))]


def _sm90_instances(fn) -> list[tuple[bool, bool, bool]]:
    """For each wgmma kernel `fn` launches: (split (cluster) instance, int8-weight instance,
    TMA instance)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    flags, kernels = [], 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kernels += 1
        match = _SPLIT_KERNEL.search(e.name)
        if match:
            flags.append(tuple(match.group(i) == "true" for i in (2, 3, 4)))
    if kernels == 0:  # no event at all: no profiler (CUPTI taken, e.g. by compute-sanitizer)
        pytest.skip("torch.profiler recorded no CUDA kernel (CUPTI unavailable)")
    return flags


def _sm90_split_flags(fn) -> list[bool]:
    """For each wgmma kernel `fn` launches, whether it was the split (cluster) instance."""
    return [split for split, _, _ in _sm90_instances(fn)]


@pytest.mark.parametrize(("m", "k"), [(300, 2560), (200, 100)])
def test_forced_impl_runs_its_instance(impl: str, m: int, k: int) -> None:
    """sm90 launches the decoding instance, sm90_int8 the int8-weight one: by TMA where x rows
    are 16-byte aligned (K = 2560), by cp.async where they are not (K = 100)."""
    x_q, _, packed = _inputs(m, 640, k)
    args = (x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    int8 = impl == "sm90_int8"
    assert _sm90_instances(lambda: _op(*args)) == [(False, int8, int8 and k % 16 == 0)]


@pytest.mark.parametrize(("m", "n", "k", "splits"), _split_grid())
def test_split_exact_accumulators(monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int, splits: str) -> None:
    monkeypatch.setenv("MMFREE_TERNARY_SM90_SPLITK", splits)
    x_q, w_q, packed = _inputs(m, n, k)
    torch.full((m, n), float("nan"), device="cuda")  # leaves NaNs for the output to reuse
    out = _op(x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert not out.isnan().any(), "kernel left outputs unwritten"
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize(("m", "n", "k"), [(512, 2560, 6912), (128, 2560, 2560), (300, 777, 300)])
def test_split_bitwise_equal_to_unsplit(monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int, splits: str) -> None:
    """Random scales, bf16 and fp16 out: the split kernel gives exactly the unsplit wgmma
    kernel's output and the reference's under off, auto and the forced count; `off` never
    launches the split instance, a forced count always does."""
    x_q, _, packed = _inputs(m, n, k)
    x_scale = torch.rand(m, device="cuda") * 0.02 + 1e-3
    w_scale = torch.rand((), device="cuda") * 0.1 + 1e-3
    for dtype in (torch.bfloat16, torch.float16):
        want = ref.ternary_matmul(x_q, x_scale, packed, w_scale, k, out_dtype=dtype)
        for mode in ["off", "auto", splits]:
            monkeypatch.setenv("MMFREE_TERNARY_SM90_SPLITK", mode)
            out = _op(x_q, x_scale, packed, w_scale, dtype)
            assert torch.equal(out, want), f"MMFREE_TERNARY_SM90_SPLITK={mode} {dtype}"
            if mode != "auto" and dtype == torch.bfloat16:
                flags = _sm90_split_flags(lambda d=dtype: _op(x_q, x_scale, packed, w_scale, d))
                assert flags == [mode == splits], (mode, flags)


@pytest.mark.parametrize(
    ("m", "aligned", "want"),
    [
        (512, True, [(False, True, True)]),
        # 32 x 5 = 160 tiles of 128 x 128 on 132 SMs, but 20 k-tiles: too few for the tail split.
        (4096, True, [(False, True, True)]),
        (300, True, []),
        (512, False, []),
    ],
)
def test_auto_takes_int8_tma_from_512_rows(
    impl: str, monkeypatch: pytest.MonkeyPatch, m: int, aligned: bool, want: list
) -> None:
    """launch.h's measured rule: auto runs the int8-weight TMA instance from M = 512 rows
    with 16-byte aligned x rows, and no wgmma kernel below (mma.sync / split-K) or with
    unaligned rows (the TMA descriptor needs them); same output either way."""
    if impl != "sm90":
        pytest.skip("sets MMFREE_TERNARY_GEMM=auto itself: one run is enough")
    monkeypatch.setenv("MMFREE_TERNARY_GEMM", "auto")
    k = 2560
    x_q, w_q, packed = _inputs(m, 640, k)
    if not aligned:
        buf = torch.empty(m * k + 1, dtype=torch.int8, device="cuda")
        x_q = buf[1:].view(m, k)
        x_q.copy_(_inputs(m, 640, k)[0])
    args = (x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert _sm90_instances(lambda: _op(*args)) == want
    assert torch.equal(_op(*args).to(torch.int64), _int_acc(x_q, w_q))


@pytest.mark.parametrize(("m", "n", "k"), [(300, 777, 2576), (130, 2560, 6928), (513, 264, 2064)])
def test_k_tail_past_the_last_k_tile(m: int, n: int, k: int) -> None:
    """K a multiple of 16 but not of 128 over several k-tiles: aligned x rows, so the int8
    form loads them by TMA and its zero fill past K must cover the last tile's tail."""
    x_q, w_q, packed = _inputs(m, n, k)
    out = _op(x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


def test_split_auto_is_off_until_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """launch.h's kSm90SplitAuto is false: auto never splits, not even where the candidate
    rule would (M = 512, 6912->2560: 40 tiles of 128 x 256). Update with that constant."""
    monkeypatch.setenv("MMFREE_TERNARY_SM90_SPLITK", "auto")
    m, n, k = 512, 2560, 6912
    x_q, _, packed = _inputs(m, n, k)
    args = (x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.bfloat16)
    assert _sm90_split_flags(lambda: _op(*args)) == [False]


def test_split_misaligned_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFREE_TERNARY_SM90_SPLITK", "3")
    m, k, n = 200, 2560, 300
    x_q, w_q, packed = _inputs(m, n, k)
    buf = torch.empty(m * k + 1, dtype=torch.int8, device="cuda")
    x_off = buf[1:].view(m, k)
    x_off.copy_(x_q)
    out = _op(x_off, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


def test_split_extreme_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """|acc| = 128 K split over 4 ranks: every partial and the sum near the int32 extremes
    that the products can reach."""
    monkeypatch.setenv("MMFREE_TERNARY_SM90_SPLITK", "4")
    m, k, n = 130, 6913, 258
    x_q = torch.full((m, k), -128, dtype=torch.int8, device="cuda")
    w_q = torch.tensor([1, -1, 0], dtype=torch.int8, device="cuda").repeat(n // 3).view(n, 1).expand(n, k)
    packed = ref.pack_ternary(w_q.contiguous())
    out = _op(x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


@pytest.mark.parametrize("splits", ["2", "4"])
def test_split_cuda_graph_capture(monkeypatch: pytest.MonkeyPatch, splits: str) -> None:
    """The cluster launch (no workspace, no memset) captured and replayed with new inputs."""
    monkeypatch.setenv("MMFREE_TERNARY_SM90_SPLITK", splits)
    _assert_graph_replays(512, 2560, 6912)


@pytest.mark.parametrize("bad", ["1", "9", "0", "two"])
def test_split_bad_override_raises(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("MMFREE_TERNARY_SM90_SPLITK", bad)
    x_q, _, packed = _inputs(128, 16, 64)
    with pytest.raises(RuntimeError, match=r"MMFREE_TERNARY_SM90_SPLITK must be 'auto', 'off' or 2\.\.8"):
        _op(x_q, torch.ones(128, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)


# The tail wave (launch.h, sm90_tail_splits): M = 2048 x 6912->2560 is 160 tiles of 128 x 256
# on 132 SMs; the 28 past the full wave run split 4 ways over K (54 k-tiles) in a second launch.
TAIL_SHAPE = (2048, 2560, 6912)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tail_wave_split_is_bitwise_the_unsplit_product(monkeypatch: pytest.MonkeyPatch, impl: str, dtype) -> None:
    m, n, k = TAIL_SHAPE
    x_q, w_q, packed = _inputs(m, n, k)
    x_scale = torch.rand(m, device="cuda") * 0.02 + 1e-3
    w_scale = torch.rand((), device="cuda") * 0.1 + 1e-3
    want = ref.ternary_matmul(x_q, x_scale, packed, w_scale, k, out_dtype=dtype)
    int8 = impl == "sm90_int8"
    for tail, launches in [("auto", [(False, int8, int8), (True, int8, int8)]), ("off", [(False, int8, int8)])]:
        monkeypatch.setenv("MMFREE_TERNARY_SM90_TAIL", tail)
        assert torch.equal(_op(x_q, x_scale, packed, w_scale, dtype), want), tail
        assert _sm90_instances(lambda: _op(x_q, x_scale, packed, w_scale, dtype)) == launches, tail
    monkeypatch.setenv("MMFREE_TERNARY_SM90_TAIL", "auto")
    ones = (torch.ones(m, device="cuda"), torch.ones((), device="cuda"))
    assert torch.equal(_op(x_q, ones[0], packed, ones[1], torch.float32).to(torch.int64), _int_acc(x_q, w_q))


@pytest.mark.parametrize(
    ("m", "n", "k", "split"),
    [(2048, 2560, 256, False), (2048, 2560, 2560, False), (4224, 2560, 6912, True), (2049, 2560, 6920, True)],
)
def test_tail_wave_rule(m: int, n: int, k: int, split: bool) -> None:
    """160 tiles with 2 or 20 k-tiles: no tail launch (4 ways would spare a rank 1.5 or 15
    k-tiles, under the 24 that pay for it); 330 tiles with 54 leave 66, split 2 ways; 2049 rows
    (170 tiles, a ragged last m-tile) with K = 6920 (a k tail, unaligned x rows) leave 38,
    split 3 ways."""
    x_q, w_q, packed = _inputs(m, n, k)
    args = (x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert _sm90_split_flags(lambda: _op(*args)) == ([False, True] if split else [False])
    assert torch.equal(_op(*args).to(torch.int64), _int_acc(x_q, w_q))


def test_tail_wave_cuda_graph_capture() -> None:
    _assert_graph_replays(*TAIL_SHAPE)


def test_tail_bad_override_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFREE_TERNARY_SM90_TAIL", "on")
    x_q, _, packed = _inputs(128, 16, 64)
    with pytest.raises(RuntimeError, match=r"MMFREE_TERNARY_SM90_TAIL must be 'auto' or 'off'"):
        _op(x_q, torch.ones(128, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
