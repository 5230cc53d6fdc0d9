"""Processes, devices and parallel wrappers, applied from outside the model in one order:

1. ``setup()`` joins the process group that ``torchrun`` describes in the environment
   (gloo on CPU, NCCL on GPU) and picks this process's device;
2. the model is built, moved to the device and, optionally, gets activation checkpointing and
   sequential attention (model options, set by the task);
3. ``wrap_model`` applies the parallel wrapper: DDP (default), FSDP2 ``fully_shard`` or
   nothing in a single process; ``torch.compile`` comes last;
4. the optimizer is built on the wrapped parameters; with ``sharding="zero1"`` it is a
   ``ZeroRedundancyOptimizer`` (optimizer states sharded, the paper's ZeRO stage 1);
5. with ``sharding="deepspeed"`` the trainer hands model and optimizer to DeepSpeed's engine
   (ZeRO stage 1 or 2, see ``deepspeed_backend``), which then reduces the gradients.

Multi-node runs use torchrun's rendezvous, e.g. on each of 2 nodes with 8 GPUs:
``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500
--rdzv-id myrun -m swinv2 train ...``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def check_device(device: str) -> torch.device:
    """``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu``) as a device this machine
    has, or a one-line ValueError saying why not: checked before anything is built, so that a
    missing GPU is not found by the first tensor moved to it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {device!r} is not a device: use auto, cpu, cuda, cuda:N, mps or xpu")
    if dev.type == "cpu":
        return dev
    if dev.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, dev.type)  # torch.cuda, torch.xpu
        available = backend.is_available()
        count = backend.device_count() if available else 0
    if not available:
        raise ValueError(f"--device {device}: this machine has no {dev.type.upper()} device that torch "
                         f"{torch.__version__} can use; use --device cpu (or auto)")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} {dev.type.upper()} device(s), "
                         f"{dev.type}:0 to {dev.type}:{count - 1}")
    return dev


def setup(device: str = "auto") -> Dist:
    """Join torchrun's process group if the environment names one; choose the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = check_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = check_device(f"cuda:{local}")  # torchrun: one GPU per local process
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, dev)


def teardown(sync: bool = False) -> None:
    """Destroy the process group; with ``sync``, first wait until every process got here, so
    that none tears the group down while another still has collectives or their worker threads
    running (gloo can then abort a process at exit)."""
    if dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: Dist, sharding: str) -> nn.Module:
    """The parallel wrapper for ``sharding`` ('none' and 'zero1' use DDP when distributed;
    'deepspeed' none here: the trainer wraps model and optimizer in DeepSpeed's engine)."""
    if not env.enabled or sharding == "deepspeed":
        return model
    if sharding == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Shard each block, then the root: parameters, gradients and optimizer states are
        # split across processes and gathered block by block in forward and backward.
        for stage in model.layers:
            for block in stage.blocks:
                fully_shard(block)
        fully_shard(model)
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    # broadcast_buffers=False as the official main.py: the model's buffers are constants.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        return model.module
    return model


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
