"""Property-based fuzzing of the RMSNorm family against mmfree_ext.reference (tests/_fuzz.py).

Every case either matches the reference (int8 codes exactly, but for a one-code step at a
rounding tie; floats within a small multiple of torch's own error against float64) or
raises a RuntimeError/ValueError naming the offending argument.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mmfree_ext
from _fuzz import (
    DEVICES,
    FINITE_KINDS,
    FLOATS,
    KINDS,
    LAYOUTS,
    NON_FLOATS,
    assert_codes_equal_off_ties,
    assert_same_nonfinite,
    assert_within_torch_error,
    budget,
    count,
    dim_k,
    dim_rows,
    expect_error,
    is_strided,
    lead_shape,
    make_values,
    place,
)
from mmfree_ext import reference as ref

EPS = st.sampled_from([1e-6, 1e-5, 1e-3, 0.1])
#: Tolerance on the distance to a rounding tie (the fp32 statistic's last-ulp freedom).
TIE_TOL = 5e-4


@st.composite
def row_case(draw: st.DrawFn, max_k: int = 4099, max_rows: int = 97, kinds: list[str] = KINDS) -> dict:
    k = draw(dim_k(max_k))
    rows = draw(dim_rows(max_rows if k <= 1024 else 7))
    return {
        "k": k,
        "lead": draw(lead_shape(rows)),
        "dtype": draw(st.sampled_from(FLOATS)),
        "w_dtype": draw(st.sampled_from(FLOATS)),
        "kind": draw(st.sampled_from(kinds)),
        "w_kind": draw(st.sampled_from(["normal"] * 6 + ["zero_rows", "nan", "inf", "large"])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "shift": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "eps": draw(EPS),
    }


def _inputs(c: dict, device: str, name_shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*c["lead"], c["k"])
    x = place(make_values(shape, c["dtype"], c["kind"], c["seed"], device), c["layout"], c["shift"])
    w = make_values((c["k"],), c["w_dtype"], c["w_kind"], c["seed"] + 1 + name_shift, device)
    w = (w + 1.0) if c["w_kind"] == "normal" else w
    return x, w


# ---- float64 truths with the reference's fp32 statistic ----------------------------------


def _eps32(eps: float) -> float:
    """eps as the kernels hold it: an fp32 value, also in the float64 mode."""
    return float(torch.tensor(eps, dtype=torch.float32))


def _rstd64(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rstd in float64, but 0 where the reference's fp32 sum of squares overflows to inf
    (the SPEC computes statistics in fp32: such a row normalizes to 0 there)."""
    xd = x.double()
    k = x.shape[-1]
    r = torch.rsqrt((xd * xd).sum(-1, keepdim=True) / k + eps)
    xf = x.float()
    overflow = torch.isinf((xf * xf).sum(-1, keepdim=True)) & torch.isfinite(xf).all(-1, keepdim=True)
    return torch.where(overflow, torch.zeros_like(r), r)


