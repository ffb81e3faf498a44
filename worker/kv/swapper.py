"""Copies of KV blocks between the device cache and the host-memory tier.

Layouts: device storage (L, 2, num_blocks, block_size, kv_heads, D) and host storage
(num_host_blocks, L, 2, block_size, kv_heads, D), so one indexing op moves a block of
every layer at once.

On CUDA the copies run on a side stream through pinned staging buffers:
- swap-out: gather the device blocks into a staging tensor (the forward pass waits only
  for this gather, since the freed device blocks may be reused in the same step), then
  copy it device->host while the forward pass runs; the host-side scatter into the host
  tier happens when the copy has finished (at the latest, before any swap-in);
- swap-in: gather host blocks into pinned memory, copy host->device and scatter into the
  device blocks on the side stream; the forward pass waits for it.
With `overlap=False` (and always on CPU) every copy is synchronous on the main stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class SwapCounters:
    num_swap_out_blocks: int = 0
    num_swap_in_blocks: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    # Host-side time spent issuing and finishing copies (for the offload-cost report).
    seconds: float = 0.0


@dataclass
class _PendingHostWrite:
    event: object
    staging: torch.Tensor  # pinned (n, L, 2, bs, H, D)
    host_ids: torch.Tensor  # (n,) int64 on CPU


@dataclass
class KVSwapper:
    device_storage: torch.Tensor  # (L, 2, N, bs, H, D)
    host_storage: torch.Tensor  # (Nh, L, 2, bs, H, D)
    overlap: bool = True
    counters: SwapCounters = field(default_factory=SwapCounters)

    def __post_init__(self) -> None:
        self.device = self.device_storage.device
        self.use_stream = self.overlap and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.use_stream else None
        self._pending: list[_PendingHostWrite] = []
        self.block_bytes = self.device_storage[:, :, 0].numel() * self.device_storage.itemsize

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Perform this step's copies; returns once the forward pass may safely run."""
        if not swap_out and not swap_in:
            return
        start = time.perf_counter()
        if swap_out:
            self._swap_out(swap_out)
        if swap_in:
            self.finish_pending()  # a swap-in may read host blocks still being written
            self._swap_in(swap_in)
        self.counters.num_swap_out_blocks += len(swap_out)
        self.counters.num_swap_in_blocks += len(swap_in)
        self.counters.swap_out_bytes += len(swap_out) * self.block_bytes
        self.counters.swap_in_bytes += len(swap_in) * self.block_bytes
        self.counters.seconds += time.perf_counter() - start

    def finish_pending(self) -> None:
        """Complete device->host copies still in flight (scatter them into the host tier)."""
        for pending in self._pending:
            pending.event.synchronize()
            self.host_storage.index_copy_(0, pending.host_ids, pending.staging)
        self._pending.clear()

    def _swap_out(self, pairs: list[tuple[int, int]]) -> None:
        device_ids = torch.tensor([d for d, _ in pairs], device=self.device)
        host_ids = torch.tensor([h for _, h in pairs])
        if not self.use_stream:
            blocks = self.device_storage.index_select(2, device_ids)  # (L, 2, n, bs, H, D)
            self.host_storage.index_copy_(0, host_ids, blocks.permute(2, 0, 1, 3, 4, 5).cpu())
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # the blocks' KV was written by earlier forwards
        with torch.cuda.stream(self.stream):
            gathered = self.device_storage.index_select(2, device_ids)
            gathered = gathered.permute(2, 0, 1, 3, 4, 5).contiguous()  # (n, L, 2, bs, H, D)
            gather_done = torch.cuda.Event()
            gather_done.record(self.stream)
            staging = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            staging.copy_(gathered, non_blocking=True)
            copy_done = torch.cuda.Event()
            copy_done.record(self.stream)
        gathered.record_stream(self.stream)
        main.wait_event(gather_done)
        self._pending.append(_PendingHostWrite(copy_done, staging, host_ids))

    def _swap_in(self, pairs: list[tuple[int, int]]) -> None:
        host_ids = torch.tensor([h for h, _ in pairs])
        device_ids = torch.tensor([d for _, d in pairs], device=self.device)
        blocks = self.host_storage.index_select(0, host_ids)  # (n, L, 2, bs, H, D)
        if not self.use_stream:
            moved = blocks.to(self.device).permute(1, 2, 0, 3, 4, 5)
            self.device_storage.index_copy_(2, device_ids, moved)
            return
        staging = blocks.pin_memory()
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            moved = staging.to(self.device, non_blocking=True).permute(1, 2, 0, 3, 4, 5)
            self.device_storage.index_copy_(2, device_ids, moved)
            done = torch.cuda.Event()
            done.record(self.stream)
        main.wait_event(done)
