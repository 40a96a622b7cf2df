"""Tests of the plain-PyTorch reference (python/mmfree_ext/reference.py).

The kernels are tested against the reference, so the reference itself is pinned here by
hand-computed cases: literal int8 codes, byte values, integer products, unrolled
recurrences and gradient formulas written out from SPEC.md, not only self-consistency.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmfree_ext import reference as ref


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _silu(v: float) -> float:
    return v * _sigmoid(v)


# ----------------------------------------------------------------------------------------
# round_half_away
# ----------------------------------------------------------------------------------------


def test_round_half_away_ties_and_near_ties():
    x = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 126.5, 3.2, -3.7])
    expected = torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 0.0, 0.0, 127.0, 3.0, -4.0])
    torch.testing.assert_close(ref.round_half_away(x), expected, rtol=0, atol=0)
    # 0.49999997 is the fp32 value where floor(x + 0.5) wrongly gives 1.
    assert float(torch.floor(torch.tensor(0.49999997) + 0.5)) == 1.0
    # torch.round is half-to-even, so it must differ exactly at 0.5 / 2.5.
    assert float(torch.round(torch.tensor(2.5))) == 2.0


def test_round_half_away_keeps_dtype_and_large_values():
    x = torch.tensor([8388607.5, -8388607.5, 1e30], dtype=torch.float32)
    out = ref.round_half_away(x)
    assert out.dtype == torch.float32
    assert out[:2].tolist() == [8388608.0, -8388608.0] and out[2] == x[2]
    xb = torch.tensor([0.5, -2.5], dtype=torch.bfloat16)
    assert ref.round_half_away(xb).tolist() == [1.0, -3.0]


# ----------------------------------------------------------------------------------------
# RMSNorm family
# ----------------------------------------------------------------------------------------


def test_rms_norm_1x2_known_values():
    x = torch.tensor([[3.0, 4.0]])
    y, res = ref.rms_norm(x, torch.ones(2), eps=0.0)
    # rms = sqrt((9 + 16) / 2) = sqrt(12.5)
    expected = torch.tensor([[3.0 / math.sqrt(12.5), 4.0 / math.sqrt(12.5)]])
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=0)
    assert res is x


def test_rms_norm_1x4_weight_and_eps():
    x = torch.tensor([[2.0, -2.0, 2.0, -2.0]])  # mean square 4 -> rstd 0.5
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y, _ = ref.rms_norm(x, w, eps=0.0)
    torch.testing.assert_close(y, torch.tensor([[1.0, -2.0, 3.0, -4.0]]), rtol=0, atol=0)
    y_eps, _ = ref.rms_norm(x, w)  # default eps 1e-6 shrinks by rsqrt(4 + 1e-6) * 2
    scale = 2.0 / math.sqrt(4.0 + 1e-6)
    torch.testing.assert_close(y_eps, torch.tensor([[1.0, -2.0, 3.0, -4.0]]) * scale, rtol=1e-6, atol=0)


def test_rms_norm_residual():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    r = torch.tensor([[2.0, 2.0]], dtype=torch.bfloat16)
    y, res = ref.rms_norm(x, torch.ones(2), eps=0.0, residual=r)
    # s = [3, 4]; residual_out = s in x dtype; y = s / sqrt(12.5) in x dtype
    assert res.dtype == torch.bfloat16 and res.tolist() == [[3.0, 4.0]]
    assert y.dtype == torch.bfloat16
    expected = torch.tensor([[3.0 / math.sqrt(12.5), 4.0 / math.sqrt(12.5)]]).to(torch.bfloat16)
    assert torch.equal(y, expected)


def test_quantize_activation_hand_codes_with_ties():
    # amax = 127/64 -> s = 127/amax = 64 exactly; 2.5/64 * 64 = 2.5 is an exact tie.
    xn = torch.tensor([[127 / 64, 2.5 / 64, -2.5 / 64, 1.5 / 64, 0.0]])
    x_q, x_scale = ref.quantize_activation(xn)
    assert x_q.dtype == torch.int8
    assert x_q.tolist() == [[127, 3, -3, 2, 0]]  # half-even would give 2, -2
    assert x_scale.shape == (1,) and x_scale.dtype == torch.float32
    assert float(x_scale[0]) == pytest.approx(1 / 64, rel=1e-7)


def test_quantize_activation_zero_row_uses_min_scale():
    x_q, x_scale = ref.quantize_activation(torch.zeros(2, 5))
    assert x_q.tolist() == [[0] * 5] * 2
    torch.testing.assert_close(x_scale, torch.full((2,), 1e-5 / 127), rtol=1e-7, atol=0)


def test_rms_norm_quant_hand_codes():
    # mean(x^2) = (9 + 4 + 1 + 1 + 1) / 16 = 1, so xn ~ x; amax = 3, s = 127/3:
    # 3 -> 127, -2 -> -84.67 -> -85, 1 -> 42.33 -> 42.
    x = torch.tensor([[3.0, -2.0, 1.0, 1.0, 1.0] + [0.0] * 11])
    x_q, x_scale = ref.rms_norm_quant(x, torch.ones(16))
    assert x_q.tolist() == [[127, -85, 42, 42, 42] + [0] * 11]
    torch.testing.assert_close(x_scale, torch.tensor([3.0 / 127]), rtol=1e-6, atol=0)
    # With a norm weight: w = [1, 4, 0.5, ...]: xn = [3, -8, 0.5, 1, 1, ..] -> amax 8,
    # s = 15.875: 3 -> 47.625 -> 48, -8 -> -127, 0.5 -> 7.94 -> 8, 1 -> 15.875 -> 16.
    w = torch.tensor([1.0, 4.0, 0.5] + [1.0] * 13)
    x_q, x_scale = ref.rms_norm_quant(x, w)
    assert x_q.tolist() == [[48, -127, 8, 16, 16] + [0] * 11]


def test_rms_norm_quant_stats_in_fp32_for_half_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 40, generator=g).to(torch.bfloat16)
    w = (torch.rand(40, generator=g) + 0.5).to(torch.bfloat16)
    q16, s16 = ref.rms_norm_quant(x, w)
    q32, s32 = ref.rms_norm_quant(x.float(), w.float())
    assert torch.equal(q16, q32) and torch.equal(s16, s32)
    assert q16.shape == (4, 3, 40) and s16.shape == (4, 3) and s16.dtype == torch.float32


def test_rms_norm_quant_multi_matches_single():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 33, generator=g)
    ws = [torch.rand(33, generator=g) + 0.1 for _ in range(3)]
    multi = ref.rms_norm_quant_multi(x, ws)
    assert len(multi) == 3
    for (q, s), w in zip(multi, ws, strict=True):
        q1, s1 = ref.rms_norm_quant(x, w)
        assert torch.equal(q, q1) and torch.equal(s, s1)


def test_rms_norm_swish_gate_order_and_values():
    g = torch.tensor([[2.0, -2.0, 2.0, -2.0]])  # normalized: [1, -1, 1, -1]
    h = torch.tensor([[0.0, 1.0, -1.0, 10.0]])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = ref.rms_norm_swish_gate(g, h, w, eps=0.0)
    expected = torch.tensor([[1 * 1 * _silu(0.0), -1 * 2 * _silu(1.0), 1 * 3 * _silu(-1.0), -1 * 4 * _silu(10.0)]])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    out_bf = ref.rms_norm_swish_gate(g.bfloat16(), h.bfloat16(), w, eps=0.0)
    assert out_bf.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------
# Ternary weights
# ----------------------------------------------------------------------------------------


def test_ternarize_hand_matrix():
    w = torch.tensor([[0.5, -0.3], [0.05, 1.0]])
    # mean|W| = 1.85 / 4 = 0.4625; W / 0.4625 = [1.08, -0.65, 0.11, 2.16]
    w_q, w_scale = ref.ternarize(w)
    assert w_q.dtype == torch.int8 and w_q.tolist() == [[1, -1], [0, 1]]
    assert w_scale.dim() == 0 and w_scale.dtype == torch.float32
    assert float(w_scale) == pytest.approx(0.4625, rel=1e-7)


def test_ternarize_ties_round_away():
    # mean|W| = 2 -> s_w = 0.5: W * s_w = [0.5, -0.5, 1.5, -1.5] -> [1, -1, 2->1, -2->-1].
    w_q, w_scale = ref.ternarize(torch.tensor([[1.0, -1.0, 3.0, -3.0]]))
    assert w_q.tolist() == [[1, -1, 1, -1]]
    assert float(w_scale) == 2.0


def test_ternarize_zero_weight():
    w_q, w_scale = ref.ternarize(torch.zeros(3, 4, dtype=torch.bfloat16))
    assert w_q.abs().sum() == 0 and float(w_scale) == pytest.approx(1e-5)


def test_pack_ternary_hand_bytes_k3():
    packed = ref.pack_ternary(torch.tensor([[1, -1, 0]], dtype=torch.int8))
    assert packed.dtype == torch.uint8 and packed.shape == (1, 32) and packed.is_contiguous()
    # k=0,1,2 live in bytes 0,1,2 at j=0 (low bits); j=1..3 and bytes 3.. are padding code 1.
    # byte0 = 2 | 1<<2 | 1<<4 | 1<<6 = 0b01010110 = 86, byte1 = 0b01010100 = 84, rest 85.
    assert packed[0].tolist() == [0b01010110, 0b01010100] + [0b01010101] * 30


def test_pack_ternary_hand_bytes_strided_positions():
    k = 129
    w = torch.zeros(2, k, dtype=torch.int8)
    w[0, 0], w[0, 32], w[0, 64], w[0, 96] = 1, -1, 1, -1  # byte 0, j = 0..3
    w[0, 33] = 1  # byte 1, j = 1
    w[0, 128] = -1  # block 1, byte 0, j = 0
    w[1, 127] = 1  # block 0, byte 31, j = 3
    packed = ref.pack_ternary(w)
    assert packed.shape == (2, 64)
    row0 = [85] * 64
    row0[0] = 2 | (0 << 2) | (2 << 4) | (0 << 6)  # 34
    row0[1] = 1 | (2 << 2) | (1 << 4) | (1 << 6)  # 89
    row0[32] = 0 | (1 << 2) | (1 << 4) | (1 << 6)  # 84
    row1 = [85] * 64
    row1[31] = 1 | (1 << 2) | (1 << 4) | (2 << 6)  # 149
    assert packed[0].tolist() == row0
    assert packed[1].tolist() == row1


@pytest.mark.parametrize("k", [1, 3, 4, 5, 127, 128, 1000, 2560])
def test_pack_unpack_round_trip(k):
    g = torch.Generator().manual_seed(k)
    w = (torch.randint(0, 3, (3, k), generator=g) - 1).to(torch.int8)
    packed = ref.pack_ternary(w)
    assert packed.shape == (3, ref.packed_row_bytes(k)) == (3, math.ceil(k / 128) * 32)
    assert torch.equal(ref.unpack_ternary(packed, k), w)
    # padding positions hold code 1
    full = ref.unpack_ternary(packed, math.ceil(k / 128) * 128)
    assert (full[:, k:] == 0).all()


def test_unpack_rejects_code_3_and_bad_width():
    packed = ref.pack_ternary(torch.zeros(1, 5, dtype=torch.int8))
    bad = packed.clone()
    bad[0, 2] = 0b01010111  # code 3 at k = 2
    with pytest.raises(ValueError):
        ref.unpack_ternary(bad, 5)
    with pytest.raises(ValueError):
        ref.unpack_ternary(packed, 200)


def test_quantize_ternary_matches_ternarize():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, 300, generator=g)
    packed, w_scale = ref.quantize_ternary(w)
    w_q, w_scale2 = ref.ternarize(w)
    assert torch.equal(ref.unpack_ternary(packed, 300), w_q) and torch.equal(w_scale, w_scale2)


# ----------------------------------------------------------------------------------------
# Ternary matmul
# ----------------------------------------------------------------------------------------


def test_ternary_matmul_acc_hand_product():
    x_q = torch.tensor([[1, 2, 3], [-128, 127, 0]], dtype=torch.int8)
    w_q = torch.tensor([[1, 0, -1], [1, 1, 1]], dtype=torch.int8)
    acc = ref.ternary_matmul_acc(x_q, w_q)
    assert acc.dtype == torch.int32
    assert acc.tolist() == [[1 - 3, 1 + 2 + 3], [-128, -1]]


def test_ternary_matmul_acc_extremes():
    k = 6913
    x_q = torch.full((2, k), -128, dtype=torch.int8)
    w_q = torch.stack([torch.ones(k), -torch.ones(k)]).to(torch.int8)
    acc = ref.ternary_matmul_acc(x_q, w_q)
    assert acc.tolist() == [[-128 * k, 128 * k], [-128 * k, 128 * k]]
    # leading dims are kept
    assert ref.ternary_matmul_acc(x_q.view(1, 2, k), w_q).shape == (1, 2, 2)


def test_ternary_matmul_acc_matches_int64():
    g = torch.Generator().manual_seed(4)
    x_q = torch.randint(-128, 128, (9, 517), generator=g).to(torch.int8)
    w_q = (torch.randint(0, 3, (13, 517), generator=g) - 1).to(torch.int8)
    expected = (x_q.long().unsqueeze(1) * w_q.long().unsqueeze(0)).sum(-1)
    assert torch.equal(ref.ternary_matmul_acc(x_q, w_q).long(), expected)


def test_ternary_matmul_rescale():
    x_q = torch.tensor([[1, 2, 3], [-128, 127, 0]], dtype=torch.int8)
    x_scale = torch.tensor([0.5, 0.25])
    w_q = torch.tensor([[1, 0, -1], [1, 1, 1]], dtype=torch.int8)
    packed = ref.pack_ternary(w_q)
    w_scale = torch.tensor(0.125)
    y = ref.ternary_matmul(x_q, x_scale, packed, w_scale)
    expected = torch.tensor([[-2 * 0.5, 6 * 0.5], [-128 * 0.25, -1 * 0.25]]) * 0.125
    assert y.dtype == torch.float32 and torch.equal(y, expected)
    y_bf = ref.ternary_matmul(x_q, x_scale, packed, w_scale, 3, out_dtype=torch.bfloat16)
    assert y_bf.dtype == torch.bfloat16 and torch.equal(y_bf, expected.bfloat16())
    with pytest.raises(ValueError):
        ref.ternary_matmul(x_q, x_scale, packed, w_scale, in_features=4)


# ----------------------------------------------------------------------------------------
# BitLinear
# ----------------------------------------------------------------------------------------


def test_bit_linear_forward_hand_case():
    x = torch.tensor([[3.0, -2.0, 1.0, 1.0, 1.0] + [0.0] * 11])  # codes [127,-85,42,42,42,0..]
    w = torch.zeros(2, 16)
    w[0, 0], w[0, 1] = 1.0, 1.0
    w[1, 1], w[1, 2] = -1.0, 1.0  # mean|W| = 4/32 = 0.125 -> W_q = W
    y = ref.bit_linear(x, w, torch.ones(16))
    _, x_scale = ref.rms_norm_quant(x, torch.ones(16))
    acc = torch.tensor([[127 - 85, 85 + 42]], dtype=torch.float32)
    assert torch.equal(y, (acc * x_scale[:, None]) * torch.tensor(0.125))


def _rms_norm_backward(x, g, dxn, eps):
    """Hand-written RMSNorm backward: xn = xhat * g, xhat = x * r, r = rsqrt(mean x^2 + eps)."""
    r = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    xhat = x * r
    dg = (dxn * xhat).reshape(-1, x.shape[-1]).sum(0)
    dxhat = dxn * g
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx, dg


def test_bit_linear_ste_gradients_match_hand_formulas():
    g = torch.Generator().manual_seed(5)
    k, n, eps = 8, 5, 1e-6
    x = torch.randn(2, 3, k, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g, requires_grad=True)
    gn = (torch.rand(k, generator=g) + 0.5).requires_grad_(True)
    dy = torch.randn(2, 3, n, generator=g)

    y = ref.bit_linear(x, w, gn, eps)
    assert y.shape == (2, 3, n)
    (y * dy).sum().backward()

    with torch.no_grad():
        xn = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * gn
        x_q, x_scale = ref.quantize_activation(xn)
        w_q, w_scale = ref.ternarize(w)
        # Forward: exact integer product, then rescale.
        acc = (x_q.long().unsqueeze(-2) * w_q.long()).sum(-1).float()
        torch.testing.assert_close(y, acc * x_scale[..., None] * w_scale, rtol=1e-6, atol=0)
        # STE: dL/dxn = dY @ (W_q * w_scale), dL/dW = dY^T @ (x_q * x_scale).
        dxn = dy @ (w_q.float() * w_scale)
        dw = dy.reshape(-1, n).t() @ (x_q.float() * x_scale[..., None]).reshape(-1, k)
        dx, dg = _rms_norm_backward(x, gn, dxn, eps)

    torch.testing.assert_close(w.grad, dw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gn.grad, dg, rtol=1e-5, atol=1e-6)


def test_bit_linear_packed_equals_bit_linear_forward():
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 4, 200, generator=g).to(dtype)
        w = torch.randn(37, 200, generator=g)
        gn = torch.rand(200, generator=g) + 0.5
        packed, w_scale = ref.quantize_ternary(w)
        y_packed = ref.bit_linear_packed(x, packed, w_scale, gn)
        y_train = ref.bit_linear(x, w, gn)
        assert y_packed.dtype == dtype and y_packed.shape == (3, 4, 37)
        assert torch.equal(y_packed, y_train)


# ----------------------------------------------------------------------------------------
# MLGRU scan
# ----------------------------------------------------------------------------------------


def test_mlgru_scan_literal_two_steps():
    # f = 0 -> sigmoid 0.5; lb = 0.5 -> f_t = 0.75; i = 0 -> c = 0; h0 = 1.
    i = torch.zeros(1, 3, 1)
    f = torch.zeros(1, 3, 1)
    h, h_last = ref.mlgru_scan(i, f, lower_bound=torch.tensor([0.5]), h0=torch.ones(1, 1))
    assert h.flatten().tolist() == [0.75, 0.5625, 0.421875]
    assert h_last.tolist() == [[0.421875]]


def test_mlgru_scan_hand_unrolled_with_lb_h0_mask():
    i_v = [[0.5, -1.0], [2.0, 0.3], [-0.7, 1.2]]
    f_v = [[0.1, -0.4], [1.5, 0.0], [-2.0, 0.8]]
    lb_v = [0.2, 0.6]
    h0_v = [0.25, -0.5]
    m_v = [1, 0, 1]
    expected = []
    h = list(h0_v)
    for t in range(3):
        row = []
        for d in range(2):
            ft = lb_v[d] + (1 - lb_v[d]) * _sigmoid(f_v[t][d])
            c = _silu(i_v[t][d]) * (1 - ft) * m_v[t]
            h[d] = ft * h[d] + c
            row.append(h[d])
        expected.append(row)
    out, h_last = ref.mlgru_scan(
        torch.tensor([i_v]),
        torch.tensor([f_v]),
        lower_bound=torch.tensor(lb_v),
        h0=torch.tensor([h0_v]),
        mask=torch.tensor([m_v]),
    )
    torch.testing.assert_close(out, torch.tensor([expected]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h_last, torch.tensor([expected[-1]]), rtol=1e-6, atol=1e-7)
    assert h_last.dtype == torch.float32

    # No lower bound, no h0: f_t = sigmoid(f), h_{-1} = 0.
    h = [0.0, 0.0]
    expected = []
    for t in range(3):
        for d in range(2):
            ft = _sigmoid(f_v[t][d])
            h[d] = ft * h[d] + _silu(i_v[t][d]) * (1 - ft)
        expected.append(list(h))
    out, _ = ref.mlgru_scan(torch.tensor([i_v]), torch.tensor([f_v]))
    torch.testing.assert_close(out, torch.tensor([expected]), rtol=1e-6, atol=1e-7)


def test_mlgru_scan_dtype():
    g = torch.Generator().manual_seed(7)
    i = torch.randn(2, 5, 6, generator=g).bfloat16()
    f = torch.randn(2, 5, 6, generator=g).bfloat16()
    h, h_last = ref.mlgru_scan(i, f)
    h32, last32 = ref.mlgru_scan(i.float(), f.float())
    assert h.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    assert torch.equal(h, h32.bfloat16()) and torch.equal(h_last, last32)


def test_mlgru_scan_varlen_equals_separate_calls():
    g = torch.Generator().manual_seed(8)
    d = 6
    cu = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)  # includes an empty sequence
    t = int(cu[-1])
    i = torch.randn(1, t, d, generator=g)
    f = torch.randn(1, t, d, generator=g)
    lb = torch.rand(d, generator=g)
    h0 = torch.randn(4, d, generator=g)
    mask = (torch.rand(1, t, generator=g) > 0.3).int()
    h, h_last = ref.mlgru_scan(i, f, lower_bound=lb, h0=h0, mask=mask, cu_seqlens=cu)
    assert h_last.shape == (4, d)
    for s in range(4):
        lo, hi = int(cu[s]), int(cu[s + 1])
        if hi == lo:
            assert torch.equal(h_last[s], h0[s])
            continue
        hs, ls = ref.mlgru_scan(i[:, lo:hi], f[:, lo:hi], lower_bound=lb, h0=h0[s : s + 1], mask=mask[:, lo:hi])
        assert torch.equal(h[:, lo:hi], hs) and torch.equal(h_last[s : s + 1], ls)
    _, zero_last = ref.mlgru_scan(i, f, cu_seqlens=cu)
    assert torch.equal(zero_last[1], torch.zeros(d))
    with pytest.raises(ValueError):
        ref.mlgru_scan(i.expand(2, -1, -1), f.expand(2, -1, -1), cu_seqlens=cu)


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64)


def _tiny_model(seed: int = 0, layers: int = 2) -> ref.ReferenceMMfreeLM:
    model = ref.ReferenceMMfreeLM({**TINY, "num_hidden_layers": layers}).init_weights(seed)
    # Non-trivial norm weights and lower bounds, so wiring mistakes show up.
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name == "model.lower_bounds":
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_default_intermediate_size_matches_released_sizes():
    assert ref.default_intermediate_size(1024) == 2816
    assert ref.default_intermediate_size(2048) == 5632
    assert ref.default_intermediate_size(2560) == 6912
    assert ref.ReferenceConfig(32000, 1024, 24).intermediate_size == 2816


def test_lower_bounds_to_layer_lb_hand_values():
    lb = ref.lower_bounds_to_layer_lb(torch.zeros(3, 4))
    expected = torch.tensor([0.0, 1 / 3, 2 / 3]).unsqueeze(1).expand(3, 4)
    torch.testing.assert_close(lb, expected, rtol=1e-6, atol=1e-7)
    lb = ref.lower_bounds_to_layer_lb(torch.randn(5, 7, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(lb[0], torch.zeros(7))  # layer 0 exactly unbounded
    assert (lb[1:] > lb[:-1]).all() and (lb < 1).all()


def test_state_dict_keys_match_spec():
    model = ref.ReferenceMMfreeLM(TINY)
    v, h, n_layers, inter = 64, 32, 2, 64
    expected = {
        "model.embeddings.weight": (v, h),
        "model.lower_bounds": (n_layers, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
        "lm_head.norm.weight": (h,),
    }
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        expected[p + "attn_norm.weight"] = (h,)
        for proj in "ifgo":
            expected[p + f"attn.{proj}_proj.weight"] = (h, h)
            expected[p + f"attn.{proj}_proj.norm.weight"] = (h,)
        expected[p + "attn.g_norm.weight"] = (h,)
        expected[p + "mlp_norm.weight"] = (h,)
        expected[p + "mlp.gate_proj.weight"] = (2 * inter, h)
        expected[p + "mlp.gate_proj.norm.weight"] = (h,)
        expected[p + "mlp.down_proj.weight"] = (h, inter)
        expected[p + "mlp.down_proj.norm.weight"] = (inter,)
    got = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert got == expected
    # loads strictly into a fresh model
    ref.ReferenceMMfreeLM(TINY).load_state_dict(model.state_dict(), strict=True)


@torch.no_grad()
def test_forward_equals_token_by_token_decode():
    model = _tiny_model(1)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(10))
    logits, state = model(ids)
    assert logits.shape == (2, 9, 64) and logits.dtype == torch.float32
    assert len(state) == 2 and all(s.shape == (2, 32) and s.dtype == torch.float32 for s in state)

    st = None
    steps = []
    for t in range(ids.shape[1]):
        out, st = model(ids[:, t : t + 1], st)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), logits, rtol=1e-6, atol=1e-6)
    for a, b in zip(st, state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    # prefill a prefix, then continue from its state
    pre, st = model(ids[:, :4])
    rest, st = model(ids[:, 4:], st)
    torch.testing.assert_close(torch.cat([pre, rest], 1), logits, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_forward_matches_spec_pseudocode():
    """Transcription of SPEC section 2, step by step, with the reference ops."""
    model = _tiny_model(2)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(11))
    sd = model.state_dict()
    eps, inter = 1e-6, TINY["intermediate_size"]

    def bl(name, v):
        return ref.bit_linear(v, sd[name + ".weight"], sd[name + ".norm.weight"], eps)

    x = sd["model.embeddings.weight"][ids]
    lb = torch.softmax(sd["model.lower_bounds"], 0)
    lb = torch.cumsum(lb, 0) - lb[0]
    for layer in range(2):
        p = f"model.layers.{layer}."
        a, _ = ref.rms_norm(x, sd[p + "attn_norm.weight"], eps)
        i, f, g = (bl(p + f"attn.{n}_proj", a) for n in "ifg")
        f = torch.sigmoid(f)
        if layer > 0:
            f = lb[layer] + (1 - lb[layer]) * f
        c = torch.nn.functional.silu(i) * (1 - f)
        hs, h = [], torch.zeros(2, 32)
        for t in range(6):
            h = f[:, t] * h + c[:, t]
            hs.append(h)
        h = torch.stack(hs, 1)
        gn, _ = ref.rms_norm(g, sd[p + "attn.g_norm.weight"], eps)
        x = x + bl(p + "attn.o_proj", gn * torch.nn.functional.silu(h))
        m, _ = ref.rms_norm(x, sd[p + "mlp_norm.weight"], eps)
        u = bl(p + "mlp.gate_proj", m)
        x = x + bl(p + "mlp.down_proj", torch.nn.functional.silu(u[..., :inter]) * u[..., inter:])
    xn, _ = ref.rms_norm(x, sd["model.norm.weight"], eps)
    expected = bl("lm_head", xn)
    logits, _ = model(ids)
    # Same quantized path; only fp32 rounding order of the gate product may differ.
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_layer0_gets_no_lower_bound(monkeypatch):
    # Spy on the scan: layer 0 must be called with no bound, layer 1 with lb[1].
    model = _tiny_model(3)
    seen = []
    real_scan = ref.mlgru_scan

    def spy(i, f, lower_bound=None, **kw):
        seen.append(lower_bound)
        return real_scan(i, f, lower_bound=lower_bound, **kw)

    monkeypatch.setattr(ref, "mlgru_scan", spy)
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(12))
    model(ids)
    assert seen[0] is None
    assert torch.equal(seen[1], ref.lower_bounds_to_layer_lb(model.model.lower_bounds)[1])
    monkeypatch.undo()

    # A one-layer model ignores lower_bounds entirely; a two-layer one does not.
    one = _tiny_model(4, layers=1)
    before, _ = one(ids)
    one.model.lower_bounds.add_(torch.randn(1, 32))
    assert torch.equal(one(ids)[0], before)
    two = _tiny_model(4, layers=2)
    before, _ = two(ids)
    two.model.lower_bounds[1].add_(5.0)  # lb[1] -> ~1: layer 1 nearly stops forgetting
    assert not torch.equal(two(ids)[0], before)


@torch.no_grad()
def test_left_padding_mask_leaves_real_tokens_unchanged():
    model = _tiny_model(5)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(13))
    plain, plain_state = model(ids)
    padded_ids = torch.cat([torch.tensor([[7, 9, 11]]), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    padded, padded_state = model(padded_ids, attention_mask=mask)
    # padded positions carry c = 0 from h = 0, so the state stays exactly 0 until real tokens
    torch.testing.assert_close(padded[:, 3:], plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(padded_state, plain_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_model_backward_reaches_every_parameter():
    model = _tiny_model(6)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(14))
    logits, _ = model(ids)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids.reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
