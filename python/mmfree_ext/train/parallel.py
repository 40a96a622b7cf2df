"""Process group, device and model setup: FSDP2 (``fully_shard`` per block and at the root)
with a ``MixedPrecisionPolicy``, activation checkpointing and ``torch.compile``.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the process joins the
group (NCCL on CUDA, gloo on CPU). A plain process runs at world size 1; it creates a
one-process group only when FSDP is wanted there (``bf16-mixed`` needs FSDP's mixed-precision
casts: the latent weights stay fp32, compute runs in bf16).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..models import MMfreeLMConfig, MMfreeLMForCausalLM, named_config
from .config import ConfigError, TrainConfig

__all__ = ["Runtime", "build_model", "resolve_precision", "setup_runtime", "teardown"]


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool  # a process group exists (torchrun, or a one-process group for FSDP)
    owns_group: bool  # this code created the group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


#: NVLink multicast (NVLS) stays off in every rank: on shared multi-GPU hosts a program that
#: creates multicast objects (NCCL's NVLS collectives, torch's multicast symmetric memory,
#: NVSHMEM's NVLS) can put the host's GPUs out of service for everyone. FSDP2's all-gather and
#: reduce-scatter run on NCCL's ring/tree algorithms instead. Applied before the first
#: communicator exists; MMFREE_ALLOW_NVLS=1 leaves the environment as the user set it.
NVLS_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_nvlink_multicast() -> dict[str, str]:
    """Switch NVLink multicast off in this process (unless MMFREE_ALLOW_NVLS=1); returns the settings."""
    if os.environ.get("MMFREE_ALLOW_NVLS") != "1":
        os.environ.update(NVLS_OFF_ENV)
    return {key: os.environ.get(key, "") for key in NVLS_OFF_ENV}


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return p


def wants_fsdp(cfg: TrainConfig, device: torch.device, world_size: int) -> bool:
    mode = cfg.train.fsdp
    if mode == "on":
        return True
    if mode == "off":
        if world_size > 1:
            raise ConfigError("train.fsdp = off needs a world size of 1 (FSDP is how ranks share the model)")
        if resolve_precision(cfg, device) == "bf16-mixed":
            raise ConfigError("train.precision = bf16-mixed needs FSDP (its MixedPrecisionPolicy); set train.fsdp")
        return False
    return world_size > 1 or resolve_precision(cfg, device) == "bf16-mixed"


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join (or create) the process group and pick this rank's device. Validates ``cfg`` first."""
    from .._native import cuda_available

    torchrun = _launched_by_torchrun()
    world = int(os.environ["WORLD_SIZE"]) if torchrun else 1
    rank = int(os.environ["RANK"]) if torchrun else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if torchrun else 0
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if cuda_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {cfg.train.device!r}: no CUDA device is available")
        device = torch.device("cuda", local_rank if torchrun else (torch.device(want).index or 0))
        torch.cuda.set_device(device)
    elif want == "cpu":
        device = torch.device("cpu")
    else:
        raise ConfigError(f"train.device = {cfg.train.device!r}: expected auto, cpu or cuda")
    cfg.validate(world_size=world)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        disable_nvlink_multicast()
    distributed, owns = dist.is_initialized(), False
    if not distributed and (torchrun or wants_fsdp(cfg, device, world)):
        if torchrun:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        distributed = owns = True
    if distributed and dist.get_world_size() != world:
        world, rank = dist.get_world_size(), dist.get_rank()
    return Runtime(rank, world, local_rank, device, distributed, owns)


def teardown(rt: Runtime, finished: bool = True) -> None:
    """Destroy the group this code created. After a finished run, first wait for every rank: a
    rank that tore its gloo connections down while a peer was still finishing its last step
    aborted at exit (std::terminate in the communicator's threads; CI, about 1 run in 3).
    After an error there is no barrier (the peers may never reach it)."""
    if rt.owns_group and dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def model_config(cfg: TrainConfig, vocab_size: int, bos: int | None = None, eos: int | None = None) -> MMfreeLMConfig:
    """The model's config: a config.json or a named size, with the [model] overrides.

    The ``tiny`` size takes the tokenizer's vocabulary and bos/eos ids unless
    ``model.vocab_size`` is set."""
    m = cfg.model
    over: dict = {}
    if m.hidden_size:
        over["hidden_size"] = m.hidden_size
    if m.num_layers:
        over["num_hidden_layers"] = m.num_layers
    if m.vocab_size:
        over["vocab_size"] = m.vocab_size
    elif not m.config and m.size.lower() == "tiny":
        over.update(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos)
    if m.config:
        base = MMfreeLMConfig.from_json_file(m.config).to_dict()
        if "hidden_size" in over:  # a new width takes its default intermediate size
            base.pop("intermediate_size", None)
        base.update(over)
        mc = MMfreeLMConfig.from_dict(base)
    else:
        mc = named_config(m.size, **over)
    if mc.packed:
        raise ConfigError(f"model.config = {m.config!r} describes a packed model; training needs latent weights")
    if mc.vocab_size < vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({mc.vocab_size}) is smaller than the tokenizer's ({vocab_size}); "
            "set model.vocab_size"
        )
    return mc


@torch.no_grad()
def _init_weights(model: MMfreeLMForCausalLM, seed: int, device: torch.device) -> None:
    """:meth:`MMfreeLMForCausalLM.init_weights` (a CPU generator in parameter order) on CPU; on
    CUDA the same distribution drawn by a seeded CUDA generator on the device (a 1.3B model's
    CPU draw takes tens of seconds). Either way every rank draws the same values."""
    if device.type != "cuda":
        model.init_weights(seed)
        return
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name == "model.lower_bounds":
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)


def build_model(cfg: TrainConfig, mc: MMfreeLMConfig, rt: Runtime) -> tuple[nn.Module, MMfreeLMForCausalLM, bool]:
    """The model on ``rt.device``, seeded, cast, checkpointed, compiled and sharded as configured.

    Returns ``(module to call, the MMfreeLMForCausalLM inside, whether FSDP wraps it)``.
    Every rank draws the same init before sharding (see :func:`_init_weights`).
    """
    with torch.device("meta"):
        model = MMfreeLMForCausalLM(mc, init_seed=None)
    model.to_empty(device=rt.device)
    _init_weights(model, cfg.model.init_seed, rt.device)
    precision = resolve_precision(cfg, rt.device)
    if precision == "bf16":
        model.to(torch.bfloat16)
    for block in model.model.layers:
        block.activation_checkpointing = cfg.train.activation_checkpointing
    fsdp = wants_fsdp(cfg, rt.device, rt.world_size)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Inputs are not cast: the per-layer lower bounds and states the blocks take stay fp32.
        param_dtype = torch.bfloat16 if precision == "bf16-mixed" else None
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.model.layers:
            if cfg.train.compile:
                block.compile(fullgraph=True)
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model, model, fsdp
