"""Property-based fuzzing of mlgru_scan (forward and backward; masks, varlen, h0,
lower_bound) against a float64 truth and mmfree_ext.reference (tests/_fuzz.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mmfree_ext
from _fuzz import (
    DEVICES,
    LAYOUTS,
    assert_within_torch_error,
    budget,
    count,
    expect_error,
    is_strided,
    make_values,
    place,
)
from mmfree_ext import reference as ref
from test_mlgru import scan64

SCAN_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SCAN_KINDS = ["normal", "normal", "normal", "large", "tiny", "zero_rows", "constant", "nan", "inf"]


@st.composite
def scan_case(draw: st.DrawFn, kinds: list[str] = SCAN_KINDS) -> dict:
    d = draw(st.one_of(st.sampled_from([1, 2, 3, 7, 31, 32, 33, 127, 128, 129, 257]), st.integers(1, 300)))
    varlen = draw(st.booleans())
    t = draw(st.one_of(st.sampled_from([0, 1, 2, 5, 16, 17, 63, 64, 65]), st.integers(0, 140)))
    b = 1 if varlen else draw(st.sampled_from([0, 1, 2, 3, 5]))
    cuts = sorted(draw(st.lists(st.integers(0, t), max_size=5))) if varlen else []
    return {
        "b": b,
        "t": t,
        "d": d,
        "cu": [0, *cuts, t] if varlen else None,
        "dtype": draw(st.sampled_from(SCAN_DTYPES)),
        "kind": draw(st.sampled_from(kinds)),
        "lb": draw(st.booleans()),
        "h0": draw(st.booleans()),
        "mask": draw(st.sampled_from([None, torch.bool, torch.int32, torch.float32])),
        "cu_dtype": draw(st.sampled_from([torch.int32, torch.int64])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        # CUDA algorithm: auto (v2 at these sizes) or the forced v4 lanes kernels (the CPU ignores it).
        "path": draw(st.sampled_from([0, 3])),
    }


def _scan(c: dict):
    """mlgru_scan with the case's CUDA path forced (autograd keeps it for the backward)."""
    if c["path"] == 0:
        return mmfree_ext.mlgru_scan
    return lambda i, f, lb=None, h0=None, mask=None, cu=None: torch.ops.mmfree.mlgru_scan_impl(
        i, f, lb, h0, mask, cu, c["path"]
    )


def _scan_inputs(c: dict, device: str):
    shape = (c["b"], c["t"], c["d"])
    state = torch.float64 if c["dtype"] == torch.float64 else torch.float32
    i = place(make_values(shape, c["dtype"], c["kind"], c["seed"], device), c["layout"])
    f = make_values(shape, c["dtype"], "normal", c["seed"] + 1, device) * 2 + 1
    g = torch.Generator().manual_seed(c["seed"])
    lb = (torch.rand(c["d"], generator=g, dtype=torch.float64) * 0.9).to(state).to(device) if c["lb"] else None
    n_seq = len(c["cu"]) - 1 if c["cu"] is not None else c["b"]
    h0 = torch.randn(n_seq, c["d"], generator=g, dtype=torch.float64).to(state).to(device) if c["h0"] else None
    mask = None
    if c["mask"] is not None:
        mask = (torch.rand(c["b"], c["t"], generator=g) > 0.3).to(c["mask"]).to(device)
    cu = torch.tensor(c["cu"], dtype=c["cu_dtype"], device=device) if c["cu"] is not None else None
    return i, f, lb, h0, mask, cu


@pytest.mark.parametrize("device", DEVICES)
@budget(60)
@given(c=scan_case())
def test_fuzz_mlgru_scan(device: str, c: dict) -> None:
    count("mlgru_scan", device)
    if device == "cuda" and c["dtype"] == torch.float64:
        c = {**c, "dtype": torch.float32}  # float64 is a CPU-only (gradcheck) mode
    i, f, lb, h0, mask, cu = _scan_inputs(c, device)
    if is_strided(i):
        expect_error(lambda: mmfree_ext.mlgru_scan(i, f, lb, h0, mask, cu), ["i"])
        return
    h, h_last = _scan(c)(i, f, lb, h0, mask, cu)
    n_seq = len(c["cu"]) - 1 if c["cu"] is not None else c["b"]
    assert h.shape == i.shape and h.dtype == i.dtype and h_last.shape == (n_seq, c["d"])
    args = [a.cpu() if a is not None else None for a in (i, f, lb, h0, mask, cu)]
    truth_h, truth_last = scan64(*args)
    base_h, base_last = ref.mlgru_scan(*args)
    if c["dtype"] == torch.float64:  # computed in float64: a few float64 ulps per step
        assert_within_torch_error(h, truth_h, truth_h, ulps=8.0 + 4 * c["t"], floor_ulps=8.0 + 4 * c["t"])
        assert_within_torch_error(h_last, truth_last, truth_last, ulps=8.0 + 4 * c["t"], floor_ulps=8.0 + 4 * c["t"])
        return
    assert_within_torch_error(h, base_h, truth_h, mult=4.0, ulps=2.0, floor_ulps=8.0)
    assert_within_torch_error(h_last, base_last, truth_last, mult=4.0, ulps=2.0, floor_ulps=8.0)


