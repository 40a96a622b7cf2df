"""Plain-PyTorch reference for every mmfree-ext op and for the whole MMfreeLM model.

Written from ``SPEC.md`` (the ground truth for the math), with no custom ops and no C++,
so that the C++/CPU and CUDA kernels can be tested against it. Conventions that the
kernels must reproduce bit for bit:

* Rounding is round-half-away-from-zero (C ``roundf``, as in the paper's Triton code),
  see :func:`round_half_away`.
* Statistics (RMS, max, mean) are computed in fp32 whatever the input dtype; results are
  cast back to the input dtype (round to nearest even) unless a function says otherwise.
* RMSNorm: ``xn = (x_f32 * rsqrt(sum(x_f32^2, -1) / K + eps)) * w_f32``, in that order.
* Activation quant (per row): ``amax = max(max|xn|, 1e-5)``, ``s = 127 / amax``,
  ``x_q = clamp(round_half_away(xn * s), -128, 127)``, ``x_scale = amax / 127``.
* Weight ternarization: ``w_scale = max(mean|W_f32|, 1e-5)``, ``s_w = 1 / w_scale``,
  ``W_q = clamp(round_half_away(W_f32 * s_w), -1, 1)``.
* Ternary product: ``y = ((float(acc) * x_scale[row]) * w_scale).to(out_dtype)`` where
  ``acc = x_q @ W_q^T`` is exact integer arithmetic.
* Packed ternary layout: see :func:`pack_ternary`.

Reductions (the sum of squares, mean|W|) follow torch's own summation order here; a
kernel summing in another order can differ in the last ulp of the statistic, which can move
an int8 code by one only when ``xn * s`` lies within a few ulp of a ``.5`` tie.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ReferenceConfig",
    "ReferenceMMfreeLM",
    "bit_linear",
    "bit_linear_packed",
    "default_intermediate_size",
    "lower_bounds_to_layer_lb",
    "mlgru_scan",
    "pack_ternary",
    "packed_row_bytes",
    "quantize_activation",
    "quantize_rows_int8",
    "quantize_ternary",
    "rms_norm",
    "rms_norm_quant",
    "rms_norm_quant_multi",
    "rms_norm_swish_gate",
    "round_half_away",
    "ternarize",
    "ternary_matmul",
    "ternary_matmul_acc",
    "unpack_ternary",
]

# Smallest allowed max|xn| and mean|W|: keeps the scales finite for all-zero rows/tensors.
SCALE_MIN = 1e-5
# Weights per packed block and bytes per block (4 two-bit codes per byte).
PACK_BLOCK = 128
PACK_BLOCK_BYTES = PACK_BLOCK // 4


# ----------------------------------------------------------------------------------------
# Rounding
# ----------------------------------------------------------------------------------------


def round_half_away(x: Tensor) -> Tensor:
    """Round to the nearest integer, ties away from zero (C ``roundf``), in x's dtype.

    ``torch.round`` rounds ties to even; we keep its result everywhere except at exact
    ties. ``|x| - floor(|x|)`` is exact in floating point (no rounding happens when the
    integer part is subtracted), so the tie test is exact too. ``floor(x + 0.5)`` is *not*
    used: it is wrong for e.g. 0.49999997, where ``x + 0.5`` rounds up to 1.0.
    """
    r = torch.round(x)
    ax = x.abs()
    fl = torch.floor(ax)
    tie = (ax - fl) == 0.5
    return torch.where(tie, torch.copysign(fl + 1.0, x), r)


# ----------------------------------------------------------------------------------------
# RMSNorm family
# ----------------------------------------------------------------------------------------


def _rstd(xf: Tensor, eps: float) -> Tensor:
    """fp32 ``rsqrt(mean(x^2) + eps)`` over the last dim, keepdim. Mean = sum / K."""
    k = xf.shape[-1]
    return torch.rsqrt((xf * xf).sum(dim=-1, keepdim=True) / k + eps)


def _normalize(xf: Tensor, weight: Tensor, eps: float) -> Tensor:
    """fp32 RMSNorm of an fp32 tensor: ``(x * rstd) * w`` (this multiplication order)."""
    return (xf * _rstd(xf, eps)) * weight.float()


def rms_norm(
    x: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dim, optionally fused with a residual add.

    Without ``residual``: returns ``(RMSNorm(x) * weight, x)``.
    With ``residual``: the sum ``s = x_f32 + residual_f32`` is formed in fp32; the
    normalized output is computed from the fp32 ``s`` (not from its rounded copy), and
    ``residual_out = s.to(x.dtype)`` is what the next residual add starts from.
    ``y`` is in x's dtype.
    """
    xf = x.float()
    if residual is not None:
        xf = xf + residual.float()
        residual_out = xf.to(x.dtype)
    else:
        residual_out = x
    y = _normalize(xf, weight, eps).to(x.dtype)
    return y, residual_out