def _quant_truth(xn64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-rounding code value, x_scale) in float64 with the NaN/inf row policy."""
    amax = xn64.abs().amax(-1, keepdim=True)
    bad = ~torch.isfinite(amax)
    amax = amax.clamp(min=ref.SCALE_MIN)
    v = torch.where(bad, torch.zeros_like(xn64), xn64 * 127.0 / amax)
    scale = torch.where(bad, torch.full_like(amax, float("nan")), amax / 127.0).squeeze(-1)
    return v, scale


def _check_quant(x_q, x_scale, q_ref, s_ref, xn64) -> None:
    v, s_truth = _quant_truth(xn64)
    assert_codes_equal_off_ties(x_q, q_ref, v, TIE_TOL)
    assert x_scale.dtype == torch.float32
    assert_within_torch_error(x_scale, s_ref, s_truth)


# ---- rms_norm_quant / _multi ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@budget(60)
@given(c=row_case())
def test_fuzz_rms_norm_quant(device: str, c: dict) -> None:
    count("rms_norm_quant", device)
    x, w = _inputs(c, device)
    if is_strided(x):
        expect_error(lambda: mmfree_ext.rms_norm_quant(x, w, c["eps"]), ["x"])
        return
    x_q, x_scale = mmfree_ext.rms_norm_quant(x, w, c["eps"])
    assert x_q.shape == x.shape and x_scale.shape == x.shape[:-1]
    xc, wc = x.cpu(), w.cpu()
    q_ref, s_ref = ref.rms_norm_quant(xc, wc, c["eps"])
    xf = xc.float()  # the reference rounds float64 input to fp32 first
    xn64 = xf.double() * _rstd64(xf, c["eps"]) * wc.float().double()
    _check_quant(x_q, x_scale, q_ref, s_ref, xn64)


@pytest.mark.parametrize("device", DEVICES)
@budget(40)
@given(c=row_case(max_k=2053, max_rows=31), p=st.integers(1, 6))
def test_fuzz_rms_norm_quant_multi(device: str, c: dict, p: int) -> None:
    count("rms_norm_quant_multi", device)
    x, _ = _inputs(c, device)
    ws = torch.stack([_inputs(c, device, name_shift=j)[1] for j in range(p)])
    if is_strided(x):
        expect_error(lambda: mmfree_ext.rms_norm_quant_multi(x, ws, c["eps"]), ["x"])
        return
    x_q, x_scale = mmfree_ext.rms_norm_quant_multi(x, ws, c["eps"])
    assert x_q.shape == (p, *x.shape) and x_scale.shape == (p, *x.shape[:-1])
    xc = x.cpu()
    xf = xc.float()
    for j, (q_ref, s_ref) in enumerate(ref.rms_norm_quant_multi(xc, list(ws.cpu()), c["eps"])):
        xn64 = xf.double() * _rstd64(xf, c["eps"]) * ws[j].cpu().float().double()
        _check_quant(x_q[j], x_scale[j], q_ref, s_ref, xn64)


# ---- rms_norm (+ residual) and its backward -------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@budget(50)
@given(c=row_case(), with_res=st.booleans(), res_layout=st.sampled_from(LAYOUTS))
def test_fuzz_rms_norm(device: str, c: dict, with_res: bool, res_layout: str) -> None:
    count("rms_norm", device)
    x, w = _inputs(c, device)
    res = None
    if with_res:
        res = place(make_values(x.shape, c["dtype"], "normal", c["seed"] + 7, device), res_layout)
    if is_strided(x) or is_strided(res):
        expect_error(lambda: mmfree_ext.rms_norm(x, w, c["eps"], res), ["x", "residual"])
        return
    y, res_out = mmfree_ext.rms_norm(x, w, c["eps"], res)
    xc, wc = x.cpu(), w.cpu()
    rc = res.cpu() if res is not None else None
    s64 = xc.double() + (rc.double() if rc is not None else 0.0)
    if c["dtype"] == torch.float64:
        y_base, res_exp, sumsq_src = None, s64, s64  # float64 is computed in float64 throughout
    else:
        y_base, res_exp = ref.rms_norm(xc, wc, c["eps"], rc)
        sumsq_src = xc.float() + (rc.float() if rc is not None else 0.0)
    res_exp = res_exp.to(c["dtype"])
    assert torch.equal(res_out.cpu().isnan(), res_exp.isnan())
    assert torch.equal(torch.nan_to_num(res_out.cpu()), torch.nan_to_num(res_exp)), "residual_out differs"
    if c["dtype"] == torch.float64:
        # No wider truth than float64: allow the float64 summation error of a K-term sum.
        truth = s64 * torch.rsqrt((s64 * s64).mean(-1, keepdim=True) + _eps32(c["eps"])) * wc.double()
        assert_within_torch_error(y, truth, truth, ulps=8.0 + c["k"])
    else:
        truth = s64 * _rstd64(sumsq_src, c["eps"]) * wc.float().double()
        assert_within_torch_error(y, y_base, truth)


def _finite_case(max_k: int = 2053, max_rows: int = 31) -> st.SearchStrategy[dict]:
    """Backward cases: finite inputs and weights (with a NaN/inf input the gradients are
    non-finite too, but where exactly is not specified: docs/numerics.md)."""
    kinds = [k for k in FINITE_KINDS if k not in ("large", "tiny")]
    return row_case(max_k=max_k, max_rows=max_rows, kinds=kinds).map(lambda c: {**c, "w_kind": "normal"})


def _grads64(fn, leaves: list[torch.Tensor], dy: list[torch.Tensor]) -> list[torch.Tensor]:
    ls = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    outs = fn(*ls)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o for o in outs], [g.cpu().double() for g in dy])
    return [t.grad for t in ls]


def _norm64(x, w, eps, res=None):
    s = x + res if res is not None else x
    return s * torch.rsqrt((s * s).mean(-1, keepdim=True) + eps) * w, s


@pytest.mark.parametrize("device", DEVICES)
@budget(30)
@given(c=_finite_case(), with_res=st.booleans())
def test_fuzz_rms_norm_backward(device: str, c: dict, with_res: bool) -> None:
    """rms_norm's autograd (the rms_norm_backward op) against float64 autograd; torch's own
    error is the reference's autograd graph in the input dtype."""
    count("rms_norm_backward", device)
    x, w = _inputs(c, device)
    x = x.contiguous()
    res = make_values(x.shape, c["dtype"], "normal", c["seed"] + 3, device) if with_res else None
    dy = make_values(x.shape, c["dtype"], "normal", c["seed"] + 5, device)
    dr = make_values(x.shape, c["dtype"], "normal", c["seed"] + 6, device)
    leaves = [x, w] + ([res] if res is not None else [])
    ours = [t.detach().clone().requires_grad_(True) for t in leaves]
    y, r_out = mmfree_ext.rms_norm(ours[0], ours[1], c["eps"], ours[2] if with_res else None)
    torch.autograd.backward([y, r_out], [dy, dr])
    truth = _grads64(lambda *a: _norm64(a[0], a[1], c["eps"], a[2] if with_res else None), leaves, [dy, dr])
    base_leaves = [t.detach().cpu().clone().requires_grad_(True) for t in leaves]
    yb, rb = ref.rms_norm(base_leaves[0], base_leaves[1], c["eps"], base_leaves[2] if with_res else None)
    torch.autograd.backward([yb, rb], [dy.cpu(), dr.cpu()])
    for o, b, t in zip(ours, base_leaves, truth, strict=True):
        assert o.grad.dtype == o.dtype
        assert_within_torch_error(o.grad, b.grad, t, mult=8.0, ulps=4.0, floor_ulps=4.0)


