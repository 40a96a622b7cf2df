"""mlgru_scan: fused gated scan (forward, backward, varlen, paths) against mmfree_ext.reference."""

from __future__ import annotations

import pytest
import torch

import mmfree_ext
from conftest import DEVICES
from mmfree_ext import reference as ref

F32_EPS = torch.finfo(torch.float32).eps
SEQUENTIAL, CHUNKED, LANES = 1, 2, 3


# ---- float64 ground truth (differentiable) -------------------------------------------------


def scan64(i, f, lb=None, h0=None, mask=None, cu_seqlens=None):
    """The SPEC recurrence in float64, differentiable; same conventions as reference.mlgru_scan."""
    i, f = i.double(), f.double()
    sg = torch.sigmoid(f)
    ft = sg if lb is None else lb.double() + (1 - lb.double()) * sg
    c = i * torch.sigmoid(i) * (1 - ft)
    if mask is not None:
        c = torch.where(mask.bool().unsqueeze(-1), c, torch.zeros_like(c))
    b, t_len, d = i.shape
    bounds = (
        [(0, t_len)] * b
        if cu_seqlens is None
        else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True))
    )
    outs, lasts = [], []
    for s, (lo, hi) in enumerate(bounds):
        row = 0 if cu_seqlens is not None else s
        h = h0[s].double() if h0 is not None else i.new_zeros(d)
        for t in range(lo, hi):
            h = ft[row, t] * h + c[row, t]
            outs.append((row, t, h))
        lasts.append(h)
    h_all = torch.zeros_like(i)
    if outs:
        idx_b = torch.tensor([o[0] for o in outs])
        idx_t = torch.tensor([o[1] for o in outs])
        h_all = h_all.index_put((idx_b.to(i.device), idx_t.to(i.device)), torch.stack([o[2] for o in outs]))
    h_last = torch.stack(lasts) if lasts else i.new_zeros((0, d))
    return h_all, h_last


def assert_close_to_truth(ours: torch.Tensor, torch_ref: torch.Tensor, truth: torch.Tensor, mult: float = 4.0) -> None:
    """Flash-attention rule: our error vs fp64 <= mult * torch's own max error, plus one
    rounding of each element to our output dtype (torch's max error is taken over few large
    elements and may be small by luck) and a few fp32 ulps of the scale."""
    dtype_eps = torch.finfo(ours.dtype).eps
    ours, torch_ref, truth = ours.double().cpu(), torch_ref.double().cpu(), truth.double().cpu()
    assert not ours.isnan().any(), "NaN in output (unwritten element?)"
    if truth.numel() == 0:
        return
    scale = max(1.0, truth.abs().max().item())
    err = (ours - truth).abs()
    ref_err = (torch_ref - truth).abs().max().item()
    bound = mult * ref_err + dtype_eps * truth.abs() + 8 * F32_EPS * scale
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"error {err.flatten()[worst]:.3e} at |truth| {truth.abs().flatten()[worst]:.3e}; torch's max {ref_err:.3e}"
    )


def make_inputs(b, t, d, dtype, device, lb=False, h0=False, mask=False, f_scale=2.0):
    state = torch.float64 if dtype == torch.float64 else torch.float32
    i = torch.randn(b, t, d, device=device).to(dtype)
    f = (torch.randn(b, t, d, device=device) * f_scale + 1.0).to(dtype)
    lbt = torch.rand(d, device=device, dtype=state) * 0.9 if lb else None
    h0t = torch.randn(b, d, device=device, dtype=state) if h0 else None
    mk = (torch.rand(b, t, device=device) > 0.25) if mask else None
    return i, f, lbt, h0t, mk


# (B, T, D, dtype, lb, h0, mask): a covering list, not the cartesian product.
FWD_CASES = [
    (1, 1, 1, torch.float32, False, False, False),
    (2, 1, 2560, torch.bfloat16, True, True, False),
    (3, 2, 7, torch.float32, True, True, True),
    (2, 63, 64, torch.bfloat16, True, False, True),
    (1, 64, 7, torch.float16, False, True, False),
    (2, 65, 64, torch.float32, False, False, False),
    (1, 1000, 64, torch.bfloat16, True, True, True),
    (2, 1000, 7, torch.float32, True, True, False),
    (1, 65, 2560, torch.float16, True, True, True),
    (2, 64, 64, torch.float64, True, True, True),
]


