"""Dense decode cache: each decoding request's context kept contiguous, so decode attention
reads it in place instead of gathering it out of the paged cache in every layer of every
step.

Why: on CPU, decode attention is memory-bound, and the gather copies every request's whole
context into a padded (B, kv_heads, L, D) tensor per layer per step. For SmolLM2 at a batch
of 64 that copy was a fifth of the step. Here a request's context is copied once, when it
starts decoding, and then grows by one token per step.

Contract:
- The paged cache stays the source of truth: prefix caching, swapping, sessions and
  preemption only know it. This cache holds a copy for the requests that are decoding.
- `prepare()` runs before every forward pass with that step's decode rows. A request keeps
  its slot only while it decodes step after step; one absent from a step loses it, and
  when it decodes again its context is copied afresh from the paged cache. So whenever a
  layer reads a slot, the slot equals the paged cache value for value: both were written
  from the same k, v tensors, or one was copied from the other.
- Memory is bounded by `max_bytes`; a step that would need more gets None (the caller
  falls back to gathering) and the copy is dropped.
- Growing means a new zero-filled tensor (zeros: masked keys are multiplied by a weight
  of 0, harmless only for finite values) and touching that much fresh memory, which is
  slow; so capacity is sized from each request's known upper bound (prompt + max_tokens)
  when that fits, and slots grow by doubling up to `max_slots`.

Layout: one tensor (layers, 2, slots, kv_heads, capacity, D). The slots in use are kept
packed at the front: when a request leaves, the one in the highest slot moves into its
place (one request's copy), so attention reads exactly the decoding requests' slots, never
idle ones, however many slots an earlier burst allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Capacity (tokens per slot) is a multiple of this many tokens.
CAPACITY_STEP = 16


@dataclass(frozen=True)
class DenseDecodeStep:
    """One step's view of the dense cache, read by every layer's decode attention."""

    storage: torch.Tensor  # (layers, 2, S, kv_heads, capacity, D); rows use slots [0, Bd)
    slots: torch.Tensor  # (Bd,) int64 slot of each decode row, a permutation of [0, Bd)
    positions: torch.Tensor  # (Bd,) int64 where each row's new token goes (seq_len - 1)
    mask: torch.Tensor  # (Bd, 1, 1, L) bool: keys each slot may see, in slot order
    length: int  # L: keys read per slot (the longest decode context)
    rows_are_slots: bool  # slots == arange(Bd): no reordering of queries and outputs


class DenseDecodeCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, max_bytes: int,
                 max_slots: int) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.max_bytes = max_bytes
        self.max_slots = max_slots
        self.token_bytes = num_layers * 2 * num_kv_heads * head_dim * dtype.itemsize
        self.storage: Optional[torch.Tensor] = None
        self.slot_of: dict[str, int] = {}
        self.stored: list[int] = []  # tokens held per slot (0: free)

    @property
    def num_slots(self) -> int:
        return len(self.stored)

    @property
    def capacity(self) -> int:
        return 0 if self.storage is None else self.storage.shape[4]

    def clear(self) -> None:
        self.storage = None
        self.slot_of.clear()
        self.stored = []

    def release(self, request_id: str) -> None:
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            self.stored[slot] = 0

    def prepare(self, request_ids: list[str], seq_lens: list[int], final_lens: list[int],
                block_tables: list[list[int]], paged: torch.Tensor,
                block_size: int) -> Optional[DenseDecodeStep]:
        """Slots for this step's decode rows (request_ids[i] has seq_lens[i] tokens counting
        the new one, at most final_lens[i] ever, its blocks in block_tables[i]); `paged` is
        the paged storage (layers, 2, num_blocks, block_size, kv_heads, D). Copies in
        whatever context a slot lacks. None when the rows do not fit in max_bytes."""
        decoding = set(request_ids)
        for request_id in [r for r in self.slot_of if r not in decoding]:
            self.release(request_id)
        self._pack()
        if not request_ids:
            return None
        if not self._ensure_size(len(request_ids), max(seq_lens), max(final_lens)):
            self.clear()
            return None
        slots = []
        for request_id, seq_len, table in zip(request_ids, seq_lens, block_tables, strict=True):
            slot = self.slot_of.get(request_id)
            if slot is None:
                slot = len(self.slot_of)  # the first slot past the packed ones
                self.slot_of[request_id] = slot
            if self.stored[slot] != seq_len - 1:
                self._copy_from_paged(slot, table, seq_len - 1, paged, block_size)
            self.stored[slot] = seq_len  # the forward pass writes token seq_len - 1
            slots.append(slot)
        visible = torch.tensor(self.stored[:len(slots)], device=self.device)  # (Bd,)
        length = max(seq_lens)
        keys = torch.arange(length, device=self.device)  # (L,)
        mask = (keys[None, :] < visible[:, None])[:, None, None, :]  # (Bd, 1, 1, L)
        return DenseDecodeStep(
            storage=self.storage,
            slots=torch.tensor(slots, dtype=torch.int64, device=self.device),
            positions=torch.tensor([n - 1 for n in seq_lens], dtype=torch.int64,
                                   device=self.device),
            mask=mask, length=length,
            rows_are_slots=slots == list(range(len(slots))))

    def _pack(self) -> None:
        """Move the requests in slots past the packed prefix into its free slots."""
        packed = len(self.slot_of)
        free = [slot for slot in range(packed) if self.stored[slot] == 0]
        outside = [(r, slot) for r, slot in self.slot_of.items() if slot >= packed]
        for target, (request_id, source) in zip(free, outside, strict=True):
            held = self.stored[source]
            self.storage[:, :, target, :, :held] = self.storage[:, :, source, :, :held]
            self.slot_of[request_id] = target
            self.stored[target], self.stored[source] = held, 0

    def _ensure_size(self, num_rows: int, length: int, final_length: int) -> bool:
        if num_rows <= self.num_slots and length <= self.capacity:
            return True
        num_slots = self.num_slots
        if num_rows > num_slots:
            num_slots = max(num_rows, min(2 * num_slots, self.max_slots))
        round_up = lambda n: -(-n // CAPACITY_STEP) * CAPACITY_STEP  # noqa: E731
        # The known bound first; else double (so growth stays rare); else just enough.
        for capacity in (round_up(max(final_length, length)),
                         round_up(max(2 * self.capacity, length)), round_up(length)):
            capacity = max(capacity, self.capacity)
            if num_slots * capacity * self.token_bytes <= self.max_bytes:
                break
        else:
            return False
        grown = torch.zeros((self.num_layers, 2, num_slots, self.num_kv_heads, capacity,
                             self.head_dim), dtype=self.dtype, device=self.device)
        if self.storage is not None:
            old = self.storage
            grown[:, :, :old.shape[2], :, :old.shape[4]] = old
        self.storage = grown
        self.stored += [0] * (num_slots - len(self.stored))
        return True

    def _copy_from_paged(self, slot: int, table: list[int], num_tokens: int,
                         paged: torch.Tensor, block_size: int) -> None:
        """The first num_tokens tokens of a request, every layer, from the paged cache."""
        if num_tokens == 0:
            return
        num_blocks = -(-num_tokens // block_size)
        blocks = torch.tensor(table[:num_blocks], dtype=torch.int64, device=self.device)
        context = paged[:, :, blocks]  # (layers, 2, nb, bs, Hkv, D)
        context = context.flatten(2, 3)[:, :, :num_tokens]  # (layers, 2, n, Hkv, D)
        self.storage[:, :, slot, :, :num_tokens] = context.transpose(2, 3)  # (.., Hkv, n, D)
