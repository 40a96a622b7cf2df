"""Every CUDA op writes every element of every output (issue 18, the initcheck finding).

compute-sanitizer's initcheck found reads of never-written device memory in tests that compare
two outputs (both came from the caching allocator with the same stale bytes, so they compared
equal). This file makes such a hole visible without a sanitizer: each case runs twice, once
after the caching allocator's free blocks were filled with 0x00 and once after 0xFF; an output
element that no kernel writes keeps the stale byte, so the two runs differ. Every case runs
at odd shapes (K and N not multiples of the tiles, few rows) and through the autograd ops'
backward too. A kernel that writes everything gives bit-identical outputs (all our kernels are
deterministic), whatever the allocator hands out.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import mmfree_ext.ops as ops

pytestmark = pytest.mark.cuda

# Block sizes that refill both pools of the caching allocator (small: <= 1 MiB from 2 MiB
# segments; large: the rest) with the poison byte.
_POISON_SIZES = [512, 4096, 32768, 262144, 1 << 20, 4 << 20, 16 << 20]


def _poison(byte: int) -> None:
    """Leave the caching allocator's free blocks filled with `byte`."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full((n,), byte, dtype=torch.uint8, device="cuda") for n in _POISON_SIZES for _ in range(8)]
    torch.cuda.synchronize()
    del blocks


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)


def _outputs(fn: Callable[[], object]) -> list[torch.Tensor]:
    out = fn()
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if isinstance(o, torch.Tensor)]


def _assert_writes_all(fn: Callable[[], object]) -> None:
    runs = []
    for byte in (0x00, 0xFF):
        _poison(byte)
        runs.append([_bytes(o).cpu() for o in _outputs(fn)])
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        bad = (a != b).nonzero()
        assert bad.numel() == 0, f"output {i}: {bad.shape[0]} bytes depend on stale memory (first at {bad[0].tolist()})"