def _case_id(c: tuple) -> str:
    b, t, d, dt, lb, h0, m = c
    return f"B{b}T{t}D{d}-{str(dt)[6:]}" + "-lb" * lb + "-h0" * h0 + "-mask" * m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_forward_matches_reference(device: str, case: tuple) -> None:
    b, t, d, dtype, lb, h0, mask = case
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    i, f, lbt, h0t, mk = make_inputs(b, t, d, dtype, device, lb, h0, mask)
    h, h_last = mmfree_ext.mlgru_scan(i, f, lbt, h0t, mk)
    assert h.dtype == dtype and h.shape == i.shape and h.device.type == device
    state = torch.float64 if dtype == torch.float64 else torch.float32
    assert h_last.dtype == state and h_last.shape == (b, d)
    args = [x.cpu() if x is not None else None for x in (i, f, lbt, h0t, mk)]
    rh, rhl = ref.mlgru_scan(*args)
    th, thl = scan64(*args)
    if dtype == torch.float64:  # computed in float64: compare with the truth directly
        torch.testing.assert_close(h.cpu(), th, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_last.cpu(), thl, rtol=1e-12, atol=1e-12)
        return
    assert_close_to_truth(h, rh, th)
    assert_close_to_truth(h_last, rhl, thl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_varlen_matches_reference(device: str, index_dtype: torch.dtype) -> None:
    lens = [5, 0, 64, 1, 130, 37]
    offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=index_dtype)
    total, d = sum(lens), 96
    i, f, lb, _, _ = make_inputs(1, total, d, torch.bfloat16, device, lb=True)
    h0 = torch.randn(len(lens), d, device=device)
    mask = torch.rand(1, total, device=device) > 0.2
    h, h_last = mmfree_ext.mlgru_scan(i, f, lb, h0, mask, offsets.to(device))
    assert h_last.shape == (len(lens), d)
    args = (i.cpu(), f.cpu(), lb.cpu(), h0.cpu(), mask.cpu(), offsets)
    rh, rhl = ref.mlgru_scan(*args)
    th, thl = scan64(*args)
    assert_close_to_truth(h, rh, th)
    assert_close_to_truth(h_last, rhl, thl)
    torch.testing.assert_close(h_last[1].cpu(), h0[1].cpu(), rtol=0, atol=0)  # empty sequence


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_equals_batched(device: str) -> None:
    i, f, lb, h0, mask = make_inputs(3, 50, 40, torch.float32, device, lb=True, h0=True, mask=True)
    h, h_last = mmfree_ext.mlgru_scan(i, f, lb, h0, mask)
    cu = torch.tensor([0, 50, 100, 150], device=device)
    hv, hlv = mmfree_ext.mlgru_scan(i.reshape(1, 150, 40), f.reshape(1, 150, 40), lb, h0, mask.reshape(1, 150), cu)
    torch.testing.assert_close(hv.reshape(3, 50, 40), h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hlv, h_last, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_dtypes_agree(device: str) -> None:
    i, f, lb, h0, mask = make_inputs(2, 30, 16, torch.float32, device, lb=True, h0=True, mask=True)
    base = mmfree_ext.mlgru_scan(i, f, lb, h0, mask)
    for m in (mask.int(), mask.float() * 3.0, mask.to(torch.int64)):
        out = mmfree_ext.mlgru_scan(i, f, lb, h0, m)
        assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])
    # Padding inputs never leak, even when they are inf/NaN: c_t = 0 there (the state decays).
    i2 = i.clone()
    i2[~mask] = float("inf")
    out = mmfree_ext.mlgru_scan(i2, f, lb, h0, mask)
    assert torch.equal(out[0], base[0])


