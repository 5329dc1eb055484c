"""Scale-out under ``torchrun``: process group set-up, gradient averaging, rank-0-only side effects.

``torchrun --nproc_per_node=N -m pipeline.run train ...`` (or multi-node through torchrun's
rendezvous, see the README) runs N replicas. Each takes ``data.batch_size / N`` images of every
global batch (``DistributedSampler``), gradients are averaged across replicas after Larsen's
per-group backward passes (an explicit all-reduce: DDP's hooks assume one backward per step, the
VAE-GAN makes three into disjoint parameter groups), and only rank 0 logs to MLflow, writes
checkpoints and grids. On CUDA, BatchNorm layers become ``SyncBatchNorm``; on CPU (gloo) PyTorch
has no SyncBatchNorm, so each replica normalises with its own half batch, which is the one way a
CPU run differs from one process with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owner: bool = False  # this call created the process group (and shuts it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owner = not dist.is_initialized()
    if owner:  # else a stage inside another (gain -> train/classify) shares its group
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, owner)


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average ``.grad`` over replicas in one coalesced all-reduce (missing grads count as 0)."""
    if not info.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_finite(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """A value every replica agrees on: non-finite if any replica's is (NaN propagates through sum)."""
    if not info.enabled:
        return t
    t = t.detach().float().clone()
    dist.all_reduce(t)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and info.owner and dist.is_initialized():
        dist.destroy_process_group()


def agree(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` on every replica (decisions that read files rank 0 wrote, run names
    with a time stamp): replicas must take the same branch or the collectives deadlock."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
