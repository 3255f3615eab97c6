"""Process groups and FSDP2 sharding (torchtune style: `fully_shard` every block, then the root).

Notable:
- `setup()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain `nvlm train` (no torchrun) is one process and
  never creates a process group. Backend: nccl on CUDA, gloo on CPU.
- `shard_model` shards every InternViT layer and every decoder layer as its own FSDP2 unit, then the root (whatever
  leftovers remain: embeddings, mlp1, final norm, lm_head, ViT patch/position embeddings). The ViT is frozen, so its
  units only ever all-gather in forward.
- FSDP2 *averages* gradients over ranks. The trainer wants sums (its loss is already divided by the global count of
  supervised tokens), so it multiplies each rank's loss by the world size (see trainer.py).
- Every rank must issue the same collectives in the same order: the trainer keeps the number of forward passes and
  the ViT/projector usage in lockstep (trainer.py `_plan`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None, timeout_s: float = 1800) -> DistEnv:
    """Join the torchrun process group (if any) and pick this rank's device (`device`: "cpu"/"cuda"/None=auto)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if use_cuda else {}))
    return DistEnv(rank, world, local, dev)


def teardown(*, wait: bool = True) -> None:
    """Leave the process group. `wait` (after a clean run): every rank arrives before any tears down, since a gloo
    rank whose peer has already closed its connections can abort at exit ("terminate called without an active
    exception", seen under CPU contention). After an error there is no waiting for peers that may never come."""
    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def shard_model(root: nn.Module, env: DistEnv, *, vision_layers, decoder_layers,
                reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: each ViT layer and each decoder layer is a unit, then `root` (in place; returns `root`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for layer in vision_layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for layer in decoder_layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return root


def all_reduce(t: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (a no-op for one process); gloo works on CPU tensors, nccl on CUDA ones."""
    if env.distributed:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
    return t


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """`obj` from rank 0 on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
