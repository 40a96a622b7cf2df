"""Ternary linear family: ternary_matmul(_t), ternary_linear(_packed), nn.BitLinear.

Integer products are checked for exact equality against the integer reference on every
CPU ISA path (scalar, AVX2, AVX-512 where the CPU has it). Float outputs follow the
flash-attention rule: our error against a float64 truth must stay within a small multiple of
the error PyTorch's own fp32 computation makes against the same truth.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import mmfree_ext
from conftest import DEVICES
from mmfree_ext import reference as ref
from mmfree_ext.nn import BitLinear, PackedBitLinear

_ISA_ORDER = ["scalar", "avx2", "avx512"]
_FEATURES = mmfree_ext.cpu_features()
_BEST_ISA = _FEATURES["best_isa"]


def _path_supported(isa: str, ext: str) -> bool:
    if _ISA_ORDER.index(isa) > _ISA_ORDER.index(_BEST_ISA):
        return False
    if ext == "vnni":
        return _FEATURES["avx512_vnni"] if isa == "avx512" else _FEATURES["avx_vnni"]
    if ext == "amx":
        return isa == "avx512" and _FEATURES["amx_int8"]
    return True


# Every kernel path: ISA cap x extension cap ("none" = the vpmaddubsw bodies, "vnni" =
# vpdpbusd, "amx" = AMX-INT8 tiles for the larger products).
_PATHS = ["scalar:none", "avx2:none", "avx2:vnni", "avx512:none", "avx512:vnni", "avx512:amx"]
ISAS = [
    pytest.param(path, marks=pytest.mark.skipif(not _path_supported(*path.split(":")), reason="CPU lacks it"))
    for path in _PATHS
]
HAS_NORM_OP = hasattr(torch.ops.mmfree, "rms_norm_quant")
needs_norm = pytest.mark.skipif(not HAS_NORM_OP, reason="mmfree::rms_norm_quant (norm branch) is not in this build")


@pytest.fixture
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Caps the CPU kernel path ("isa:ext") for one test, then restores the best one."""
    isa_name, ext = request.param.split(":")
    mmfree_ext.set_cpu_isa(isa_name)
    mmfree_ext.set_cpu_ext(ext)
    assert mmfree_ext.cpu_isa() == isa_name
    features = mmfree_ext.cpu_features()
    if ext == "vnni":
        assert features["use_vnni512"] if isa_name == "avx512" else features["use_vnni256"]
    yield request.param
    mmfree_ext.set_cpu_isa(_BEST_ISA)
    mmfree_ext.set_cpu_ext("amx")


