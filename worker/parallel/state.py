"""The parallel groups of this process: its place in the replica and the collectives the
layers use.

One replica = tp x pp processes. Global rank r is tensor-parallel rank r % tp of pipeline
stage r // tp; rank 0 (stage 0, tp rank 0) runs the scheduler. Layers read the group
from here at construction, so the model code never names ranks. With no group set up
(tp = pp = 1) every collective is a no-op, so a single-rank engine runs exactly the ops it
always ran.

Groups (every rank creates every group, in the same order, as torch.distributed needs):
- `tp_group`: the ranks of this stage, for the layers' all-reduce / all-gather (NCCL on
  CUDA, gloo on CPU);
- `world_cpu`: all ranks over gloo (agreeing on the KV block count);
- `stage0_messages`: stage 0's ranks over gloo, for rank 0's step messages;
- `pipe_messages` (gloo) and `pipe_hidden` (device): stage s -> s + 1, point to point;
- `pipe_return` (device): the last stage's sampled rows back to stage 0 (its own group,
  so on NCCL it never queues behind a forward send on the same link).
The message groups wait without a deadline (a rank idles there between requests); tensor
collectives give up after `timeout_s`, so a dead rank fails the step instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

# Group set-up and every tensor collective give up after this long instead of hanging
# forever when a rank died or never came up.
DEFAULT_TIMEOUT_S = 120.0
# Waiting for the next step message has no real deadline: a replica may idle for days.
_IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class ParallelGroups:
    rank: int  # global: stage * tp + tp_rank
    tp_size: int
    pp_size: int
    tp_group: Any  # this stage's ranks, for tensors
    world_cpu: Any
    stage0_messages: Any  # None unless tp > 1
    pipe_messages: Any  # None unless pp > 1
    pipe_hidden: Any
    pipe_return: Any

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    def global_rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp_size + tp_rank


_groups: Optional[ParallelGroups] = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment() -> dict[str, str]:
    """Environment every rank runs with: NVLink multicast (NVLS) stays off, as on every
    machine this project runs on."""
    return {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def init_groups(rank: int, tp_size: int, pp_size: int, port: int, device: str = "cpu",
                timeout_s: float = DEFAULT_TIMEOUT_S, host: str = "127.0.0.1",
                cuda_device: Optional[int] = None) -> ParallelGroups:
    """Join the replica's groups, whose rendezvous rank 0 serves on host:port; blocks until
    all tp x pp ranks joined (or raises after timeout_s). On CUDA this rank uses device
    `cuda_device` (default: its rank, for ranks that share one process's devices)."""
    global _groups
    if _groups is not None:
        raise RuntimeError("parallel groups are already set up in this process")
    os.environ.update(rank_environment())
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank if cuda_device is None else cuda_device)
    world = tp_size * pp_size
    address = f"[{host}]" if ":" in host else host
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                            world_size=world, timeout=timeout)

    def group(ranks: list[int], on: str, wait: datetime.timedelta = timeout) -> Any:
        if on == backend and len(ranks) == world and wait == timeout:
            return dist.group.WORLD
        return dist.new_group(ranks, backend=on, timeout=wait)

    stage_groups = [group(list(range(s * tp_size, (s + 1) * tp_size)), backend)
                    for s in range(pp_size)]
    everyone = list(range(world))
    world_cpu = group(everyone, "gloo")
    stage0 = group(list(range(tp_size)), "gloo", _IDLE_TIMEOUT) if tp_size > 1 else None
    pipe_messages = pipe_hidden = pipe_return = None
    if pp_size > 1:
        pipe_messages = group(everyone, "gloo", _IDLE_TIMEOUT)
        pipe_hidden = dist.new_group(everyone, backend=backend, timeout=timeout)
        pipe_return = dist.new_group(everyone, backend=backend, timeout=timeout)
    _groups = ParallelGroups(rank, tp_size, pp_size, stage_groups[rank // tp_size],
                             world_cpu, stage0, pipe_messages, pipe_hidden, pipe_return)
    return _groups


def destroy_groups() -> None:
    global _groups
    if _groups is not None:
        _groups = None
        if dist.is_initialized():
            dist.destroy_process_group()


def get_groups() -> Optional[ParallelGroups]:
    return _groups


def get_tp_rank() -> int:
    return 0 if _groups is None else _groups.tp_rank


def get_tp_size() -> int:
    return 1 if _groups is None else _groups.tp_size


def get_pp_rank() -> int:
    return 0 if _groups is None else _groups.pp_rank


def get_pp_size() -> int:
    return 1 if _groups is None else _groups.pp_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over this stage's tensor-parallel ranks in place; returns x (untouched at
    tp = 1)."""
    if _groups is not None and _groups.tp_size > 1:
        dist.all_reduce(x, group=_groups.tp_group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate this stage's ranks' x along dim, in rank order (x itself at tp = 1)."""
    if _groups is None or _groups.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_groups.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_groups.tp_group)
    return torch.cat(parts, dim=dim)


def all_reduce_min(value: int) -> int:
    """The smallest of every rank's value (e.g. KV blocks: all ranks must hold as many)."""
    if _groups is None:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_groups.world_cpu)
    return int(tensor.item())


def broadcast_message(message: Any = None) -> Any:
    """Rank 0 sends `message` to the other ranks of stage 0; each of them returns it."""
    if _groups is None or _groups.stage0_messages is None:
        raise RuntimeError("no tensor-parallel group to broadcast a step message to")
    box = [message if _groups.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_groups.stage0_messages)
    return box[0]