def quantize_activation(xn: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 quantization of an already-normalized activation.

    ``xn`` is taken in fp32. Returns ``x_q`` (int8, same shape) and ``x_scale`` (fp32,
    shape ``xn.shape[:-1]``), the dequantization multiplier ``amax / 127``.
    A row holding a NaN or an infinity (NaN/inf input, weight or eps) gets codes 0 and
    ``x_scale`` NaN, so the NaN reaches every product of the row (docs/numerics.md); an
    all-zero row gets codes 0 and the finite scale ``1e-5 / 127`` (products exactly 0).
    """
    xf = xn.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)  # NaN if the row holds one, inf for an inf
    bad = ~torch.isfinite(amax)
    amax = amax.clamp(min=SCALE_MIN)
    s = 127.0 / amax  # fp32 division, as the kernels must do it
    v = round_half_away(xf * s).clamp(-128, 127)
    x_q = torch.where(bad, torch.zeros_like(v), v).to(torch.int8)
    x_scale = torch.where(bad, torch.full_like(amax, float("nan")), amax / 127.0).squeeze(-1)
    return x_q, x_scale


def quantize_rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 quantization of a gradient (the opt-in int8 dX's dY, SwitchBack-style).

    ``s = max|x| / 127`` per row (IEEE fp32 division; 1 where that is 0: an all-zero row, or
    an fp32 row of subnormals below ``127 * 2**-149``, whose codes then round to 0) and
    ``q = round_half_even(x / s)`` clamped to ``[-127, 127]``, so ``q * s`` is within ``s / 2``
    of ``x`` for a normal ``s``. Unlike :func:`quantize_activation` the range is symmetric and rounding is half to
    even. A row holding a NaN or an inf gets codes 0 and ``s`` NaN (docs/numerics.md).
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # NaN if the row holds one, inf for an inf
    bad = ~torch.isfinite(amax)
    # A tensor divisor: true division on every device (a Python scalar divisor becomes a
    # multiply by its reciprocal on CUDA).
    s = amax / torch.full_like(amax, 127.0)
    s = torch.where(s > 0, s, torch.ones_like(s))
    s = torch.where(bad, torch.full_like(amax, float("nan")), s)
    v = torch.round(xf / torch.where(bad, torch.ones_like(s), s).unsqueeze(-1)).clamp(-127, 127)
    q = torch.where(bad.unsqueeze(-1), torch.zeros_like(v), v).to(torch.int8)
    return q, s


def rms_norm_quant(x: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """RMSNorm followed by per-row int8 activation quantization (BitLinear's input side).

    Returns ``(x_q int8 [.., K], x_scale fp32 [..])``.
    """
    return quantize_activation(_normalize(x.float(), weight, eps))


def rms_norm_quant_multi(x: Tensor, weights: Sequence[Tensor], eps: float = 1e-6) -> list[tuple[Tensor, Tensor]]:
    """:func:`rms_norm_quant` for several norm weights sharing one input.

    The MLGRU's i/f/g projections each own a norm weight but read the same ``a``; the
    rstd is computed once and reused, so every output equals ``rms_norm_quant(x, w_k)``.
    """
    xf = x.float()
    xr = xf * _rstd(xf, eps)
    return [quantize_activation(xr * w.float()) for w in weights]


def rms_norm_swish_gate(g: Tensor, h: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """MLGRU output gate: ``RMSNorm(g) * weight * silu(h)`` in fp32, output in g's dtype.

    Note the order (SPEC section 2): the norm is on ``g``, the SiLU on the hidden state ``h``.
    """
    hf = h.float()
    return (_normalize(g.float(), weight, eps) * (hf * torch.sigmoid(hf))).to(g.dtype)


# ----------------------------------------------------------------------------------------
# Ternary weights: quantization and packing
# ----------------------------------------------------------------------------------------


def ternarize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean ternarization of a latent weight tensor.

    Returns ``W_q`` (int8 in {-1, 0, 1}, same shape) and ``w_scale`` (0-dim fp32 tensor,
    the dequantization multiplier ``max(mean|W|, 1e-5)``).
    """
    wf = weight.float()
    # An empty weight has mean|W| = 0 (not torch's NaN mean of nothing): scale 1e-5.
    w_scale = (wf.abs().mean() if wf.numel() else wf.new_zeros(())).clamp(min=SCALE_MIN)
    s_w = 1.0 / w_scale  # fp32 reciprocal, then multiply (not a division by w_scale)
    w_q = round_half_away(wf * s_w).clamp(-1, 1).to(torch.int8)
    return w_q, w_scale


def packed_row_bytes(in_features: int) -> int:
    """Bytes per packed output row: ``ceil(K / 128) * 32``."""
    return -(-in_features // PACK_BLOCK) * PACK_BLOCK_BYTES


def pack_ternary(w_q: Tensor) -> Tensor:
    """Pack ternary int8 weights ``[N, K]`` into the canonical 2-bit layout.

    Layout: code = w + 1 (0 -> -1, 1 -> 0, 2 -> +1; 3 is invalid). Each output row is split
    along K into blocks of 128 weights = 32 bytes. In a block, bits ``[2j, 2j+1]`` of byte
    ``b`` hold the weight at ``k = block * 128 + j * 32 + b`` (j = 0 is the least significant
    pair), so one 32-byte load gives four 32-wide contiguous K slices. Positions k >= K are
    padded with code 1 (weight 0). Returns uint8 ``[N, ceil(K/128) * 32]``, contiguous.
    """
    if w_q.dim() != 2:
        raise ValueError(f"pack_ternary expects [N, K], got shape {tuple(w_q.shape)}")
    if w_q.numel() and (w_q.min() < -1 or w_q.max() > 1):
        raise ValueError("pack_ternary expects values in {-1, 0, 1}")
    n, k = w_q.shape
    nb = -(-k // PACK_BLOCK)
    codes = torch.ones((n, nb * PACK_BLOCK), dtype=torch.int32, device=w_q.device)
    codes[:, :k] = w_q.to(torch.int32) + 1
    # [N, block, j, b]: k = block*128 + j*32 + b
    codes = codes.view(n, nb, 4, PACK_BLOCK_BYTES)
    shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=w_q.device).view(1, 1, 4, 1)
    packed = (codes << shifts).sum(dim=2)  # disjoint bit fields: sum == bitwise or
    return packed.to(torch.uint8).reshape(n, nb * PACK_BLOCK_BYTES).contiguous()


def unpack_ternary(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_ternary`: uint8 ``[N, ceil(K/128)*32]`` -> int8 ``[N, K]``.

    Raises ``ValueError`` on a code 3 anywhere in the first K positions, so a corrupt
    packing never silently reads as a weight.
    """
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError("unpack_ternary expects a 2-D uint8 tensor")
    n, row_bytes = packed.shape
    if row_bytes != packed_row_bytes(in_features):
        raise ValueError(
            f"packed row has {row_bytes} bytes, expected {packed_row_bytes(in_features)} for in_features={in_features}"
        )
    nb = row_bytes // PACK_BLOCK_BYTES
    p = packed.to(torch.int32).view(n, nb, 1, PACK_BLOCK_BYTES)
    shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=packed.device).view(1, 1, 4, 1)
    codes = ((p >> shifts) & 3).reshape(n, nb * PACK_BLOCK)[:, :in_features]
    if codes.numel() and bool((codes == 3).any()):
        raise ValueError("invalid ternary code 3 in packed weights")
    return (codes - 1).to(torch.int8)


def quantize_ternary(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Ternarize and pack a latent weight ``[N, K]``: returns ``(packed uint8, w_scale)``.

    ``w_scale`` is a one-element fp32 tensor (0-dim), kept separate from the packed bytes.
    """
    w_q, w_scale = ternarize(weight)
    return pack_ternary(w_q), w_scale


# ----------------------------------------------------------------------------------------
# Ternary matmul
# ----------------------------------------------------------------------------------------


def ternary_matmul_acc(x_q: Tensor, w_q: Tensor) -> Tensor:
    """Exact integer accumulators ``x_q @ W_q^T``: int8 ``[.., K]`` x int8 ``[N, K]`` -> int32 ``[.., N]``.

    Computed in float64, which is exact here: every product and partial sum is an integer
    of magnitude <= 128 * K, far below 2^53 (and int32 holds it for K < 2^24).
    """
    acc = torch.matmul(x_q.to(torch.float64), w_q.to(torch.float64).t())
    return acc.to(torch.int32)


def ternary_matmul(
    x_q: Tensor,
    x_scale: Tensor,
    packed: Tensor,
    w_scale: Tensor,
    in_features: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Dequantized ternary product ``y = (float(acc) * x_scale[row]) * w_scale``.

    ``x_q`` int8 ``[.., K]``, ``x_scale`` fp32 ``[..]``, ``packed`` uint8 ``[N, ceil(K/128)*32]``,
    ``w_scale`` one-element fp32. The rescale is done in fp32 in exactly this order, then
    cast to ``out_dtype``. ``in_features`` defaults to (and must equal) ``x_q.shape[-1]``.
    """
    k = x_q.shape[-1]
    if in_features is not None and in_features != k:
        raise ValueError(f"in_features={in_features} but x_q has K={k}")
    w_q = unpack_ternary(packed, k)
    acc = ternary_matmul_acc(x_q, w_q)
    y = (acc.float() * x_scale.float().unsqueeze(-1)) * w_scale.float().reshape(())
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------
# BitLinear
# ----------------------------------------------------------------------------------------


def bit_linear(x: Tensor, weight: Tensor, norm_weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Training BitLinear: RMSNorm -> int8 activations x ternary weights, STE backward.

    Forward value (bit-identical to :func:`bit_linear_packed`):
    ``((float(x_q @ W_q^T) * x_scale) * w_scale).to(x.dtype)``.

    Backward (SPEC section 1, both roundings treated as identity):
    ``dL/dxn = dY @ (W_q * w_scale)``, ``dL/dW = dY^T @ (x_q * x_scale)``, then autograd's
    RMSNorm backward (fp32) gives ``dL/dx`` and ``dL/dnorm_weight``. Any leading shape.

    The gradient is attached with zero-valued carriers ``t - t.detach()``: their value is
    exactly 0, so the forward stays the exact integer result, while their gradients are
    exactly the two STE products (no ``W + (W_deq - W).detach()`` float round-off).
    """
    k = x.shape[-1]
    lead = x.shape[:-1]
    xn = _normalize(x.float().reshape(-1, k), norm_weight, eps)  # differentiable, fp32
    x_q, x_scale = quantize_activation(xn.detach())
    w_q, w_scale = ternarize(weight.detach())

    acc = ternary_matmul_acc(x_q, w_q)
    y = (acc.float() * x_scale.unsqueeze(-1)) * w_scale  # exact forward value, fp32

    if xn.requires_grad or weight.requires_grad:
        w_deq = w_q.float() * w_scale  # constants (no grad)
        x_deq = x_q.float() * x_scale.unsqueeze(-1)
        t_x = xn @ w_deq.t()  # d/dxn = dY @ w_deq
        t_w = x_deq @ weight.float().t()  # d/dW = dY^T @ x_deq
        y = y + (t_x - t_x.detach()) + (t_w - t_w.detach())
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


def bit_linear_packed(x: Tensor, packed: Tensor, w_scale: Tensor, norm_weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Inference BitLinear on packed ternary weights; output in x's dtype, any leading shape."""
    x_q, x_scale = rms_norm_quant(x, norm_weight, eps)
    return ternary_matmul(x_q, x_scale, packed, w_scale, x.shape[-1], out_dtype=x.dtype)


# ----------------------------------------------------------------------------------------
# MLGRU scan
# ----------------------------------------------------------------------------------------


def _scan_fp32(f: Tensor, c: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """h_t = f_t * h_{t-1} + c_t over dim 1 (fp32, multiply then add: two roundings)."""
    outs = []
    for t in range(f.shape[1]):
        h = f[:, t] * h + c[:, t]
        outs.append(h)
    if not outs:  # T = 0: no steps, the state passes through
        return f.new_empty(f.shape), h
    return torch.stack(outs, dim=1), h


def mlgru_scan(
    i: Tensor,
    f: Tensor,
    lower_bound: Tensor | None = None,
    h0: Tensor | None = None,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MLGRU recurrence (SPEC section 2) from the raw i and f projections.

    ``i``, ``f``: ``[B, T, D]``, any float dtype; all math in fp32:
    ``f_t = lb + (1 - lb) * sigmoid(f)`` (just ``sigmoid(f)`` when ``lower_bound`` is None),
    ``c_t = silu(i) * (1 - f_t)``, ``c_t = 0`` where ``mask[b, t] == 0`` (the state still
    decays by ``f_t`` there), ``h_t = f_t * h_{t-1} + c_t``, ``h_{-1} = h0`` or 0.

    ``lower_bound``: broadcastable to ``[D]``. ``h0``: fp32 ``[B, D]``. ``mask``: ``[B, T]``.
    Varlen: with ``cu_seqlens`` (``[S+1]`` offsets), B must be 1 and T holds S packed
    sequences, each starting from ``h0[s]`` (``h0`` is ``[S, D]``) or zero.

    Returns ``h`` (``[B, T, D]``, input dtype) and ``h_last`` (fp32 ``[B, D]``, or ``[S, D]``
    in varlen mode; a zero-length sequence returns its ``h0``).
    """
    if i.shape != f.shape or i.dim() != 3:
        raise ValueError(f"i and f must both be [B, T, D], got {tuple(i.shape)}, {tuple(f.shape)}")
    b, t_len, d = i.shape
    sig = torch.sigmoid(f.float())
    if lower_bound is not None:
        lb = lower_bound.float()
        ft = lb + (1.0 - lb) * sig
    else:
        ft = sig
    ifl = i.float()
    c = (ifl * torch.sigmoid(ifl)) * (1.0 - ft)
    if mask is not None:
        c = torch.where(mask.to(torch.bool).unsqueeze(-1), c, torch.zeros_like(c))

    if cu_seqlens is None:
        h_init = h0.float() if h0 is not None else i.new_zeros((b, d), dtype=torch.float32)
        h, h_last = _scan_fp32(ft, c, h_init)
        return h.to(i.dtype), h_last

    if b != 1:
        raise ValueError("varlen mlgru_scan (cu_seqlens given) requires B == 1")
    offsets = [int(v) for v in cu_seqlens.tolist()]
    if offsets[0] != 0 or offsets[-1] != t_len or any(a > z for a, z in itertools.pairwise(offsets)):
        raise ValueError(f"cu_seqlens must rise from 0 to T={t_len}, got {offsets}")
    n_seq = len(offsets) - 1
    h_out = torch.empty((1, t_len, d), dtype=torch.float32, device=i.device)
    lasts = []
    for s in range(n_seq):
        lo, hi = offsets[s], offsets[s + 1]
        h_init = h0[s : s + 1].float() if h0 is not None else i.new_zeros((1, d), dtype=torch.float32)
        if hi > lo:
            h_seg, h_last = _scan_fp32(ft[:, lo:hi], c[:, lo:hi], h_init)
            h_out[:, lo:hi] = h_seg
        else:
            h_last = h_init
        lasts.append(h_last)
    h_last_all = torch.cat(lasts, dim=0) if lasts else i.new_zeros((0, d), dtype=torch.float32)
    return h_out.to(i.dtype), h_last_all


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


def lower_bounds_to_layer_lb(lower_bounds: Tensor) -> Tensor:
    """Per-layer forget-gate lower bounds from the ``[L, h]`` parameter, in fp32.

    ``lb = softmax(lower_bounds, 0); lb = cumsum(lb, 0) - lb[0]``: increasing with depth,
    and row 0 is exactly 0 (cumsum's first row *is* ``lb[0]``), so layer 0 has no bound.
    Computed in fp32 whatever the parameter dtype.
    """
    lb = torch.softmax(lower_bounds.float(), dim=0)
    return torch.cumsum(lb, dim=0) - lb[0]


def default_intermediate_size(hidden_size: int, hidden_ratio: int = 4) -> int:
    """HGRNBit's default GLU width: ``256 * ceil(int(h * ratio * 2/3) / 256)``."""
    inner = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * math.ceil(inner / 256)


@dataclass
class ReferenceConfig:
    """The config fields the reference model needs (HF ``hgrn_bit`` names)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int | None = None
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)

    @classmethod
    def from_any(cls, cfg: Any) -> ReferenceConfig:
        """Build from a ReferenceConfig, a mapping, or any object with those attributes."""
        if isinstance(cfg, cls):
            return cfg
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            intermediate_size=get("intermediate_size"),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        )


class _RMSNorm(nn.Module):
    """Holds a ``.weight`` only; the math lives in the functional ops."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class _BitLinear(nn.Module):
    """Latent weight ``[out, in]`` plus its own input RMSNorm (``.norm.weight``); no bias."""

    def __init__(self, in_features: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.norm = _RMSNorm(in_features)

    def forward(self, x: Tensor) -> Tensor:
        return bit_linear(x, self.weight, self.norm.weight, self.eps)


class _MLGRU(nn.Module):
    """Token mixer (HGRNBitAttention with num_heads 1, expand_ratio 1, no short conv)."""

    def __init__(self, h: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.i_proj = _BitLinear(h, h, eps)
        self.f_proj = _BitLinear(h, h, eps)
        self.g_proj = _BitLinear(h, h, eps)
        self.o_proj = _BitLinear(h, h, eps)
        self.g_norm = _RMSNorm(h)

    def forward(
        self,
        a: Tensor,
        lower_bound: Tensor | None,
        h0: Tensor | None,
        mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        i = self.i_proj(a)
        f = self.f_proj(a)
        g = self.g_proj(a)
        h, h_last = mlgru_scan(i, f, lower_bound=lower_bound, h0=h0, mask=mask)
        o = rms_norm_swish_gate(g, h, self.g_norm.weight, self.eps)
        return self.o_proj(o), h_last


class _GLU(nn.Module):
    """Channel mixer: ``down(silu(u[..:I]) * u[..I:])`` with ``u = gate_proj(m)``."""

    def __init__(self, h: int, inter: int, eps: float) -> None:
        super().__init__()
        self.intermediate_size = inter
        self.gate_proj = _BitLinear(h, 2 * inter, eps)
        self.down_proj = _BitLinear(inter, h, eps)

    def forward(self, m: Tensor) -> Tensor:
        u = self.gate_proj(m)
        gate, v = u[..., : self.intermediate_size], u[..., self.intermediate_size :]
        return self.down_proj(F.silu(gate) * v)


class _Block(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.eps = eps
        self.attn_norm = _RMSNorm(h)
        self.attn = _MLGRU(h, eps)
        self.mlp_norm = _RMSNorm(h)
        assert cfg.intermediate_size is not None
        self.mlp = _GLU(h, cfg.intermediate_size, eps)

    def forward(
        self,
        x: Tensor,
        lower_bound: Tensor | None,
        h0: Tensor | None,
        mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        a, _ = rms_norm(x, self.attn_norm.weight, self.eps)
        attn_out, h_last = self.attn(a, lower_bound, h0, mask)
        # Fused add + norm, as the paper's block does: x_new = x + attn_out (fp32 add,
        # stored in x's dtype), m = RMSNorm of the fp32 sum.
        m, x = rms_norm(attn_out, self.mlp_norm.weight, self.eps, residual=x)
        return x + self.mlp(m), h_last


class _Backbone(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.lower_bounds = nn.Parameter(torch.zeros(cfg.num_hidden_layers, cfg.hidden_size))
        self.layers = nn.ModuleList([_Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = _RMSNorm(cfg.hidden_size)


class ReferenceMMfreeLM(nn.Module):
    """Reference HGRNBitForCausalLM (MMfreeLM); state_dict keys match SPEC section 3.

    ``forward(input_ids, state, attention_mask)`` runs all T tokens through the MLGRU
    recurrence starting from ``state`` (one fp32 ``[B, h]`` tensor per layer, None = zeros)
    and returns ``(logits fp32 [B, T, V], new_state)``. Feeding tokens one at a time with the
    returned state gives the same logits as one full forward. Compute runs in the parameter
    dtype (cast the module to bf16 for a bf16 model); scan and statistics are fp32 inside.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = ReferenceConfig.from_any(config)
        self.model = _Backbone(self.config)
        self.lm_head = _BitLinear(self.config.hidden_size, self.config.vocab_size, self.config.rms_norm_eps)
        self.init_weights(0)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> ReferenceMMfreeLM:
        """Deterministic init: embeddings and latent weights ~ N(0, std), norms = 1,
        lower_bounds = 0 (the paper's initialization). Returns self."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "model.lower_bounds":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        return self

    def forward(
        self,
        input_ids: Tensor,
        state: Sequence[Tensor | None] | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        cfg = self.config
        n_layers = cfg.num_hidden_layers
        if state is not None and len(state) != n_layers:
            raise ValueError(f"state must hold {n_layers} tensors, got {len(state)}")
        x = self.model.embeddings(input_ids)
        lb = lower_bounds_to_layer_lb(self.model.lower_bounds)
        new_state: list[Tensor] = []
        for idx, layer in enumerate(self.model.layers):
            h0 = state[idx] if state is not None else None
            # Layer 0 takes no lower bound at all (its lb row is 0 anyway).
            x, h_last = layer(x, lb[idx] if idx > 0 else None, h0, attention_mask)
            new_state.append(h_last)
        xn, _ = rms_norm(x, self.model.norm.weight, cfg.rms_norm_eps)
        logits = self.lm_head(xn)
        return logits.float(), new_state