@pytest.mark.parametrize("device", DEVICES)
def test_decode_steps_equal_prefill(device: str) -> None:
    i, f, lb, h0, _ = make_inputs(2, 12, 2560, torch.bfloat16, device, lb=True, h0=True)
    h_all, h_last = mmfree_ext.mlgru_scan(i, f, lb, h0)
    state = h0
    for t in range(12):
        h_t, state = mmfree_ext.mlgru_scan(i[:, t : t + 1].contiguous(), f[:, t : t + 1].contiguous(), lb, state)
        torch.testing.assert_close(h_t[:, 0].float(), h_all[:, t].float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(state, h_last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device: str) -> None:
    h0 = torch.randn(2, 8, device=device)
    i = torch.empty(2, 0, 8, device=device)
    h, h_last = mmfree_ext.mlgru_scan(i, i, None, h0)
    assert h.shape == (2, 0, 8) and torch.equal(h_last, h0)
    h, h_last = mmfree_ext.mlgru_scan(torch.empty(0, 5, 8, device=device), torch.empty(0, 5, 8, device=device))
    assert h.shape == (0, 5, 8) and h_last.shape == (0, 8)
    _, _, glb, gh0 = torch.ops.mmfree.mlgru_scan_backward(
        torch.empty_like(i), torch.ones(2, 8, device=device), i, i, None, h0, None, None
    )
    assert torch.equal(gh0, torch.ones(2, 8, device=device)) and torch.equal(glb, torch.zeros(8, device=device))


# ---- backward -----------------------------------------------------------------------------

BWD_CASES = [
    (1, 1, 7, torch.float32, True, True, False),
    (2, 63, 64, torch.float32, True, True, True),
    (2, 65, 7, torch.bfloat16, True, True, True),
    (1, 40, 2560, torch.bfloat16, True, True, False),
    (3, 64, 16, torch.float16, False, False, True),
]


def _grads(fn, inputs, grad_h, grad_hl):
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) if x is not None else None for x in inputs]
    h, hl = fn(*leaves)
    torch.autograd.backward([h, hl], [grad_h.to(h.dtype), grad_hl.to(hl.dtype)])
    return [x.grad if x is not None and x.is_floating_point() else None for x in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BWD_CASES, ids=_case_id)
def test_backward_matches_reference(device: str, case: tuple) -> None:
    b, t, d, dtype, lb, h0, mask = case
    i, f, lbt, h0t, mk = make_inputs(b, t, d, dtype, device, lb, h0, mask)
    gh = torch.randn(b, t, d, device=device)
    ghl = torch.randn(b, d, device=device)
    ours = _grads(mmfree_ext.mlgru_scan, (i, f, lbt, h0t, mk), gh.to(dtype), ghl)
    cpu_in = [x.cpu() if x is not None else None for x in (i, f, lbt, h0t, mk)]
    theirs = _grads(ref.mlgru_scan, cpu_in, gh.cpu().to(dtype), ghl.cpu())
    truth = _grads(scan64, cpu_in, gh.cpu().to(dtype).double(), ghl.cpu().double())
    for name, o, r, tr in zip(("i", "f", "lower_bound", "h0"), ours, theirs, truth, strict=False):
        if tr is None:
            assert o is None, name
            continue
        assert o.dtype == r.dtype, name
        assert_close_to_truth(o, r, tr)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_varlen(device: str) -> None:
    lens = [3, 0, 70, 1, 20]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    total, d = sum(lens), 24
    i, f, lb, _, _ = make_inputs(1, total, d, torch.float32, device, lb=True)
    h0 = torch.randn(len(lens), d, device=device)
    mask = torch.rand(1, total, device=device) > 0.2
    gh, ghl = torch.randn(1, total, d, device=device), torch.randn(len(lens), d, device=device)
    ours = _grads(lambda *a: mmfree_ext.mlgru_scan(*a, cu.to(device)), (i, f, lb, h0, mask), gh, ghl)
    cpu_in = [x.cpu() for x in (i, f, lb, h0, mask)]
    theirs = _grads(lambda *a: ref.mlgru_scan(*a, cu), cpu_in, gh.cpu(), ghl.cpu())
    truth = _grads(lambda *a: scan64(*a, cu), cpu_in, gh.cpu().double(), ghl.cpu().double())
    for o, r, tr in zip(ours[:4], theirs[:4], truth[:4], strict=True):
        assert_close_to_truth(o, r, tr)


