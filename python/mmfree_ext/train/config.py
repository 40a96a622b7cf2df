"""The training run's configuration: a small TOML file and/or ``--section.key value`` flags.

Every field is declared once here, with its default and its help text; the command line
(``mmfree train --help``) and the TOML loader are generated from these declarations, so they
cannot drift apart. :meth:`TrainConfig.validate` checks the whole config (types, ranges, that
data files exist, that optional packages are installed) before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["ConfigError", "TrainConfig", "add_config_flags", "config_from_args", "load_config"]

_SECTIONS = ("model", "data", "train", "optim", "checkpoint", "log")


class ConfigError(ValueError):
    """A config value that cannot work (the message names the ``section.key``)."""


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    size: str = _f("tiny", "named size: tiny, 370M, 1.3B, 2.7B (ignored when `config` is set)")
    config: str = _f("", "path to a config.json (model_type hgrn_bit) instead of a named size")
    hidden_size: int = _f(0, "override the hidden size (0 = the size's)")
    num_layers: int = _f(0, "override the number of layers (0 = the size's)")
    vocab_size: int = _f(0, "override the vocabulary (0 = the tokenizer's for `tiny`, else the size's)")
    init_seed: int = _f(0, "seed of the N(0, 0.02) weight init")


@dataclass
class DataSection:
    source: str = _f("files", "files, stdlib (the demo's docstring corpus) or synthetic (random tokens)",
                     ("files", "stdlib", "synthetic"))  # fmt: skip
    paths: list = _f([], "files, folders or glob patterns (.txt, .jsonl, .parquet)")  # noqa: RUF009 (a field)
    format: str = _f("auto", "file format: auto (by extension), text, jsonl, parquet",
                     ("auto", "text", "jsonl", "parquet"))  # fmt: skip
    text_field: str = _f("text", "the text field of jsonl records and parquet rows")
    text_split: str = _f("file", "documents of a text file: the whole file, or blocks separated by blank lines",
                         ("file", "blank_line"))  # fmt: skip
    tokenizer: str = _f("bytes", "bytes (UTF-8, vocab 258) or a path to a tokenizer.json (the `tokenizers` package)")
    seq_len: int = _f(256, "tokens per packed row (T)")
    synthetic_tokens: int = _f(1 << 20, "corpus size of source=synthetic")
    synthetic_doc_len: int = _f(0, "mean document length of source=synthetic (0 = one document)")


@dataclass
class TrainSection:
    out_dir: str = _f("runs/train", "run folder (relative to the working dir): metrics.jsonl, checkpoints/, export/")
    steps: int = _f(100, "optimizer steps (the schedule's length)")
    max_seconds: float = _f(0.0, "stop after this wall time (0 = no limit); with steps=0 the schedule is "
                            "stretched over the steps estimated to fit")  # fmt: skip
    stop_after: int = _f(0, "stop after this step as if interrupted (the schedule still spans `steps`; 0 = never)")
    global_batch: int = _f(8, "rows per optimizer step, over all ranks")
    micro_batch: int = _f(0, "rows per rank per forward/backward (0 = global_batch / world size: no accumulation)")
    seed: int = _f(0, "seed of the data order and of torch's RNG")
    device: str = _f("auto", "auto, cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    precision: str = _f("auto", "auto (bf16-mixed on CUDA, fp32 on CPU), fp32, bf16 (bf16 params and optimizer, "
                        "as the benchmark), bf16-mixed (fp32 master weights, bf16 compute, fp32 gradient reduction)",
                        ("auto", "fp32", "bf16", "bf16-mixed"))  # fmt: skip
    fsdp: str = _f("auto", "auto (shard when launched by torchrun or for bf16-mixed), on, off", ("auto", "on", "off"))
    compile: bool = _f(False, "torch.compile the loss (fullgraph) or, under FSDP, each block")
    compile_mode: str = _f("default", "torch.compile mode with compile = true: default, or reduce-overhead "
                           "(the forward and backward replayed as CUDA graphs: CUDA, no FSDP, one "
                           "micro-batch per step)", ("default", "reduce-overhead"))  # fmt: skip
    activation_checkpointing: bool = _f(False, "recompute each block's activations in the backward")
    clip: float = _f(1.0, "max global gradient norm (0 = no clipping)")
    threads: int = _f(0, "torch CPU threads (0 = torch's choice)")


@dataclass
class OptimSection:
    lr: float = _f(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(0.1, "final learning rate / peak of the cosine")
    warmup_steps: int = _f(10, "linear warmup steps")
    weight_decay: float = _f(0.01, "AdamW weight decay (matrices only; not norms, embeddings, lower bounds)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW eps")


@dataclass
class CheckpointSection:
    every: int = _f(0, "save a sharded checkpoint every N steps (0 = only at the end)")
    at_end: bool = _f(True, "save a checkpoint after the last step")
    resume: str = _f("auto", "auto (the run folder's latest), none, or a checkpoint folder")
    keep: int = _f(2, "checkpoints kept (older ones are deleted; 0 = all)")
    export: bool = _f(False, "at the end write export/latent (HF-style) and export/packed (for mmfree generate)")


@dataclass
class LogSection:
    every: int = _f(1, "write a metrics.jsonl record every N steps")
    progress: bool = _f(True, "show the progress line (loss, tokens/s, memory)")
    tensorboard: bool = _f(False, "also write TensorBoard scalars to OUT_DIR/tb (needs `tensorboard`)")
    print_every: int = _f(0, "also print a text line every N steps (0 = about 8 lines per run)")
    summary: bool = _f(True, "print the setup line before and the tokens/s + memory line after the run")


@dataclass
class TrainConfig:
    """The whole run: ``[model]``, ``[data]``, ``[train]``, ``[optim]``, ``[checkpoint]``, ``[log]``."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    # ------------------------------------------------------------------------------------
    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` (type-checked against the field's declared type)."""
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or not key:
            raise ConfigError(f"unknown config key {dotted!r}: expected section.key with section in {_SECTIONS}")
        sec = getattr(self, section)
        names = {f.name: f for f in fields(sec)}
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}; [{section}] has: {', '.join(names)}")
        setattr(sec, key, _coerce(dotted, names[key], value))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        cfg = cls()
        for section, values in data.items():
            if section not in _SECTIONS:
                raise ConfigError(f"{source}: unknown section [{section}]; expected one of {', '.join(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section}] must be a table of key = value")
            for key, value in values.items():
                try:
                    cfg.set(f"{section}.{key}", value)
                except ConfigError as exc:
                    raise ConfigError(f"{source}: {exc}") from None
        return cfg

    def validate(self, world_size: int = 1, check_paths: bool = True) -> None:
        """Raise :class:`ConfigError` for any value that cannot work, before any work starts."""
        t, d, o, m = self.train, self.data, self.optim, self.model
        _positive("data.seq_len", d.seq_len)
        _positive("train.global_batch", t.global_batch)
        if t.steps < 0 or (t.steps == 0 and t.max_seconds <= 0):
            raise ConfigError(f"train.steps = {t.steps}: need steps >= 1, or steps = 0 with train.max_seconds > 0")
        if t.stop_after < 0:
            raise ConfigError(f"train.stop_after = {t.stop_after} must be >= 0")
        if t.max_seconds < 0:
            raise ConfigError(f"train.max_seconds = {t.max_seconds} must be >= 0")
        if t.micro_batch < 0:
            raise ConfigError(f"train.micro_batch = {t.micro_batch} must be >= 0")
        if t.global_batch % world_size:
            raise ConfigError(f"train.global_batch = {t.global_batch} is not divisible by the world size {world_size}")
        per_rank = t.global_batch // world_size
        if t.micro_batch and per_rank % t.micro_batch:
            raise ConfigError(
                f"train.micro_batch = {t.micro_batch} does not divide the {per_rank} rows per rank "
                f"(global_batch {t.global_batch} / world size {world_size})"
            )
        if t.clip < 0:
            raise ConfigError(f"train.clip = {t.clip} must be >= 0")
        if not (o.lr > 0):
            raise ConfigError(f"optim.lr = {o.lr} must be > 0")
        if not (0 <= o.min_lr_ratio <= 1):
            raise ConfigError(f"optim.min_lr_ratio = {o.min_lr_ratio} must be in [0, 1]")
        if o.warmup_steps < 0 or o.weight_decay < 0:
            raise ConfigError("optim.warmup_steps and optim.weight_decay must be >= 0")
        if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
            raise ConfigError(f"optim.beta1/beta2 = {o.beta1}/{o.beta2} must be in [0, 1)")
        if self.checkpoint.every < 0 or self.checkpoint.keep < 0 or self.log.every < 1:
            raise ConfigError("checkpoint.every and checkpoint.keep must be >= 0, log.every >= 1")
        for name in ("hidden_size", "num_layers", "vocab_size"):
            if getattr(m, name) < 0:
                raise ConfigError(f"model.{name} = {getattr(m, name)} must be >= 0")
        if m.config:
            if check_paths and not os.path.isfile(m.config):
                raise ConfigError(f"model.config = {m.config!r}: no such file")
            if check_paths:
                from ..models import MMfreeLMConfig

                try:
                    MMfreeLMConfig.from_json_file(m.config)
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"model.config = {m.config!r}: {exc}") from None
        else:
            from ..models import NAMED_CONFIGS

            if m.size.lower() not in {k.lower() for k in NAMED_CONFIGS}:
                raise ConfigError(f"model.size = {m.size!r}: choose one of {', '.join(NAMED_CONFIGS)}")
        if d.tokenizer != "bytes" and check_paths and not os.path.isfile(d.tokenizer):
            raise ConfigError(f"data.tokenizer = {d.tokenizer!r}: expected 'bytes' or an existing tokenizer.json")
        if d.source == "files":
            if not d.paths:
                raise ConfigError("data.paths is empty: give the text/jsonl/parquet files (or data.source = synthetic)")
            if check_paths:
                from .data import resolve_files

                resolve_files(d.paths, d.format)  # raises naming the missing file
        if d.source == "synthetic":
            _positive("data.synthetic_tokens", d.synthetic_tokens)
            if d.synthetic_tokens < d.seq_len + 1:
                raise ConfigError(
                    f"data.synthetic_tokens = {d.synthetic_tokens} is less than one row ({d.seq_len + 1})"
                )
        if self.log.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                msg = "log.tensorboard = true needs the 'tensorboard' package: pip install tensorboard"
                raise ConfigError(msg) from None
        if d.tokenizer != "bytes":
            try:
                import tokenizers  # noqa: F401
            except ImportError:
                raise ConfigError(f"data.tokenizer = {d.tokenizer!r} needs the 'tokenizers' package") from None


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} = {value!r} must be a positive integer")


def _coerce(dotted: str, f: dataclasses.Field, value: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    choices = f.metadata.get("choices")
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = value.lower() in ("1", "true", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            value = int(value)
        elif kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
        elif kind == "list":
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(value)
        elif kind == "str":
            if not isinstance(value, str):
                raise ValueError(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{dotted} = {value!r}: expected {kind}") from None
    if choices and value not in choices:
        raise ConfigError(f"{dotted} = {value!r}: expected one of {', '.join(choices)}")
    return value


def _read_toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(f"{path}: reading TOML on Python 3.10 needs the 'tomli' package") from None
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of a TOML file (or the defaults), with ``{"section.key": value}`` overrides.

    Relative paths in the file (data.paths, data.tokenizer, model.config) are relative to it.
    """
    cfg = TrainConfig()
    if path:
        cfg = TrainConfig.from_dict(_read_toml(path), source=path)
        base = os.path.dirname(os.path.abspath(path))
        cfg.data.paths = [_rel(base, p) for p in cfg.data.paths]
        if cfg.data.tokenizer != "bytes":
            cfg.data.tokenizer = _rel(base, cfg.data.tokenizer)
        if cfg.model.config:
            cfg.model.config = _rel(base, cfg.model.config)
    for key, value in (overrides or {}).items():
        cfg.set(key, value)
    return cfg


def _rel(base: str, p: str) -> str:
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else os.path.join(base, p)


# ----------------------------------------------------------------------------------------
# Command-line flags, generated from the fields above
# ----------------------------------------------------------------------------------------


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--section.key`` flag per field (default: the file's value, else the field default)."""
    defaults = TrainConfig()
    for section in _SECTIONS:
        group = parser.add_argument_group(f"[{section}]")
        for f in fields(getattr(defaults, section)):
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            default = getattr(getattr(defaults, section), f.name)
            shown = ",".join(default) if isinstance(default, list) else default
            metavar = {"bool": "true|false", "list": "A,B,.."}.get(kind, kind.upper())
            choices = f.metadata.get("choices")
            if choices:
                metavar = "|".join(choices)
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"cfg:{section}.{f.name}",
                default=None,
                metavar=metavar,
                help=f"{f.metadata['help']} (default: {shown!s})",
            )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file named by ``args.config`` (if any) with the flags given on top."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return load_config(getattr(args, "config", None), overrides)
