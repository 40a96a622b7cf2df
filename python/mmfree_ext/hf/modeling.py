"""``HGRNBitForCausalLM``: a transformers ``PreTrainedModel`` + ``GenerationMixin`` over our model.

The computation is :class:`mmfree_ext.models.MMfreeLMForCausalLM` (held as ``_core``); this class
registers the core's ``model`` (backbone) and ``lm_head`` as its own submodules, so its
``state_dict`` keys are the paper's (``model.layers.0.attn.i_proj.weight``, ``lm_head.weight``,
...) and transformers loads the paper's folders (safetensors or ``pytorch_model.bin``) as they
are. What this class adds: the ``labels=`` loss, the :class:`~mmfree_ext.hf.cache.MMfreeCache`
protocol that ``generate()`` drives, and for packed models the core's decode step (a CUDA graph
on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import nn as mnn
from ..models.generation import Decoder
from ..models.modeling import MMfreeLMForCausalLM
from .cache import MMfreeCache
from .config import HGRNBitConfig

__all__ = ["DECODE_MODES", "HGRNBitForCausalLM", "HGRNBitPreTrainedModel", "causal_lm_loss"]

#: ``model.decode_mode``: "auto" runs single-token steps of a packed model under no_grad (what
#: generate() runs) through the native decoder (CUDA graph on CUDA, the decode-step op on CPU);
#: "eager" always runs the plain forward.
DECODE_MODES = ("auto", "eager")

# transformers 5.2x renamed the output / input field `past_key_values` to `cache`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
IGNORE_INDEX = -100


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Next-token cross entropy: ``logits[:, t]`` predicts ``labels[:, t + 1]``; ``-100`` is ignored.

    The mean over the counted tokens, or their sum divided by ``num_items_in_batch`` when given
    (what transformers' Trainer passes under gradient accumulation).
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be [B, T] = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class HGRNBitPreTrainedModel(PreTrainedModel):
    """transformers plumbing shared by the MMfreeLM classes (config class, init, flags)."""

    config_class = HGRNBitConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    # Packed scales (`w_scale`) are fp32 buffers: transformers' dtype= casts parameters only, so
    # they stay exact (tested); `_keep_in_fp32_modules` cannot name buffers on transformers 4.x.
    _supports_cache_class = True
    # A recurrent state cannot be rolled back: transformers refuses assisted decoding.
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The native init (MMfreeLMForCausalLM.init_weights): weights ~ N(0, initializer_range),
        norm scales 1, lower bounds 0. Used for models built from a config, not when loading."""
        std = self.config.initializer_range
        if isinstance(module, (mnn.BitLinear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, mnn.RMSNorm):
            module.weight.fill_(1.0)
        if isinstance(getattr(module, "lower_bounds", None), nn.Parameter):
            module.lower_bounds.zero_()


class HGRNBitForCausalLM(HGRNBitPreTrainedModel, GenerationMixin):
    """MMfreeLM for ``AutoModelForCausalLM`` / ``generate()`` / ``Trainer`` / PEFT.

    ``forward(input_ids, attention_mask=None, past_key_values=None, labels=None, use_cache=None,
    logits_to_keep=0)`` returns ``CausalLMOutputWithPast`` (fp32 logits ``[B, T', V]``, the loss
    when ``labels`` are given, the updated :class:`MMfreeCache`). ``attention_mask`` marks real
    tokens with 1 (left padding: padded positions add nothing to the state). :meth:`pack` turns the
    weights into 2-bit codes in place (inference; ``save_pretrained`` then writes a packed folder).
    """

    def __init__(self, config: HGRNBitConfig) -> None:
        super().__init__(config)
        core = MMfreeLMForCausalLM(config.to_mmfree_config(), init_seed=None)
        if config.packed:
            core.pack()
        # The core is not a registered submodule (its keys would gain a prefix); its two children are.
        self.__dict__["_core"] = core
        self.model = core.model
        self.lm_head = core.lm_head
        self.decode_mode = "auto"
        self.post_init()

    # ------------------------------------------------------------------------------------
    @property
    def core(self) -> MMfreeLMForCausalLM:
        """The native model computing this one's forward (shares every parameter)."""
        core = self.__dict__["_core"]
        # PEFT and friends may swap our children; the core must run what we hold.
        if core.model is not self.model:
            core.model = self.model
        if core.lm_head is not self.lm_head:
            core.lm_head = self.lm_head
        return core

    @property
    def is_packed(self) -> bool:
        return self.core.is_packed

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> None:
        return None  # lm_head is a BitLinear (its own norm, ternary weights): not tied, not resizable

    def train(self, mode: bool = True) -> HGRNBitForCausalLM:
        super().train(mode)
        self.__dict__["_core"].training = mode  # not a registered child: keep its flag in step
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> HGRNBitForCausalLM:
        # The core's _apply moves our (shared) children plus its derived buffers and keeps the
        # packed scales in fp32 under `.to(bf16)`.
        self.core._apply(fn, recurse)
        return self

    @torch.no_grad()
    def pack(self) -> HGRNBitForCausalLM:
        """Replace every BitLinear by its 2-bit packed form (in place, inference only). Returns self."""
        core = self.core
        core.pack()
        self.lm_head = core.lm_head
        self.config.mmfree = core.config.to_dict()["mmfree"]
        return self

    @classmethod
    def from_native(cls, model: MMfreeLMForCausalLM) -> HGRNBitForCausalLM:
        """Wrap an existing native model (latent or packed) without copying: the result shares
        every parameter and buffer with ``model`` and computes with it."""
        if not isinstance(model, MMfreeLMForCausalLM):
            raise ValueError(f"model must be an MMfreeLMForCausalLM, got {type(model).__name__}")
        native = model.config
        fields = {k: v for k, v in native.to_dict().items() if k != "model_type"}
        fields.pop("architectures", None)
        config = HGRNBitConfig(**fields, architectures=[cls.__name__])
        with torch.device("meta"):
            wrapper = cls(config)  # a meta skeleton; its modules are replaced by the native ones
        wrapper.__dict__["_core"] = model
        wrapper.model = model.model
        wrapper.lm_head = model.lm_head
        wrapper.train(model.training)
        return wrapper

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> HGRNBitForCausalLM:
        """transformers' loader, then the packed path's derived constants from the loaded weights."""
        model = super().from_pretrained(*args, **kwargs)
        model.core.refresh_fused_weights()
        return model

    # ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: MMfreeCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: Tensor | None = None,
        return_dict: bool | None = None,
        cache: MMfreeCache | None = None,
        num_items_in_batch: int | Tensor | None = None,
        token_type_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        # token_type_ids (some tokenizers return them) and position_ids / cache_position (generate()
        # passes them on some versions) mean nothing to a recurrent model: accepted and ignored.
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported by HGRNBitForCausalLM: pass input_ids")
        for name in ("output_hidden_states", "output_attentions"):
            if kwargs.get(name):
                raise ValueError(f"{name}=True is not supported by HGRNBitForCausalLM (the fused layers keep none)")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor, got {None if input_ids is None else input_ids.shape}")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, MMfreeCache):
            raise ValueError(f"past_key_values must be an MMfreeCache (a recurrent state), got {type(cache).__name__}")
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        if labels is not None and logits_to_keep:
            raise ValueError("labels need the logits of every position: pass logits_to_keep=0")
        batch, seq = input_ids.shape
        state = cache.state if cache is not None else None
        if state is not None and state.shape[1] != batch:
            raise ValueError(f"the cache holds {state.shape[1]} sequences, input_ids has {batch}")
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < seq:
                raise ValueError(
                    f"attention_mask must be [B={batch}, >= T={seq}] (1 = token, 0 = padding), "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask[:, -seq:]
            if bool(mask.all()):
                mask = None

        logits, new_state = self._run(input_ids, state, mask, logits_to_keep)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        if use_cache:
            if cache is None:
                cache = MMfreeCache(self.config.num_hidden_layers)
            cache.update_state(new_state, seq)
        else:
            cache = None
        if return_dict is False:
            out = (logits, cache) if cache is not None else (logits,)
            return (loss, *out) if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _run(
        self, ids: Tensor, state: Tensor | None, mask: Tensor | None, logits_to_keep: int
    ) -> tuple[Tensor, Tensor]:
        core = self.core
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {self.decode_mode!r}")
        decode_step = (
            self.decode_mode == "auto"
            and ids.shape[1] == 1
            and state is not None
            and mask is None
            and core.is_packed
            and not torch.is_grad_enabled()
        )
        if decode_step:
            # The native decoder's step: a CUDA graph captured once per batch size on CUDA, the
            # model-level decode op on CPU. It updates its state in place (the graph's lives in a
            # static buffer the next replay overwrites), so it gets a copy and hands out copies.
            decoder = Decoder(core, ids.shape[0], "auto")
            decoder.state = state.clone()
            logits = decoder.step(ids[:, 0]).unsqueeze(1).clone()
            new_state = decoder.state.clone() if decoder.mode == "cuda_graph" else decoder.state
            return logits, new_state
        out = core(ids, state, mask, logits_to_keep=logits_to_keep)
        return out.logits, out.state

    # ------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool = True,
        logits_to_keep: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not absorbed yet (all of them on the first step)."""
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported by HGRNBitForCausalLM: pass input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None and use_cache:
            cache = MMfreeCache(self.config.num_hidden_layers)
        if cache is not None:
            seen = cache.get_seq_length()
            if seen >= input_ids.shape[1]:
                raise ValueError(f"the cache has absorbed {seen} tokens but input_ids holds only {input_ids.shape[1]}")
            input_ids = input_ids[:, seen:]
        return {
            "input_ids": input_ids.contiguous(),
            "attention_mask": attention_mask,
            "use_cache": use_cache,
            "logits_to_keep": 1 if logits_to_keep is None else logits_to_keep,
            _CACHE_FIELD: cache,
        }

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: the first forward builds an MMfreeCache
