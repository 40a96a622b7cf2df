"""Checkpoints of a run (``torch.distributed.checkpoint``, sharded) and its exports.

A checkpoint is the folder ``OUT_DIR/checkpoints/step_XXXXXXXX`` holding the DCP shards of
``model`` and ``optim`` (keyed by parameter name, so it loads at any world size and with or
without FSDP), ``rng_rank{R}.pt`` (each rank's torch RNG state) and, written last by rank 0
once every rank has finished, ``train_state.json`` (step, data position, tokens, the config):
a folder without it is an incomplete save and is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..models import MMfreeLMConfig, MMfreeLMForCausalLM, save_model, save_packed
from .parallel import Runtime

__all__ = ["export_model", "find_latest", "load_checkpoint", "save_checkpoint"]

STATE_FILE = "train_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@contextmanager
def _single_process_ok():
    """A plain (world size 1) process saves and loads without a process group by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield


def checkpoint_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"step_{step:08d}")


def find_latest(out_dir: str) -> str | None:
    """The newest complete checkpoint of a run folder, or None."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = sorted(
        name
        for name in os.listdir(root)
        if _STEP_DIR.match(name) and os.path.isfile(os.path.join(root, name, STATE_FILE))
    )
    return os.path.join(root, done[-1]) if done else None


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict[str, Any], rt: Runtime, keep: int
) -> None:
    """Save model + optimizer (sharded, every rank writes its shards), RNG and ``train_state``."""
    os.makedirs(path, exist_ok=True) if rt.is_main else None
    rt.barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with _single_process_ok():
        dcp.save(state, checkpoint_id=path)
    torch.save(_rng_state(rt.device), os.path.join(path, f"rng_rank{rt.rank}.pt"))
    rt.barrier()
    if rt.is_main:
        tmp = os.path.join(path, STATE_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({**train_state, "world_size": rt.world_size}, fh, indent=2, default=str)
        os.replace(tmp, os.path.join(path, STATE_FILE))
        if keep:
            root = os.path.dirname(path)
            old = sorted(n for n in os.listdir(root) if _STEP_DIR.match(n))[:-keep]
            for name in old:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    rt.barrier()


def read_train_state(path: str) -> dict[str, Any]:
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} is not a complete checkpoint (no {STATE_FILE})")
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime) -> dict[str, Any]:
    """Load a checkpoint saved at any world size into ``model``/``optimizer``; returns its
    train state. The RNG state is restored when the world size is the same."""
    meta = read_train_state(path)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = os.path.join(path, f"rng_rank{rt.rank}.pt")
    if meta.get("world_size") == rt.world_size and os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and rt.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], rt.device)
    return meta


def export_model(model: nn.Module, mc: MMfreeLMConfig, out_dir: str, rt: Runtime, tokenizer: str) -> dict[str, str]:
    """Gather the full fp32 weights and write ``out_dir/latent`` (HF-style config.json +
    model.safetensors, latent weights) and ``out_dir/packed`` (2-bit, for ``mmfree generate``),
    each with the run's tokenizer.json when it has one. Collective: every rank calls it."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    paths = {"latent": os.path.join(out_dir, "latent"), "packed": os.path.join(out_dir, "packed")}
    if rt.is_main:
        with torch.device("meta"):
            plain = MMfreeLMForCausalLM(MMfreeLMConfig.from_dict(mc.to_dict()), init_seed=None)
        plain.load_state_dict({k: v.float() for k, v in full.items()}, strict=True, assign=True)
        save_model(plain, paths["latent"], progress=False)
        save_packed(plain, paths["packed"], progress=False)
        if tokenizer != "bytes":
            for p in paths.values():
                shutil.copyfile(tokenizer, os.path.join(p, "tokenizer.json"))
    rt.barrier()
    return paths
