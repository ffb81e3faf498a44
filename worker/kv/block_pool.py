"""A pool of fixed-size KV blocks with reference counts and a prefix-cache index.

Contract:
- A block is *in use* while its reference count is > 0, and *free* otherwise. Free blocks
  sit in one queue in eviction order: `allocate` takes from the front.
- A free block may still be *cached*: it keeps its hash, and `get_cached_block` can find
  it and `touch` revives it (taking it out of the free queue) as long as `allocate` has
  not reused it. Reusing a cached free block drops its hash (eviction).
- `free` appends to the back of the queue in the order given, so callers pass a request's
  blocks last-first: the tail of a prompt, least likely to be shared, is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Optional

from lmfleet.worker.kv.prefix import BlockHash


class NoFreeBlocksError(RuntimeError):
    """Raised when more blocks are requested than are free (callers check first)."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[Optional[BlockHash]] = [None] * num_blocks
        # Insertion order is eviction order; values unused.
        self._free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached_blocks: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (free-but-cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (for tests and debugging)."""
        return list(self._free_queue)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks from the front of the free queue, evicting their hashes."""
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free_queue.popitem(last=False)
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def get_cached_block(self, block_hash: BlockHash) -> Optional[int]:
        return self._cached_blocks.get(block_hash)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block (a prefix-cache hit), reviving free cached ones."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free_queue[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue."""
        for block_id in block_ids:
            if self.ref_counts[block_id] <= 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if self.enable_caching and self.block_hashes[block_id] is not None:
                    self._free_queue[block_id] = None
                else:
                    # An uncached block is worth nothing: put it first in line for reuse.
                    self._free_queue[block_id] = None
                    self._free_queue.move_to_end(block_id, last=False)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a full, computed block under its hash. Returns False when another block
        already holds that content (the duplicate stays unregistered and is freed plainly)."""
        if not self.enable_caching or self.block_hashes[block_id] is not None:
            return False
        if block_hash in self._cached_blocks:
            return False
        self.block_hashes[block_id] = block_hash
        self._cached_blocks[block_hash] = block_id
        return True

    def _evict(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:
            del self._cached_blocks[block_hash]
            self.block_hashes[block_id] = None
