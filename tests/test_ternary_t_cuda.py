"""CUDA implementations of torch.ops.mmfree.ternary_matmul_t (the STE backward product
dY @ W_q from the packed codes) and the CUDA training backward of ternary_linear.

Two implementations, chosen by MMFREE_TERNARY_T_CUDA: "panels" (default: W_q decoded one
column panel at a time into the grad's dtype, cuBLAS with fp32 output) and "mma" (the
mma.sync kernel decoding codes in shared memory; bf16 grads only, others use the panels).

Exactness: with integer-valued grads the products and the fp32 sums are exact, so the
result must equal an int64 reference bit for bit (bf16, fp16 and fp32 grads). With random
grads the error must stay within a few times torch's own error for a product in that dtype.
"""

from __future__ import annotations

import pytest
import torch

from mmfree_ext import reference as ref

pytestmark = pytest.mark.cuda

# (M, N = reduction, K = output columns): the CPU issue's grid plus model shapes, tails in
# every dimension (M % 128, N % 64, N % 8 for the unaligned-grad path, K % 128, odd K).
SHAPES = [
    (1, 1, 1),
    (1, 5, 3),
    (7, 300, 100),
    (15, 64, 128),
    (17, 2560, 64),
    (200, 37, 6913),
    (300, 2560, 2560),
    (129, 6912, 2560),
    (256, 13824, 2560),
    (64, 2560, 6912),
    (3584, 256, 1280),  # 10 x 14 tiles of 256 rows: the mma kernel's 256-row config on an H100
]