def test_gradcheck_float64() -> None:
    i, f, lb, h0, mask = make_inputs(2, 9, 5, torch.float64, "cpu", lb=True, h0=True, mask=True)
    lb = lb.requires_grad_()
    h0 = h0.requires_grad_()
    fn = lambda a, b_, c, d: mmfree_ext.mlgru_scan(a, b_, c, d, mask)
    assert torch.autograd.gradcheck(fn, (i.requires_grad_(), f.requires_grad_(), lb, h0))
    cu = torch.tensor([0, 4, 4, 18])
    iv, fv = torch.randn(1, 18, 3, dtype=torch.float64), torch.randn(1, 18, 3, dtype=torch.float64)
    h0v = torch.randn(3, 3, dtype=torch.float64)
    fnv = lambda a, b_, d: mmfree_ext.mlgru_scan(a, b_, None, d, None, cu)
    assert torch.autograd.gradcheck(fnv, (iv.requires_grad_(), fv.requires_grad_(), h0v.requires_grad_()))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    i, f, lb, h0, mask = make_inputs(2, 70, 16, torch.float32, device, lb=True, h0=True, mask=True)
    torch.library.opcheck(torch.ops.mmfree.mlgru_scan, (i, f, lb, h0, mask, None))
    torch.library.opcheck(torch.ops.mmfree.mlgru_scan, (i.requires_grad_(), f, None, None, None, None))
    torch.library.opcheck(torch.ops.mmfree.mlgru_scan_impl, (i.detach(), f, lb, h0, mask, None, SEQUENTIAL))
    cu = torch.tensor([0, 30, 140], device=device, dtype=torch.int32)
    iv, fv = i.detach().reshape(1, 140, 16), f.reshape(1, 140, 16)
    torch.library.opcheck(torch.ops.mmfree.mlgru_scan, (iv, fv, lb, h0, None, cu))
    gh, ghl = torch.randn_like(i), torch.randn(2, 16, device=device)
    torch.library.opcheck(torch.ops.mmfree.mlgru_scan_backward, (gh, ghl, i.detach(), f, lb, h0, mask, None, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device: str) -> None:
    i, f, lb, h0, mask = make_inputs(2, 33, 24, torch.float32, device, lb=True, h0=True, mask=True)

    def layer(i, f, lb, h0, mask):
        h, h_last = mmfree_ext.mlgru_scan(i * 1.5, f, lb, h0, mask)
        return torch.nn.functional.silu(h).sum() + h_last.sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (i, f)]
    out = compiled(*leaves, lb, h0, mask)
    out.backward()
    leaves2 = [x.clone().requires_grad_() for x in (i, f)]
    expect = layer(*leaves2, lb, h0, mask)
    expect.backward()
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(leaves[0].grad, leaves2[0].grad)


# ---- stability and paths --------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("f_value", [30.0, 12.0, -30.0, -100.0, 100.0])
def test_long_sequence_saturated_gates(device: str, f_value: float) -> None:
    """T = 65536 with forget gates at or near 0 and 1: finite, and h_last matches the closed form."""
    t, d = 65536, 8
    i_row = torch.linspace(-4, 4, d, device=device)
    i = i_row.expand(1, t, d).contiguous()
    f = torch.full((1, t, d), f_value, device=device)
    lb = torch.linspace(0, 0.5, d, device=device)
    h0 = torch.full((1, d), 3.0, device=device)
    h, h_last = mmfree_ext.mlgru_scan(i, f, lb, h0)
    assert torch.isfinite(h).all() and torch.isfinite(h_last).all()
    # Closed form with constant gates: h_T = a^T h0 + c (1 - a^T) / (1 - a). The state is
    # fp32, so the decay a is the fp32 value of the gate (near 1 it carries ~1% relative error
    # in 1 - a, as in the reference); c uses the kernel's exact (1 - lb)(1 - sigmoid(f)).
    sg = torch.sigmoid(torch.tensor(f_value, dtype=torch.float64))
    lb64 = lb.double().cpu()
    a = (lb64 + (1 - lb64) * sg).float().double()
    c = i_row.double().cpu() * torch.sigmoid(i_row.double().cpu()) * (1 - lb64) * (1 - sg)
    a_t = a**t
    expect = torch.where(a < 1, a_t * 3.0 + c * (1 - a_t) / (1 - a).clamp_min(1e-300), 3.0 + c * t)
    # Rounding of h per step (half an fp32 ulp) accumulates over min(T, 1 / (1 - a)) steps
    # (systematically when c_t is a few ulps of h): that is the fp32-state bound.
    steps = torch.where(a < 1, 1.0 / (1 - a).clamp_min(1e-300), torch.full_like(a, float(t))).clamp_max(t)
    bound = F32_EPS * expect.abs().clamp_min(1.0) * steps + 1e-6
    err = (h_last[0].double().cpu() - expect).abs()
    assert (err <= bound).all(), f"errors {err.tolist()} above the fp32 bound {bound.tolist()}"


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_cpu_isa_paths_agree(isa: str) -> None:
    order = ["scalar", "avx2", "avx512"]
    if order.index(isa) > order.index(mmfree_ext.cpu_features()["best_isa"]):
        pytest.skip(f"{isa} not available here")
    i, f, lb, h0, mask = make_inputs(2, 70, 100, torch.float16, "cpu", lb=True, h0=True, mask=True)
    before = mmfree_ext.cpu_isa()
    mmfree_ext.set_cpu_isa(isa)
    try:
        assert mmfree_ext.cpu_isa() == isa
        out = mmfree_ext.mlgru_scan(i, f, lb, h0, mask)
        gh, ghl = torch.randn_like(i), torch.randn(2, 100)
        grads = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None)
    finally:
        mmfree_ext.set_cpu_isa(before)
    rh, rhl = ref.mlgru_scan(i, f, lb, h0, mask)
    th, thl = scan64(i, f, lb, h0, mask)
    assert_close_to_truth(out[0], rh, th)
    assert_close_to_truth(out[1], rhl, thl)
    base = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None)
    for g, gb in zip(grads, base, strict=True):
        torch.testing.assert_close(g.float(), gb.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1000, 2560), (4, 65, 7), (2, 2048, 64), (1, 4099, 24)])