def _random_case(m: int, k: int, n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    return x_q.to(device), w_q, ref.pack_ternary(w_q).to(device)


# Every M in {1, 2, 15, 16, 17, 300}, K in {1, 3, 64, 100, 2560, 6913}, N in {1, 5, 2560},
# the extremes together (M=300 with K=6913; N=2560 with K=6913), GEMV (M < 4) and GEMM paths.
SHAPES = [
    (1, 1, 1),
    (2, 3, 5),
    (15, 64, 2560),
    (16, 100, 5),
    (17, 2560, 1),
    (300, 6913, 5),
    (1, 6913, 2560),
    (300, 100, 2560),
    (16, 2560, 37),
    (2, 6913, 5),
    (17, 1, 5),
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_matmul_exact_integer(isa: str, m: int, k: int, n: int) -> None:
    x_q, w_q, packed = _random_case(m, k, n)
    ones_x, one_w = torch.ones(m), torch.ones(())
    y = torch.ops.mmfree.ternary_matmul(x_q, ones_x, packed, one_w, torch.float32)
    # |acc| <= 128 * 6913 < 2^24: fp32 holds the integer accumulator exactly.
    assert torch.equal(y, ref.ternary_matmul_acc(x_q, w_q).float())


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 100, 5), (17, 2560, 37), (300, 130, 9)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matmul_scaled_matches_reference(isa: str, m: int, k: int, n: int, out_dtype: torch.dtype) -> None:
    x_q, _, packed = _random_case(m, k, n)
    x_scale = torch.rand(m) * 0.05 + 1e-3
    w_scale = torch.tensor(0.0123)
    y = torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed, w_scale, out_dtype)
    expected = ref.ternary_matmul(x_q, x_scale, packed, w_scale, k, out_dtype)
    assert y.dtype == out_dtype
    assert torch.equal(y, expected)  # same fp32 rescale order, same round-to-nearest-even cast


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize(("x_val", "w_val"), [(-128, 1), (-128, -1), (127, 1), (127, -1), (-128, 0), (55, 0)])
def test_matmul_extreme_inputs(isa: str, m: int, x_val: int, w_val: int) -> None:
    # x = -128 against codes 2 (w = +1) is the largest |maddubs| pair sum (512) at every lane,
    # for the longest K: an int16 accumulator that ran too long would overflow here.
    k, n = 6913, 5
    x_q = torch.full((m, k), x_val, dtype=torch.int8)
    packed = ref.pack_ternary(torch.full((n, k), w_val, dtype=torch.int8))
    y = torch.ops.mmfree.ternary_matmul(x_q, torch.ones(m), packed, torch.ones(()), torch.float32)
    assert torch.equal(y, torch.full((m, n), float(x_val * w_val * k)))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_matmul_leading_dims_and_empty(isa: str) -> None:
    x_q = torch.randint(-128, 128, (2, 3, 200), dtype=torch.int8)
    w_q = torch.randint(-1, 2, (7, 200), dtype=torch.int8)
    packed = ref.pack_ternary(w_q)
    x_scale = torch.rand(2, 3)
    y = torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed, torch.tensor(0.5), torch.float32)
    assert y.shape == (2, 3, 7)
    assert torch.equal(y, ref.ternary_matmul(x_q, x_scale, packed, torch.tensor(0.5), 200))
    empty = torch.ops.mmfree.ternary_matmul(x_q[:0], x_scale[:0], packed, torch.tensor(0.5), torch.float32)
    assert empty.shape == (0, 3, 7)
    no_rows = torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed[:0], torch.tensor(0.5), torch.float32)
    assert no_rows.shape == (2, 3, 0)


def _assert_within_torch_error(ours: torch.Tensor, truth: torch.Tensor, torch_fp32: torch.Tensor, factor: float = 4.0):
    """Flash-attention rule: |ours - truth| <= factor * |torch_fp32 - truth| (+ a few fp32 ulps)."""
    err = (ours.double() - truth).abs().max().item()
    torch_err = (torch_fp32.double() - truth).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * truth.abs().max().item()
    assert err <= factor * torch_err + floor, f"error {err:.3g} vs torch fp32 error {torch_err:.3g}"


# M >= 16 takes the AMX-BF16 body on the "avx512:amx" path (odd M, N, K: padded tiles).
_MATMUL_T_SHAPES = [(1, 3, 5), (7, 100, 300), (200, 6913, 37), (13, 2560, 600), (16, 128, 32), (161, 300, 517)]


def _assert_matmul_t_path(isa: str, m: int) -> None:
    """The "avx512:amx" cap must really run AMX-BF16 for M >= 16 where the CPU has it."""
    if isa == "avx512:amx" and _FEATURES["amx_bf16"]:
        assert mmfree_ext.cpu_features()["use_amx_bf16"]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize(("m", "k", "n"), _MATMUL_T_SHAPES)
def test_matmul_t_exact_integer(isa: str, m: int, k: int, n: int) -> None:
    """Small-integer grads and w_scale 1: every path's fp32 sum is exact, so all agree exactly."""
    _assert_matmul_t_path(isa, m)
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    grad = torch.randint(-8, 9, (m, n)).float()
    out = torch.ops.mmfree.ternary_matmul_t(grad, ref.pack_ternary(w_q), torch.tensor(1.0), k)
    assert torch.equal(out, (grad.double() @ w_q.double()).float())


