"""A step's batch as tensors: token ids, positions and the common attention metadata.

Batch layout: decodes (one new token each) first, then prefill chunks, all flattened into
T tokens. Everything is built with numpy on the host into one pinned int32 staging
array, then copied to the device's persistent buffers (one copy per segment that is in
use, all asynchronous: the only host sync of a step is the sampler's). The buffers never
move, so CUDA graphs captured over their views replay on each step's contents.

Padding rows (graph buckets larger than the batch) get token 0 at position 0, slot -1
(nothing stored) and context length 0 (attention writes zeros); the runner drops their
outputs. A step too large for the buffers (only the start-up profile can ask for one)
gets fresh tensors instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from lmfleet.worker.kv.manager import blocks_for_tokens
from lmfleet.worker.model.attention.base import CommonAttentionMetadata
from lmfleet.worker.scheduler.base import ScheduledRequest

# Segments of the staging array, in order; "tokens" ones hold max_num_tokens entries,
# "rows" ones max_num_reqs (+1 for the start locations), block_tables rows x width.
_TOKEN_SEGMENTS = ("input_ids", "positions", "slot_mapping")


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # (T,) int32
    positions: torch.Tensor  # (T,) int32
    common: CommonAttentionMetadata
    sample_rows: list[int]  # row in T of each token that samples, in request order
    sample_requests: list  # the Request of each sample row
    num_padded_reqs: int  # rows including graph padding (== common.num_reqs when eager)
    # (token row, request) of input tokens still on the device (sampled by the step in
    # flight): the runner fills them in on the device before the forward.
    placeholder_rows: list
    # In the persistent buffers (what CUDA graphs read), not in fresh tensors.
    persistent: bool = True


class StepInputs:
    def __init__(self, max_num_tokens: int, max_num_reqs: int, max_blocks_per_req: int,
                 block_size: int, device: torch.device) -> None:
        self.max_num_tokens = max_num_tokens
        self.max_num_reqs = max_num_reqs
        self.width = max_blocks_per_req
        self.block_size = block_size
        self.device = device
        sizes = {name: max_num_tokens for name in _TOKEN_SEGMENTS}
        sizes.update(query_start_loc=max_num_reqs + 1, seq_lens=max_num_reqs,
                     block_tables=max_num_reqs * max_blocks_per_req)
        self._offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, size in sizes.items():
            self._offsets[name] = (total, size)
            total += size
        pinned = device.type == "cuda"
        self._host = torch.zeros(total, dtype=torch.int32, pin_memory=pinned)
        self._host_np = self._host.numpy()
        # On CPU the staging array is the device buffer.
        self._device = self._host if device.type == "cpu" else torch.zeros(
            total, dtype=torch.int32, device=device)
        # Marks when the device has read the staging array: a step that samples nothing
        # does not sync, so the next one waits for this before overwriting it.
        self._copied = torch.cuda.Event() if pinned else None

    def _segment(self, buffer, name: str, count: Optional[int] = None):
        start, size = self._offsets[name]
        return buffer[start:start + (size if count is None else count)]

    def device_view(self, name: str, count: int) -> torch.Tensor:
        """A persistent device view (graph capture reads these)."""
        view = self._segment(self._device, name, count * (self.width if name ==
                                                          "block_tables" else 1))
        return view.view(count, self.width) if name == "block_tables" else view

    def fits(self, num_tokens: int, num_reqs: int, max_seq_len: int) -> bool:
        return (num_tokens <= self.max_num_tokens and num_reqs <= self.max_num_reqs
                and blocks_for_tokens(max_seq_len, self.block_size) <= self.width)

    def prepare(self, ordered: list[ScheduledRequest], num_decodes: int,
                pad_to: Optional[int] = None, extra=None) -> StepBatch:
        """Fill the inputs of `ordered` (decodes first); `pad_to` rows with padding."""
        num_reqs = len(ordered)
        num_rows = pad_to or num_reqs
        query_lens = np.fromiter((s.num_new_tokens for s in ordered), dtype=np.int64,
                                 count=num_reqs)
        seq_lens = np.fromiter((s.request.num_computed_tokens + s.num_new_tokens
                                for s in ordered), dtype=np.int64, count=num_reqs)
        num_tokens = int(query_lens.sum())
        num_padded_tokens = num_tokens + (num_rows - num_reqs)
        max_seq_len = int(seq_lens.max(initial=0))
        persistent = self.fits(num_padded_tokens, num_rows, max_seq_len)
        width = self.width if persistent else max(blocks_for_tokens(max_seq_len,
                                                                    self.block_size), 1)
        if persistent and self._copied is not None:
            self._copied.synchronize()
        host = self._host_np if persistent else None
        seg = (lambda name, count: self._segment(host, name, count)) if persistent else (
            lambda name, count: np.zeros(count, dtype=np.int32))
        ids = seg("input_ids", num_padded_tokens)
        positions = seg("positions", num_padded_tokens)
        slots = seg("slot_mapping", num_padded_tokens)
        start_loc = seg("query_start_loc", num_rows + 1)
        lens = seg("seq_lens", num_rows)
        tables = seg("block_tables", num_rows * width).reshape(num_rows, width)
        tables.fill(0)
        sample_rows, sample_requests, placeholder_rows = [], [], []
        row = 0
        bs = self.block_size
        for index, item in enumerate(ordered):
            request = item.request
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            num_blocks = blocks_for_tokens(end, bs)
            block_ids = request.block_ids[:num_blocks]
            tables[index, :num_blocks] = block_ids
            if end - start == 1:
                ids[row] = request.token_ids[start]
                positions[row] = start
                slots[row] = block_ids[start // bs] * bs + start % bs
            else:
                pos = np.arange(start, end)
                ids[row:row + end - start] = request.token_ids[start:end]
                positions[row:row + end - start] = pos
                slots[row:row + end - start] = tables[index, pos // bs] * bs + pos % bs
            row += end - start
            if request.num_pending_tokens and end == request.num_tokens:
                placeholder_rows.append((row - 1, request))
            if end == request.num_tokens:
                sample_rows.append(row - 1)
                sample_requests.append(request)
        start_loc[0] = 0
        start_loc[1:num_reqs + 1] = np.cumsum(query_lens)
        lens[:num_reqs] = seq_lens
        if num_rows > num_reqs:  # graph padding rows
            pad = slice(num_tokens, num_padded_tokens)
            ids[pad], positions[pad], slots[pad] = 0, 0, -1
            start_loc[num_reqs + 1:] = np.arange(num_tokens + 1, num_padded_tokens + 1)
            lens[num_reqs:] = 0
        to_device = self._copier(persistent)
        common = CommonAttentionMetadata(
            num_decodes=num_decodes if pad_to is None else num_rows,
            num_prefills=num_reqs - num_decodes,
            num_tokens=num_padded_tokens,
            block_size=bs,
            max_query_len=int(query_lens.max(initial=1)),
            max_seq_len=max_seq_len,
            query_lens=np.concatenate([query_lens, np.ones(num_rows - num_reqs, np.int64)]),
            seq_lens_host=np.concatenate([seq_lens, np.zeros(num_rows - num_reqs, np.int64)]),
            block_tables_host=tables,
            slot_mapping=to_device("slot_mapping", slots),
            query_start_loc=to_device("query_start_loc", start_loc),
            seq_lens=to_device("seq_lens", lens),
            block_tables=to_device("block_tables", tables),
            extra=extra,
        )
        batch = StepBatch(to_device("input_ids", ids), to_device("positions", positions),
                          common, sample_rows, sample_requests, num_rows, placeholder_rows,
                          persistent)
        if persistent and self._copied is not None:
            self._copied.record()
        return batch

    def _copier(self, persistent: bool):
        if self.device.type == "cpu":
            return lambda name, array: torch.from_numpy(array)
        if not persistent:
            return lambda name, array: torch.from_numpy(np.ascontiguousarray(array)).to(
                self.device, non_blocking=False)

        def copy(name: str, array: np.ndarray) -> torch.Tensor:
            count = array.size
            source = self._segment(self._host, name, count)
            target = self._segment(self._device, name, count)
            target.copy_(source, non_blocking=True)
            return target.view(array.shape)

        return copy