# ---- swish gate (+ quant) and its backward ------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@budget(40)
@given(c=row_case(), h_layout=st.sampled_from(LAYOUTS), h_kind=st.sampled_from(KINDS))
def test_fuzz_rms_norm_swish_gate(device: str, c: dict, h_layout: str, h_kind: str) -> None:
    count("rms_norm_swish_gate", device)
    g, w = _inputs(c, device)
    h = place(make_values(g.shape, c["dtype"], h_kind, c["seed"] + 9, device), h_layout)
    if is_strided(g) or is_strided(h):
        expect_error(lambda: mmfree_ext.rms_norm_swish_gate(g, h, w, c["eps"]), ["g", "h"])
        return
    y = mmfree_ext.rms_norm_swish_gate(g, h, w, c["eps"])
    gc, hc, wc = g.cpu(), h.cpu(), w.cpu()
    hd = hc.double()
    silu = hd * torch.sigmoid(hd)
    if c["dtype"] == torch.float64:
        truth = gc * torch.rsqrt((gc * gc).mean(-1, keepdim=True) + _eps32(c["eps"])) * wc.double() * silu
        assert_within_torch_error(y, truth, truth, ulps=8.0 + c["k"])
        return
    gf = gc.float()
    truth = gf.double() * _rstd64(gf, c["eps"]) * wc.float().double() * silu
    assert_within_torch_error(y, ref.rms_norm_swish_gate(gc, hc, wc, c["eps"]), truth, ulps=4.0)