def test_matmul_t_amx_splits_fp32_grad_exactly() -> None:
    """Each output is one grad times +-0.5 (a signed permutation W): exact in fp32 on every
    path, so the AMX-BF16 result must equal it bit for bit; a bf16-only grad would not."""
    n = k = 48
    perm = torch.randperm(k)
    w_q = torch.zeros(n, k, dtype=torch.int8)
    w_q[torch.arange(n), perm] = (torch.randint(0, 2, (n,)) * 2 - 1).to(torch.int8)
    grad = (1.0 + torch.randint(0, 2**23, (32, n)).double() * 2.0**-23).float() * torch.randn(32, n).sign()
    out = torch.ops.mmfree.ternary_matmul_t(grad, ref.pack_ternary(w_q), torch.tensor(0.5), k)
    assert torch.equal(out, ((grad.double() @ w_q.double()) * 0.5).float())
    grad[3, 5] = float("inf")
    out_inf = torch.ops.mmfree.ternary_matmul_t(grad, ref.pack_ternary(w_q), torch.tensor(1.0), k)
    truth_inf = grad.double() @ w_q.double()  # inf * (+-1) = +-inf, inf * 0 = NaN, as in fp32
    assert out_inf[3, perm[5]].abs().item() == float("inf")
    assert torch.equal(out_inf.isnan(), truth_inf.isnan()) and torch.equal(out_inf.isinf(), truth_inf.isinf())


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize(("m", "k", "n"), _MATMUL_T_SHAPES)
def test_matmul_t_matches_float64(isa: str, m: int, k: int, n: int) -> None:
    _assert_matmul_t_path(isa, m)
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    packed = ref.pack_ternary(w_q)
    w_scale = torch.tensor(0.037)
    grad = torch.randn(m, n)
    out = torch.ops.mmfree.ternary_matmul_t(grad, packed, w_scale, k)
    assert out.shape == (m, k) and out.dtype == torch.float32
    w_deq = w_q.float() * w_scale
    truth = grad.double() @ w_deq.double()
    _assert_within_torch_error(out, truth, grad @ w_deq)
    # The a-priori fp32 bound of a sum of exact products: every path adds at most 3N terms
    # (AMX: hi, mid, lo of each grad) plus one rounding of the scale, each step within
    # u = 2^-24 relative: |err| <= gamma_(3N+2) * sum |g w| (w_scale included), float64 truth.
    u = 2.0**-24
    steps = 3 * n + 2
    bound = steps * u / (1 - steps * u) * (grad.double().abs() @ w_deq.double().abs())
    assert ((out.double() - truth).abs() <= bound + 1e-30).all()


def test_matmul_t_bf16_grad_and_leading_dims() -> None:
    w_q = torch.randint(-1, 2, (9, 70), dtype=torch.int8)
    grad = torch.randn(2, 3, 9).bfloat16()
    out = torch.ops.mmfree.ternary_matmul_t(grad, ref.pack_ternary(w_q), torch.tensor(1.0), 70)
    assert out.shape == (2, 3, 70)
    truth = grad.double() @ w_q.double()
    _assert_within_torch_error(out, truth, grad.float() @ w_q.float())


# ---- BitLinear ------------------------------------------------------------------------------


def _bitlinear_inputs(m: int, k: int, n: int, dtype: torch.dtype, device: str = "cpu"):
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
    g = (1.0 + 0.1 * torch.randn(k, device=device)).to(dtype)
    return x, w, g