@pytest.fixture(params=["panels", "mma"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MMFREE_TERNARY_T_CUDA", request.param)
    return request.param


def _int_grad(m: int, n: int, bound: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randint(-bound, bound + 1, (m, n), device="cuda").to(dtype)


def _exact_truth(grad: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Integer products summed in float64: exact here (|sum| << 2^53), and fast on the GPU."""
    return (grad.double() @ w_q.double()).to(torch.int64)


def _skip_unused_impl(impl: str, dtype: torch.dtype) -> None:
    if impl == "mma" and dtype != torch.bfloat16:
        pytest.skip("the mma kernel takes bf16 grads only (others run the panels path)")


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_on_integer_grads(impl: str, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    _skip_unused_impl(impl, dtype)
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
    packed = ref.pack_ternary(w_q)
    # bf16 holds integers up to 256 exactly, fp16 up to 2048, fp32 gets 12-bit ones. Sums
    # stay below 2^24, so fp32 accumulation is exact in any order.
    bound = {torch.bfloat16: 256, torch.float16: 1024, torch.float32: 4095}[dtype]
    bound = min(bound, (1 << 23) // max(n, 1))
    grad = _int_grad(m, n, bound, dtype)
    torch.full((m, k), float("nan"), device="cuda")  # poison the allocator: unwritten outputs show
    out = torch.ops.mmfree.ternary_matmul_t(grad, packed, torch.ones((), device="cuda"), k)
    assert out.shape == (m, k) and out.dtype == torch.float32
    assert torch.equal(out.to(torch.int64), _exact_truth(grad, w_q))


def _torch_product(grad: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """torch's own product in grad's dtype (fp32 output where torch offers it)."""
    if grad.dtype in (torch.float32, torch.float64):
        return grad.float() @ w_q.float()
    try:
        return torch.mm(grad, w_q.to(grad.dtype), out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return (grad @ w_q.to(grad.dtype)).float()


@pytest.mark.parametrize(("m", "n", "k"), [(33, 2560, 2560), (300, 640, 1000), (8, 13824, 2560)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_random_grads_within_torch_error(impl: str, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    _skip_unused_impl(impl, dtype)
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
    grad = torch.randn(m, n, device="cuda").to(dtype)
    out = torch.ops.mmfree.ternary_matmul_t(grad, ref.pack_ternary(w_q), torch.tensor(0.037, device="cuda"), k)
    truth = (grad.double() @ w_q.double()) * float(torch.tensor(0.037))
    torch_out = _torch_product(grad, w_q) * torch.tensor(0.037, device="cuda")
    err = (out.double() - truth).abs().max().item()
    torch_err = (torch_out.double() - truth).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * truth.abs().max().item()
    assert err <= 4 * torch_err + floor, f"error {err:.3g} vs torch's error {torch_err:.3g}"


def test_matches_cpu_kernel() -> None:
    w_q = torch.randint(-1, 2, (700, 300), dtype=torch.int8)
    packed = ref.pack_ternary(w_q)
    grad = torch.randint(-100, 101, (50, 700)).float()
    w_scale = torch.tensor(1.0)
    cpu = torch.ops.mmfree.ternary_matmul_t(grad, packed, w_scale, 300)
    gpu = torch.ops.mmfree.ternary_matmul_t(grad.cuda(), packed.cuda(), w_scale.cuda(), 300)
    assert torch.equal(gpu.cpu(), cpu)


def test_leading_dims_views_and_empty(impl: str) -> None:
    w_q = torch.randint(-1, 2, (24, 200), dtype=torch.int8, device="cuda")
    packed = ref.pack_ternary(w_q)
    one = torch.ones((), device="cuda")
    base = _int_grad(2 * 3 * 24 + 3, 1, 100, torch.bfloat16).flatten()
    grad = base[3:].view(2, 3, 24)  # a contiguous view at a 6-byte offset
    out = torch.ops.mmfree.ternary_matmul_t(grad, packed, one, 200)
    assert out.shape == (2, 3, 200)
    assert torch.equal(out.view(6, 200).to(torch.int64), _exact_truth(grad.reshape(6, 24), w_q))
    assert grad.data_ptr() % 16 != 0
    # A packed view at an offset that is not 16-byte aligned.
    storage = torch.empty(24 * 64 + 8, dtype=torch.uint8, device="cuda")
    shifted = storage[8:].view(24, 64)
    shifted.copy_(packed)
    assert shifted.data_ptr() % 16 != 0
    out2 = torch.ops.mmfree.ternary_matmul_t(grad, shifted, one, 200)
    assert torch.equal(out2, out)
    empty = torch.ops.mmfree.ternary_matmul_t(torch.empty(0, 24, device="cuda"), packed, one, 200)
    assert empty.shape == (0, 200)
    no_rows = torch.empty(0, 64, dtype=torch.uint8, device="cuda")
    zero = torch.ops.mmfree.ternary_matmul_t(torch.empty(4, 0, device="cuda"), no_rows, one, 200)
    assert torch.equal(zero, torch.zeros(4, 200, device="cuda"))


def test_graph_capture_and_compile(impl: str) -> None:
    w_q = torch.randint(-1, 2, (256, 384), dtype=torch.int8, device="cuda")
    packed = ref.pack_ternary(w_q)
    one = torch.ones((), device="cuda")
    grad = _int_grad(64, 256, 50, torch.bfloat16)
    want = torch.ops.mmfree.ternary_matmul_t(grad, packed, one, 384)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.mmfree.ternary_matmul_t(grad, packed, one, 384)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    compiled = torch.compile(lambda g: torch.ops.mmfree.ternary_matmul_t(g, packed, one, 384), fullgraph=True)
    assert torch.equal(compiled(grad), want)


def test_opcheck() -> None:
    w_q = torch.randint(-1, 2, (40, 130), dtype=torch.int8, device="cuda")
    packed = ref.pack_ternary(w_q)
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(5, 40, device="cuda").to(dtype)
        torch.library.opcheck(torch.ops.mmfree.ternary_matmul_t, (grad, packed, torch.tensor(0.3, device="cuda"), 130))


@pytest.mark.parametrize(
    ("dtype", "norm_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
    ],  # the last: autocast-style fp32 norm weight on bf16 x
)
def test_training_backward_matches_reference(impl: str, dtype: torch.dtype, norm_dtype: torch.dtype) -> None:
    """ternary_linear's CUDA backward (matmul_t + fused RMSNorm backward + dense dW) against
    reference.bit_linear's autograd in float64 (the STE truth), per gradient, within a
    tolerance scaled to the dtype's own rounding."""
    m, k, n = 96, 512, 384
    x = torch.randn(m, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
    g = (1.0 + 0.1 * torch.randn(k, device="cuda")).to(norm_dtype)
    dy = torch.randn(m, n, device="cuda").to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, g)]
    torch.ops.mmfree.ternary_linear(*leaves, 1e-6).backward(dy)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in (x, w, g)]
    ref.bit_linear(*ref_leaves).backward(dy.double().cpu())
    rtol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
    for name, ours, want in zip(("x", "weight", "norm_weight"), leaves, ref_leaves, strict=True):
        assert ours.grad.dtype == ours.dtype, name
        got, exp = ours.grad.double().cpu(), want.grad
        err = (got - exp).norm() / exp.norm()
        assert err <= rtol, f"{name}: relative error {err:.3g}"


def test_rejects_unknown_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFREE_TERNARY_T_CUDA", "fast")
    packed = torch.zeros(3, 32, dtype=torch.uint8, device="cuda")
    with pytest.raises(RuntimeError, match="MMFREE_TERNARY_T_CUDA"):
        torch.ops.mmfree.ternary_matmul_t(torch.randn(4, 3, device="cuda"), packed, torch.ones((), device="cuda"), 100)


def test_rejects_bad_input() -> None:
    packed = torch.zeros(3, 32, dtype=torch.uint8, device="cuda")
    one = torch.ones((), device="cuda")
    with pytest.raises(RuntimeError, match="'grad'"):
        torch.ops.mmfree.ternary_matmul_t(torch.randn(4, 5, device="cuda"), packed, one, 100)
    with pytest.raises(RuntimeError, match="'packed'"):
        torch.ops.mmfree.ternary_matmul_t(torch.randn(4, 3, device="cuda"), packed, one, 300)
    with pytest.raises(RuntimeError, match="'w_scale'"):
        torch.ops.mmfree.ternary_matmul_t(torch.randn(4, 3, device="cuda"), packed, torch.ones(()), 100)
    with pytest.raises(RuntimeError, match="'grad'"):
        torch.ops.mmfree.ternary_matmul_t(torch.ones(4, 3, dtype=torch.int32, device="cuda"), packed, one, 100)
