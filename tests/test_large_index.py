"""64-bit index math: ops whose element counts pass 2^31 (M*K, rows*K, B*T*D, N*row_bytes)
give the reference's result in the rows past the 2^31 boundary (docs/indexing.md has the
review of every kernel's index math).

CPU cases need about 3 GiB and run where that much memory is free (marked slow); CUDA cases
are sized past 2^31 elements for the H200 (up to ~20 GB each) and run where CUDA is.
Each checks the last rows (whose offsets pass 2^31) against the reference on those rows.
"""

from __future__ import annotations

import pytest
import torch

import mmfree_ext
from mmfree_ext import reference as ref

BIG = 2**31


def _mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _need_cpu_memory(gib: float) -> None:
    if _mem_available_gib() < gib:
        pytest.skip(f"needs {gib} GiB of free memory")


def _need_cuda_memory(gib: float) -> None:
    if not mmfree_ext.cuda_available():
        pytest.skip("no CUDA")
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


def _tail_rows(n_rows: int, k: int) -> slice:
    """The last few rows: their first element lies past 2^31."""
    assert (n_rows - 3) * k >= BIG, "test not sized past the boundary"
    return slice(n_rows - 3, n_rows)


def _matmul_case(device: str, k: int = 4096, n: int = 5):
    m = BIG // k + 4
    x_q = torch.empty(m, k, dtype=torch.int8, device=device)
    x_q[:-8].fill_(1)
    x_q[-8:] = torch.randint(-128, 128, (8, k), dtype=torch.int8, device=device)
    x_scale = torch.rand(m, device=device)
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    return x_q, x_scale, ref.pack_ternary(w_q).to(device), torch.tensor(0.02, device=device), m


def _check_matmul(device: str) -> None:
    x_q, x_scale, packed, w_scale, m = _matmul_case(device)
    y = mmfree_ext.ternary_matmul(x_q, x_scale, packed, w_scale)
    rows = _tail_rows(m, x_q.shape[1])
    expected = ref.ternary_matmul(x_q[rows].cpu(), x_scale[rows].cpu(), packed.cpu(), w_scale.cpu())
    assert torch.equal(y[rows].cpu(), expected)
    first = ref.ternary_matmul(x_q[:2].cpu(), x_scale[:2].cpu(), packed.cpu(), w_scale.cpu())
    assert torch.equal(y[:2].cpu(), first)


def _check_unpack(device: str, k: int = 65536) -> None:
    n = BIG // k + 4
    codes = torch.randint(-1, 2, (8, k), dtype=torch.int8)
    packed = ref.pack_ternary(codes).to(device).repeat(n // 8 + 1, 1)[:n].contiguous()
    out = mmfree_ext.unpack_ternary(packed, k)
    rows = _tail_rows(n, k)
    assert torch.equal(out[rows].cpu(), ref.unpack_ternary(packed[rows].cpu(), k))


@pytest.mark.slow
def test_cpu_ternary_matmul_past_2g_elements() -> None:
    _need_cpu_memory(4.0)
    _check_matmul("cpu")


@pytest.mark.slow
def test_cpu_unpack_ternary_past_2g_elements() -> None:
    _need_cpu_memory(4.0)
    _check_unpack("cpu")


# ---- CUDA ---------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_ternary_matmul_past_2g_elements() -> None:
    _need_cuda_memory(6)
    _check_matmul("cuda")


@pytest.mark.cuda
def test_cuda_unpack_ternary_past_2g_elements() -> None:
    _need_cuda_memory(6)
    _check_unpack("cuda")


@pytest.mark.cuda
def test_cuda_quantize_ternary_past_2g_elements() -> None:
    _need_cuda_memory(12)
    k = 8192
    n = BIG // k + 4
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    packed, scale = mmfree_ext.quantize_ternary(w)
    truth = w.float().abs().double().mean()
    assert abs(scale.item() - truth.item()) <= 1e-4 * truth.item()
    rows = _tail_rows(n, k)
    w_q = ref.round_half_away(w[rows].float().cpu() * (1.0 / scale.cpu())).clamp(-1, 1).to(torch.int8)
    assert torch.equal(mmfree_ext.unpack_ternary(packed[rows].contiguous(), k).cpu(), w_q)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1024, 5000])  # vector (warp/block) and generic row kernels
