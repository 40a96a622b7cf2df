"""Training MMfreeLMs at scale on the standard PyTorch stack: ``mmfree train CONFIG``.

torchrun or one plain process, FSDP2 with mixed precision, a local data pipeline packed into
rows with document boundaries (``cu_seqlens``), sharded DCP checkpoints with exact resume,
exports that ``mmfree generate`` loads. See :mod:`.config` for every setting.
"""

from .config import ConfigError, TrainConfig, load_config
from .step import build_optimizer, lm_loss_sum, lr_at, train_step
from .trainer import TrainResult, run_training

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "lm_loss_sum",
    "load_config",
    "lr_at",
    "run_training",
    "train_step",
]
