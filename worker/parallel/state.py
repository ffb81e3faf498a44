"""The tensor-parallel group of this process: rank, size and the collectives the layers use.

One replica = `tp` processes. Layers read the group from here at construction, so the model
code never names ranks. With no group set up (tp = 1) every collective is a no-op, so a
single-rank engine runs exactly the ops it always ran.

Tensors travel over the device group (NCCL on CUDA, gloo on CPU); step messages travel
over a CPU (gloo) group, which is the same group on CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

# Group set-up and every collective give up after this long instead of hanging forever
# when a rank died or never came up.
DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    device_group: Any  # torch.distributed ProcessGroup for tensors
    cpu_group: Any  # gloo ProcessGroup for step messages


_group: Optional[TPGroup] = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment() -> dict[str, str]:
    """Environment every rank runs with: NVLink multicast (NVLS) stays off, as on every
    machine this project runs on."""
    return {"NCCL_NVLS_ENABLE": "0"}


def init_tp_group(rank: int, size: int, port: int, device: str = "cpu",
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup:
    """Join the replica's group on 127.0.0.1:port; blocks until all `size` ranks joined
    (or raises after timeout_s)."""
    global _group
    if _group is not None:
        raise RuntimeError("a tensor-parallel group is already set up in this process")
    os.environ.update(rank_environment())
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=timeout)
    device_group = dist.group.WORLD
    cpu_group = device_group if backend == "gloo" else dist.new_group(backend="gloo",
                                                                       timeout=timeout)
    _group = TPGroup(rank, size, device_group, cpu_group)
    return _group


def destroy_tp_group() -> None:
    global _group
    if _group is not None:
        _group = None
        if dist.is_initialized():
            dist.destroy_process_group()


def get_tp_group() -> Optional[TPGroup]:
    return _group


def get_tp_rank() -> int:
    return 0 if _group is None else _group.rank


def get_tp_size() -> int:
    return 1 if _group is None else _group.size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the group in place; returns x (untouched at tp = 1)."""
    if _group is not None and _group.size > 1:
        dist.all_reduce(x, group=_group.device_group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's x along dim, in rank order (x itself at tp = 1)."""
    if _group is None or _group.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_group.size)]
    dist.all_gather(parts, x.contiguous(), group=_group.device_group)
    return torch.cat(parts, dim=dim)


def all_reduce_min(value: int) -> int:
    """The smallest of every rank's value (e.g. KV blocks: all ranks must hold as many)."""
    if _group is None or _group.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_group.cpu_group)
    return int(tensor.item())


def broadcast_message(message: Any = None) -> Any:
    """Rank 0 sends `message` over the CPU group; every other rank returns what it got."""
    assert _group is not None
    box = [message if _group.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_group.cpu_group)
    return box[0]
