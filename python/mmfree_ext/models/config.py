"""MMfreeLM configuration: the paper's ``config.json`` (model_type ``hgrn_bit``, SPEC section 2)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..reference import default_intermediate_size

__all__ = ["NAMED_CONFIGS", "MMfreeLMConfig", "named_config"]

MODEL_TYPE = "hgrn_bit"

# Options of the paper's HGRNBit code that this model does not implement, with the only
# value the released checkpoints use. Any other value is rejected with the field's name.
_FIXED_FIELDS: dict[str, Any] = {
    "num_heads": 1,
    "expand_ratio": 1,
    "use_short_conv": False,
    "use_lower_bound": True,
    "tie_word_embeddings": False,
}
_SWISH_NAMES = ("swish", "silu")


@dataclass
class MMfreeLMConfig:
    """Fields of an ``hgrn_bit`` config that define the computation (other keys are kept in ``extra``).

    ``intermediate_size`` defaults to ``256 * ceil(int(h * hidden_ratio * 2/3) / 256)``.
    ``packed`` is True for a folder written by :func:`~mmfree_ext.models.save_packed`, whose
    BitLinear weights are stored as 2-bit codes plus a scale.
    """

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    intermediate_size: int | None = None
    hidden_ratio: int = 4
    rms_norm_eps: float = 1e-6
    hidden_act: str = "swish"
    num_heads: int = 1
    expand_ratio: int = 1
    use_short_conv: bool = False
    use_lower_bound: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    packed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size, self.hidden_ratio)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"config field '{name}' must be a positive integer, got {value!r}")
        for name, expected in _FIXED_FIELDS.items():
            if getattr(self, name) != expected:
                raise ValueError(
                    f"config field '{name}' = {getattr(self, name)!r} is not supported "
                    f"(MMfreeLM checkpoints use {expected!r})"
                )
        if self.hidden_act not in _SWISH_NAMES:
            raise ValueError(f"config field 'hidden_act' = {self.hidden_act!r} is not supported (expected 'swish')")

    # ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MMfreeLMConfig:
        """Build from a parsed ``config.json``; raises ``ValueError`` naming a bad field."""
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"config field 'model_type' = {model_type!r}: expected {MODEL_TYPE!r} (MMfreeLM / HGRNBit)"
            )
        known = {f.name for f in fields(cls)} - {"extra", "packed"}
        kwargs = {k: v for k, v in data.items() if k in known}
        mmfree = data.get("mmfree") or {}
        extra = {k: v for k, v in data.items() if k not in known and k not in ("model_type", "mmfree")}
        if "intermediate_size" in kwargs and kwargs["intermediate_size"] is None:
            del kwargs["intermediate_size"]
        return cls(**kwargs, packed=bool(mmfree.get("packed", False)), extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MMfreeLMConfig:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> MMfreeLMConfig:
        """Read ``<model_dir>/config.json`` (a local folder only; nothing is downloaded)."""
        path = os.path.join(os.fspath(model_dir), "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {os.fspath(model_dir)!r} (expected a local checkpoint folder)")
        return cls.from_json_file(path)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content (round-trips through :meth:`from_dict`)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("extra", "packed")}
        data = {"model_type": MODEL_TYPE, **self.extra, **data}
        if self.packed:
            data["mmfree"] = {"packed": True, "format": "ternary-2bit-k128"}
        return data

    def save(self, model_dir: str | os.PathLike) -> None:
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(os.fspath(model_dir), "config.json"), "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")


#: The paper's sizes (SPEC section 2) and a tiny one for tests; vocab 32000 (Llama tokenizer).
NAMED_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {"vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 2},
    "370M": {"vocab_size": 32000, "hidden_size": 1024, "num_hidden_layers": 24},
    "1.3B": {"vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 24},
    "2.7B": {"vocab_size": 32000, "hidden_size": 2560, "num_hidden_layers": 32},
}


def named_config(name: str, **overrides: Any) -> MMfreeLMConfig:
    """One of :data:`NAMED_CONFIGS` (case-insensitive), with optional field overrides."""
    key = {k.lower(): k for k in NAMED_CONFIGS}.get(name.lower())
    if key is None:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    return MMfreeLMConfig(**{**NAMED_CONFIGS[key], **overrides})