def test_cuda_paths_agree(dtype: torch.dtype, shape: tuple) -> None:
    b, t, d = shape
    i, f, lb, h0, mask = make_inputs(b, t, d, dtype, "cuda", lb=True, h0=True, mask=True)
    outs = [torch.ops.mmfree.mlgru_scan_impl(i, f, lb, h0, mask, None, p) for p in (SEQUENTIAL, CHUNKED, LANES)]
    args = [x.cpu() for x in (i, f, lb, h0, mask)]
    rh, rhl = ref.mlgru_scan(*args)
    for h, h_last in outs:
        torch.testing.assert_close(h.float().cpu(), rh.float(), **_tol(dtype))
        torch.testing.assert_close(h_last.cpu(), rhl, rtol=1e-4, atol=1e-4)
    for other in outs[1:]:
        torch.testing.assert_close(outs[0][1], other[1], rtol=1e-5, atol=1e-5)
    gh, ghl = torch.randn_like(i), torch.randn(b, d, device="cuda")
    g_cpu = torch.ops.mmfree.mlgru_scan_backward(gh.cpu(), ghl.cpu(), *args, None)
    for path in (SEQUENTIAL, CHUNKED, LANES):
        ours = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None, path)
        for a, g in zip(ours, g_cpu, strict=True):
            assert not a.isnan().any(), path
            scale = max(1.0, g.abs().max().item())
            torch.testing.assert_close(
                a.float().cpu(), g.float(), rtol=_tol(dtype)["rtol"], atol=_tol(dtype)["atol"] * scale
            )


def _tol(dtype: torch.dtype) -> dict:
    # One rounding of the output in the input dtype (both sides round fp32 values that differ
    # by fp32 noise, so a value may land one ulp apart).
    return {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}.get(
        dtype, dict(rtol=2e-3, atol=2e-3)
    )


