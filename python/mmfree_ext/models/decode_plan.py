"""The packed model's tensors laid out for the model-level decode op ``mmfree::decode_step``.

:class:`DecodeWeights` gathers them once per packed model (the 2-bit weights are shared, not
copied; the small norm vectors and scales are stacked), so that a decode step is one op call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import nn as mnn
from ..ops.decode import decode_step
from .modeling import MMfreeLMForCausalLM

__all__ = ["DecodeWeights", "decode_weights"]


@dataclass(frozen=True)
class DecodeWeights:
    """Arguments of ``mmfree::decode_step`` after ``tokens`` and ``state`` (see ops/decode.py)."""

    embeddings: Tensor
    lower_bounds: Tensor
    norms: Tensor
    down_norms: Tensor
    packed: list[Tensor]
    w_scales: Tensor
    final_norms: Tensor
    eps: float

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: MMfreeLMForCausalLM) -> DecodeWeights:
        """Gather a packed model's decode tensors (raises ValueError for a latent model)."""
        if not model.is_packed:
            raise ValueError("decode_step needs a packed model: call model.pack() first")
        norms, down_norms, packed, scales = [], [], [], []
        for layer in model.model.layers:
            attn, mlp = layer.attn, layer.mlp
            norms.append(
                torch.stack(
                    [
                        layer.attn_norm.weight,
                        attn.i_proj.norm.weight,
                        attn.f_proj.norm.weight,
                        attn.g_proj.norm.weight,
                        attn.g_norm.weight,
                        attn.o_proj.norm.weight,
                        layer.mlp_norm.weight,
                        mlp.gate_proj.norm.weight,
                    ]
                )
            )
            down_norms.append(mlp.down_proj.norm.weight)
            for proj in (attn.i_proj, attn.f_proj, attn.g_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj):
                packed.append(proj.packed)
                scales.append(proj.w_scale.reshape(()))
        head = model.lm_head
        assert isinstance(head, mnn.PackedBitLinear)
        packed.append(head.packed)
        scales.append(head.w_scale.reshape(()))
        assert model.layer_lb is not None
        return cls(
            embeddings=model.model.embeddings.weight.detach(),
            lower_bounds=model.layer_lb.float().contiguous(),
            norms=torch.stack(norms).contiguous(),
            down_norms=torch.stack(down_norms).contiguous(),
            packed=packed,
            w_scales=torch.stack(scales).float().contiguous(),
            final_norms=torch.stack([model.model.norm.weight, head.norm.weight]).contiguous(),
            eps=float(model.config.rms_norm_eps),
        )

    def step(self, tokens: Tensor, state: Tensor) -> Tensor:
        """``decode_step(tokens [B], state [L, B, h] (updated in place))`` -> logits ``[B, V]``."""
        return decode_step(
            tokens,
            state,
            self.embeddings,
            self.lower_bounds,
            self.norms,
            self.down_norms,
            self.packed,
            self.w_scales,
            self.final_norms,
            self.eps,
        )


def decode_weights(model: MMfreeLMForCausalLM) -> DecodeWeights:
    """The model's :class:`DecodeWeights`, gathered on first use. The model drops them whenever
    its packed constants are re-derived (pack, load_state_dict) or it is moved or cast."""
    cached = model.__dict__.get("_decode_weights")
    if cached is None:
        cached = DecodeWeights.from_model(model)
        model.__dict__["_decode_weights"] = cached
    return cached
