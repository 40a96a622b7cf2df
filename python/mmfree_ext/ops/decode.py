"""The model-level decode step ``mmfree::decode_step`` (csrc/kernels/decode.h).

One call runs a whole T=1 step of the packed MMfreeLM: embedding lookup, every layer, the
final norm and the lm_head, updating the fp32 recurrent state ``[L, B, h]`` in place and
returning the logits ``[B, V]`` in the activation (embedding) dtype. Its result is
bit-identical to the op-by-op packed path of :class:`~mmfree_ext.models.MMfreeLMForCausalLM`
on the same device.

The weights come as a handful of stacked tensors (see
:class:`mmfree_ext.models.decode_plan.DecodeWeights`, which builds them from a packed model):

* ``norms [L, 8, h]``: per layer attn_norm, i/f/g_proj.norm, g_norm, o_proj.norm, mlp_norm,
  gate_proj.norm (the order of ``DecodeNorm`` in decode.h);
* ``down_norms [L, I]``; ``final_norms [2, h]`` (model.norm, lm_head.norm);
* ``packed``: ``6 L + 1`` packed weights, per layer i, f, g, o, gate, down, then lm_head;
  ``w_scales`` fp32 ``[6 L + 1]`` in the same order;
* ``lower_bounds`` fp32 ``[L, h]`` (row 0 unused: layer 0 has no lower bound).

Fused device implementations register in C++ for CPU and CUDA; the composite below runs
the same step op by op where none is registered (it is also the ground truth they are
tested against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import packed_row_bytes

__all__ = ["DECODE_MATS_PER_LAYER", "DECODE_NORMS_PER_LAYER", "check_decode_args", "decode_step"]

DECODE_NORMS_PER_LAYER = 8
DECODE_MATS_PER_LAYER = 6
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def decode_step(
    tokens: Tensor,
    state: Tensor,
    embeddings: Tensor,
    lower_bounds: Tensor,
    norms: Tensor,
    down_norms: Tensor,
    packed: list[Tensor],
    w_scales: Tensor,
    final_norms: Tensor,
    eps: float,
) -> Tensor:
    """One decode step of the packed model: ``tokens [B]`` int64 -> logits ``[B, V]``.

    ``state`` fp32 ``[L, B, h]`` is read and overwritten with the new recurrent state. See the
    module docstring for the weight layout. Returns the logits in ``embeddings.dtype``.
    """
    return torch.ops.mmfree.decode_step(
        tokens, state, embeddings, lower_bounds, norms, down_norms, packed, w_scales, final_norms, eps
    )


def _fail(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"mmfree: {msg}")


def check_decode_args(
    tokens: Tensor,
    state: Tensor,
    embeddings: Tensor,
    lower_bounds: Tensor,
    norms: Tensor,
    down_norms: Tensor,
    packed: list[Tensor],
    w_scales: Tensor,
    final_norms: Tensor,
    check: bool = True,
) -> tuple[int, int, int, int, int]:
    """Validate the decode_step arguments (the C++ implementations check the same); returns
    ``(B, L, h, I, V)``. ``check=False`` uses ``torch._check`` (fake kernels) instead of raising."""
    req = _fail if check else (lambda cond, msg: torch._check(cond, lambda: f"mmfree: {msg}"))

    req(
        tokens.dim() == 1 and tokens.dtype == torch.int64,
        f"argument 'tokens' must be int64 [B], got {tokens.dtype} of shape {tuple(tokens.shape)}",
    )
    req(
        embeddings.dim() == 2 and embeddings.dtype in _FLOATS,
        f"argument 'embeddings' must be a float32/bfloat16/float16 [V, h] tensor, got {embeddings.dtype} "
        f"of shape {tuple(embeddings.shape)}",
    )
    vocab, hidden = embeddings.shape
    batch = tokens.shape[0]
    req(
        state.dim() == 3 and state.dtype == torch.float32 and state.shape[1:] == (batch, hidden),
        f"argument 'state' must be float32 [L, B={batch}, h={hidden}], got {state.dtype} of shape {tuple(state.shape)}",
    )
    layers = state.shape[0]
    req(layers >= 1, "argument 'state' must have at least one layer")
    req(state.is_contiguous(), "argument 'state' must be contiguous")
    req(
        lower_bounds.dtype == torch.float32 and tuple(lower_bounds.shape) == (layers, hidden),
        f"argument 'lower_bounds' must be float32 [L={layers}, h={hidden}], got {lower_bounds.dtype} "
        f"of shape {tuple(lower_bounds.shape)}",
    )
    req(
        norms.dtype in _FLOATS and tuple(norms.shape) == (layers, DECODE_NORMS_PER_LAYER, hidden),
        f"argument 'norms' must be a float [L={layers}, {DECODE_NORMS_PER_LAYER}, h={hidden}] tensor, got "
        f"{norms.dtype} of shape {tuple(norms.shape)}",
    )
    req(
        down_norms.dim() == 2 and down_norms.shape[0] == layers and down_norms.dtype == norms.dtype,
        f"argument 'down_norms' must be [L={layers}, I] with the dtype of 'norms' ({norms.dtype}), got "
        f"{down_norms.dtype} of shape {tuple(down_norms.shape)}",
    )
    inter = down_norms.shape[1]
    req(
        tuple(final_norms.shape) == (2, hidden) and final_norms.dtype == norms.dtype,
        f"argument 'final_norms' must be [2, h={hidden}] with the dtype of 'norms', got {final_norms.dtype} "
        f"of shape {tuple(final_norms.shape)}",
    )
    n_mats = DECODE_MATS_PER_LAYER * layers + 1
    req(len(packed) == n_mats, f"argument 'packed' must hold 6 * L + 1 = {n_mats} tensors, got {len(packed)}")
    req(
        w_scales.dtype == torch.float32 and tuple(w_scales.shape) == (n_mats,),
        f"argument 'w_scales' must be float32 [{n_mats}], got {w_scales.dtype} of shape {tuple(w_scales.shape)}",
    )
    rows_cols = [(hidden, hidden)] * 4 + [(2 * inter, hidden), (hidden, inter)]
    for idx, w in enumerate(packed):
        n, k = rows_cols[idx % DECODE_MATS_PER_LAYER] if idx < n_mats - 1 else (vocab, hidden)
        req(
            w.dtype == torch.uint8 and tuple(w.shape) == (n, packed_row_bytes(k)),
            f"argument 'packed[{idx}]' must be uint8 [{n}, {packed_row_bytes(k)}], got {w.dtype} "
            f"of shape {tuple(w.shape)}",
        )
    dev = embeddings.device
    for name, t in (
        ("tokens", tokens),
        ("state", state),
        ("lower_bounds", lower_bounds),
        ("norms", norms),
        ("down_norms", down_norms),
        ("w_scales", w_scales),
        ("final_norms", final_norms),
    ):
        req(t.device == dev, f"argument '{name}' must be on {dev} (the device of 'embeddings'), got {t.device}")
    for idx, w in enumerate(packed):
        req(w.device == dev, f"argument 'packed[{idx}]' must be on {dev}, got {w.device}")
    return batch, layers, hidden, inter, vocab


@torch.library.register_fake("mmfree::decode_step")
def _decode_step_fake(tokens, state, embeddings, lower_bounds, norms, down_norms, packed, w_scales, final_norms, eps):
    batch, _, _, _, vocab = check_decode_args(
        tokens, state, embeddings, lower_bounds, norms, down_norms, packed, w_scales, final_norms, check=False
    )
    return embeddings.new_empty((batch, vocab))


@torch.library.impl("mmfree::decode_step", "CompositeExplicitAutograd")
def _decode_step_composite(
    tokens, state, embeddings, lower_bounds, norms, down_norms, packed, w_scales, final_norms, eps
):
    """The step op by op, exactly as the model's packed forward runs it for T = 1."""
    batch, layers, _, inter, _ = check_decode_args(
        tokens, state, embeddings, lower_bounds, norms, down_norms, packed, w_scales, final_norms
    )
    mm = torch.ops.mmfree
    if batch > 0 and tokens.device.type == "cpu":
        bad = (tokens < 0) | (tokens >= embeddings.shape[0])
        _fail(not bool(bad.any()), f"argument 'tokens' must be in [0, {embeddings.shape[0]}), got {tokens.tolist()}")
    dtype = embeddings.dtype
    x = F.embedding(tokens, embeddings).unsqueeze(1)  # [B, 1, h]
    delta = None
    ws = w_scales.unbind(0)
    for layer in range(layers):
        nw = norms[layer]
        base = DECODE_MATS_PER_LAYER * layer
        if delta is None:
            a, _ = mm.rms_norm(x, nw[0], eps, None)
        else:
            a, x = mm.rms_norm(delta, nw[0], eps, x)
        x_q, x_scale = mm.rms_norm_quant_multi(a, nw[1:4], eps)
        i, f, g = mm.ternary_matmul_grouped(x_q, x_scale, packed[base : base + 3], list(ws[base : base + 3]), dtype)
        lb = lower_bounds[layer] if layer > 0 else None
        h, h_last = mm.mlgru_scan(i, f, lb, state[layer], None, None)
        o_q, o_scale = mm.rms_norm_swish_gate_quant(g, h, nw[4], eps, nw[5], eps)
        attn_out = mm.ternary_matmul(o_q, o_scale, packed[base + 3], ws[base + 3], dtype)
        m, x = mm.rms_norm(attn_out, nw[6], eps, x)
        u = mm.ternary_linear_packed(m, packed[base + 4], ws[base + 4], nw[7], eps)
        t = F.silu(u[..., :inter]) * u[..., inter:]
        delta = mm.ternary_linear_packed(t, packed[base + 5], ws[base + 5], down_norms[layer], eps)
        state[layer].copy_(h_last)
    assert delta is not None
    xn, _ = mm.rms_norm(delta.contiguous(), final_norms[0], eps, x.contiguous())
    x_q, x_scale = mm.rms_norm_quant(xn, final_norms[1], eps)
    logits = mm.ternary_matmul(x_q, x_scale, packed[-1], ws[-1], dtype)
    return logits[:, 0]
