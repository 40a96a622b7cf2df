"""Reading and writing MMfreeLM checkpoint folders (local paths only; nothing is downloaded).

Latent checkpoints (the paper's): ``config.json`` plus ``model.safetensors``, sharded
safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin`` (also sharded
with ``pytorch_model.bin.index.json``). Packed checkpoints (written by :func:`save_packed`):
``config.json`` with ``"mmfree": {"packed": true}`` and ``model.safetensors`` holding, for
every BitLinear, ``<name>.packed`` (uint8 2-bit codes) and ``<name>.w_scale`` (fp32 scalar).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from .._progress import progress_bar
from .config import MMfreeLMConfig
from .modeling import MMfreeLMForCausalLM

__all__ = ["CheckpointError", "load_model", "load_state_dict_files", "save_model", "save_packed"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that does not fit the model (the message names the key or file)."""


def _weight_files(model_dir: str) -> list[str]:
    """The tensor files of a checkpoint folder, in the order the index lists them."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = os.path.join(model_dir, index_name)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
            files = list(dict.fromkeys(weight_map.values()))
            for name in files:
                if not os.path.isfile(os.path.join(model_dir, name)):
                    raise CheckpointError(f"{index_path} names shard {name!r}, which is not in {model_dir!r}")
            return [os.path.join(model_dir, name) for name in files]
    for single in (SAFE_SINGLE, BIN_SINGLE):
        path = os.path.join(model_dir, single)
        if os.path.isfile(path):
            return [path]
    raise CheckpointError(
        f"no weights in {model_dir!r}: expected {SAFE_SINGLE}, {SAFE_INDEX} (sharded), {BIN_SINGLE} or {BIN_INDEX}"
    )


def _read_file(path: str) -> list[tuple[str, Tensor]]:
    """Every tensor of one weight file; a truncated, corrupt or mislabelled file (a pickle
    named .safetensors, say) raises CheckpointError naming it instead of the parser's error."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as fh:
                return [(key, fh.get_tensor(key)) for key in fh.keys()]
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors/pickle/zip errors have no common base class
        kind = "safetensors" if path.endswith(".safetensors") else "torch.save (.bin)"
        raise CheckpointError(f"{path}: not a readable {kind} file (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors, got {type(state).__name__}")
    return list(state.items())


def _iter_file(path: str) -> Iterator[tuple[str, Tensor]]:
    yield from _read_file(path)


def load_state_dict_files(model_dir: str, progress: bool = True) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder (CPU), with a progress bar over the files' tensors."""
    files = _weight_files(model_dir)
    state: dict[str, Tensor] = {}
    with progress_bar(len(files), "loading weights", disable=not progress) as bar:
        for path in files:
            for key, tensor in _iter_file(path):
                if key in state:
                    raise CheckpointError(f"key {key!r} appears in more than one shard of {model_dir!r}")
                state[key] = tensor
            bar.update(1)
    return state


