"""CUDA kernels behind torch.ops.mmfree.ternary_matmul: the dp4a decode GEMV (M <= 16) and
the int8 tensor-core GEMM (M > 16), checked exactly against integer references.

Every test here needs a CUDA device (module-level ``cuda`` mark). The C++ binary
``bench_ternary_cuda`` checks the same kernels without torch (and each kernel separately).
"""

from __future__ import annotations

import pytest
import torch

from mmfree_ext import reference as ref

pytestmark = pytest.mark.cuda

M_GRID = [1, 2, 4, 8, 15, 16, 17, 32, 33, 300]
K_GRID = [1, 3, 64, 100, 128, 2560, 6913]
N_GRID = [1, 5, 2560]
# (N, K) of the 2.7B model's projections and LM head.
MODEL_SHAPES = [(2560, 2560), (13824, 2560), (2560, 6912), (32000, 2560)]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _op(x_q: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype):
    return torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed, w_scale, dtype)


def _inputs(m: int, n: int, k: int, device: str = "cuda", gen: torch.Generator | None = None):
    """Random int8 activations (full range, -128 included), ternary weights and their packing."""
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
    w_q = w_q.to(device)
    return x_q.to(device), w_q, ref.pack_ternary(w_q)  # packed where it is used (fast on GPU)


def _poison_allocator(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Leaves a NaN-filled block in the caching allocator, which the op's output then reuses,
    so an output element the kernel fails to write shows up as NaN."""
    t = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    del t


def _int_acc(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact accumulators: float64 products are exact here (|acc| <= 128 K << 2^53)."""
    return torch.matmul(x_q.double(), w_q.double().t()).to(torch.int64)


@pytest.mark.parametrize("n", N_GRID)
@pytest.mark.parametrize("k", K_GRID)
@pytest.mark.parametrize("m", M_GRID)
def test_exact_accumulators(m: int, k: int, n: int) -> None:
    """Scales of 1 and fp32 output: the output is float(acc), exact for |acc| < 2^24."""
    x_q, w_q, packed = _inputs(m, n, k)
    ones = torch.ones(m, device="cuda")
    w_scale = torch.ones((), device="cuda")
    _poison_allocator((m, n), torch.float32)
    out = _op(x_q, ones, packed, w_scale, torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert not out.isnan().any(), "kernel left outputs unwritten"
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 300])
@pytest.mark.parametrize("nk", [*MODEL_SHAPES[:3], (777, 300)])
def test_scaled_matches_reference_bitwise(m: int, nk: tuple[int, int], dtype: torch.dtype) -> None:
    """Random scales: bit-identical to the reference's (float(acc) * x_scale) * w_scale."""
    n, k = nk
    x_q, _, packed = _inputs(m, n, k)
    x_scale = torch.rand(m, device="cuda") * 0.02 + 1e-3
    w_scale = torch.rand((), device="cuda") * 0.1 + 1e-3
    _poison_allocator((m, n), dtype)
    out = _op(x_q, x_scale, packed, w_scale, dtype)
    want = ref.ternary_matmul(x_q, x_scale, packed, w_scale, k, out_dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, want)


@pytest.mark.parametrize("m", [1, 7, 16, 40])
def test_extreme_values(m: int) -> None:
    """x = -128 everywhere and all-(+1) / all-(-1) / all-zero weight rows: |acc| = 128 K,
    the largest the code offset (sum x*c - sum x) must get right."""
    k, n = 6913, 48
    x_q = torch.full((m, k), -128, dtype=torch.int8, device="cuda")
    w_q = torch.tensor([1, -1, 0], dtype=torch.int8).repeat(n // 3).view(n, 1).expand(n, k).contiguous()
    packed = ref.pack_ternary(w_q).cuda()
    out = _op(x_q, torch.ones(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.float32)
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q.cuda()))


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("m", [1, 9, 16, 33, 200])
def test_cpu_and_cuda_identical(m: int, dtype: torch.dtype) -> None:
    x_q, _, packed = _inputs(m, 1000, 2560, device="cpu")
    x_scale = torch.rand(m) * 0.02 + 1e-3
    w_scale = torch.tensor(0.037)
    cpu = _op(x_q, x_scale, packed, w_scale, dtype)
    gpu = _op(x_q.cuda(), x_scale.cuda(), packed.cuda(), w_scale.cuda(), dtype)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("m", [1, 40])
