"""transformers integration (the optional extra ``mmfree-ext[hf]``).

Importing this package registers ``HGRNBitConfig`` / ``HGRNBitForCausalLM`` for model_type
``hgrn_bit`` with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` (:func:`register`
does it explicitly), so ``AutoModelForCausalLM.from_pretrained(dir)`` loads the paper's folders
and our packed ones onto the mmfree kernels.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mmfree_ext.hf needs the 'transformers' package: pip install 'mmfree-ext[hf]' (or transformers)"
    ) from exc

from .cache import MMfreeCache
from .config import HGRNBitConfig
from .modeling import HGRNBitForCausalLM, HGRNBitPreTrainedModel, causal_lm_loss

__all__ = ["HGRNBitConfig", "HGRNBitForCausalLM", "HGRNBitPreTrainedModel", "MMfreeCache", "causal_lm_loss", "register"]


def register() -> None:
    """Register our classes for model_type ``hgrn_bit`` with the transformers Auto classes.

    Replaces an earlier registration of ``hgrn_bit`` (e.g. by the paper's ``mmfreelm`` package),
    so the Auto classes build this implementation. Safe to call more than once.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(HGRNBitConfig.model_type, HGRNBitConfig, exist_ok=True)
    AutoModel.register(HGRNBitConfig, HGRNBitForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(HGRNBitConfig, HGRNBitForCausalLM, exist_ok=True)


register()