def _check_keys(model: MMfreeLMForCausalLM, state: dict[str, Tensor], model_dir: str) -> None:
    """Strict key and shape check, raising one clear error that names the offending keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"checkpoint {model_dir!r} does not match the config: " + "; ".join(parts))
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"checkpoint {model_dir!r}: key {key!r} has shape {tuple(got.shape)}, "
                f"the config needs {tuple(want.shape)}"
            )
        if want.dtype in (torch.uint8,) and got.dtype != want.dtype:
            raise CheckpointError(f"checkpoint {model_dir!r}: key {key!r} has dtype {got.dtype}, expected {want.dtype}")
        if not (got.is_floating_point() or got.dtype == torch.uint8):
            raise CheckpointError(f"checkpoint {model_dir!r}: key {key!r} has non-float dtype {got.dtype}")
        if want.dtype != torch.uint8 and got.dtype == torch.uint8:
            raise CheckpointError(f"checkpoint {model_dir!r}: key {key!r} has dtype uint8, expected a float tensor")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise CheckpointError(f"checkpoint {model_dir!r}: key {key!r} holds {bad} NaN/inf value(s)")


def load_model(
    model_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    pack: bool = False,
    progress: bool = True,
) -> MMfreeLMForCausalLM:
    """Load a latent or packed checkpoint folder into :class:`MMfreeLMForCausalLM`.

    ``dtype`` casts the float weights (default: as stored; packed scales stay fp32).
    ``pack=True`` packs a latent checkpoint after loading. Any missing or unexpected key,
    wrong shape or wrong ``model_type`` raises :class:`CheckpointError`/``ValueError``
    naming it.
    """
    model_dir = os.fspath(model_dir)
    try:
        config = MMfreeLMConfig.from_pretrained(model_dir)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{os.path.join(model_dir, 'config.json')}: not valid JSON: {e}") from e
    except TypeError as e:  # a field the config class does not take, or of the wrong kind
        raise CheckpointError(f"{os.path.join(model_dir, 'config.json')}: {e}") from e
    stored_packed = config.packed
    with torch.device("meta"):
        model = MMfreeLMForCausalLM(config, init_seed=None)
        if stored_packed:
            model.pack()
    state = load_state_dict_files(model_dir, progress=progress)
    _check_keys(model, state, model_dir)
    expected = model.state_dict()
    for key, tensor in state.items():
        if expected[key].dtype == torch.float32 and key.endswith("w_scale"):
            state[key] = tensor.float()
        elif dtype is not None and tensor.is_floating_point():
            state[key] = tensor.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.to(device)
    if pack and not model.is_packed:
        with progress_bar(model.num_bit_linears(), "packing", disable=not progress) as bar:
            model.pack(progress=bar.update)
    return model.eval()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform / file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(path: str, write) -> str:
    """``write(tmp_path)`` into a temp file beside ``path``, fsync it; returns the temp path."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def save_model(model: MMfreeLMForCausalLM, out_dir: str | os.PathLike, *, progress: bool = True) -> None:
    """Write ``config.json`` and ``model.safetensors`` (the model as it is: latent or packed).

    Atomic per file: each is written to a temp file in ``out_dir``, fsynced, then renamed
    over the old one (``os.replace``), so a save killed at any point leaves the previous
    checkpoint loadable (a killed save may leave a ``.model.safetensors.tmp-<pid>`` file,
    which loading ignores). The weights are replaced before the config. A folder holding a
    checkpoint of another layout (sharded or .bin) is refused: its index would shadow the
    new file.
    """
    from safetensors.torch import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    others = [n for n in (SAFE_INDEX, BIN_INDEX, BIN_SINGLE) if os.path.exists(os.path.join(out_dir, n))]
    if others:
        raise CheckpointError(
            f"{out_dir!r} already holds a checkpoint of another layout ({', '.join(others)}), which would "
            f"shadow the new {SAFE_SINGLE}; save to an empty folder"
        )
    items = list(model.state_dict().items())
    tensors = {}
    with progress_bar(len(items), "saving", disable=not progress) as bar:
        for key, t in items:
            tensors[key] = t.detach().to("cpu").contiguous().clone()
            bar.update(1)
    config = copy.copy(model.config)
    config.packed = model.is_packed
    weights_path = os.path.join(out_dir, SAFE_SINGLE)
    config_path = os.path.join(out_dir, "config.json")
    tmp_weights = _write_durable(weights_path, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    try:
        tmp_config = _write_durable(config_path, lambda p: _write_config(config, p))
    except BaseException:
        os.remove(tmp_weights)
        raise
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_config, config_path)
    _fsync_dir(out_dir)
    model.config.packed = model.is_packed


def _write_config(config: MMfreeLMConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config.to_dict(), fh, indent=2, sort_keys=True)
        fh.write("\n")


def save_packed(model: MMfreeLMForCausalLM, out_dir: str | os.PathLike, *, progress: bool = True) -> None:
    """Pack ``model`` (if needed) and save it: the folder loads on CPU or CUDA via ``from_pretrained``."""
    if not model.is_packed:
        with progress_bar(model.num_bit_linears(), "packing", disable=not progress) as bar:
            model.pack(progress=bar.update)
    save_model(model, out_dir, progress=progress)
