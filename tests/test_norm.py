"""Fused RMSNorm ops (rms_norm_quant[_multi], rms_norm, rms_norm_swish_gate[_quant]) on CPU and CUDA.

Integer codes must equal the reference except where fp32 statistics summed in another order
move a value across a rounding tie: at most one code, in a tiny fraction of elements. Float
outputs follow the flash-attention rule: the kernel's error against an fp64 computation is at
most twice the reference's own error in the same precision (plus one ulp of the output).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import mmfree_ext
from conftest import DEVICES
from mmfree_ext import reference as ref

EPS = 1e-6
K_GRID = [1, 7, 100, 2560, 6912, 8193]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ISAS = ["scalar", "avx2", "avx512"]


def _rows_for(k: int) -> tuple[int, ...]:
    """A leading shape with a few rows (fewer for the widest rows, to keep the file fast)."""
    return (2, 3) if k <= 2560 else (3,)


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _weight(k: int, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (1.0 + 0.5 * torch.randn(k, device=device)).to(dtype)


def assert_codes_close(q: torch.Tensor, q_ref: torch.Tensor) -> None:
    """int8 codes: equal except at most one code in a tiny count (fp32 statistics ties)."""
    assert q.dtype == torch.int8 and q.shape == q_ref.shape
    diff = (q.cpu().int() - q_ref.cpu().int()).abs()
    n_bad = int((diff != 0).sum())
    allowed = 1 + q.numel() // 1000
    max_diff = int(diff.max()) if diff.numel() else 0
    assert max_diff <= 1, f"codes differ by {max_diff}"
    assert n_bad <= allowed, f"{n_bad} codes differ (allowed {allowed})"


def assert_close_to_truth(out: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor) -> None:
    """Kernel error vs fp64 truth <= 2x the reference's error in out's precision + 1 ulp."""
    out64, base64, truth64 = out.cpu().double(), baseline.cpu().double(), truth.cpu().double()
    assert not torch.isnan(out64).any() or torch.isnan(truth64).any()
    err = (out64 - truth64).abs().max().item() if out.numel() else 0.0
    base_err = (base64 - truth64).abs().max().item() if out.numel() else 0.0
    ulp = torch.finfo(out.dtype).eps * (truth64.abs().max().item() if out.numel() else 0.0)
    assert err <= 2 * base_err + ulp, f"error {err:.3g} vs reference error {base_err:.3g} (ulp {ulp:.3g})"


# ---- fp64 truths ----------------------------------------------------------------------------


def _norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd * torch.rsqrt((xd * xd).mean(-1, keepdim=True) + eps) * w.double()


def _scale64(xn: torch.Tensor) -> torch.Tensor:
    return xn.abs().amax(-1).clamp(min=ref.SCALE_MIN) / 127.0


def _gate64(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    hd = h.double()
    return _norm64(g, w, eps) * (hd * torch.sigmoid(hd))


# ---- rms_norm_quant ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", K_GRID)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_quant_matches_reference(device: str, k: int, dtype: torch.dtype) -> None:
    x = _randn((*_rows_for(k), k), dtype, device, scale=3.0)
    w = _weight(k, device)
    x_q, x_scale = mmfree_ext.rms_norm_quant(x, w, EPS)
    q_ref, s_ref = ref.rms_norm_quant(x.cpu(), w.cpu(), EPS)
    assert x_q.device.type == device and x_scale.dtype == torch.float32 and x_scale.shape == x.shape[:-1]
    assert_codes_close(x_q, q_ref)
    assert_close_to_truth(x_scale, s_ref, _scale64(_norm64(x.cpu().float(), w.cpu(), EPS)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rms_norm_quant_weight_dtypes(device: str, w_dtype: torch.dtype) -> None:
    x = _randn((4, 512), torch.bfloat16, device)
    w = _weight(512, device, w_dtype)
    x_q, x_scale = mmfree_ext.rms_norm_quant(x, w, EPS)
    q_ref, s_ref = ref.rms_norm_quant(x.cpu(), w.cpu(), EPS)
    assert_codes_close(x_q, q_ref)
    torch.testing.assert_close(x_scale.cpu(), s_ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [7, 2560])
def test_rms_norm_quant_multi(device: str, dtype: torch.dtype, k: int) -> None:
    x = _randn((2, 5, k), dtype, device)
    ws = torch.stack([_weight(k, device) for _ in range(3)])
    x_q, x_scale = mmfree_ext.rms_norm_quant_multi(x, ws, EPS)
    assert x_q.shape == (3, 2, 5, k) and x_scale.shape == (3, 2, 5)
    for p, (q_ref, s_ref) in enumerate(ref.rms_norm_quant_multi(x.cpu(), list(ws.cpu()), EPS)):
        assert_codes_close(x_q[p], q_ref)
        torch.testing.assert_close(x_scale[p].cpu(), s_ref, rtol=2e-6, atol=0)
        # One shared normalization: bit-identical to the single-weight op on the same device.
        q1, s1 = mmfree_ext.rms_norm_quant(x, ws[p], EPS)
        assert torch.equal(x_q[p], q1) and torch.equal(x_scale[p], s1)
    # A sequence of weights is stacked by the wrapper.
    q_seq, _ = mmfree_ext.rms_norm_quant_multi(x, list(ws), EPS)
    assert torch.equal(q_seq, x_q)


@pytest.mark.parametrize("device", DEVICES)
def test_quant_extremes(device: str) -> None:
    """All-zero rows hit the 1e-5 amax floor; exact ties round away from zero."""
    x = torch.zeros(3, 64, device=device)
    x_q, x_scale = mmfree_ext.rms_norm_quant(x, torch.ones(64, device=device), EPS)
    assert torch.equal(x_q.cpu(), torch.zeros(3, 64, dtype=torch.int8))
    assert torch.allclose(x_scale.cpu(), torch.full((3,), 1e-5 / 127))
    # One big value sets amax; the small values are crafted so x*s lands on .5 ties.
    row = torch.tensor([127.0] + [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.0] * 9, device=device)
    w = torch.ones_like(row)
    x_q, _ = mmfree_ext.rms_norm_quant(row[None], w, 0.0)
    q_ref, _ = ref.rms_norm_quant(row[None].cpu(), w.cpu(), 0.0)
    assert_codes_close(x_q, q_ref)


# ---- rms_norm (+ residual) ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", K_GRID)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(device: str, k: int, dtype: torch.dtype, with_residual: bool) -> None:
    x = _randn((*_rows_for(k), k), dtype, device)
    res = _randn(x.shape, dtype, device, scale=2.0) if with_residual else None
    w = _weight(k, device)
    y, res_out = mmfree_ext.rms_norm(x, w, EPS, res)
    y_ref, res_ref = ref.rms_norm(x.cpu(), w.cpu(), EPS, None if res is None else res.cpu())
    assert y.dtype == dtype and res_out.dtype == dtype and y.shape == x.shape
    s64 = x.cpu().double() + (res.cpu().double() if res is not None else 0.0)
    assert_close_to_truth(y, y_ref, _norm64(s64, w.cpu(), EPS))
    if res is None:
        assert torch.equal(res_out, x) and res_out.data_ptr() != x.data_ptr()
    elif dtype == torch.float64:
        assert torch.equal(res_out.cpu(), s64)  # the fp64 path adds in fp64
    else:
        assert torch.equal(res_out.cpu(), res_ref)


# ---- rms_norm_swish_gate (+ quant) --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", K_GRID)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swish_gate_matches_reference(device: str, k: int, dtype: torch.dtype) -> None:
    g = _randn((*_rows_for(k), k), dtype, device)
    h = _randn(g.shape, dtype, device, scale=4.0)
    w = _weight(k, device)
    y = mmfree_ext.rms_norm_swish_gate(g, h, w, EPS)
    y_ref = ref.rms_norm_swish_gate(g.cpu(), h.cpu(), w.cpu(), EPS)
    assert y.dtype == dtype and y.shape == g.shape
    assert_close_to_truth(y, y_ref, _gate64(g.cpu(), h.cpu(), w.cpu(), EPS))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", K_GRID)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swish_gate_quant_matches_composite(device: str, k: int, dtype: torch.dtype) -> None:
    g = _randn((*_rows_for(k), k), dtype, device)
    h = _randn(g.shape, dtype, device, scale=4.0)
    w, nw = _weight(k, device), _weight(k, device)
    x_q, x_scale = mmfree_ext.rms_norm_swish_gate_quant(g, h, w, EPS, nw, 2e-6)
    q_ref, s_ref = ref.rms_norm_quant(ref.rms_norm_swish_gate(g.cpu(), h.cpu(), w.cpu(), EPS), nw.cpu(), 2e-6)
    assert x_q.shape == g.shape and x_scale.shape == g.shape[:-1]
    assert_codes_close(x_q, q_ref)
    torch.testing.assert_close(x_scale.cpu(), s_ref, rtol=4e-6, atol=0)
    # The fused op rounds the gate to g's dtype in registers: it equals our own unfused pair.
    q_pair, s_pair = mmfree_ext.rms_norm_quant(mmfree_ext.rms_norm_swish_gate(g, h, w, EPS), nw, 2e-6)
    if dtype != torch.float64:  # (fp64 swish_gate computes in fp64; the fused op in fp32)
        assert torch.equal(x_q, q_pair) and torch.equal(x_scale, s_pair)


# ---- empty inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_batch(device: str, lead: tuple[int, ...]) -> None:
    k = 33
    x = torch.randn((*lead, k), device=device)
    w = torch.ones(k, device=device, requires_grad=True)
    x_q, x_scale = mmfree_ext.rms_norm_quant(x, w, EPS)
    assert x_q.shape == x.shape and x_scale.shape == lead
    q_m, s_m = mmfree_ext.rms_norm_quant_multi(x, torch.ones(2, k, device=device), EPS)
    assert q_m.shape == (2, *x.shape) and s_m.shape == (2, *lead)
    y, r = mmfree_ext.rms_norm(x, w, EPS, x)
    assert y.shape == x.shape and r.shape == x.shape
    assert mmfree_ext.rms_norm_swish_gate(x, x, w, EPS).shape == x.shape
    assert mmfree_ext.rms_norm_swish_gate_quant(x, x, w, EPS, w, EPS)[0].shape == x.shape
    xr = x.clone().requires_grad_(True)
    mmfree_ext.rms_norm(xr, w, EPS)[0].sum().backward()
    assert torch.equal(w.grad.cpu(), torch.zeros(k))


# ---- CPU instruction-set paths ----------------------------------------------------------------------


@pytest.fixture
def restore_isa():
    yield
    mmfree_ext.set_cpu_isa("avx512")


def _isa_or_skip(isa: str) -> None:
    mmfree_ext.set_cpu_isa(isa)
    if mmfree_ext.cpu_isa() != isa:
        pytest.skip(f"{isa} path not compiled or not supported by this CPU")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [7, 100, 2560, 8193])
def test_cpu_isa_paths(restore_isa: None, isa: str, dtype: torch.dtype, k: int) -> None:
    x = _randn((3, k), dtype, "cpu", scale=2.0)
    res = _randn((3, k), dtype, "cpu")
    h = _randn((3, k), dtype, "cpu", scale=4.0)
    w, nw = _weight(k, "cpu"), _weight(k, "cpu", torch.bfloat16)
    _isa_or_skip(isa)
    q, s = mmfree_ext.rms_norm_quant_multi(x, torch.stack([w, nw.float()]), EPS)
    y, r = mmfree_ext.rms_norm(x, w, EPS, res)
    gy = mmfree_ext.rms_norm_swish_gate(x, h, w, EPS)
    gq, gs = mmfree_ext.rms_norm_swish_gate_quant(x, h, w, EPS, nw, EPS)
    for p, wp in enumerate([w, nw.float()]):
        q_ref, s_ref = ref.rms_norm_quant(x, wp, EPS)
        assert_codes_close(q[p], q_ref)
        torch.testing.assert_close(s[p], s_ref, rtol=2e-6, atol=0)
    y_ref, r_ref = ref.rms_norm(x, w, EPS, res)
    assert_close_to_truth(y, y_ref, _norm64(x.double() + res.double(), w, EPS))
    assert torch.equal(r, r_ref)
    assert_close_to_truth(gy, ref.rms_norm_swish_gate(x, h, w, EPS), _gate64(x, h, w, EPS))
    gq_ref, gs_ref = ref.rms_norm_quant(ref.rms_norm_swish_gate(x, h, w, EPS), nw, EPS)
    assert_codes_close(gq, gq_ref)
    torch.testing.assert_close(gs, gs_ref, rtol=4e-6, atol=0)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_vector_paths_agree_with_scalar(restore_isa: None, isa: str) -> None:
    x = _randn((16, 2560 + 5), torch.bfloat16, "cpu", scale=2.0)
    h = _randn(x.shape, torch.bfloat16, "cpu", scale=4.0)
    w = _weight(x.shape[-1], "cpu")
    mmfree_ext.set_cpu_isa("scalar")
    q0, s0 = mmfree_ext.rms_norm_quant(x, w, EPS)
    g0 = mmfree_ext.rms_norm_swish_gate(x, h, w, EPS)
    _isa_or_skip(isa)
    q1, s1 = mmfree_ext.rms_norm_quant(x, w, EPS)
    g1 = mmfree_ext.rms_norm_swish_gate(x, h, w, EPS)
    assert_codes_close(q1, q0)
    torch.testing.assert_close(s1, s0, rtol=2e-6, atol=0)
    # Same elementwise operation sequence: only the sum order of the statistics differs.
    torch.testing.assert_close(g1, g0, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=0)


def test_single_row_runs_inline_and_matches_batched() -> None:
    """M=1 (decode) takes the no-threading path; it must equal the same row in a batch."""
    x = _randn((64, 2560), torch.bfloat16, "cpu")
    w = _weight(2560, "cpu")
    q_all, s_all = mmfree_ext.rms_norm_quant(x, w, EPS)
    q_one, s_one = mmfree_ext.rms_norm_quant(x[5:6].contiguous(), w, EPS)
    assert torch.equal(q_one[0], q_all[5]) and torch.equal(s_one[0], s_all[5])


# ---- autograd -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("k", [1, 7, 20])
def test_rms_norm_gradcheck(device: str, with_residual: bool, k: int) -> None:
    opts = {"dtype": torch.float64, "device": device, "requires_grad": True}
    x = torch.randn(2, 2, k, **opts)
    w = (1.0 + 0.5 * torch.randn(k, dtype=torch.float64, device=device)).requires_grad_(True)
    res = torch.randn(2, 2, k, **opts) if with_residual else None

    def f(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return mmfree_ext.rms_norm(x, w, EPS, res)

    assert torch.autograd.gradcheck(f, (x, w, res), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 7, 20])
def test_swish_gate_gradcheck(device: str, k: int) -> None:
    opts = {"dtype": torch.float64, "device": device, "requires_grad": True}
    g = torch.randn(2, 2, k, **opts)
    h = (torch.randn(2, 2, k, dtype=torch.float64, device=device) * 3).requires_grad_(True)
    w = (1.0 + 0.5 * torch.randn(k, dtype=torch.float64, device=device)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda g, h, w: mmfree_ext.rms_norm_swish_gate(g, h, w, EPS), (g, h, w), eps=1e-6, atol=1e-6, rtol=1e-5
    )


def _grads(fn: Callable[..., Any], inputs: list[torch.Tensor], grads_out: list[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [go.to(o.dtype) for o, go in zip(outs, grads_out, strict=True)])
    return [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [7, 2560])
def test_rms_norm_backward_matches_reference(device: str, dtype: torch.dtype, k: int) -> None:
    x, res = _randn((3, 5, k), dtype, device), _randn((3, 5, k), dtype, device)
    w = _weight(k, device)
    gy, gr = torch.randn(3, 5, k, device=device), torch.randn(3, 5, k, device=device)
    ours = _grads(lambda x, w, r: mmfree_ext.rms_norm(x, w, EPS, r), [x, w, res], [gy, gr])
    base = _grads(lambda x, w, r: ref.rms_norm(x, w, EPS, r), [x.cpu(), w.cpu(), res.cpu()], [gy.cpu(), gr.cpu()])
    truth = _grads(
        lambda x, w, r: (_norm64(x + r, w, EPS), x + r),
        [x.cpu().double(), w.cpu().double(), res.cpu().double()],
        [gy.cpu().double(), gr.cpu().double()],
    )
    for o, b, t in zip(ours, base, truth, strict=True):
        assert o.dtype == b.dtype
        assert_close_to_truth(o, b, t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [7, 2560])
def test_swish_gate_backward_matches_reference(device: str, dtype: torch.dtype, k: int) -> None:
    g, h = _randn((3, 5, k), dtype, device), _randn((3, 5, k), dtype, device, scale=3.0)
    w = _weight(k, device)
    gy = torch.randn(3, 5, k, device=device)
    ours = _grads(lambda g, h, w: mmfree_ext.rms_norm_swish_gate(g, h, w, EPS), [g, h, w], [gy])
    base = _grads(lambda g, h, w: ref.rms_norm_swish_gate(g, h, w, EPS), [g.cpu(), h.cpu(), w.cpu()], [gy.cpu()])
    truth = _grads(
        lambda g, h, w: _gate64(g, h, w, EPS),
        [g.cpu().double(), h.cpu().double(), w.cpu().double()],
        [gy.cpu().double()],
    )
    for o, b, t in zip(ours, base, truth, strict=True):
        assert_close_to_truth(o, b, t)


def test_dweight_is_deterministic_across_thread_counts() -> None:
    x = torch.randn(300, 257)
    gy = torch.randn(300, 257)
    w = _weight(257, "cpu")
    n = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(torch.ops.mmfree.rms_norm_backward(gy, x, w, EPS, None, None)[1])
            results.append(torch.ops.mmfree.rms_norm_swish_gate_backward(gy, x, gy, w, EPS)[2])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])


@pytest.mark.cuda
def test_dweight_is_deterministic_on_cuda() -> None:
    x, gy = torch.randn(4096, 2560, device="cuda"), torch.randn(4096, 2560, device="cuda")
    w = _weight(2560, "cuda")
    a = torch.ops.mmfree.rms_norm_backward(gy, x, w, EPS, None, None)[1]
    b = torch.ops.mmfree.rms_norm_backward(gy, x, w, EPS, None, None)[1]
    assert torch.equal(a, b)


# ---- CUDA specifics ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_and_cuda_agree(dtype: torch.dtype) -> None:
    x = _randn((64, 2560), dtype, "cpu", scale=2.0)
    h = _randn((64, 2560), dtype, "cpu", scale=4.0)
    w = _weight(2560, "cpu")
    q_c, s_c = mmfree_ext.rms_norm_quant(x, w, EPS)
    q_g, s_g = mmfree_ext.rms_norm_quant(x.cuda(), w.cuda(), EPS)
    assert_codes_close(q_g, q_c)
    torch.testing.assert_close(s_g.cpu(), s_c, rtol=2e-6, atol=0)
    gq_c, _ = mmfree_ext.rms_norm_swish_gate_quant(x, h, w, EPS, w, EPS)
    gq_g, _ = mmfree_ext.rms_norm_swish_gate_quant(x.cuda(), h.cuda(), w.cuda(), EPS, w.cuda(), EPS)
    assert_codes_close(gq_g, gq_c)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_generic_path_agrees_with_vector_path(dtype: torch.dtype) -> None:
    """Unaligned buffers and very wide rows take the generic kernels; same results."""
    for k in (2560, 20000):
        x = _randn((5, k), dtype, "cuda", scale=2.0)
        h = _randn((5, k), dtype, "cuda", scale=4.0)
        w = _weight(k, "cuda")
        q_v, s_v = mmfree_ext.rms_norm_quant(x, w, EPS)
        q_m, s_m = mmfree_ext.rms_norm_quant(_misaligned(x), w, EPS)
        assert_codes_close(q_m, q_v)
        torch.testing.assert_close(s_m, s_v, rtol=2e-6, atol=0)
        q_ref, _ = ref.rms_norm_quant(x.cpu(), w.cpu(), EPS)
        assert_codes_close(q_v, q_ref)
        y_v, _ = mmfree_ext.rms_norm(x, w, EPS, h)
        y_m, _ = mmfree_ext.rms_norm(_misaligned(x), w, EPS, _misaligned(h))
        y_ref, _ = ref.rms_norm(x.cpu(), w.cpu(), EPS, h.cpu())
        assert_close_to_truth(y_m, y_ref, _norm64(x.cpu().double() + h.cpu().double(), w.cpu(), EPS))
        assert_close_to_truth(y_v, y_ref, _norm64(x.cpu().double() + h.cpu().double(), w.cpu(), EPS))
        gq_v, _ = mmfree_ext.rms_norm_swish_gate_quant(x, h, w, EPS, w, EPS)
        gq_m, _ = mmfree_ext.rms_norm_swish_gate_quant(_misaligned(x), _misaligned(h), w, EPS, w, EPS)
        assert_codes_close(gq_m, gq_v)


@pytest.mark.cuda
def test_cuda_uses_current_stream() -> None:
    x = torch.randn(256, 2560, device="cuda", dtype=torch.bfloat16)
    w = _weight(2560, "cuda")
    expected, _ = mmfree_ext.rms_norm_quant(x, w, EPS)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got, _ = mmfree_ext.rms_norm_quant(x, w, EPS)
    stream.synchronize()
    assert torch.equal(got, expected)


# ---- opcheck --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    k = 40
    x = torch.randn(3, 4, k, device=device)
    h = torch.randn(3, 4, k, device=device)
    w = _weight(k, device)
    ops = torch.ops.mmfree
    torch.library.opcheck(ops.rms_norm_quant, (x, w, EPS))
    torch.library.opcheck(ops.rms_norm_quant, (x.clone().requires_grad_(True), w, EPS))
    torch.library.opcheck(ops.rms_norm_quant_multi, (x, torch.stack([w, w * 2]), EPS))
    torch.library.opcheck(ops.rms_norm_swish_gate_quant, (x, h, w, EPS, w, EPS))
    xg, hg, wg = (t.clone().requires_grad_(True) for t in (x, h, w))
    torch.library.opcheck(ops.rms_norm, (xg, wg, EPS, hg))
    torch.library.opcheck(ops.rms_norm, (xg, wg, EPS, None))
    torch.library.opcheck(ops.rms_norm_swish_gate, (xg, hg, wg, EPS))
    # The backward ops run inside autograd only: schema and fake checks suffice.
    bwd_utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.rms_norm_backward, (h, x, w, EPS, h, x), test_utils=bwd_utils)
    torch.library.opcheck(ops.rms_norm_backward, (h, x, w, EPS, None, None), test_utils=bwd_utils)
    torch.library.opcheck(ops.rms_norm_swish_gate_backward, (h, x, h, w, EPS), test_utils=bwd_utils)


# ---- bad input ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    x = torch.randn(4, 8)
    w = torch.ones(8)
    ops = torch.ops.mmfree
    with pytest.raises(RuntimeError, match="'x' must be a floating tensor"):
        ops.rms_norm_quant(x.to(torch.int32), w, EPS)
    with pytest.raises(RuntimeError, match="'weight' must be 1-D of size K=8"):
        ops.rms_norm_quant(x, torch.ones(7), EPS)
    with pytest.raises(RuntimeError, match="'weight' must be 1-D of size K=8"):
        ops.rms_norm(x, torch.ones(1, 8), EPS)
    with pytest.raises(RuntimeError, match="'x' must be contiguous"):
        ops.rms_norm_quant(torch.randn(8, 4).t(), w[:4].contiguous(), EPS)
    with pytest.raises(RuntimeError, match="'weight' must be contiguous"):
        ops.rms_norm_quant(x, torch.ones(16)[::2], EPS)
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        ops.rms_norm_quant(torch.tensor(1.0), torch.ones(1), EPS)
    with pytest.raises(RuntimeError, match="non-empty last dimension"):
        ops.rms_norm(torch.randn(4, 0), torch.ones(0), EPS)
    with pytest.raises(RuntimeError, match="'weights' must be 2-D \\[P, K\\]"):
        ops.rms_norm_quant_multi(x, w, EPS)
    with pytest.raises(RuntimeError, match="'residual' must have the shape of 'x'"):
        ops.rms_norm(x, w, EPS, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="'residual' must have the dtype of 'x'"):
        ops.rms_norm(x, w, EPS, x.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="'h' must have the shape of 'g'"):
        ops.rms_norm_swish_gate(x, torch.randn(3, 8), w, EPS)
    with pytest.raises(RuntimeError, match="'norm_weight' must be 1-D of size K=8"):
        ops.rms_norm_swish_gate_quant(x, x, w, EPS, torch.ones(9), EPS)
    with pytest.raises(RuntimeError, match="'grad_y' must have the shape of 'x'"):
        ops.rms_norm_backward(torch.randn(4, 9), x, w, EPS, None, None)


@pytest.mark.cuda
def test_bad_device_raises() -> None:
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="'weight' is on cpu but 'x' is on cuda"):
        torch.ops.mmfree.rms_norm_quant(x, torch.ones(8), EPS)
    with pytest.raises(RuntimeError, match="'h' is on cpu but 'g' is on cuda"):
        torch.ops.mmfree.rms_norm_swish_gate(x, torch.randn(4, 8), torch.ones(8, device="cuda"), EPS)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_fast_path_matches_autograd_path(device: str) -> None:
    """Wrappers skip the autograd layer when nothing needs grad; same values either way."""
    x, r, h = (torch.randn(3, 96, device=device) for _ in range(3))
    w = _weight(96, device)
    with torch.no_grad():
        y0, r0 = mmfree_ext.rms_norm(x, w, EPS, r)
        g0 = mmfree_ext.rms_norm_swish_gate(x, h, w, EPS)
    assert y0.grad_fn is None and g0.grad_fn is None
    wg = w.clone().requires_grad_(True)
    y1, r1 = mmfree_ext.rms_norm(x, wg, EPS, r)
    g1 = mmfree_ext.rms_norm_swish_gate(x, h, wg, EPS)
    assert y1.grad_fn is not None and g1.grad_fn is not None
    assert torch.equal(y0, y1) and torch.equal(r0, r1) and torch.equal(g0, g1)


def test_torch_compile_traces_the_ops() -> None:
    """Dynamo traces the wrappers without graph breaks; fake kernels and autograd hold."""

    def block(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m, x_new = mmfree_ext.rms_norm(x, w, EPS, r)
        q, s = mmfree_ext.rms_norm_quant(x_new, w, EPS)
        g = mmfree_ext.rms_norm_swish_gate(m, x_new, w, EPS)
        return g.sum() + (q.float() * s.unsqueeze(-1)).sum()

    x, r = torch.randn(4, 64), torch.randn(4, 64)
    w = _weight(64, "cpu").requires_grad_(True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x, r, w)
    out.backward()
    grad_compiled = w.grad.clone()
    w.grad = None
    expected = block(x, r, w)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_compiled, w.grad)


def test_quant_ops_are_constants_to_autograd() -> None:
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    for q, s in (
        mmfree_ext.rms_norm_quant(x, w, EPS),
        mmfree_ext.rms_norm_quant_multi(x, torch.stack([w, w]), EPS),
        mmfree_ext.rms_norm_swish_gate_quant(x, x, w, EPS, w, EPS),
    ):
        assert not q.requires_grad and not s.requires_grad


def test_fp64_inputs_compute_in_fp64() -> None:
    """rms_norm on float64 is exact to fp64 rounding (the gradcheck path), not to fp32."""
    x = torch.randn(4, 300, dtype=torch.float64)
    w = torch.rand(300, dtype=torch.float64) + 0.5
    y, _ = mmfree_ext.rms_norm(x, w, EPS)
    truth = _norm64(x, w, EPS)
    assert (y - truth).abs().max().item() <= 64 * math.ulp(1.0) * truth.abs().max().item()
