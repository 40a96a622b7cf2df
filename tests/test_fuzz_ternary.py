"""Property-based fuzzing of the ternary ops (packing, products, BitLinear) against
mmfree_ext.reference (tests/_fuzz.py). Integer results must match exactly; the products'
rescale is a fixed sequence of fp32 operations, so they must match bit for bit too."""

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

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _codes(n: int, k: int, seed: int, device: str, kind: str = "random") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ones":
        return torch.ones(n, k, dtype=torch.int8, device=device)
    if kind == "minus":
        return torch.full((n, k), -1, dtype=torch.int8, device=device)
    if kind == "zeros":
        return torch.zeros(n, k, dtype=torch.int8, device=device)
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8).to(device)


def _x_q(shape: tuple[int, ...], seed: int, device: str, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "max":
        return torch.full(shape, 127, dtype=torch.int8, device=device)
    if kind == "min":
        return torch.full(shape, -128, dtype=torch.int8, device=device)
    if kind == "extremes":
        return (torch.randint(0, 2, shape, generator=g, dtype=torch.int8) * 255 - 128).to(torch.int8).to(device)
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.int8, device=device)
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8).to(device)


# ---- quantize_ternary / unpack_ternary ----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@budget(50)
@given(
    n=dim_rows(200),
    k=dim_k(),
    dtype=st.sampled_from(FLOATS),
    kind=st.sampled_from(KINDS),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_quantize_ternary(device: str, n: int, k: int, dtype, kind: str, layout: str, seed: int) -> None:
    count("quantize_ternary", device)
    w = place(make_values((n, k), dtype, kind, seed, device), layout)
    if is_strided(w):
        expect_error(lambda: mmfree_ext.quantize_ternary(w), ["weight"])
        return
    packed, scale = mmfree_ext.quantize_ternary(w)
    assert packed.dtype == torch.uint8 and packed.shape == (n, ref.packed_row_bytes(k))
    wc = w.cpu()
    p_ref, s_ref = ref.quantize_ternary(wc)
    wf = wc.float().double()
    truth = (wf.abs().mean() if wc.numel() else wf.new_zeros(())).clamp(min=ref.SCALE_MIN)
    # mean|W| sums N*K terms in fp32 lanes: a few ulps beyond torch's (cascade) sum.
    assert_within_torch_error(scale.reshape(1), s_ref.reshape(1), truth.reshape(1), ulps=8.0)
    if not bool(torch.isfinite(s_ref)):
        # A NaN/inf anywhere makes the scale NaN/inf: every code is 0 then (1/inf = 0, NaN -> 0).
        assert torch.equal(mmfree_ext.unpack_ternary(packed, k).cpu(), torch.zeros(n, k, dtype=torch.int8))
        return
    codes = mmfree_ext.unpack_ternary(packed, k).cpu()
    assert_codes_equal_off_ties(codes, ref.unpack_ternary(p_ref, k), wf / truth, 1e-4)
    # The padding past K is code 1 (weight 0), exactly.
    assert torch.equal(packed.cpu()[:, : ref.packed_row_bytes(k)], ref.pack_ternary(codes))


@pytest.mark.parametrize("device", DEVICES)
@budget(50)
@given(
    n=dim_rows(200),
    k=dim_k(),
    kind=st.sampled_from(["random", "random", "ones", "minus", "zeros"]),
    corrupt=st.sampled_from([None, None, "code3", "padding", "random_byte"]),
    layout=st.sampled_from(["contig", "offset", "strided"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_unpack_ternary(device: str, n: int, k: int, kind: str, corrupt, layout: str, seed: int) -> None:
    count("unpack_ternary", device)
    w_q = _codes(n, k, seed, "cpu", kind)
    packed = ref.pack_ternary(w_q)
    g = torch.Generator().manual_seed(seed)
    if corrupt is not None and n > 0:
        r = int(torch.randint(0, n, (1,), generator=g))
        if corrupt == "code3":
            c = int(torch.randint(0, k, (1,), generator=g))
            blk, rem = divmod(c, 128)
            j, b = divmod(rem, 32)
            packed[r, blk * 32 + b] |= 3 << (2 * j)
        elif corrupt == "padding" and k % 128:
            packed[r, -1] = 0  # code 0 (weight -1) in the padding, or in the last real weights
        elif corrupt == "random_byte":
            packed[r, int(torch.randint(0, packed.shape[1], (1,), generator=g))] = int(
                torch.randint(0, 256, (1,), generator=g)
            )
    pk = place(packed.to(device), layout)
    if is_strided(pk):
        expect_error(lambda: mmfree_ext.unpack_ternary(pk, k), ["packed"])
        return
    try:
        ref_out = ref.unpack_ternary(packed, k)
        # The kernel is stricter than the reference: the padding past K must be code 1.
        nb = packed.shape[1] // 32
        all_codes = ((packed.to(torch.int32).view(n, nb, 1, 32) >> torch.arange(0, 8, 2).view(1, 1, 4, 1)) & 3).reshape(
            n, nb * 128
        )
        valid = bool((all_codes[:, k:] == 1).all())
    except ValueError:
        ref_out, valid = None, False
    if not valid:
        expect_error(lambda: mmfree_ext.unpack_ternary(pk, k), ["packed"])
        return
    out = mmfree_ext.unpack_ternary(pk, k)
    assert torch.equal(out.cpu(), ref_out)


# ---- ternary_matmul / _grouped / _t ---------------------------------------------------------


@st.composite
def matmul_case(draw: st.DrawFn, max_rows: int = 3000) -> dict:
    k = draw(dim_k(4099))
    big = st.integers(98, max_rows) if max_rows > 97 else dim_rows(max_rows)
    rows = draw(st.one_of(dim_rows(min(97, max_rows)), big) if k <= 512 else dim_rows(33))
    return {
        "k": k,
        "n": draw(st.one_of(st.sampled_from([0, 1, 3, 8, 17, 64, 129]), st.integers(0, 300 if k <= 512 else 70))),
        "lead": draw(lead_shape(rows)),
        "x_kind": draw(st.sampled_from(["random", "random", "max", "min", "extremes", "zeros"])),
        "w_kind": draw(st.sampled_from(["random", "random", "ones", "minus", "zeros"])),
        "scale_kind": draw(st.sampled_from([*FINITE_KINDS, "nan", "inf"])),
        "out_dtype": draw(st.sampled_from(OUT_DTYPES)),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "shift": draw(st.integers(1, 15)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _matmul_inputs(c: dict, device: str):
    shape = (*c["lead"], c["k"])
    x_q = place(_x_q(shape, c["seed"], device, c["x_kind"]), c["layout"], c["shift"])
    x_scale = make_values(c["lead"], torch.float32, c["scale_kind"], c["seed"] + 1, device).abs()
    w_q = _codes(c["n"], c["k"], c["seed"] + 2, device, c["w_kind"])
    packed = place(ref.pack_ternary(w_q.cpu()).to(device), "offset" if c["layout"] == "offset" else "contig", 1)
    w_scale = torch.tensor(0.0123 + (c["seed"] % 97) / 50.0, device=device)
    return x_q, x_scale, packed, w_scale


@pytest.mark.parametrize("device", DEVICES)
@budget(60)
@given(c=matmul_case())
def test_fuzz_ternary_matmul(device: str, c: dict) -> None:
    count("ternary_matmul", device)
    x_q, x_scale, packed, w_scale = _matmul_inputs(c, device)
    if is_strided(x_q):
        expect_error(lambda: mmfree_ext.ternary_matmul(x_q, x_scale, packed, w_scale, c["out_dtype"]), ["x_q"])
        return
    y = mmfree_ext.ternary_matmul(x_q, x_scale, packed, w_scale, c["out_dtype"])
    assert y.shape == (*c["lead"], c["n"]) and y.dtype == c["out_dtype"]
    expected = ref.ternary_matmul(x_q.cpu(), x_scale.cpu(), packed.cpu(), w_scale.cpu(), out_dtype=c["out_dtype"])
    assert_same_nonfinite(y, expected)
    assert torch.equal(torch.nan_to_num(y.cpu()), torch.nan_to_num(expected)), "not bit-identical to the reference"


@pytest.mark.parametrize("device", DEVICES)
@budget(30)
@given(c=matmul_case(max_rows=40), groups=st.integers(1, 5))
def test_fuzz_ternary_matmul_grouped(device: str, c: dict, groups: int) -> None:
    count("ternary_matmul_grouped", device)
    # x_q is stacked (contiguous); the packed weights keep their drawn offsets (16-byte misaligned ones).
    parts = [_matmul_inputs({**c, "seed": c["seed"] + 10 * g}, device) for g in range(groups)]
    x_q = torch.stack([p[0] for p in parts])
    x_scale = torch.stack([p[1] for p in parts])
    packed = [p[2] for p in parts]
    w_scale = [p[3] for p in parts]
    y = mmfree_ext.ternary_matmul_grouped(x_q, x_scale, packed, w_scale, c["out_dtype"])
    assert y.shape == (groups, *c["lead"], c["n"])
    for g, (xq, xs, pk, ws) in enumerate(parts):
        expected = ref.ternary_matmul(xq.cpu(), xs.cpu(), pk.cpu(), ws.cpu(), out_dtype=c["out_dtype"])
        assert_same_nonfinite(y[g], expected)
        assert torch.equal(torch.nan_to_num(y[g].cpu()), torch.nan_to_num(expected)), f"group {g} differs"


@pytest.mark.parametrize("device", DEVICES)
@budget(40)
@given(c=matmul_case(max_rows=200), g_dtype=st.sampled_from(FLOATS), g_kind=st.sampled_from(KINDS))
def test_fuzz_ternary_matmul_t(device: str, c: dict, g_dtype, g_kind: str) -> None:
    """grad @ (W_q * w_scale) in fp32, against float64; torch's own error is the fp32 product."""
    count("ternary_matmul_t", device)
    w_q = _codes(c["n"], c["k"], c["seed"] + 2, "cpu", c["w_kind"])
    packed = ref.pack_ternary(w_q).to(device)
    w_scale = torch.tensor(0.037, device=device)
    grad = place(make_values((*c["lead"], c["n"]), g_dtype, g_kind, c["seed"], device), c["layout"], c["shift"])
    out = mmfree_ext.ternary_matmul_t(grad, packed, w_scale, c["k"])  # any strides are accepted
    assert out.shape == (*c["lead"], c["k"]) and out.dtype == torch.float32
    w_deq = w_q.double() * 0.037
    gd = grad.cpu().double()
    truth = gd @ w_deq if c["n"] else torch.zeros(out.shape, dtype=torch.float64)
    base = grad.cpu().float() @ (w_q.float() * w_scale.cpu()) if c["n"] else truth.float()
    if g_kind in ("large",) and g_dtype == torch.float64:
        truth = base.double()  # the fp32 product overflows where float64 does not: both give inf
    mult = 4.0 if g_dtype in (torch.float32, torch.float64) else 8.0
    assert_within_torch_error(out, base, truth, mult=mult, ulps=4.0)


# ---- BitLinear: the composition of the tested ops ---------------------------------------------


@st.composite
def linear_case(draw: st.DrawFn) -> dict:
    k = draw(dim_k(1100))
    return {
        "k": k,
        "n": draw(st.sampled_from([1, 5, 64, 130])),
        "lead": draw(lead_shape(draw(dim_rows(33)))),
        "dtype": draw(st.sampled_from(FLOATS)),
        "w_dtype": draw(st.sampled_from(FLOATS)),
        "kind": draw(st.sampled_from(KINDS)),
        "w_kind": draw(st.sampled_from(FINITE_KINDS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "layout": draw(st.sampled_from(LAYOUTS)),
    }


def _composite(x, packed, w_scale, norm_weight, eps, out_dtype):
    """rms_norm_quant -> ternary_matmul with the extension's own (separately fuzzed) ops."""
    xf = x.float() if x.dtype == torch.float64 else x
    gf = norm_weight.float() if norm_weight.dtype == torch.float64 else norm_weight
    x_q, x_scale = mmfree_ext.rms_norm_quant(xf, gf, eps)
    return ref.ternary_matmul(x_q.cpu(), x_scale.cpu(), packed.cpu(), w_scale.cpu(), out_dtype=out_dtype)


@pytest.mark.parametrize("device", DEVICES)
@budget(40)
@given(c=linear_case())
def test_fuzz_ternary_linear(device: str, c: dict) -> None:
    """Forward of both BitLinear ops: bit-identical to the composition of their parts."""
    x = place(make_values((*c["lead"], c["k"]), c["dtype"], c["kind"], c["seed"], device), c["layout"])
    weight = make_values((c["n"], c["k"]), c["w_dtype"], c["w_kind"], c["seed"] + 1, device)
    g = make_values((c["k"],), c["w_dtype"], "normal", c["seed"] + 2, device) + 1
    packed, w_scale = mmfree_ext.quantize_ternary(weight)
    out_dtype = torch.float32 if c["dtype"] == torch.float64 else c["dtype"]
    expected = _composite(x.contiguous(), packed, w_scale, g, 1e-6, out_dtype).to(c["dtype"])
    for op, args, name in (
        (mmfree_ext.ternary_linear, (x, weight, g, 1e-6), "ternary_linear"),
        (mmfree_ext.ternary_linear_packed, (x, packed, w_scale, g, 1e-6), "ternary_linear_packed"),
    ):
        count(name, device)
        y = op(*args)  # x of any strides is accepted (copied)
        assert y.dtype == c["dtype"] and y.shape == (*c["lead"], c["n"])
        assert_same_nonfinite(y, expected)
        assert torch.equal(torch.nan_to_num(y.cpu()), torch.nan_to_num(expected)), f"{name} differs"


@pytest.mark.parametrize("device", DEVICES)
@budget(25)
@given(c=linear_case())
def test_fuzz_ternary_linear_backward(device: str, c: dict) -> None:
    """STE gradients of both BitLinear ops against reference.bit_linear's float64 autograd
    (with the same forward codes); torch's own error is the reference in fp32."""
    count("ternary_linear_backward", device)
    count("ternary_linear_packed_backward", device)
    finite = c["kind"] if c["kind"] in ("normal", "zero_rows", "constant", "ties") else "normal"
    x = make_values((*c["lead"], c["k"]), c["dtype"], finite, c["seed"], device)
    weight = make_values((c["n"], c["k"]), c["w_dtype"], "normal", c["seed"] + 1, device)
    g = make_values((c["k"],), c["w_dtype"], "normal", c["seed"] + 2, device) + 1
    dy = make_values((*c["lead"], c["n"]), c["dtype"], "normal", c["seed"] + 3, device)

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, g)]
    mmfree_ext.ternary_linear(*leaves, 1e-6).backward(dy)
    truth = [t.detach().cpu().double().requires_grad_(True) for t in (x, weight, g)]
    ref.bit_linear(*truth, 1e-6).backward(dy.cpu().double())
    base = [t.detach().cpu().clone().requires_grad_(True) for t in (x, weight, g)]
    ref.bit_linear(*base, 1e-6).backward(dy.cpu())
    mult = 4.0 if c["dtype"] in (torch.float32, torch.float64) else 16.0
    # dx = rstd * (dxn * g - xhat * mean(...)) cancels terms of size rstd * |dxn * g|: count
    # its floor in ulps of that (rstd is large for short rows of small values).
    xd = x.cpu().double()
    rstd = float((xd * xd).mean(-1).add(1e-6).rsqrt().max()) if xd.numel() else 1.0
    dxn = float((dy.cpu().double().abs().sum(-1).max() if dy.numel() else 0.0) * g.cpu().double().abs().max())
    scales = (rstd * dxn, 1.0, 1.0)
    for o, b, t, sc in zip(leaves, base, truth, scales, strict=True):
        assert o.grad.dtype == o.dtype
        # A 16-bit dY makes 16-bit products (as a 16-bit nn.Linear) and float64 runs in fp32:
        # count ulps in the coarsest of the dtypes involved.
        coarse = max((c["dtype"], o.dtype, torch.float32), key=lambda d: torch.finfo(d).eps)
        assert_within_torch_error(
            o.grad, b.grad, t.grad, mult=mult, ulps=8.0, floor_ulps=8.0, eps_dtype=coarse, floor_scale=sc
        )

    packed, w_scale = mmfree_ext.quantize_ternary(weight)
    pl = [t.detach().clone().requires_grad_(True) for t in (x, g)]
    mmfree_ext.ternary_linear_packed(pl[0], packed, w_scale, pl[1], 1e-6).backward(dy)
    for o, ref_grad in zip(pl, (leaves[0].grad, leaves[2].grad), strict=True):
        torch.testing.assert_close(o.grad, ref_grad, rtol=0, atol=0)  # the same kernels, bit for bit


# ---- arguments the ternary ops must refuse -----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@budget(30)
@given(
    k=st.integers(1, 300),
    k_packed=st.integers(1, 300),
    xq_dtype=st.sampled_from([torch.int8, torch.uint8, torch.int32, torch.float32]),
    p_dtype=st.sampled_from([torch.uint8, torch.int8]),
    s_shape=st.sampled_from(["ok", "short", "scalar"]),
    ws_numel=st.sampled_from([1, 1, 2, 0]),
)
def test_fuzz_ternary_bad_arguments(device: str, k: int, k_packed: int, xq_dtype, p_dtype, s_shape, ws_numel) -> None:
    count("ternary_bad_arguments", device)
    x_q = torch.zeros(3, k, device=device).to(xq_dtype)
    x_scale = {"ok": torch.ones(3), "short": torch.ones(2), "scalar": torch.ones(())}[s_shape].to(device)
    packed = torch.full((4, ref.packed_row_bytes(k_packed)), 85, device=device, dtype=torch.uint8).to(p_dtype)
    w_scale = torch.ones(ws_numel, device=device)
    names = []
    if xq_dtype != torch.int8:
        names.append("x_q")
    if s_shape != "ok":
        names.append("x_scale")
    if p_dtype != torch.uint8 or ref.packed_row_bytes(k_packed) != ref.packed_row_bytes(k):
        names.append("packed")
    if ws_numel != 1:
        names.append("w_scale")
    call = lambda: mmfree_ext.ternary_matmul(x_q, x_scale, packed, w_scale)
    if names:
        expect_error(call, names)
    else:
        assert call().shape == (3, 4)