def test_cuda_norm_ops_past_2g_elements(k: int) -> None:
    _need_cuda_memory(24)
    rows = BIG // k + 4
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(k, device="cuda") + 0.5
    tail = _tail_rows(rows, k)
    xt = x[tail].cpu()
    x_q, x_scale = mmfree_ext.rms_norm_quant(x, w)
    q_ref, s_ref = ref.rms_norm_quant(xt, w.cpu())
    assert (x_q[tail].cpu().int() - q_ref.int()).abs().max() <= 1
    torch.testing.assert_close(x_scale[tail].cpu(), s_ref, rtol=1e-5, atol=0)
    del x_q, x_scale
    y, _ = mmfree_ext.rms_norm(x, w)
    torch.testing.assert_close(y[tail].cpu().float(), ref.rms_norm(xt, w.cpu())[0].float(), rtol=1e-2, atol=1e-2)
    del y
    g = mmfree_ext.rms_norm_swish_gate(x, x, w)
    torch.testing.assert_close(
        g[tail].cpu().float(), ref.rms_norm_swish_gate(xt, xt, w.cpu()).float(), rtol=1e-2, atol=1e-2
    )


@pytest.mark.cuda
def test_cuda_rms_norm_backward_past_2g_elements() -> None:
    _need_cuda_memory(30)
    k = 2048
    rows = BIG // k + 4
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    w = torch.rand(k, device="cuda") + 0.5
    dx, dw = torch.ops.mmfree.rms_norm_backward(dy, x, w, 1e-6, None, None)
    tail = _tail_rows(rows, k)
    xt = x[tail].cpu().float().requires_grad_(True)
    wt = w.cpu().clone().requires_grad_(True)
    ref.rms_norm(xt, wt)[0].backward(dy[tail].cpu().float())
    torch.testing.assert_close(dx[tail].cpu().float(), xt.grad, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(dw).all()


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["panels", "mma"])
def test_cuda_ternary_matmul_t_past_2g_elements(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_cuda_memory(12)
    monkeypatch.setenv("MMFREE_TERNARY_T_CUDA", impl)
    k, n = 4096, 16
    m = BIG // k + 4
    grad = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    packed = ref.pack_ternary(w_q).cuda()
    out = mmfree_ext.ternary_matmul_t(grad, packed, torch.tensor(0.5, device="cuda"), k)
    tail = _tail_rows(m, k)
    truth = grad[tail].cpu().double() @ (w_q.double() * 0.5)
    torch.testing.assert_close(out[tail].cpu().double(), truth, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("varlen", [False, True])
def test_cuda_mlgru_scan_past_2g_elements(varlen: bool) -> None:
    _need_cuda_memory(30)
    d, t = 2048, 8192
    b = BIG // (t * d) + 1  # B*T*D > 2^31
    i = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16)
    f = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16)
    if varlen:
        i, f = i.view(1, b * t, d), f.view(1, b * t, d)
        cu = torch.arange(0, b * t + 1, t, device="cuda", dtype=torch.int32)
        h, h_last = mmfree_ext.mlgru_scan(i, f, cu_seqlens=cu)
        last_i, last_f, last_h = i[:, -t:], f[:, -t:], h[:, -t:]
    else:
        h, h_last = mmfree_ext.mlgru_scan(i, f)
        last_i, last_f, last_h = i[-1:], f[-1:], h[-1:]
    assert (i.numel() - last_i.numel()) >= BIG
    rh, rl = ref.mlgru_scan(last_i.cpu(), last_f.cpu())
    torch.testing.assert_close(last_h[:, -64:].cpu().float(), rh[:, -64:].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h_last[-1:].cpu(), rl, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("path", [0, 3], ids=["auto", "lanes"])
def test_cuda_mlgru_scan_backward_past_2g_elements(path: int) -> None:
    """The backward (the v4 lanes kernels at this shape, forced or by auto) past 2^31 elements:
    the last sequence's gradients against the CPU kernels' backward of that sequence alone
    (sequences are independent; dL/dlb sums over all of them and is not compared)."""
    _need_cuda_memory(40)
    d, t = 2048, 8192
    b = BIG // (t * d) + 1  # B*T*D > 2^31
    i = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16)
    f = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16)
    gh = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16)
    ghl = torch.randn(b, d, device="cuda")
    lb = torch.rand(d, device="cuda") * 0.5
    gi, gf, _, gh0 = torch.ops.mmfree.mlgru_scan_backward(gh, ghl, i, f, lb, None, None, None, path)
    assert (i.numel() - t * d) >= BIG
    base = torch.ops.mmfree.mlgru_scan_backward(
        gh[-1:].cpu(), ghl[-1:].cpu(), i[-1:].cpu(), f[-1:].cpu(), lb.cpu(), None, None, None
    )
    for name, ours, want in (("i", gi[-1:], base[0]), ("f", gf[-1:], base[1]), ("h0", gh0[-1:], base[3])):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(ours.cpu().float(), want.float(), rtol=2e-2, atol=2e-2 * scale, msg=name)
