"""Fused BitLinear lm_head + cross-entropy: the training loss without the [M, V] logits.

:func:`ternary_linear_cross_entropy` equals
``F.cross_entropy(reference.bit_linear(x, weight, norm_weight, eps).float(), labels,
ignore_index=ignore_index)`` (mean over the rows whose label is not ``ignore_index``) and
its straight-through gradients, but walks the rows in chunks of ``chunk_rows``: per chunk it
normalizes and quantizes the rows (``rms_norm_quant``), forms the chunk's logits with the
ternary product in x's dtype, takes the log-softmax and the logit gradient right there, sends
that gradient through ``ternary_linear_packed_backward`` (dX: the transposed ternary product
and the RMSNorm backward) and adds ``dLogits^T @ x_deq`` into an fp32 dW. Only one chunk's
logits (and their fp32 softmax) are ever alive; the latent weight is ternarized and packed
once per call.

The gradients are computed in the forward pass, as the loss is (one pass over the logits
instead of a second one in the backward, and nothing but three gradients saved): the op
``mmfree::ternary_linear_cross_entropy`` returns ``(loss, grad_x, grad_weight,
grad_norm_weight)`` for ``d loss = 1``, and its autograd formula scales them by the incoming
gradient. With ``with_grad=False`` (no_grad / eval) the three gradients are empty and only
the loss is computed.

The op is a composition of mmfree ops (and torch ops) in Python, registered with
``torch.library.custom_op``: one implementation for CPU and CUDA, opaque to torch.compile.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["default_chunk_rows", "ternary_linear_cross_entropy"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: Logits per chunk (rows * V) when chunk_rows is 0: 2**25 elements, 128 MiB as fp32 (1048 rows
#: at V = 32000: 8 chunks for 8192 rows, each still a GEMM of ~170 GFLOP at K = 2560).
_CHUNK_ELEMENTS = 1 << 25
#: torch.mm(a, b, out_dtype=torch.float32) (16-bit operands, fp32 result) exists on CUDA.
_HAS_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk that keep one chunk's fp32 logits near 128 MiB (at least 16 rows)."""
    return max(16, _CHUNK_ELEMENTS // max(1, vocab_size))


def ternary_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 1e-6,
    ignore_index: int = -100,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy of the BitLinear logits ``x [.., K] -> [.., V]`` against ``labels [..]``.

    ``weight`` is the latent lm_head weight ``[V, K]``, ``norm_weight`` its input RMSNorm
    ``[K]``, ``labels`` int64 with x's leading shape (``ignore_index`` rows do not count).
    ``chunk_rows`` rows are processed at a time (0: :func:`default_chunk_rows`). Returns a
    0-dim fp32 loss (float64 for float64 x), differentiable in x, weight and norm_weight
    (straight-through estimator, as :func:`mmfree_ext.ops.ternary_linear`). Never materializes
    more than one chunk of logits.
    """
    with_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or norm_weight.requires_grad)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    labels2 = labels.reshape(-1)
    loss, _, _, _ = torch.ops.mmfree.ternary_linear_cross_entropy(
        x2, weight, norm_weight, labels2, eps, ignore_index, chunk_rows, with_grad
    )
    return loss


# ---- argument checks (shared by the implementation and the fake kernel) --------------------


def _check_args(
    x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int
):
    torch._check(x.dtype in _FLOATS, lambda: f"mmfree: argument 'x' must be a floating tensor, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: f"mmfree: argument 'x' must be 2-D [M, K], got shape {tuple(x.shape)}")
    k = x.shape[1]
    torch._check(k >= 1, lambda: "mmfree: argument 'x' must have K >= 1 columns")
    torch._check(
        weight.dtype in _FLOATS, lambda: f"mmfree: argument 'weight' must be a floating tensor, got {weight.dtype}"
    )
    torch._check(
        weight.dim() == 2 and weight.shape[1] == k,
        lambda: f"mmfree: argument 'weight' must be [V, K] with K={k}, got shape {tuple(weight.shape)}",
    )
    torch._check(weight.shape[0] >= 1, lambda: "mmfree: argument 'weight' must have V >= 1 rows")
    torch._check(
        norm_weight.dtype in _FLOATS,
        lambda: f"mmfree: argument 'norm_weight' must be a floating tensor, got {norm_weight.dtype}",
    )
    torch._check(
        norm_weight.dim() == 1 and norm_weight.shape[0] == k,
        lambda: f"mmfree: argument 'norm_weight' must be 1-D of size K={k}, got shape {tuple(norm_weight.shape)}",
    )
    torch._check(
        labels.dtype == torch.int64, lambda: f"mmfree: argument 'labels' must have dtype int64, got {labels.dtype}"
    )
    torch._check(
        labels.dim() == 1 and labels.shape[0] == x.shape[0],
        lambda: f"mmfree: argument 'labels' must be 1-D [M] with M={x.shape[0]}, got shape {tuple(labels.shape)}",
    )
    torch._check(chunk_rows >= 0, lambda: f"mmfree: argument 'chunk_rows' must be >= 0, got {chunk_rows}")
    for name, t in (("weight", weight), ("norm_weight", norm_weight), ("labels", labels)):
        torch._check(
            t.device == x.device,
            lambda name=name, t=t: f"mmfree: argument '{name}' is on {t.device} but 'x' is on {x.device}",
        )


def _outputs_like(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, with_grad: bool):
    loss = x.new_empty((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not with_grad:
        return loss, x.new_empty(0), weight.new_empty(0), norm_weight.new_empty(0)
    return loss, torch.empty_like(x), torch.empty_like(weight), torch.empty_like(norm_weight)


# ---- the op ---------------------------------------------------------------------------------


def _accumulate_dw(acc: torch.Tensor, dlogits: torch.Tensor, x_deq: torch.Tensor) -> None:
    """``acc (fp32) += dlogits^T @ x_deq``. 16-bit operands on CUDA multiply in their dtype with
    fp32 accumulation (what a 16-bit nn.Linear's dW does); everything else in fp32."""
    if dlogits.dtype == torch.float32:
        acc.addmm_(dlogits.t(), x_deq)
    elif dlogits.is_cuda and _HAS_MM_OUT_DTYPE:
        acc.add_(torch.mm(dlogits.t(), x_deq, out_dtype=torch.float32))
    elif dlogits.is_cuda:  # older torch: 16-bit product rounded per chunk, summed in fp32
        acc.add_(torch.mm(dlogits.t(), x_deq))
    else:  # no 16-bit -> fp32 product on CPU: widen (exact) and multiply in fp32
        acc.addmm_(dlogits.t().float(), x_deq.float())


@torch.library.custom_op("mmfree::ternary_linear_cross_entropy", mutates_args=())
def _ternary_linear_cross_entropy_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    ignore_index: int,
    chunk_rows: int,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_args(x, weight, norm_weight, labels, chunk_rows)
    mm = torch.ops.mmfree
    m, k = x.shape
    v = weight.shape[0]
    f64 = x.dtype == torch.float64
    logit_dtype = torch.float32 if f64 else x.dtype  # the BitLinear's output dtype (fp32 for f64)
    ce_dtype = torch.float64 if f64 else torch.float32
    rows = chunk_rows if chunk_rows > 0 else default_chunk_rows(v)
    x = x.contiguous()
    # One fp32 copy of the norm weight: exact, and it makes the RMSNorm backward return dg in fp32.
    nw32 = norm_weight.float().contiguous()
    packed, w_scale = mm.quantize_ternary(weight.contiguous())

    valid = labels != ignore_index
    if not labels.is_cuda:
        bad = valid & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"mmfree: argument 'labels' must hold class ids in [0, {v}) or ignore_index={ignore_index}, "
                f"got {int(labels[i])} at row {i}"
            )
    n_valid = valid.sum().to(ce_dtype)
    inv_n = 1.0 / n_valid  # nan loss (0/0) when every row is ignored, as F.cross_entropy
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)

    loss_sum = torch.zeros((), dtype=ce_dtype, device=x.device)
    if with_grad:
        grad_x = torch.empty_like(x)
        dw = torch.zeros((v, k), dtype=torch.float32, device=x.device)
        dnw = torch.zeros(k, dtype=torch.float32, device=x.device)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        xc = x[r0:r1]
        x_q, x_scale = mm.rms_norm_quant(xc.float() if f64 else xc, nw32, eps)
        logits = mm.ternary_matmul(x_q, x_scale, packed, w_scale, logit_dtype)
        # One pass from the compute dtype to the fp32 log-probabilities (no separate upcast).
        z = torch.log_softmax(logits, dim=1, dtype=ce_dtype)
        del logits
        vc = valid[r0:r1]
        lc = safe_labels[r0:r1]
        picked = z.gather(1, lc)  # log p(label) = -(row loss)
        loss_sum = loss_sum - (picked.squeeze(1) * vc).sum()
        if not with_grad:
            continue
        # dLoss/dlogits = (softmax - onehot) / n_valid on counted rows, 0 on ignored ones.
        z.exp_()
        z.scatter_add_(1, lc, torch.full_like(picked, -1.0))
        z.mul_(torch.where(vc, inv_n, torch.zeros_like(inv_n)).unsqueeze(1))  # 0 (not nan) if all ignored
        dlogits = z.to(torch.float32 if f64 else x.dtype)  # what a 16-bit autograd graph holds
        del z
        gx, gnw = mm.ternary_linear_packed_backward(dlogits, xc, packed, w_scale, nw32, eps)
        grad_x[r0:r1] = gx
        dnw += gnw
        # x_q * x_scale formed in fp32 and rounded once to dLogits' dtype (as ternary_linear_backward).
        x_deq = (x_q.float() * x_scale.unsqueeze(1)).to(dlogits.dtype)
        _accumulate_dw(dw, dlogits, x_deq)
    loss = loss_sum * inv_n
    if not with_grad:
        return loss, x.new_empty(0), weight.new_empty(0), norm_weight.new_empty(0)
    return loss, grad_x, dw.to(weight.dtype), dnw.to(norm_weight.dtype)


@_ternary_linear_cross_entropy_op.register_fake
def _ternary_linear_cross_entropy_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    ignore_index: int,
    chunk_rows: int,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_args(x, weight, norm_weight, labels, chunk_rows)
    return _outputs_like(x, weight, norm_weight, with_grad)


# ---- autograd: the gradients were computed with the loss; scale them -----------------------


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    with_grad = inputs[7]
    ctx.with_grad = with_grad
    _, gx, gw, gnw = output
    ctx.save_for_backward(gx, gw, gnw)


def _backward(ctx: Any, grad_loss: torch.Tensor, *unused: Any) -> tuple[torch.Tensor | None, ...]:
    if not ctx.with_grad:
        raise RuntimeError(
            "mmfree: ternary_linear_cross_entropy was called with with_grad=False; call it with "
            "with_grad=True (ternary_linear_cross_entropy() does so when a gradient is needed)"
        )
    gx, gw, gnw = ctx.saved_tensors
    g = grad_loss.float()
    return (gx * g.to(gx.dtype), gw * g.to(gw.dtype), gnw * g.to(gnw.dtype), None, None, None, None, None)


_ternary_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