# The auto forward on fixed-length batches of several tiles (256 tokens per tile): a partial
# last tile, channel vectors past D in the last channel block, several sequences; against the
# reference and the forced chunked path.
MULTI_TILE_FWD_SHAPES = [(1, 1000, 2560), (3, 777, 24), (2, 4099, 64), (5, 513, 136)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", MULTI_TILE_FWD_SHAPES, ids=lambda s: "B{}T{}D{}".format(*s))
def test_cuda_multi_tile_forward_matches_reference(dtype: torch.dtype, shape: tuple) -> None:
    b, t, d = shape
    for lb_on in (True, False):
        i, f, lb, h0, mask = make_inputs(b, t, d, dtype, "cuda", lb=lb_on, h0=lb_on, mask=lb_on)
        h, h_last = mmfree_ext.mlgru_scan(i, f, lb, h0, mask)
        args = [x.cpu() if x is not None else None for x in (i, f, lb, h0, mask)]
        rh, rhl = ref.mlgru_scan(*args)
        torch.testing.assert_close(h.float().cpu(), rh.float(), **_tol(dtype))
        torch.testing.assert_close(h_last.cpu(), rhl, rtol=1e-4, atol=1e-4)
        for path in (CHUNKED, LANES):
            h2, h_last2 = torch.ops.mmfree.mlgru_scan_impl(i, f, lb, h0, mask, None, path)
            torch.testing.assert_close(h2.float().cpu(), rh.float(), **_tol(dtype))
            torch.testing.assert_close(h.float(), h2.float(), **_tol(dtype))
            torch.testing.assert_close(h_last, h_last2, rtol=1e-5, atol=1e-5)
        again, _ = mmfree_ext.mlgru_scan(i, f, lb, h0, mask)
        assert torch.equal(h, again)


def _assert_grads_close(ours: tuple, base: tuple, dtype: torch.dtype) -> None:
    """Gradients of the CUDA backward against the CPU kernels' (fp32 state both)."""
    for name, o, g in zip(("i", "f", "lower_bound", "h0"), ours, base, strict=True):
        assert o.dtype == g.dtype, name
        assert not o.isnan().any(), name
        scale = max(1.0, g.abs().max().item())
        tol = _tol(dtype)
        torch.testing.assert_close(o.float().cpu(), g.float(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)


# The forced chunked backward (lanes of one sequence across a CTA; auto picks it for long
# sequences): T = 1, tails (31, 33, 97), an exact multiple (64), D odd (scalar channels) and
# even.
CHUNKED_BWD_SHAPES = [(3, 1, 7), (2, 31, 2), (2, 33, 33), (1, 97, 64), (5, 64, 130), (2, 300, 2560)]


@pytest.mark.cuda
@pytest.mark.parametrize("path", [CHUNKED, LANES], ids=["chunked", "lanes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CHUNKED_BWD_SHAPES, ids=lambda s: "B{}T{}D{}".format(*s))
def test_cuda_chunked_backward_matches_cpu(dtype: torch.dtype, shape: tuple, path: int) -> None:
    b, t, d = shape
    i, f, lb, h0, mask = make_inputs(b, t, d, dtype, "cuda", lb=True, h0=True, mask=True)
    gh, ghl = torch.randn_like(i), torch.randn(b, d, device="cuda")
    ours = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None, path)
    args = [x.cpu() for x in (i, f, lb, h0, mask)]
    base = torch.ops.mmfree.mlgru_scan_backward(gh.cpu(), ghl.cpu(), *args, None)
    _assert_grads_close(ours, base, dtype)
    # Without lower bound, h0 and mask (layer 0): the null-pointer paths.
    ours = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, None, None, None, None, path)
    base = torch.ops.mmfree.mlgru_scan_backward(gh.cpu(), ghl.cpu(), args[0], args[1], None, None, None, None)
    _assert_grads_close(ours, base, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("path", [CHUNKED, LANES], ids=["chunked", "lanes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_chunked_backward_varlen(dtype: torch.dtype, path: int) -> None:
    # Empty sequences, one token, chunk tails and multiples, sequences not starting on a chunk.
    lens = [0, 1, 31, 32, 33, 0, 100, 64, 5]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    total, d = sum(lens), 66
    i, f, lb, _, _ = make_inputs(1, total, d, dtype, "cuda", lb=True)
    h0 = torch.randn(len(lens), d, device="cuda")
    mask = torch.rand(1, total, device="cuda") > 0.2
    gh, ghl = torch.randn_like(i), torch.randn(len(lens), d, device="cuda")
    for index_dtype in (torch.int32, torch.int64):
        cu_dev = cu.to("cuda", index_dtype)
        ours = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, cu_dev, path)
        args = [x.cpu() for x in (i, f, lb, h0, mask)]
        base = torch.ops.mmfree.mlgru_scan_backward(gh.cpu(), ghl.cpu(), *args, cu)
        _assert_grads_close(ours, base, dtype)
        # An empty sequence's dL/dh0 is its dL/dh_last.
        assert torch.equal(ours[3][0], ghl[0]) and torch.equal(ours[3][5], ghl[5])
        h, h_last = torch.ops.mmfree.mlgru_scan_impl(i, f, lb, h0, mask, cu_dev, path)
        rh, rhl = ref.mlgru_scan(*args, cu)
        torch.testing.assert_close(h.float().cpu(), rh.float(), **_tol(dtype))
        torch.testing.assert_close(h_last.cpu(), rhl, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_chunked_backward_deterministic_and_matches_auto() -> None:
    # The forced chunked backward twice (bitwise equal) and against the auto path's.
    i, f, lb, h0, mask = make_inputs(4, 300, 260, torch.bfloat16, "cuda", lb=True, h0=True, mask=True)
    gh, ghl = torch.randn_like(i), torch.randn(4, 260, device="cuda")
    first = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None, CHUNKED)
    again = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None, CHUNKED)
    for a, b_ in zip(first, again, strict=True):
        assert torch.equal(a, b_)  # dL/dlb reduced in a fixed order, no atomics
    # The auto path (its own launch configuration for this shape): the same sums.
    v2 = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None)
    _assert_grads_close(first, tuple(x.cpu() for x in v2), torch.bfloat16)


@pytest.mark.cuda
def test_cuda_lanes_deterministic_and_auto_takes_them_at_training_shapes() -> None:
    # B=4, T=512, D=2560 (a training batch): the auto backward runs the lanes kernels, so it is
    # bitwise the forced path; the lanes backward twice is bitwise equal (fixed-order dL/dlb).
    # The auto forward is v2's chunked kernel (the lanes forward runs only when forced).
    i, f, lb, h0, mask = make_inputs(4, 512, 2560, torch.bfloat16, "cuda", lb=True, h0=True, mask=True)
    gh, ghl = torch.randn_like(i), torch.randn(4, 2560, device="cuda")
    auto = torch.ops.mmfree.mlgru_scan_impl(i, f, lb, h0, mask, None, 0)
    chunked = torch.ops.mmfree.mlgru_scan_impl(i, f, lb, h0, mask, None, CHUNKED)
    lanes = torch.ops.mmfree.mlgru_scan_impl(i, f, lb, h0, mask, None, LANES)
    for a, b_, c in zip(auto, chunked, lanes, strict=True):
        assert torch.equal(a, b_)
        torch.testing.assert_close(a.float(), c.float(), **_tol(torch.bfloat16))
    first = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None, LANES)
    again = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None, LANES)
    auto_g = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None)
    for a, b_, c in zip(first, again, auto_g, strict=True):
        assert torch.equal(a, b_) and torch.equal(a, c)
    # Against v2's chunked kernels at the same shape (an independent algorithm).
    v2 = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, mask, None, CHUNKED)
    _assert_grads_close(first, tuple(x.cpu() for x in v2), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("f_value", [30.0, -30.0, -100.0])
def test_cuda_lanes_long_sequence_saturated_gates(f_value: float) -> None:
    """The lanes kernels over T = 65536 (one CTA of 32 lanes at D = 16: 256 tiles of 256
    tokens) with saturated forget gates (fp32): the same h_last and gradients as v2's
    sequential path. (16-bit gates past the exponent cap against the reference:
    test_numerics_policy.)"""
    t, d = 65536, 16
    i = torch.linspace(-4, 4, d, device="cuda").expand(1, t, d).contiguous()
    f = torch.full((1, t, d), f_value, device="cuda")
    lb = torch.linspace(0, 0.5, d, device="cuda")
    h0 = torch.full((1, d), 3.0, device="cuda")
    h, h_last = torch.ops.mmfree.mlgru_scan_impl(i, f, lb, h0, None, None, LANES)
    _, seq_last = torch.ops.mmfree.mlgru_scan_impl(i, f, lb, h0, None, None, SEQUENTIAL)
    assert torch.isfinite(h).all()
    # Two summation orders of an fp32 state over T steps: up to T * eps / 2 relative apart.
    torch.testing.assert_close(h_last, seq_last, rtol=t * F32_EPS / 2, atol=1e-5)
    gh, ghl = torch.randn_like(i), torch.randn(1, d, device="cuda")
    grads = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, None, None, LANES)
    seq = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, h0, None, None, SEQUENTIAL)
    for a, b_ in zip(grads, seq, strict=True):
        assert torch.isfinite(a).all()
        scale = max(1.0, b_.abs().max().item())
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.cuda
def test_cuda_chunked_backward_unaligned_views() -> None:
    # 2-byte offsets: the 2-channel (4-byte) accesses are not allowed, the 1-channel path runs.
    t, d = 70, 64
    storage = torch.randn(1 + 3 * t * d, device="cuda").to(torch.bfloat16)
    i = storage[1 : 1 + t * d].view(1, t, d)
    f = storage[1 + t * d : 1 + 2 * t * d].view(1, t, d)
    gh = storage[1 + 2 * t * d :].view(1, t, d)
    ghl = torch.randn(1, d, device="cuda")
    base = torch.ops.mmfree.mlgru_scan_backward(gh.cpu(), ghl.cpu(), i.cpu(), f.cpu(), None, None, None, None)
    for path in (CHUNKED, SEQUENTIAL, LANES):
        ours = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, None, None, None, None, path)
        _assert_grads_close(ours, base, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_decode_graph_capture() -> None:
    d = 2560
    i, f, lb, h0, _ = make_inputs(1, 1, d, torch.bfloat16, "cuda", lb=True, h0=True)
    state = h0.clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        mmfree_ext.mlgru_scan(i, f, lb, state)  # warm-up outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            _, h_last = mmfree_ext.mlgru_scan(i, f, lb, state)
    torch.cuda.synchronize()
    i.copy_(torch.randn_like(i))
    graph.replay()
    torch.cuda.synchronize()
    _, rhl = ref.mlgru_scan(i.cpu(), f.cpu(), lb.cpu(), h0.cpu())
    torch.testing.assert_close(h_last.cpu(), rhl, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_unaligned_views_use_scalar_path() -> None:
    base = torch.randn(1, 50, 2561, device="cuda", dtype=torch.bfloat16)
    i = base[..., 1:].contiguous()
    storage = torch.empty(1 + 50 * 2560, device="cuda", dtype=torch.bfloat16)
    f = storage[1:].view(1, 50, 2560)  # contiguous, but 2 bytes off 16-byte alignment
    f.copy_(torch.randn(1, 50, 2560))
    h, h_last = mmfree_ext.mlgru_scan(i, f)
    rh, rhl = ref.mlgru_scan(i.cpu(), f.cpu())
    torch.testing.assert_close(h.float().cpu(), rh.float(), **_tol(torch.bfloat16))
    torch.testing.assert_close(h_last.cpu(), rhl, rtol=1e-4, atol=1e-4)


# ---- bad input ------------------------------------------------------------------------------


def test_rejects_bad_input() -> None:
    i = torch.randn(2, 5, 4)
    op = torch.ops.mmfree.mlgru_scan
    with pytest.raises(RuntimeError, match="'i' must be a floating tensor"):
        op(i.int(), i.int())
    with pytest.raises(RuntimeError, match="'i' must be 3-D"):
        op(i[0], i[0])
    with pytest.raises(RuntimeError, match="'f' must have the shape of 'i'"):
        op(i, i[:, :4])
    with pytest.raises(RuntimeError, match="'f' must have dtype"):
        op(i, i.bfloat16())
    with pytest.raises(RuntimeError, match="'i' must be contiguous"):
        op(i.transpose(0, 1).contiguous().transpose(0, 1), i)
    with pytest.raises(RuntimeError, match="'lower_bound' must have dtype Float"):
        op(i, i, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="'lower_bound' must have 4 element"):
        op(i, i, torch.zeros(5))
    with pytest.raises(RuntimeError, match=r"'h0' must have shape \[2, 4\]"):
        op(i, i, None, torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match=r"'mask' must have shape \[2, 5\]"):
        op(i, i, None, None, torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="requires B == 1"):
        op(i, i, None, None, None, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="'cu_seqlens' must have dtype int32 or int64"):
        op(i[:1], i[:1], None, None, None, torch.tensor([0.0, 5.0]))
    with pytest.raises(RuntimeError, match="must rise from 0 to T=5"):
        op(i[:1], i[:1], None, None, None, torch.tensor([0, 3, 2, 5]))
    with pytest.raises(RuntimeError, match="'path' must be 0"):
        torch.ops.mmfree.mlgru_scan_impl(i, i, None, None, None, None, 7)
    with pytest.raises(RuntimeError, match="'grad_h_last' must have shape"):
        torch.ops.mmfree.mlgru_scan_backward(i, torch.zeros(3, 4), i, i, None, None, None, None)


@pytest.mark.cuda
def test_rejects_bad_input_cuda() -> None:
    i = torch.randn(2, 5, 4, device="cuda")
    with pytest.raises(RuntimeError, match="'f' is on cpu"):
        torch.ops.mmfree.mlgru_scan(i, i.cpu())
    with pytest.raises(RuntimeError, match="float64 on CPU only"):
        torch.ops.mmfree.mlgru_scan(i.double(), i.double())
