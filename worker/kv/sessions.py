"""KV kept between the turns of a chat session (`session_id`).

When a request with a session_id finishes (not aborted), its KV is parked instead of
freed. With a host tier the parked KV moves to host memory at once (idle sessions should
not hold device blocks); the next turn of the session, whose prompt starts with the
previous prompt + answer, takes those blocks over and prefills only its new tokens.
Without a host tier the parked request's full blocks go to the prefix cache (they stay
until evicted) and the next turn reuses them through an ordinary prefix hit, recomputing
at most the partial last block.

Bounds: a parked session expires after `ttl_s`; beyond `max_sessions`, or when the host
tier is full, the least recently used sessions are dropped and their KV freed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from lmfleet.worker.kv.manager import KVCacheManager, blocks_for_tokens
from lmfleet.worker.request import Request


def common_prefix_length(a: list[int], b: list[int]) -> int:
    length = min(len(a), len(b))
    for index in range(length):
        if a[index] != b[index]:
            return index
    return length


class SessionCache:
    def __init__(self, kv_manager: KVCacheManager, ttl_s: float, max_sessions: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kv = kv_manager
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.clock = clock
        # session_id -> (finished request holding the KV, last use); LRU order.
        self._parked: OrderedDict[str, tuple[Request, float]] = OrderedDict()
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, request: Request) -> list[tuple[int, int]]:
        """Keep a finished request's KV for its session's next turn. Returns (device, host)
        block pairs the runner must copy (the move to host memory)."""
        session_id = request.session_id
        self.drop(session_id)
        if self.max_sessions == 0:
            self.kv.free(request)
            return []
        if self.kv.host_pool is None:
            self.kv.free(request)  # full blocks stay findable in the prefix cache
            return []
        self.expire()
        needed = self.kv.num_computed_blocks(request)
        while self._parked and (len(self._parked) >= self.max_sessions
                                or self.kv.num_free_host_blocks < needed):
            self._drop_oldest()
        if not self.kv.can_swap_out(request):
            self.kv.free(request)
            return []
        pairs = self.kv.swap_out(request)
        self._parked[session_id] = (request, self.clock())
        return pairs

    def attach(self, request: Request) -> int:
        """Give a new turn its session's parked KV; returns the tokens it need not prefill."""
        entry = self._parked.pop(request.session_id, None) if request.session_id else None
        if entry is None:
            return 0
        parked, _ = entry
        # The last token of the parked request was sampled but never fed, so its KV covers
        # num_computed_tokens; the new turn must still compute at least its last token.
        reuse = min(common_prefix_length(parked.token_ids[: parked.num_computed_tokens],
                                         request.token_ids), request.num_tokens - 1)
        # Equal image tokens with another image are not a shared prefix.
        parked_images = set(parked.image_spans)
        for span in request.image_spans:
            if span.offset < reuse and span not in parked_images:
                reuse = span.offset
        keep = blocks_for_tokens(reuse, self.kv.block_size)
        if reuse == 0:
            self.kv.free(parked)
            return 0
        request.host_block_ids = parked.host_block_ids[:keep]
        parked.host_block_ids = parked.host_block_ids[keep:]
        self.kv.free(parked)
        request.num_computed_tokens = reuse
        request.num_cached_tokens = reuse
        return reuse

    def drop(self, session_id: str | None) -> bool:
        entry = self._parked.pop(session_id, None) if session_id else None
        if entry is not None:
            self.kv.free(entry[0])
        return entry is not None

    def expire(self) -> int:
        """Drop sessions idle longer than the TTL; returns how many."""
        now = self.clock()
        expired = [sid for sid, (_, last) in self._parked.items() if now - last >= self.ttl_s]
        for session_id in expired:
            self.drop(session_id)
        self.num_expired += len(expired)
        return len(expired)

    def _drop_oldest(self) -> None:
        session_id, (request, _) = self._parked.popitem(last=False)
        self.kv.free(request)