def _grads(fn: Callable[..., torch.Tensor], *leaves: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """The op's output and the gradients of its differentiable inputs, for a fixed upstream grad."""

    def run() -> list[torch.Tensor]:
        xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
        out = fn(*xs)
        gen = torch.Generator(device="cuda").manual_seed(1)
        out.backward(torch.randn(out.shape, device="cuda", generator=gen).to(out.dtype))
        return [out] + [x.grad for x in xs if x.grad is not None]

    return run


DTYPES = [torch.float32, torch.bfloat16]


def _rand(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols"), [(37, 100), (5, 6913)])
def test_pack_ops(dtype: torch.dtype, rows: int, cols: int) -> None:
    w = _rand(rows, cols, dtype=dtype, scale=0.05)
    _assert_writes_all(lambda: torch.ops.mmfree.quantize_ternary(w))
    packed, _ = torch.ops.mmfree.quantize_ternary(w)
    _assert_writes_all(lambda: torch.ops.mmfree.unpack_ternary(packed, cols))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols"), [(37, 100), (9, 2560)])
def test_dequantize_rows(dtype: torch.dtype, rows: int, cols: int) -> None:
    x_q, x_scale = torch.ops.mmfree.rms_norm_quant(_rand(rows, cols), torch.ones(cols, device="cuda"), 1e-6)
    _assert_writes_all(lambda: torch.ops.mmfree.dequantize_rows(x_q, x_scale, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols"), [(7, 100), (3, 2560)])
def test_norm_ops(dtype: torch.dtype, rows: int, cols: int) -> None:
    x, r, g = (_rand(rows, cols, dtype=dtype) for _ in range(3))
    w = (1 + 0.2 * torch.randn(cols, device="cuda")).to(dtype)
    ws = (1 + 0.2 * torch.randn(3, cols, device="cuda")).to(dtype)
    m = torch.ops.mmfree
    _assert_writes_all(lambda: m.rms_norm_quant(x, w, 1e-6))
    _assert_writes_all(lambda: m.rms_norm_quant_multi(x, ws, 1e-6))
    _assert_writes_all(lambda: m.rms_norm(x, w, 1e-6, r))
    _assert_writes_all(lambda: m.rms_norm_backward(g, x, w, 1e-6, r, g))
    _assert_writes_all(lambda: m.rms_norm_backward(g, x, w, 1e-6, None, None))
    _assert_writes_all(lambda: m.rms_norm_swish_gate(g, x, w, 1e-6))
    _assert_writes_all(lambda: m.rms_norm_swish_gate_backward(r, g, x, w, 1e-6))
    _assert_writes_all(lambda: m.rms_norm_swish_gate_quant(g, x, w, 1e-6, w, 1e-6))


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 72), (10, 40, 72), (300, 37, 100), (129, 2560, 6913)])
def test_ternary_products(out_dtype: torch.dtype, m: int, n: int, k: int) -> None:
    ops_ = torch.ops.mmfree
    x = _rand(m, k, dtype=out_dtype)
    x_q, x_scale = ops_.rms_norm_quant(x, torch.ones(k, device="cuda", dtype=out_dtype), 1e-6)
    packed, w_scale = ops_.quantize_ternary(_rand(n, k, scale=0.05))
    packed2, w_scale2 = ops_.quantize_ternary(_rand(n, k, scale=0.05))
    _assert_writes_all(lambda: ops_.ternary_matmul(x_q, x_scale, packed, w_scale, out_dtype))
    ones2 = torch.ones(2, k, device="cuda", dtype=out_dtype)
    xg_q, xg_scale = ops_.rms_norm_quant_multi(x, ones2, 1e-6)  # [2, m, k]: one input per group
    _assert_writes_all(
        lambda: ops_.ternary_matmul_grouped(xg_q, xg_scale, [packed, packed2], [w_scale, w_scale2], out_dtype)
    )
    grad = _rand(m, n, dtype=out_dtype)
    _assert_writes_all(lambda: ops_.ternary_matmul_t(grad, packed, w_scale, k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(10, 40, 72), (300, 37, 100)])
def test_linear_ops_and_their_backward(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    x = _rand(2, m // 2 if m % 2 == 0 else m, k, dtype=dtype)
    w = _rand(n, k, dtype=dtype, scale=0.05)
    nw = (1 + 0.2 * torch.randn(k, device="cuda")).to(dtype)
    _assert_writes_all(_grads(lambda a, b, c: ops.ternary_linear(a, b, c, 1e-6), x, w, nw))
    packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
    _assert_writes_all(_grads(lambda a, c: torch.ops.mmfree.ternary_linear_packed(a, packed, w_scale, c, 1e-6), x, nw))


@pytest.mark.parametrize("int8_dx", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitlinear_ops(dtype: torch.dtype, int8_dx: bool) -> None:
    m = torch.ops.mmfree
    x = _rand(33, 100, dtype=dtype)
    w = _rand(37, 100, dtype=dtype, scale=0.05)
    nw = (1 + 0.2 * torch.randn(100, device="cuda")).to(dtype)
    _assert_writes_all(lambda: m.bitlinear_forward(x, w, nw, 1e-6, True))
    _, packed, w_scale, x_q, x_scale, packed_t = m.bitlinear_forward(x, w, nw, 1e-6, True)
    g = _rand(33, 37, dtype=dtype)
    _assert_writes_all(
        lambda: m.bitlinear_backward(g, x, x_q, x_scale, packed, w_scale, packed_t, nw, 1e-6, dtype, int8_dx)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_glu_and_loss_ops(dtype: torch.dtype) -> None:
    u = _rand(2, 5, 2 * 72, dtype=dtype)
    w = _rand(40, 72, dtype=dtype, scale=0.05)
    nw = (1 + 0.2 * torch.randn(72, device="cuda")).to(dtype)
    dy = _rand(2, 5, 72, dtype=dtype)
    _assert_writes_all(lambda: torch.ops.mmfree.silu_mul(u))
    _assert_writes_all(lambda: torch.ops.mmfree.silu_mul_backward(dy, u))
    _assert_writes_all(_grads(lambda a, b, c: ops.silu_mul_ternary_linear(a, b, c, 1e-6), u, w, nw))
    x = _rand(2, 5, 72, dtype=dtype)
    labels = torch.tensor([[1, 2, -100, 39, 0], [5, 5, 5, -100, 7]], device="cuda")
    _assert_writes_all(
        _grads(lambda a, b, c: ops.ternary_linear_cross_entropy(a, b, c, labels, chunk_rows=3), x, w, nw)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("varlen", [False, True])
def test_mlgru_ops(dtype: torch.dtype, varlen: bool) -> None:
    b, t, d = (1, 13, 72) if varlen else (2, 7, 72)
    i, f = _rand(b, t, d, dtype=dtype), _rand(b, t, d, dtype=dtype)
    lb = torch.rand(d, device="cuda")  # the lower bound is fp32 for every dtype
    h0 = None if varlen else _rand(b, d)  # the state is fp32
    cu = torch.tensor([0, 4, 5, 13], device="cuda", dtype=torch.int32) if varlen else None
    m = torch.ops.mmfree
    _assert_writes_all(lambda: m.mlgru_scan(i, f, lb, h0, None, cu))
    gh, gl = _rand(b, t, d, dtype=dtype), _rand(3 if varlen else b, d)
    _assert_writes_all(lambda: m.mlgru_scan_backward(gh, gl, i, f, lb, h0, None, cu))


def test_decode_step() -> None:
    from mmfree_ext.models.decode_plan import decode_weights
    from test_decode_step import _packed_model

    model = _packed_model("cuda", torch.bfloat16)
    weights = decode_weights(model)
    tokens = torch.tensor([1, 7, 299], device="cuda")
    state0 = _rand(3, 3, 96)  # the recurrent state is fp32

    def step() -> list[torch.Tensor]:
        state = state0.clone()
        return [weights.step(tokens, state), state]

    _assert_writes_all(step)