@pytest.mark.parametrize("device", DEVICES)
@budget(30)
@given(c=scan_case(kinds=["normal", "zero_rows", "constant"]))
def test_fuzz_mlgru_scan_backward(device: str, c: dict) -> None:
    """Gradients for i, f, lower_bound and h0 against float64 autograd of the truth; torch's
    own error is the reference's autograd graph in the input dtype."""
    count("mlgru_scan_backward", device)
    if device == "cuda" and c["dtype"] == torch.float64:
        c = {**c, "dtype": torch.float32}
    i, f, lb, h0, mask, cu = _scan_inputs({**c, "layout": "contig"}, device)
    diff = [t for t in (i, f, lb, h0) if t is not None]
    ours = [t.detach().clone().requires_grad_(True) for t in diff]

    def call(fn, leaves, convert):
        it = iter(leaves)
        args = [next(it) if t is not None else None for t in (i, f, lb, h0)]
        rest = [convert(t) if t is not None else None for t in (mask, cu)]
        return fn(*args, *rest)

    g = torch.Generator().manual_seed(c["seed"] + 5)
    dh = torch.randn(i.shape, generator=g).to(i.dtype)
    n_seq = len(c["cu"]) - 1 if c["cu"] is not None else c["b"]
    dl = torch.randn(n_seq, c["d"], generator=g, dtype=torch.float64)

    def grads(outs, douts, leaves):
        """Gradients of the leaves (zeros where nothing depends on them: empty inputs)."""
        pairs = [(o, g) for o, g in zip(outs, douts, strict=True) if o.requires_grad]
        if not pairs:
            return [torch.zeros_like(t) for t in leaves]
        return torch.autograd.grad(
            [p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True, materialize_grads=True
        )

    h, h_last = call(_scan(c), ours, lambda t: t)
    g_ours = grads([h, h_last], [dh.to(i.device), dl.to(h_last.dtype).to(i.device)], ours)
    truth = [t.detach().cpu().double().requires_grad_(True) for t in diff]
    g_truth = grads(call(scan64, truth, lambda t: t.cpu()), [dh.double(), dl], truth)
    base = [t.detach().cpu().clone().requires_grad_(True) for t in diff]
    bh, bl = call(ref.mlgru_scan, base, lambda t: t.cpu())
    g_base = grads([bh, bl], [dh, dl.to(bl.dtype)], base)
    for o, b, t in zip(g_ours, g_base, g_truth, strict=True):
        if c["dtype"] == torch.float64:
            assert_within_torch_error(o, t, t, ulps=16.0 + 8 * c["t"], floor_ulps=16.0 + 8 * c["t"])
        else:
            assert_within_torch_error(o, b, t, mult=8.0, ulps=4.0, floor_ulps=16.0)


@pytest.mark.parametrize("device", DEVICES)
@budget(30)
@given(
    bad=st.sampled_from(["f_shape", "f_dtype", "lb_dtype", "lb_len", "h0_shape", "mask_shape", "cu_order", "cu_b"]),
    d=st.integers(1, 40),
    t=st.integers(1, 20),
)
def test_fuzz_mlgru_bad_arguments(device: str, bad: str, d: int, t: int) -> None:
    count("mlgru_bad_arguments", device)
    i = torch.randn(2, t, d, device=device)
    f = torch.randn(2, t, d, device=device)
    kw: dict = {}
    name = {"f_shape": "f", "f_dtype": "f", "lb_dtype": "lower_bound", "lb_len": "lower_bound", "h0_shape": "h0"}.get(
        bad, "mask" if bad == "mask_shape" else "cu_seqlens"
    )
    if bad == "f_shape":
        f = torch.randn(2, t, d + 1, device=device)
    elif bad == "f_dtype":
        f = f.half()
    elif bad == "lb_dtype":
        kw["lower_bound"] = torch.zeros(d, device=device, dtype=torch.float16)
    elif bad == "lb_len":
        kw["lower_bound"] = torch.zeros(d + 1, device=device)
    elif bad == "h0_shape":
        kw["h0"] = torch.zeros(3, d, device=device)
    elif bad == "mask_shape":
        kw["mask"] = torch.ones(2, t + 1, device=device, dtype=torch.bool)
    elif bad == "cu_b":
        kw["cu_seqlens"] = torch.tensor([0, t], device=device, dtype=torch.int32)
    elif bad == "cu_order":
        if device == "cuda":
            return  # not checked on CUDA (a check would sync); the kernels clamp offsets
        i, f = i[:1], f[:1]
        kw["cu_seqlens"] = torch.tensor([0, t + 1, t], dtype=torch.int64)
    expect_error(lambda: mmfree_ext.mlgru_scan(i, f, **kw), [name])