def _one_code_tolerance(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> float:
    """A reduction-order ulp in the RMS statistic can move one int8 code by one exactly at a
    rounding tie; such a flip moves an output by at most x_scale * w_scale per flipped code."""
    _, x_scale = ref.rms_norm_quant(x.reshape(-1, x.shape[-1]), g)
    _, w_scale = ref.ternarize(w)
    return 2.0 * x_scale.max().item() * w_scale.item()


@needs_norm
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ternary_linear_forward(device: str, dtype: torch.dtype) -> None:
    x, w, g = _bitlinear_inputs(37, 300, 70, dtype, device)
    x = x.reshape(37, 1, 300)
    y = torch.ops.mmfree.ternary_linear(x, w, g, 1e-6)
    assert y.shape == (37, 1, 70) and y.dtype == dtype
    # Bit for bit the composition of the ops it is made of ...
    x_q, x_scale = torch.ops.mmfree.rms_norm_quant(x, g, 1e-6)
    packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
    assert torch.equal(y, torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed, w_scale, dtype))
    # ... and the packed op; and the reference up to a tie flip.
    assert torch.equal(y, torch.ops.mmfree.ternary_linear_packed(x, packed, w_scale, g, 1e-6))
    expected = ref.bit_linear(x.cpu(), w.cpu(), g.cpu())
    atol = _one_code_tolerance(x.cpu(), w.cpu(), g.cpu())
    torch.testing.assert_close(y.cpu().float(), expected.float(), rtol=0, atol=atol)


def _ste_truth(x, w, g, dy, eps=1e-6):
    """STE gradients (SPEC section 1) in float64, from the same quantized values the forward uses."""
    k = x.shape[-1]
    x_q, x_scale = ref.rms_norm_quant(x.float(), g.float(), eps)
    w_q, w_scale = ref.ternarize(w)
    xd, gd, dyd = x.double(), g.double(), dy.double()
    rstd = torch.rsqrt((xd * xd).sum(-1, keepdim=True) / k + eps)
    xhat = xd * rstd
    dxn = dyd @ (w_q.double() * w_scale.double())
    dw = dyd.t() @ (x_q.double() * x_scale.double().unsqueeze(-1))
    dg = (dxn * xhat).sum(0)
    dxhat = dxn * gd
    dx = rstd * (dxhat - xhat * (dxhat * xhat).sum(-1, keepdim=True) / k)
    return dx, dw, dg


@needs_norm
@pytest.mark.parametrize("device", DEVICES)
def test_ternary_linear_ste_gradients_float64(device: str) -> None:
    """The gradient check for a quantized op.

    The forward is piecewise constant in x, W and g (int8/ternary rounding), so a numerical
    torch.autograd.gradcheck measures finite differences of a step function: zero almost
    everywhere, huge across a step, never the STE gradient training uses. Instead, in float64
    inputs, the op's analytic gradients are compared with reference.bit_linear's autograd
    gradients against a float64 evaluation of the SPEC's STE formulas.
    """
    m, k, n = 33, 200, 48
    x, w, g = _bitlinear_inputs(m, k, n, torch.float64, device)
    dy = torch.randn(m, n, dtype=torch.float64, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, w, g)]
    torch.ops.mmfree.ternary_linear(*leaves, 1e-6).backward(dy)
    ours = [t.grad for t in leaves]
    ref_leaves = [t.detach().cpu().clone().requires_grad_() for t in (x, w, g)]
    ref.bit_linear(*ref_leaves).backward(dy.cpu())
    truth = _ste_truth(x.cpu(), w.cpu(), g.cpu(), dy.cpu())
    for name, o, r, t in zip(("x", "weight", "norm_weight"), ours, [t.grad for t in ref_leaves], truth, strict=True):
        assert o.dtype == torch.float64 and o.shape == t.shape, name
        _assert_within_torch_error(o.cpu(), t, r)


@needs_norm
@pytest.mark.parametrize("device", DEVICES)
def test_ternary_linear_packed_gradients(device: str) -> None:
    x, w, g = _bitlinear_inputs(20, 130, 24, torch.float32, device)
    dy = torch.randn(20, 24, device=device)
    packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
    xl, gl = x.clone().requires_grad_(), g.clone().requires_grad_()
    torch.ops.mmfree.ternary_linear_packed(xl, packed, w_scale, gl, 1e-6).backward(dy)
    dx, _, dg = _ste_truth(x.cpu(), w.cpu(), g.cpu(), dy.cpu())
    rx, rw, rg = (t.detach().cpu().clone().requires_grad_() for t in (x, w, g))
    ref.bit_linear(rx, rw, rg).backward(dy.cpu())
    _assert_within_torch_error(xl.grad.cpu(), dx, rx.grad)
    _assert_within_torch_error(gl.grad.cpu(), dg, rg.grad)


