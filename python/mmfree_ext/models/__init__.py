"""The MMfreeLM model layer: config, model on the mmfree ops, checkpoints, packing, generation."""

from .checkpoint import CheckpointError, load_model, save_model, save_packed
from .config import NAMED_CONFIGS, MMfreeLMConfig, named_config
from .generation import Decoder, GenerationResult, generate, sample_next
from .modeling import MMfreeLMForCausalLM, MMfreeLMOutput, model_memory_bytes, pack_model
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "NAMED_CONFIGS",
    "ByteTokenizer",
    "CheckpointError",
    "Decoder",
    "GenerationResult",
    "HFTokenizer",
    "MMfreeLMConfig",
    "MMfreeLMForCausalLM",
    "MMfreeLMOutput",
    "generate",
    "load_model",
    "load_tokenizer",
    "model_memory_bytes",
    "named_config",
    "pack_model",
    "sample_next",
    "save_model",
    "save_packed",
]
