"""``HGRNBitConfig``: the paper's ``config.json`` (model_type ``hgrn_bit``) as a transformers config.

Every field the released checkpoints write is accepted and written back unchanged, so a folder
saved by us has the paper's layout. The fields that select computations we do not implement
(``use_short_conv=True``, ``num_heads != 1``, ``expand_ratio != 1``, ...) raise ``ValueError``
naming the field when the config is built, before any weight is read.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

from ..models.config import MODEL_TYPE, MMfreeLMConfig

__all__ = ["HGRNBitConfig"]

#: The paper's ``attn_mode`` values: three kernels for the same recurrence (we run one of our own).
ATTN_MODES = ("fused_recurrent", "naive_recurrent", "chunk")
#: Our own key for packed folders (``{"packed": true, "format": ...}``); absent in latent folders.
_MMFREE_KEY = "mmfree"


class HGRNBitConfig(PretrainedConfig):
    """Configuration of an MMfreeLM (``HGRNBitForCausalLM``) checkpoint.

    Arguments are the fields of the paper's ``HGRNBitConfig`` (same names and defaults), plus
    ``mmfree`` (``{"packed": True}`` for a folder of 2-bit packed weights written by this package).
    :meth:`to_mmfree_config` gives the :class:`~mmfree_ext.models.MMfreeLMConfig` the model is built from.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        attn_mode: str = "fused_recurrent",
        num_heads: int | None = 1,
        expand_ratio: int | None = 1,
        use_short_conv: bool = False,
        conv_size: int = 4,
        share_conv_kernel: bool = True,
        use_lower_bound: bool = True,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        fuse_cross_entropy: bool = False,
        mmfree: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.attn_mode = attn_mode
        self.num_heads = num_heads
        self.expand_ratio = expand_ratio
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.share_conv_kernel = share_conv_kernel
        self.use_lower_bound = use_lower_bound
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_cross_entropy = fuse_cross_entropy
        self.mmfree = dict(mmfree) if mmfree else None
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.tie_word_embeddings = tie_word_embeddings
        self._check_supported()

    # ------------------------------------------------------------------------------------
    def _check_supported(self) -> None:
        if self.attn_mode not in ATTN_MODES:
            raise ValueError(f"config field 'attn_mode' = {self.attn_mode!r} is not one of {ATTN_MODES}")
        if getattr(self, "use_moe", False):
            raise ValueError("config field 'use_moe' = True is not supported (MMfreeLM has dense GLU channel mixers)")
        if self.mmfree is not None and not isinstance(self.mmfree.get("packed", False), bool):
            raise ValueError(f"config field 'mmfree.packed' must be a bool, got {self.mmfree.get('packed')!r}")
        self.to_mmfree_config()  # the remaining checks (num_heads, expand_ratio, ...) name the field

    @property
    def packed(self) -> bool:
        """True for a folder of 2-bit packed weights (``"mmfree": {"packed": true}``)."""
        return bool(self.mmfree and self.mmfree.get("packed", False))

    def to_mmfree_config(self) -> MMfreeLMConfig:
        """The native config; raises ``ValueError`` naming any field we do not implement."""
        return MMfreeLMConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.intermediate_size,
            hidden_ratio=self.hidden_ratio if self.hidden_ratio is not None else 4,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act,
            num_heads=self.num_heads,
            expand_ratio=self.expand_ratio,
            use_short_conv=self.use_short_conv,
            use_lower_bound=self.use_lower_bound,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            packed=self.packed,
        )

    def to_dict(self) -> dict[str, Any]:
        """As transformers writes it, in the paper's layout (no ``mmfree`` key in latent folders, ``torch_dtype``)."""
        data = super().to_dict()
        if not data.get(_MMFREE_KEY):
            data.pop(_MMFREE_KEY, None)
        # transformers 5 writes `dtype`; the paper's folders (and transformers 4) read `torch_dtype`.
        if data.get("dtype") is not None and "torch_dtype" not in data:
            data["torch_dtype"] = data["dtype"]
        return data
