"""Device KV block accounting for requests: allocation, prefix hits, freeing.

The manager never touches tensors: it decides which block ids hold which tokens. The
model runner owns the KV tensors and writes each token's K/V at slot
`block_ids[pos // block_size] * block_size + pos % block_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmfleet.worker.kv.block_pool import BlockPool
from lmfleet.worker.kv.prefix import extend_block_hashes
from lmfleet.worker.request import Request


@dataclass
class PrefixCacheStats:
    """Counted in tokens, as vLLM's prefix_cache_queries/hits metrics are."""

    queries: int = 0
    hits: int = 0


@dataclass
class SwapStats:
    num_swap_out_blocks: int = 0
    num_swap_in_blocks: int = 0


@dataclass(frozen=True)
class PrefixHit:
    block_ids: list[int]

    def num_tokens(self, block_size: int) -> int:
        return len(self.block_ids) * block_size


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        # Host-memory tier for swapped-out KV; no prefix caching there (a swapped request
        # owns its host blocks alone).
        self.host_pool = BlockPool(num_host_blocks, enable_caching=False) if num_host_blocks \
            else None
        self.prefix_stats = PrefixCacheStats()
        self.swap_stats = SwapStats()
        # Host blocks read by this step's swap-ins: the runner copies swap-outs before
        # swap-ins, so a host block freed by a swap-in must not take a swap-out in the
        # same step. They return to the host pool at the next step.
        self._host_blocks_read_this_step: list[int] = []

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def find_prefix_hit(self, request: Request) -> PrefixHit:
        """Longest chain of cached blocks matching the start of the request's tokens.

        At least the last token is always left to compute, since the step that computes
        it is the one that samples the next token.
        """
        if not self.enable_prefix_caching:
            return PrefixHit([])
        extend_block_hashes(
            request.block_hashes, request.token_ids, request.num_tokens, self.block_size,
            request.image_spans)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        block_ids = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block_id = self.pool.get_cached_block(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return PrefixHit(block_ids)

    def allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Make the request's blocks cover `num_new_tokens` more tokens (after any prefix hit,
        which is applied here: the hit blocks become the request's first blocks and its
        `num_computed_tokens` moves past them). Returns False, changing nothing, if short.
        Passing a hit (even an empty one) counts a prefix-cache query in the stats."""
        if self._num_blocks_needed(request, num_new_tokens, hit) > self.num_free_blocks:
            return False
        if hit is not None and self.enable_prefix_caching:
            self.prefix_stats.queries += request.num_tokens
            self.prefix_stats.hits += hit.num_tokens(self.block_size)
        if hit is not None and hit.block_ids:
            if request.block_ids:
                raise RuntimeError("a prefix hit applies only to a request without blocks")
            self.pool.touch(hit.block_ids)
            request.block_ids = list(hit.block_ids)
            request.num_computed_tokens = hit.num_tokens(self.block_size)
            request.num_registered_blocks = len(hit.block_ids)
        total_tokens = request.num_computed_tokens + num_new_tokens
        num_missing = blocks_for_tokens(total_tokens, self.block_size) - len(request.block_ids)
        if num_missing > 0:
            request.block_ids.extend(self.pool.allocate(num_missing))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose KV has been computed."""
        if not self.enable_prefix_caching:
            return
        extend_block_hashes(
            request.block_hashes, request.token_ids, request.num_computed_tokens,
            self.block_size, request.image_spans)
        num_full = request.num_computed_tokens // self.block_size
        for index in range(request.num_registered_blocks, num_full):
            self.pool.cache_block(request.block_ids[index], request.block_hashes[index])
        request.num_registered_blocks = max(num_full, request.num_registered_blocks)

    def free(self, request: Request) -> None:
        """Release the request's device and host blocks (device tail first)."""
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        request.num_registered_blocks = 0
        if request.host_block_ids:
            self.host_pool.free(request.host_block_ids)
            request.host_block_ids = []

    # ---- host tier ---------------------------------------------------------------------
    @property
    def num_host_blocks(self) -> int:
        return self.host_pool.num_blocks if self.host_pool else 0

    @property
    def num_free_host_blocks(self) -> int:
        return self.host_pool.num_free_blocks if self.host_pool else 0

    @property
    def num_used_host_blocks(self) -> int:
        """Host blocks held by swapped requests (excludes ones being released)."""
        return (self.num_host_blocks - self.num_free_host_blocks
                - len(self._host_blocks_read_this_step))

    def num_computed_blocks(self, request: Request) -> int:
        return blocks_for_tokens(request.num_computed_tokens, self.block_size)

    def can_swap_out(self, request: Request) -> bool:
        return (self.host_pool is not None and bool(request.block_ids)
                and self.num_computed_blocks(request) <= self.num_free_host_blocks)

    def swap_out(self, request: Request) -> list[tuple[int, int]]:
        """Move the request's computed KV to host blocks; returns (device, host) block pairs
        the runner must copy before any freed device block is written again."""
        num_blocks = self.num_computed_blocks(request)
        host_ids = self.host_pool.allocate(num_blocks)
        pairs = list(zip(request.block_ids[:num_blocks], host_ids, strict=True))
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        request.num_registered_blocks = 0
        request.host_block_ids = host_ids
        self.swap_stats.num_swap_out_blocks += num_blocks
        return pairs

    def begin_step(self) -> None:
        """Called by the scheduler at the start of each schedule()."""
        if self._host_blocks_read_this_step:
            self.host_pool.free(self._host_blocks_read_this_step)
            self._host_blocks_read_this_step = []

    def can_swap_in(self, request: Request) -> bool:
        return len(request.host_block_ids) <= self.num_free_blocks

    def swap_in(self, request: Request) -> list[tuple[int, int]]:
        """Bring a swapped request's KV back; returns (host, device) block pairs to copy."""
        device_ids = self.pool.allocate(len(request.host_block_ids))
        pairs = list(zip(request.host_block_ids, device_ids, strict=True))
        self._host_blocks_read_this_step.extend(request.host_block_ids)
        request.host_block_ids = []
        request.block_ids = device_ids
        self.swap_stats.num_swap_in_blocks += len(device_ids)
        return pairs

    def _num_blocks_needed(self, request: Request, num_new_tokens: int, hit: PrefixHit | None):
        num_computed = request.num_computed_tokens
        num_owned = len(request.block_ids)
        num_revived = 0
        if hit is not None and hit.block_ids:
            num_computed = hit.num_tokens(self.block_size)
            num_owned = len(hit.block_ids)
            # Hit blocks that are free now leave the free queue when touched.
            num_revived = sum(1 for b in hit.block_ids if self.pool.ref_counts[b] == 0)
        needed = blocks_for_tokens(num_computed + num_new_tokens, self.block_size) - num_owned
        return max(needed, 0) + num_revived
