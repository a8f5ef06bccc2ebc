"""Data parallelism on torch.distributed, applied from outside the model.

A run started by torchrun (`torchrun --nproc-per-node N -m lmforge train ...`, or `lmforge train --nproc N`, which
runs that) has RANK / WORLD_SIZE / LOCAL_RANK in its environment; `init_distributed` joins the process group (NCCL
on GPUs, Gloo on CPU) and says who this process is. Every rank builds the same model from the same seed, DDP
all-reduces the gradients, and the data loader gives each rank its own rows of one global batch (data/loader.py),
so N ranks with --train.batch_size B step exactly like one process with batch N*B. With --train.parallel fsdp,
FSDP2 (`fully_shard`, per block and then the whole model) shards weights, gradients and optimizer state instead;
checkpoints then gather full state dicts (`full_state`) so they load with any world size, sharded or not. Only
rank 0 writes: the run folder, checkpoints, the ledger, progress. The ranks agree every step on the values that decide when to stop
(wall time, Ctrl-C), so none waits forever on a collective the others have left.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from lmforge.errors import ConfigError

TIMEOUT = datetime.timedelta(minutes=10)  # a rank silent this long (dead, hung) fails the collective


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The value averaged over ranks (itself in a single process)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)  # a sum: Gloo has no average
            value /= self.world_size
        return value

    def total(self, value: float) -> float:
        """A number summed over ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def largest(self, values: list[float]) -> list[float]:
        """Each number's maximum over ranks: one small collective for all the values the ranks must agree on."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    @property
    def device(self) -> torch.device:
        backend = dist.get_backend() if self.distributed else "gloo"
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def init_distributed(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (a single-process World if it describes none); returns the
    World and the device this rank computes on (cuda:LOCAL_RANK on GPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                              f"start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return World(rank, world_size, local_rank), device


def wrap_data_parallel(model: nn.Module, world: World, sites: int = 1, site_group: object = None) -> nn.Module:
    """DDP around the model over all ranks, or over the ranks of this rank's site (DiLoCo); the model itself is
    unchanged and still holds the weights. A site of one rank needs no wrapper."""
    if world.world_size // sites == 1:
        return model
    device_ids = [model.embed.weight.device.index] if model.embed.weight.is_cuda else None
    # buffers (RoPE tables) are computed identically on every rank: nothing to broadcast before each forward
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False, process_group=site_group)


def shard_model(model: nn.Module, world: World) -> None:
    """FSDP2 in place: each block is its own unit (gathered just before it runs, freed after), then the rest."""
    if not world.distributed:
        return
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, list[dict]]:
    """Whole (unsharded) model and optimizer state dicts, optimizer state keyed by parameter name: the same on every
    world size. Collective under FSDP: every rank calls it; rank 0 gets the tensors."""
    return get_model_state_dict(model, options=FULL), [get_optimizer_state_dict(model, opt, options=FULL)
                                                       for opt in optimizers]


def load_full_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], model_state: dict,
                    optimizer_states: list[dict]) -> None:
    """The inverse of `full_state`, onto a sharded or plain model."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    for opt, state in zip(optimizers, optimizer_states, strict=True):
        set_optimizer_state_dict(model, opt, state, options=options)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
