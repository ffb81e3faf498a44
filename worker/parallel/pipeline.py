"""Point-to-point links between pipeline stages.

Stage s sends each step's message and its hidden states to the rank with the same
tensor-parallel rank in stage s + 1; the last stage sends the hidden rows that sample back
to stage 0, where the LM head and the sampler live (next to the scheduler's per-request
sampling state). Sends never wait for the receiver: a stage goes on with its next
micro-batch while the next stage is still busy, which is what keeps stages from idling.
A send's tensors are kept until it completed.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist

from lmfleet.worker.parallel.state import ParallelGroups


class PipelineLink:
    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups
        stage, tp_rank = groups.pp_rank, groups.tp_rank
        last = groups.pp_size - 1
        self.previous = groups.global_rank(stage - 1, tp_rank) if stage > 0 else None
        self.next = groups.global_rank(stage + 1, tp_rank) if stage < last else None
        self.first = groups.global_rank(0, tp_rank)
        self.last = groups.global_rank(last, tp_rank)
        self._sends: list[tuple[Any, tuple[torch.Tensor, ...]]] = []

    def _isend(self, tensor: torch.Tensor, destination: int, group: Any) -> None:
        work = dist.isend(tensor, destination, group=group)
        self._sends.append((work, (tensor,)))
        self._sends = [(w, kept) for w, kept in self._sends if not w.is_completed()]

    # ---- step messages (pickled, over gloo) ---------------------------------------------
    def send_message(self, message: Any) -> None:
        """To the next stage (no-op on the last)."""
        if self.next is None:
            return
        payload = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
        self._isend(torch.tensor([payload.numel()], dtype=torch.int64), self.next,
                    self.groups.pipe_messages)
        self._isend(payload, self.next, self.groups.pipe_messages)

    def recv_message(self) -> Any:
        """The previous stage's next message (waits as long as the replica idles)."""
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, self.previous, group=self.groups.pipe_messages)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(payload, self.previous, group=self.groups.pipe_messages)
        return pickle.loads(payload.numpy().tobytes())

    # ---- hidden states (over the device group) --------------------------------------------
    def send_hidden(self, hidden: torch.Tensor) -> None:
        """(2, T, H) residual stream and last layer's output, to the next stage."""
        self._isend(hidden.contiguous(), self.next, self.groups.pipe_hidden)

    def recv_hidden(self, shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
        hidden = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(hidden, self.previous, group=self.groups.pipe_hidden)
        return hidden

    def send_to_first(self, rows: torch.Tensor) -> None:
        """(N, H) final hidden rows that sample, back to stage 0."""
        self._isend(rows.contiguous(), self.first, self.groups.pipe_return)

    def recv_from_last(self, shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
        rows = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(rows, self.last, group=self.groups.pipe_return)
        return rows

    def flush(self) -> None:
        """Wait for every send still in flight (before leaving the groups)."""
        for work, _ in self._sends:
            work.wait()
        self._sends = []
