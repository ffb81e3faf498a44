"""Copies of KV blocks between the device cache and the host-memory tier.

Layouts: device storage (L, 2, num_blocks, block_size, kv_heads, D) and host storage
(num_host_blocks, L, 2, block_size, kv_heads, D), so one indexing op moves a block of
every layer at once.

On CUDA the host storage is pinned and copies go straight between it and a device-side
staging tensor, one DMA per run of consecutive host block ids (the host pool hands out
ids in order, so runs are long); no CPU-side copy touches the data. With `overlap`
they run on a side stream:
- swap-out: gather the device blocks into staging (the forward pass waits only for this
  gather, since the freed device blocks may be reused in the same step), then copy
  staging to host while the forward pass runs;
- swap-in: copy host runs into staging, scatter into the device blocks; the forward
  pass waits for it.
Side-stream order keeps a swap-in behind any earlier swap-out of the same host blocks.
Without overlap (and always on CPU) the same copies run synchronously.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def consecutive_runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(offset in ids, first id, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for offset, block_id in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == block_id:
            first_offset, first_id, length = runs[-1]
            runs[-1] = (first_offset, first_id, length + 1)
        else:
            runs.append((offset, block_id, 1))
    return runs


@dataclass
class KVSwapper:
    device_storage: torch.Tensor  # (L, 2, N, bs, H, D)
    host_storage: torch.Tensor  # (Nh, L, 2, bs, H, D)
    overlap: bool = True

    def __post_init__(self) -> None:
        self.device = self.device_storage.device
        self.use_stream = self.overlap and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.use_stream else None
        self._pending: list[torch.cuda.Event] = []
        self.block_bytes = self.device_storage[:, :, 0].numel() * self.device_storage.itemsize

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Perform this step's copies; returns once the forward pass may safely run."""
        # Block counts are kept by KVCacheManager.swap_stats, which decides the swaps.
        if swap_out:
            self._swap_out(swap_out)
        if swap_in:
            self._swap_in(swap_in)

    def finish_pending(self) -> None:
        """Wait for device->host copies still in flight (only needed before the host tier
        is read outside the side stream, e.g. by tests and benchmarks)."""
        for event in self._pending:
            event.synchronize()
        self._pending.clear()

    def _swap_out(self, pairs: list[tuple[int, int]]) -> None:
        device_ids = torch.tensor([d for d, _ in pairs], device=self.device)
        host_ids = [h for _, h in pairs]
        if self.device.type != "cuda":
            blocks = self.device_storage.index_select(2, device_ids)  # (L, 2, n, bs, H, D)
            self.host_storage.index_copy_(0, torch.tensor(host_ids),
                                          blocks.permute(2, 0, 1, 3, 4, 5))
            return
        main = torch.cuda.current_stream(self.device)
        stream = self.stream or main
        if self.stream is not None:
            stream.wait_stream(main)  # the blocks' KV was written by earlier forwards
        with torch.cuda.stream(stream):
            gathered = self.device_storage.index_select(2, device_ids)
            staging = gathered.permute(2, 0, 1, 3, 4, 5).contiguous()  # (n, L, 2, bs, H, D)
            gather_done = torch.cuda.Event()
            gather_done.record(stream)
            for offset, first, length in consecutive_runs(host_ids):
                self.host_storage[first:first + length].copy_(
                    staging[offset:offset + length], non_blocking=self.stream is not None)
            copy_done = torch.cuda.Event()
            copy_done.record(stream)
        if self.stream is not None:
            staging.record_stream(stream)
            main.wait_event(gather_done)
            self._pending.append(copy_done)

    def _swap_in(self, pairs: list[tuple[int, int]]) -> None:
        host_ids = [h for h, _ in pairs]
        device_ids = torch.tensor([d for _, d in pairs], device=self.device)
        if self.device.type != "cuda":
            blocks = self.host_storage.index_select(0, torch.tensor(host_ids))
            self.device_storage.index_copy_(2, device_ids, blocks.permute(1, 2, 0, 3, 4, 5))
            return
        main = torch.cuda.current_stream(self.device)
        stream = self.stream or main
        if self.stream is not None:
            stream.wait_stream(main)
        with torch.cuda.stream(stream):
            staging = torch.empty((len(pairs), *self.host_storage.shape[1:]),
                                  dtype=self.host_storage.dtype, device=self.device)
            for offset, first, length in consecutive_runs(host_ids):
                staging[offset:offset + length].copy_(self.host_storage[first:first + length],
                                                      non_blocking=self.stream is not None)
            self.device_storage.index_copy_(2, device_ids, staging.permute(1, 2, 0, 3, 4, 5))
            done = torch.cuda.Event()
            done.record(stream)
        if self.stream is not None:
            staging.record_stream(stream)
            main.wait_event(done)