@needs_norm
def test_ternary_linear_bf16_backward_dtypes() -> None:
    x, w, g = _bitlinear_inputs(8, 64, 16, torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, w, g)]
    torch.ops.mmfree.ternary_linear(*leaves, 1e-6).sum().backward()
    for t in leaves:
        assert t.grad.dtype == torch.bfloat16 and t.grad.shape == t.shape
        assert torch.isfinite(t.grad.float()).all()


# ---- opcheck ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_matmul_ops(device: str) -> None:
    x_q, _, packed = _random_case(5, 130, 7, device)
    x_scale = torch.rand(5, device=device)
    w_scale = torch.tensor(0.3, device=device)
    torch.library.opcheck(torch.ops.mmfree.ternary_matmul, (x_q, x_scale, packed, w_scale, torch.bfloat16))
    grad = torch.randn(5, 7, device=device)
    torch.library.opcheck(torch.ops.mmfree.ternary_matmul_t, (grad, packed, w_scale, 130))


@needs_norm
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_linear_ops(device: str) -> None:
    x, w, g = _bitlinear_inputs(6, 130, 7, torch.float32, device)
    packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
    dy = torch.randn(6, 7, device=device)
    xg, wg, gg = (t.clone().requires_grad_() for t in (x, w, g))
    torch.library.opcheck(torch.ops.mmfree.ternary_linear, (xg, wg, gg, 1e-6))
    torch.library.opcheck(torch.ops.mmfree.ternary_linear_packed, (xg, packed, w_scale, gg, 1e-6))
    torch.library.opcheck(torch.ops.mmfree.ternary_linear_backward, (dy, x, w, g, 1e-6))
    torch.library.opcheck(torch.ops.mmfree.ternary_linear_packed_backward, (dy, x, packed, w_scale, g, 1e-6))


# ---- modules --------------------------------------------------------------------------------


@needs_norm
def test_bitlinear_module_pack_and_state_dict() -> None:
    layer = BitLinear(300, 50)
    assert set(layer.state_dict()) == {"weight", "norm.weight"}
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 9, 300)
    y = layer(x)
    packed_layer = layer.pack()
    assert isinstance(packed_layer, PackedBitLinear)
    assert (packed_layer.in_features, packed_layer.out_features) == (300, 50)
    assert set(packed_layer.state_dict()) == {"packed", "w_scale", "norm.weight"}
    assert packed_layer.packed.dtype == torch.uint8 and packed_layer.w_scale.dim() == 0
    assert torch.equal(packed_layer(x), y)
    # A latent-weight checkpoint loads straight into the packed layer.
    fresh = PackedBitLinear(300, 50)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.packed, packed_layer.packed) and torch.equal(fresh(x), y)
    fresh.load_state_dict(packed_layer.state_dict())
    assert torch.equal(fresh(x), y)