@pytest.mark.parametrize("device", DEVICES)
@budget(40)
@given(c=row_case(), h_kind=st.sampled_from(KINDS))
def test_fuzz_rms_norm_swish_gate_quant(device: str, c: dict, h_kind: str) -> None:
    """Equals the reference composite rms_norm_quant(rms_norm_swish_gate(...)). The gate is
    rounded to g's dtype in between, so a one-ulp difference of the gate can move a code by
    one: codes may differ by one in at most 1 + n/1000 places (as tests/test_norm.py)."""
    count("rms_norm_swish_gate_quant", device)
    g, w = _inputs(c, device)
    nw = _inputs(c, device, name_shift=11)[1]
    h = make_values(g.shape, c["dtype"], h_kind, c["seed"] + 9, device)
    if is_strided(g):
        expect_error(lambda: mmfree_ext.rms_norm_swish_gate_quant(g, h, w, c["eps"], nw, c["eps"]), ["g"])
        return
    x_q, x_scale = mmfree_ext.rms_norm_swish_gate_quant(g, h, w, c["eps"], nw, c["eps"])
    gate = ref.rms_norm_swish_gate(g.cpu(), h.cpu(), w.cpu(), c["eps"])
    q_ref, s_ref = ref.rms_norm_quant(gate, nw.cpu(), c["eps"])
    assert_same_nonfinite(x_scale, s_ref)
    diff = (x_q.cpu().int() - q_ref.int()).abs()
    assert int(diff.max() if diff.numel() else 0) <= 1
    assert int((diff != 0).sum()) <= 1 + diff.numel() // 1000
    fin = s_ref.isfinite()
    torch.testing.assert_close(x_scale.cpu()[fin], s_ref[fin], rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
@budget(30)
@given(c=_finite_case())
def test_fuzz_rms_norm_swish_gate_backward(device: str, c: dict) -> None:
    count("rms_norm_swish_gate_backward", device)
    g, w = _inputs(c, device)
    g = g.contiguous()
    h = make_values(g.shape, c["dtype"], "normal", c["seed"] + 9, device)
    dy = make_values(g.shape, c["dtype"], "normal", c["seed"] + 5, device)
    leaves = [g, h, w]
    ours = [t.detach().clone().requires_grad_(True) for t in leaves]
    mmfree_ext.rms_norm_swish_gate(*ours, c["eps"]).backward(dy)

    def gate64(g_, h_, w_):
        return _norm64(g_, w_, c["eps"])[0] * (h_ * torch.sigmoid(h_))

    truth = _grads64(gate64, leaves, [dy])
    base = [t.detach().cpu().clone().requires_grad_(True) for t in leaves]
    ref.rms_norm_swish_gate(*base, c["eps"]).backward(dy.cpu())
    for o, b, t in zip(ours, base, truth, strict=True):
        assert_within_torch_error(o.grad, b.grad, t, mult=8.0, ulps=4.0, floor_ulps=4.0)


# ---- arguments the norm ops must refuse ---------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@budget(30)
@given(
    x_dtype=st.sampled_from(FLOATS + NON_FLOATS),
    w_dtype=st.sampled_from(FLOATS + NON_FLOATS),
    k=st.integers(1, 40),
    w_len=st.integers(0, 41),
    x_dim=st.integers(0, 3),
)
def test_fuzz_norm_bad_arguments(device: str, x_dtype, w_dtype, k: int, w_len: int, x_dim: int) -> None:
    """Wrong dtypes, a weight of the wrong length, a 0-dim x: a clear error naming it."""
    count("norm_bad_arguments", device)
    shape = (2,) * max(x_dim - 1, 0) + ((k,) if x_dim else ())
    x = torch.ones(shape, device=device).to(x_dtype)
    w = torch.ones(w_len, device=device).to(w_dtype)
    bad_x = x_dtype not in FLOATS or x_dim == 0
    bad_w = w_dtype not in FLOATS or w_len != (k if x_dim else 1)
    ops = [
        lambda: mmfree_ext.rms_norm_quant(x, w),
        lambda: mmfree_ext.rms_norm(x, w),
        lambda: mmfree_ext.rms_norm_swish_gate(x, x, w),
    ]
    for op in ops:
        if bad_x or bad_w:
            expect_error(op, (["x", "g"] if bad_x else []) + (["weight"] if bad_w else []))
        else:
            op()
