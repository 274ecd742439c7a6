"""One code path for one process and for torchrun: RANK/WORLD_SIZE from the environment.

A missing RANK means world size 1 and no process group. Only rank 0 logs and writes files.
On CUDA the group has two backends, "cpu:gloo,cuda:nccl": a collective runs on its tensors' device (the
loop's token counts and eval totals are CPU tensors; NCCL alone would reject them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slimtune.registry import OPTIONS
from slimtune.technique import Technique


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(requested: str) -> torch.device:
    """train.device: cuda:LOCAL_RANK; auto takes it when this rank has a GPU of its own (more ranks than
    GPUs, e.g. a 2-process CPU run on a 1-GPU machine, run on the CPU)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "cuda" or (requested == "auto" and local < torch.cuda.device_count()):
        return torch.device("cuda", local)
    return torch.device("cpu")


def setup(device: torch.device) -> DistInfo:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return DistInfo()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (a no-op for one process); returns x."""
    if info.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value on every rank (e.g. an error message or a resume step)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


@OPTIONS.register("torchrun")
class Torchrun(Technique):
    """More than one process (torchrun, WORLD_SIZE > 1)."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return world > 1

    @staticmethod
    def shown(cfg, world: int) -> str:
        return f"{world} processes"

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"single_process"}
