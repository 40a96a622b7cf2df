"""MMfreeLM (HGRNBitForCausalLM) built from the mmfree ops.

Module structure and ``state_dict`` keys are those of the paper's checkpoints (SPEC
section 3, the same as :class:`mmfree_ext.reference.ReferenceMMfreeLM`). A model starts with
latent float weights (trainable: BitLinear's ternary_linear and mlgru_scan carry autograd);
:meth:`MMfreeLMForCausalLM.pack` turns every BitLinear into 2-bit packed weights, after which
the forward runs the fused inference ops (one shared RMSNorm + int8 quantization for the
i/f/g projections, the output gate fused with o_proj's quantization, ternary_matmul).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .. import nn as mnn
from . import _layers as L
from .config import MMfreeLMConfig

__all__ = ["IGNORE_INDEX", "MMfreeLMForCausalLM", "MMfreeLMOutput", "model_memory_bytes", "pack_model"]

#: Label value that the training loss skips (the transformers / F.cross_entropy convention).
IGNORE_INDEX = -100


class _LogitsAndState(NamedTuple):
    logits: Tensor | None
    state: Tensor


class MMfreeLMOutput(_LogitsAndState):
    """``logits`` fp32 ``[B, T', V]`` (T' = T or the last ``logits_to_keep``; None when a latent
    model was given ``labels``: the loss is then formed without them), the new recurrent
    ``state`` fp32 ``[L, B, h]`` (one MLGRU hidden vector per layer and sequence), and ``loss``
    (0-dim fp32 when ``labels`` were given, else None).

    A 2-tuple ``(logits, state)`` as before (``logits, state = model(ids)`` keeps working);
    ``loss`` is an attribute beside the two fields.
    """

    loss: Tensor | None

    def __new__(cls, logits: Tensor | None, state: Tensor, loss: Tensor | None = None) -> MMfreeLMOutput:
        self = super().__new__(cls, logits, state)
        self.loss = loss
        return self


def _is_packed(module: nn.Module) -> bool:
    return isinstance(module, mnn.PackedBitLinear)


class MLGRU(nn.Module):
    """Token mixer (HGRNBitAttention: num_heads 1, expand_ratio 1, no short conv)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.i_proj = mnn.BitLinear(hidden_size, hidden_size, bias=False, eps=eps)
        self.f_proj = mnn.BitLinear(hidden_size, hidden_size, bias=False, eps=eps)
        self.g_proj = mnn.BitLinear(hidden_size, hidden_size, bias=False, eps=eps)
        self.o_proj = mnn.BitLinear(hidden_size, hidden_size, bias=False, eps=eps)
        self.g_norm = mnn.RMSNorm(hidden_size, eps=eps)
        # Packed models: the i/f/g input-norm weights stacked [3, h] for rms_norm_quant_multi
        # (a derived, non-persistent copy; refreshed by the model after packing and loading).
        self.ifg_norm: Tensor | None = None

    def ifg_norm_weights(self) -> Tensor:
        if self.ifg_norm is None:
            return torch.stack([self.i_proj.norm.weight, self.f_proj.norm.weight, self.g_proj.norm.weight])
        return self.ifg_norm

    @torch.no_grad()
    def refresh_fused_weights(self) -> None:
        """Re-derive :attr:`ifg_norm` from the three norm weights (call after changing them)."""
        stacked = torch.stack([self.i_proj.norm.weight, self.f_proj.norm.weight, self.g_proj.norm.weight])
        self.__dict__.pop("ifg_norm", None)  # the plain None attribute set in __init__
        self._buffers.pop("ifg_norm", None)
        self.register_buffer("ifg_norm", stacked.detach().contiguous(), persistent=False)

    def forward(
        self,
        a: Tensor,
        lower_bound: Tensor | None,
        h0: Tensor | None,
        mask: Tensor | None,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        eps = self.eps
        if _is_packed(self.i_proj):
            # i, f, g read the same normalized input: one rstd, three norm weights, and one
            # grouped product (a single GEMV launch at decode sizes).
            x_q, x_scale = L.rms_norm_quant_multi(a, self.ifg_norm_weights(), eps)
            projs = (self.i_proj, self.f_proj, self.g_proj)
            i, f, g = L.ternary_matmul_grouped(
                x_q, x_scale, [p.packed for p in projs], [p.w_scale for p in projs], a.dtype
            ).unbind(0)
            h, h_last = _scan(i, f, lower_bound, h0, mask, cu_seqlens)
            o_q, o_scale = L.swish_gate_quant(g, h, self.g_norm.weight, eps, self.o_proj.norm.weight, eps)
            return L.ternary_matmul(o_q, o_scale, self.o_proj.packed, self.o_proj.w_scale, a.dtype), h_last
        i = L.bit_linear_train(a, self.i_proj.weight, self.i_proj.norm.weight, eps)
        f = L.bit_linear_train(a, self.f_proj.weight, self.f_proj.norm.weight, eps)
        g = L.bit_linear_train(a, self.g_proj.weight, self.g_proj.norm.weight, eps)
        h, h_last = _scan(i, f, lower_bound, h0, mask, cu_seqlens)
        o = L.swish_gate(g, h, self.g_norm.weight, eps)
        return L.bit_linear_train(o, self.o_proj.weight, self.o_proj.norm.weight, eps), h_last


def _scan(
    i: Tensor, f: Tensor, lower_bound: Tensor | None, h0: Tensor | None, mask: Tensor | None, cu_seqlens: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The MLGRU scan over ``[B, T, D]``; with ``cu_seqlens`` the B rows are flattened into one
    packed row of B*T tokens (the scan's varlen form needs B == 1) and the state restarts at
    every offset, so ``cu_seqlens`` must contain every row start ``b * T``."""
    if cu_seqlens is None:
        return L.mlgru_scan(i, f, lower_bound, h0, mask)
    if mask is not None:
        raise ValueError("attention_mask and cu_seqlens cannot be combined (cu_seqlens marks packed documents)")
    b, t, d = i.shape
    h, h_last = L.mlgru_scan(i.reshape(1, b * t, d), f.reshape(1, b * t, d), lower_bound, h0, None, cu_seqlens)
    return h.view(b, t, d), h_last


class GLU(nn.Module):
    """Channel mixer: ``down(silu(u[.., :I]) * u[.., I:])`` with ``u = gate_proj(m)``."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.intermediate_size = intermediate_size
        self.gate_proj = mnn.BitLinear(hidden_size, 2 * intermediate_size, bias=False, eps=eps)
        self.down_proj = mnn.BitLinear(intermediate_size, hidden_size, bias=False, eps=eps)

    def forward(self, m: Tensor) -> Tensor:
        u = _bit_linear(self.gate_proj, m, self.eps)
        if not _is_packed(self.gate_proj):
            # Training: silu_mul + down_proj as one op (instead of slice, silu, mul, BitLinear)
            # whose backward recomputes the [.., I] activation from u instead of keeping it.
            return L.glu_down(u, self.down_proj.weight, self.down_proj.norm.weight, self.eps)
        # Packed path: kept op for op (ops/decode.py's composite mirrors this rounding).
        gate, v = u[..., : self.intermediate_size], u[..., self.intermediate_size :]
        return _bit_linear(self.down_proj, F.silu(gate) * v, self.eps)


def _bit_linear(proj: nn.Module, x: Tensor, eps: float) -> Tensor:
    if _is_packed(proj):
        return L.bit_linear_packed(x, proj.packed, proj.w_scale, proj.norm.weight, eps)
    return L.bit_linear_train(x, proj.weight, proj.norm.weight, eps)


class Block(nn.Module):
    """Pre-norm residual block: MLGRU token mixer, then GLU channel mixer."""

    def __init__(self, cfg: MMfreeLMConfig) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.eps = eps
        self.attn_norm = mnn.RMSNorm(h, eps=eps)
        self.attn = MLGRU(h, eps)
        self.mlp_norm = mnn.RMSNorm(h, eps=eps)
        assert cfg.intermediate_size is not None
        self.mlp = GLU(h, cfg.intermediate_size, eps)
        self.activation_checkpointing = False

    def forward(
        self,
        x: Tensor,
        delta: Tensor | None,
        lower_bound: Tensor | None,
        h0: Tensor | None,
        mask: Tensor | None,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The residual stream is ``x + delta`` (``delta`` = the previous block's MLP output, not
        yet added, or None): returns ``(x, delta, h_last)`` in the same form.

        With :attr:`activation_checkpointing` set (training), the block's activations are not
        kept for the backward but recomputed from its inputs (non-reentrant checkpoint, inside
        ``forward`` so that FSDP's hooks on the block stay outside it)."""
        if self.activation_checkpointing and torch.is_grad_enabled() and not _is_packed(self.attn.i_proj):
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, delta, lower_bound, h0, mask, cu_seqlens, use_reentrant=False
            )
        return self._forward(x, delta, lower_bound, h0, mask, cu_seqlens)

    def _forward(
        self,
        x: Tensor,
        delta: Tensor | None,
        lower_bound: Tensor | None,
        h0: Tensor | None,
        mask: Tensor | None,
        cu_seqlens: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        eps = self.eps
        # Residual adds are fused into the following RMSNorm: (norm(x + d), x + d), in both
        # paths (the fused op carries autograd for x, weight and residual).
        if delta is None:
            a, _ = L.rms_norm(x, self.attn_norm.weight, eps)
        else:
            a, x = L.rms_norm(delta, self.attn_norm.weight, eps, residual=x)
        attn_out, h_last = self.attn(a, lower_bound, h0, mask, cu_seqlens)
        m, x = L.rms_norm(attn_out, self.mlp_norm.weight, eps, residual=x)
        return x, self.mlp(m), h_last


class Backbone(nn.Module):
    def __init__(self, cfg: MMfreeLMConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.lower_bounds = nn.Parameter(torch.zeros(cfg.num_hidden_layers, cfg.hidden_size))
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = mnn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class MMfreeLMForCausalLM(nn.Module):
    """The MatMul-free LM (paper checkpoints: model_type ``hgrn_bit``), on the mmfree ops.

    ``forward(input_ids, state=None, attention_mask=None, logits_to_keep=0, labels=None)`` runs
    the T tokens through every layer starting from ``state`` (fp32 ``[L, B, h]`` or a list of
    ``[B, h]``; None = zeros) and returns :class:`MMfreeLMOutput`. With ``labels`` ``[B, T]``
    (int64, shifted inside as in transformers: position t predicts ``labels[:, t + 1]``, -100
    ignored) the output's ``loss`` is the mean next-token cross entropy; a latent model then
    forms it with the fused lm_head + cross-entropy op and returns no logits.
    ``shift_labels=False`` takes ``labels`` as already aligned (``labels[:, t]`` is position t's
    target), so that a ``[B, T+1]`` batch trains on all T targets of its T inputs.
    ``attention_mask`` ``[B, T]`` marks real tokens with 1: padded positions add nothing to the
    recurrent state, so left-padded batches give each sequence the result it gets alone.
    ``cu_seqlens`` (int32/int64 ``[S+1]``, offsets into the B*T tokens read row after row,
    containing every row start ``b*T``) marks packed documents: the recurrent state restarts at
    every offset (training on packed rows); the returned state is then ``[L, S, h]``, one per
    document. Compute runs in the embedding dtype.
    """

    def __init__(self, config: MMfreeLMConfig | dict[str, Any], *, init_seed: int | None = 0) -> None:
        super().__init__()
        self.config = config if isinstance(config, MMfreeLMConfig) else MMfreeLMConfig.from_dict(config)
        cfg = self.config
        self.model = Backbone(cfg)
        self.lm_head = mnn.BitLinear(cfg.hidden_size, cfg.vocab_size, bias=False, eps=cfg.rms_norm_eps)
        # Packed models: per-layer lower bounds fp32 [L, h], derived from lower_bounds.
        self.layer_lb: Tensor | None = None
        if init_seed is not None and not self.model.embeddings.weight.is_meta:
            self.init_weights(init_seed)
        self.register_load_state_dict_post_hook(self._refresh_after_load)

    # ------------------------------------------------------------------------------------
    @property
    def is_packed(self) -> bool:
        """True once :meth:`pack` has turned the BitLinear weights into 2-bit codes."""
        return _is_packed(self.lm_head)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.weight.dtype

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> MMfreeLMForCausalLM:
        """Deterministic init, the same as ReferenceMMfreeLM.init_weights: embeddings and latent
        weights ~ N(0, std) in parameter order, norms = 1, lower_bounds = 0. Returns self."""
        if self.is_packed:
            raise RuntimeError("init_weights needs latent weights; this model is packed")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "model.lower_bounds":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        return self

    @torch.no_grad()
    def pack(self, progress: Callable[[int], None] | None = None) -> MMfreeLMForCausalLM:
        """Replace every BitLinear by its 2-bit packed form (in place; inference only). Returns self.

        ``progress`` (optional) is called with 1 after each converted layer.
        """
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, mnn.BitLinear):
                    setattr(parent, name, child.pack())
                    if progress is not None:
                        progress(1)
        self.config.packed = True
        self.refresh_fused_weights()
        return self

    @torch.no_grad()
    def refresh_fused_weights(self) -> None:
        """Re-derive the packed path's constants from the weights (done by pack() and loading):
        the stacked i/f/g norm weights and the per-layer lower bounds."""
        self.__dict__.pop("_decode_weights", None)  # decode_plan's gathered copies are stale now
        if not self.is_packed:
            return
        for layer in self.model.layers:
            layer.attn.refresh_fused_weights()
        self.__dict__.pop("layer_lb", None)
        self._buffers.pop("layer_lb", None)
        layer_lb = L.layer_lower_bounds(self.model.lower_bounds.detach()).contiguous()
        self.register_buffer("layer_lb", layer_lb, persistent=False)

    def _refresh_after_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        self.refresh_fused_weights()

    def num_bit_linears(self) -> int:
        return sum(isinstance(m, (mnn.BitLinear, mnn.PackedBitLinear)) for m in self.modules())

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MMfreeLMForCausalLM:
        # `.to(bf16)` / `.half()` cast every float buffer; the packed weights' scales must stay
        # exact fp32 (they are part of the quantized weight), so keep their fp32 values aside.
        # The same holds for the fp32 per-layer lower bounds.
        keep = [(m, "w_scale") for m in self.modules() if _is_packed(m)]
        if self.layer_lb is not None:
            keep.append((self, "layer_lb"))
        saved = [(m, name, m._buffers[name]) for m, name in keep]
        self.__dict__.pop("_decode_weights", None)  # moved or cast: gather again on next use
        super()._apply(fn, recurse)
        for m, name, before in saved:
            after = m._buffers[name]
            if after is not None and after.dtype != torch.float32:
                m._buffers[name] = before.to(device=after.device, dtype=torch.float32)
        return self

    def empty_state(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """Zero recurrent state fp32 ``[L, B, h]``: the whole per-sequence cache (L*h floats)."""
        cfg = self.config
        return torch.zeros(
            (cfg.num_hidden_layers, batch_size, cfg.hidden_size),
            dtype=torch.float32,
            device=self.device if device is None else device,
        )

    # ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        state: Tensor | Sequence[Tensor | None] | None = None,
        attention_mask: Tensor | None = None,
        logits_to_keep: int = 0,
        cu_seqlens: Tensor | None = None,
        labels: Tensor | None = None,
        shift_labels: bool = True,
    ) -> MMfreeLMOutput:
        cfg = self.config
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            if logits_to_keep > 0:
                raise ValueError("labels and logits_to_keep cannot be combined: the loss needs every position")
        n_layers = cfg.num_hidden_layers
        if state is not None and len(state) != n_layers:
            raise ValueError(f"state must hold {n_layers} per-layer tensors, got {len(state)}")
        x = self.model.embeddings(input_ids)
        # Packed (frozen) models keep the per-layer bounds computed once at pack/load time.
        lb = self.layer_lb if self.layer_lb is not None else L.layer_lower_bounds(self.model.lower_bounds)
        new_state = []
        delta: Tensor | None = None
        for idx, layer in enumerate(self.model.layers):
            h0 = state[idx] if state is not None else None
            # Layer 0 takes no lower bound (its row of lb is exactly 0).
            x, delta, h_last = layer(x, delta, lb[idx] if idx > 0 else None, h0, attention_mask, cu_seqlens)
            new_state.append(h_last)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
            delta = delta[:, -logits_to_keep:] if delta is not None else None
        eps = cfg.rms_norm_eps
        if delta is None:
            xn, _ = L.rms_norm(x, self.model.norm.weight, eps)
        else:
            xn, _ = L.rms_norm(delta.contiguous(), self.model.norm.weight, eps, residual=x.contiguous())
        state_out = torch.stack(new_state)
        if labels is not None and not self.is_packed:
            # Position t predicts labels[:, t + 1]; the last position of each row has no target.
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) if shift_labels else labels
            loss = L.bit_linear_cross_entropy(xn, self.lm_head.weight, self.lm_head.norm.weight, targets, eps)
            return MMfreeLMOutput(None, state_out, loss)
        if self.is_packed:
            x_q, x_scale = L.rms_norm_quant(xn, self.lm_head.norm.weight, eps)
            logits = L.ternary_matmul(x_q, x_scale, self.lm_head.packed, self.lm_head.w_scale, xn.dtype)
        else:
            logits = L.bit_linear_train(xn, self.lm_head.weight, self.lm_head.norm.weight, eps)
        logits = logits.float()
        if labels is None:
            return MMfreeLMOutput(logits, state_out)
        # Packed (frozen) models: no latent lm_head weight to fuse with; the plain loss.
        scored, targets = (logits[:, :-1], labels[:, 1:]) if shift_labels else (logits, labels)
        loss = F.cross_entropy(scored.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return MMfreeLMOutput(logits, state_out, loss)

    # ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        pack: bool = False,
        progress: bool = True,
    ) -> MMfreeLMForCausalLM:
        """Load a local checkpoint folder (see :func:`mmfree_ext.models.checkpoint.load_model`)."""
        from .checkpoint import load_model

        return load_model(model_dir, device=device, dtype=dtype, pack=pack, progress=progress)

    def save_pretrained(self, out_dir: str, *, progress: bool = True) -> None:
        """Write config.json + model.safetensors (packed or latent, as the model is now)."""
        from .checkpoint import save_model

        save_model(self, out_dir, progress=progress)


def pack_model(model: MMfreeLMForCausalLM) -> MMfreeLMForCausalLM:
    """Convert every BitLinear of ``model`` to packed 2-bit weights (in place); returns it."""
    return model.pack()


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