def test_leading_dims_and_misaligned_pointers(m: int) -> None:
    """3-D activations, and x_q / packed starting one byte off 16-byte alignment (the
    kernels' byte-load and fallback paths)."""
    k, n = 300, 70
    x_q, w_q, packed = _inputs(2 * m, n, k)
    x_buf = torch.empty(2 * m * k + 1, dtype=torch.int8, device="cuda")
    x_off = x_buf[1:].view(2, m, k)
    x_off.copy_(x_q.view(2, m, k))
    p_buf = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    p_off = p_buf[1:].view(packed.shape)
    p_off.copy_(packed)
    ones = torch.ones(2, m, device="cuda")
    w_scale = torch.ones((), device="cuda")
    out = _op(x_off, ones, p_off, w_scale, torch.float32)
    assert out.shape == (2, m, n)
    assert torch.equal(out.view(2 * m, n).to(torch.int64), _int_acc(x_q, w_q))
    assert torch.equal(_op(x_q.view(2, m, k), ones, packed, w_scale, torch.float32), out)


def test_empty_inputs() -> None:
    _, _, packed = _inputs(1, 8, 64)
    out = _op(
        torch.empty(0, 64, dtype=torch.int8, device="cuda"),
        torch.empty(0, device="cuda"),
        packed,
        torch.ones((), device="cuda"),
        torch.bfloat16,
    )
    assert out.shape == (0, 8)
    x_q, _, _ = _inputs(3, 1, 64)
    empty_w = torch.empty(0, 32, dtype=torch.uint8, device="cuda")
    assert _op(x_q, torch.ones(3, device="cuda"), empty_w, torch.ones((), device="cuda"), torch.float32).shape == (3, 0)


def test_runs_on_the_current_stream() -> None:
    x_q, w_q, packed = _inputs(33, 300, 2560)
    ones = torch.ones(33, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = _op(x_q, ones, packed, torch.ones((), device="cuda"), torch.float32)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out.to(torch.int64), _int_acc(x_q, w_q))


@pytest.mark.parametrize("m", [1, 64])
def test_cuda_graph_capture(m: int) -> None:
    """The launcher does no host synchronisation or allocation: it captures and replays."""
    n, k = 2560, 2560
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
        new_x, _, _ = _inputs(m, 1, k)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        want = ref.ternary_matmul(new_x, x_scale, packed, w_scale, k, out_dtype=torch.bfloat16)
        assert torch.equal(static_out, want)


def test_torch_compile_fullgraph() -> None:
    torch._dynamo.reset()

    def f(x_q: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        y = _op(x_q, x_scale, packed, w_scale, torch.float32)
        return torch.relu(y) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    for m in (1, 40):
        x_q, _, packed = _inputs(m, 512, 640)
        x_scale = torch.rand(m, device="cuda") + 0.01
        w_scale = torch.full((), 0.3, device="cuda")
        assert torch.equal(compiled(x_q, x_scale, packed, w_scale), f(x_q, x_scale, packed, w_scale))


@pytest.mark.parametrize("m", [1, 40])
def test_opcheck(m: int) -> None:
    x_q, _, packed = _inputs(m, 40, 200)
    args = (x_q, torch.rand(m, device="cuda"), packed, torch.ones((), device="cuda"), torch.bfloat16)
    torch.library.opcheck(torch.ops.mmfree.ternary_matmul, args)


@pytest.mark.parametrize("m", [1, 300])
def test_linear_packed_graph_capture_and_compile(m: int) -> None:
    """The issue's acceptance case: ternary_linear_packed (RMSNorm + quant + product) captured
    in a CUDA graph and compiled with fullgraph=True, forward and (compiled) backward."""
    k, n = 640, 384
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
    packed, w_scale = ref.pack_ternary(w_q), torch.full((), 0.05, device="cuda")
    g = 1.0 + 0.1 * torch.randn(k, device="cuda")
    static_x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mmfree.ternary_linear_packed(x, packed, w_scale, g, 1e-6)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = f(static_x)
    new_x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, f(new_x))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x1 = new_x.clone().requires_grad_()
    x2 = new_x.clone().requires_grad_()
    y1, y2 = compiled(x1), f(x2)
    assert torch.equal(y1, y2)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    assert torch.equal(x1.grad, x2.grad)


def test_grouped_gemv_graph_capture() -> None:
    """The decode path's grouped i/f/g launch replays from a CUDA graph."""
    k, n = 2560, 2560
    x_q = torch.randint(-128, 128, (3, 1, k), dtype=torch.int8, device="cuda")
    x_scale = torch.rand(3, 1, device="cuda") + 0.01
    packed = [ref.pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")) for _ in range(3)]
    w_scale = [torch.rand((), device="cuda") + 0.01 for _ in range(3)]
    graph = torch.cuda.CUDAGraph()
    torch.ops.mmfree.ternary_matmul_grouped(x_q, x_scale, packed, w_scale, torch.bfloat16)
    with torch.cuda.graph(graph):
        out = torch.ops.mmfree.ternary_matmul_grouped(x_q, x_scale, packed, w_scale, torch.bfloat16)
    x_q.copy_(torch.randint(-128, 128, (3, 1, k), dtype=torch.int8, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    for i in range(3):
        assert torch.equal(out[i], _op(x_q[i], x_scale[i], packed[i], w_scale[i], torch.bfloat16))