@needs_norm
def test_bitlinear_trains() -> None:
    torch.manual_seed(1)
    layer = BitLinear(64, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(256, 64)
    target = torch.randn(8, 64) @ x.t()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (layer(x) - target.t()).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@needs_norm
def test_torch_compile_fullgraph_matches_eager() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = BitLinear(96, 64)
            self.b = BitLinear(64, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.nn.functional.silu(self.a(x)))

    net = Net()
    x = torch.randn(3, 5, 96)
    compiled = torch.compile(net, fullgraph=True)
    y_eager = net(x)
    y_comp = compiled(x)
    assert torch.equal(y_comp, y_eager)
    y_comp.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    y_eager.sum().backward()
    for gc, ge in zip(grads, (p.grad for p in net.parameters()), strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


# ---- bad input ------------------------------------------------------------------------------


def test_matmul_rejects_bad_input() -> None:
    x_q, _, packed = _random_case(4, 200, 3)
    xs, ws = torch.ones(4), torch.ones(())
    op = torch.ops.mmfree.ternary_matmul
    with pytest.raises(RuntimeError, match="'packed' must have 32 bytes per row"):
        op(x_q[:, :100].contiguous(), xs, packed, ws, torch.float32)  # K mismatch
    with pytest.raises(RuntimeError, match="'packed' must have dtype"):
        op(x_q, xs, packed.to(torch.int8), ws, torch.float32)
    with pytest.raises(RuntimeError, match="'packed' must be 2-D"):
        op(x_q, xs, packed.reshape(-1), ws, torch.float32)
    with pytest.raises(RuntimeError, match="'x_q' must have dtype"):
        op(x_q.float(), xs, packed, ws, torch.float32)
    with pytest.raises(RuntimeError, match="'x_q' must be contiguous"):
        op(torch.cat([x_q, x_q], 1)[:, ::2], xs, packed, ws, torch.float32)
    with pytest.raises(RuntimeError, match="'x_scale' must have shape"):
        op(x_q, torch.ones(5), packed, ws, torch.float32)
    with pytest.raises(RuntimeError, match="'x_scale' must have dtype"):
        op(x_q, xs.double(), packed, ws, torch.float32)
    with pytest.raises(RuntimeError, match="'w_scale' must have 1 element"):
        op(x_q, xs, packed, torch.ones(2), torch.float32)
    with pytest.raises(RuntimeError, match="'out_dtype' must be float32, bfloat16 or float16"):
        op(x_q, xs, packed, ws, torch.float64)
    with pytest.raises(RuntimeError, match="'packed' must be contiguous"):
        op(x_q, xs, torch.cat([packed, packed], 1)[:, ::2], ws, torch.float32)


def test_matmul_t_rejects_bad_input() -> None:
    packed = ref.pack_ternary(torch.zeros(3, 200, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="'grad' must have N=3"):
        torch.ops.mmfree.ternary_matmul_t(torch.randn(4, 5), packed, torch.ones(()), 200)
    with pytest.raises(RuntimeError, match="96 bytes per row"):
        torch.ops.mmfree.ternary_matmul_t(torch.randn(4, 3), packed, torch.ones(()), 300)


@needs_norm
def test_linear_rejects_bad_input() -> None:
    x, w, g = _bitlinear_inputs(4, 100, 6, torch.float32)
    with pytest.raises(RuntimeError, match="'weight' must be \\[N, K\\] with K=100"):
        torch.ops.mmfree.ternary_linear(x, w[:, :50].contiguous(), g, 1e-6)
    with pytest.raises(RuntimeError, match="'norm_weight' must have K=100"):
        torch.ops.mmfree.ternary_linear(x, w, g[:50], 1e-6)
    with pytest.raises(RuntimeError, match="'x' must be a floating tensor"):
        torch.ops.mmfree.ternary_linear(x.to(torch.int32), w, g, 1e-6)
    with pytest.raises(RuntimeError, match="'weight' must be contiguous"):
        torch.ops.mmfree.ternary_linear(x, torch.randn(100, 6).t(), g, 1e-6)
    packed, w_scale = torch.ops.mmfree.quantize_ternary(w)
    with pytest.raises(RuntimeError, match="'packed' must have 64 bytes per row"):
        torch.ops.mmfree.ternary_linear_packed(torch.randn(4, 200), packed, w_scale, torch.ones(200), 1e-6)


@pytest.mark.cuda
def test_rejects_mixed_devices() -> None:
    x_q, _, packed = _random_case(4, 200, 3)
    with pytest.raises(RuntimeError, match="'packed' is on"):
        torch.ops.mmfree.ternary_matmul(x_q.cuda(), torch.ones(4).cuda(), packed, torch.ones(()).cuda(), torch.float32)
    with pytest.raises(RuntimeError, match="'w_scale' is on"):
        torch.ops.mmfree.ternary_matmul(x_q.cuda(), torch.ones(4).cuda(), packed.cuda(), torch.ones(()), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_cuda_matches_cpu_exactly(m: int, k: int, n: int) -> None:
    x_q, _, packed = _random_case(m, k, n)
    x_scale, w_scale = torch.rand(m), torch.tensor(0.02)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cpu = torch.ops.mmfree.ternary_matmul(x_q, x_scale, packed, w_scale, dtype)
        gpu = torch.ops.mmfree.ternary_matmul(x_q.cuda(), x_scale.cuda(), packed.cuda(), w_scale.cuda(), dtype)
        assert torch.equal(gpu.cpu(), cpu)


def test_rmsnorm_module_matches_reference() -> None:
    norm = mmfree_ext.nn.RMSNorm(300)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 7, 300)
    assert set(norm.state_dict()) == {"weight"}
    expected = ref.rms_norm(x, norm.weight)[0]
    # fp32 statistics summed in another order: a few ulps of the output.
    torch.testing.assert_close(norm(x), expected, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-6)


# ---- ternary_matmul_grouped -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("m", "k", "n", "groups"),
    [(1, 2560, 300, 3), (4, 100, 37, 2), (7, 6913, 5, 4), (8, 300, 64, 3), (17, 130, 70, 3), (2, 64, 16, 5)],
)
def test_grouped_equals_separate_products(device: str, m: int, k: int, n: int, groups: int) -> None:
    """One call of G products == G ternary_matmul calls, bit for bit: the grouped GEMV on
    CUDA (M < 8, G <= 4) and the per-group fallback (M >= 8 or G > 4)."""
    x_q = torch.randint(-128, 128, (groups, m, k), dtype=torch.int8, device=device)
    x_scale = torch.rand(groups, m, device=device)
    packed = [ref.pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8)).to(device) for _ in range(groups)]
    w_scale = [torch.rand((), device=device) + 0.01 for _ in range(groups)]
    for dtype in (torch.float32, torch.bfloat16):
        out = mmfree_ext.ternary_matmul_grouped(x_q, x_scale, packed, w_scale, dtype)
        assert out.shape == (groups, m, n) and out.dtype == dtype
        for g in range(groups):
            want = torch.ops.mmfree.ternary_matmul(x_q[g], x_scale[g], packed[g], w_scale[g], dtype)
            assert torch.equal(out[g], want), f"group {g}"


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_opcheck_and_bad_input(device: str) -> None:
    x_q = torch.randint(-128, 128, (3, 2, 130), dtype=torch.int8, device=device)
    x_scale = torch.rand(3, 2, device=device)
    packed = [ref.pack_ternary(torch.randint(-1, 2, (9, 130), dtype=torch.int8)).to(device) for _ in range(3)]
    w_scale = [torch.rand((), device=device) for _ in range(3)]
    torch.library.opcheck(torch.ops.mmfree.ternary_matmul_grouped, (x_q, x_scale, packed, w_scale, torch.bfloat16))
    with pytest.raises(RuntimeError, match="one 'packed' and one 'w_scale' per group"):
        torch.ops.mmfree.ternary_matmul_grouped(x_q, x_scale, packed[:2], w_scale, torch.float32)
    other = ref.pack_ternary(torch.randint(-1, 2, (10, 130), dtype=torch.int8)).to(device)
    with pytest.raises(RuntimeError, match="same N rows"):
        torch.ops.mmfree.ternary_matmul_grouped(x_q, x_scale, [*packed[:2], other], w_scale, torch.float32)
    with pytest.raises(RuntimeError, match="'x_scale' must have shape"):
        torch.ops.mmfree.ternary_matmul_grouped(x_q, x_scale[:, :1].contiguous(), packed, w_scale, torch.float32)
    with pytest.raises(RuntimeError, match="'x_q' must have dtype"):
        torch.ops.mmfree.ternary_matmul_grouped(x_q.float(), x_scale, packed, w_scale, torch.float32)
