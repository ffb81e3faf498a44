"""A replica's load as the engine thread sees it after each step, and its token rate.

`LoadSnapshot` is immutable: the engine thread builds a new one after every step and
publishes it by a single reference assignment, so any thread may read the latest one
without a lock and without touching the (not thread-safe) engine.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

# Generation throughput is averaged over this many seconds, in one-second buckets.
RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class LoadSnapshot:
    """Counts and gauges of one engine at one moment (the end of a step).

    The token rate is not stored as a number: it is computed when read (`tokens_per_second`)
    from per-second buckets, so an idle engine reports its rate decaying to zero even
    though its thread is asleep and takes no new snapshot.
    """

    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    kv_cache_usage: float = 0.0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # tokens found there
    num_generated_tokens: int = 0  # since the engine started
    # (queue name, running, waiting) per scheduler queue (one for fcfs, k for mlfq).
    queues: tuple[tuple[str, int, int], ...] = ()
    num_swap_out_blocks: int = 0
    num_swap_in_blocks: int = 0
    block_bytes: int = 0
    num_used_host_blocks: int = 0
    num_total_host_blocks: int = 0
    num_sessions: int = 0
    scheduler: str = "fcfs"
    cost_model: Optional[dict] = None
    # (whole second on the monotonic clock, tokens generated in it), oldest first.
    token_buckets: tuple[tuple[int, int], ...] = ()
    started_at: float = 0.0  # monotonic time the rate window began counting

    def tokens_per_second(self, now: Optional[float] = None,
                          window_s: float = RATE_WINDOW_S) -> float:
        """Generated tokens per second averaged over the last `window_s` seconds."""
        now = time.monotonic() if now is None else now
        since = now - window_s
        tokens = sum(count for second, count in self.token_buckets if second + 1 > since)
        span = min(window_s, max(now - self.started_at, 1.0))
        return tokens / span


class TokenRateWindow:
    """Per-second counts of generated tokens over the recent window (engine thread only)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.started_at = time.monotonic()
        self._buckets: deque[list[int]] = deque()  # [second, count]
        self._last_total: Optional[int] = None

    def record(self, total_generated: int, now: Optional[float] = None) -> None:
        """Note the engine's running total of generated tokens after a step."""
        now = time.monotonic() if now is None else now
        new_tokens = 0 if self._last_total is None else total_generated - self._last_total
        self._last_total = total_generated
        second = int(now)
        if new_tokens > 0:
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += new_tokens
            else:
                self._buckets.append([second, new_tokens])
        while self._buckets and self._buckets[0][0] + 1 <= now - self.window_s:
            self._buckets.popleft()

    def buckets(self) -> tuple[tuple[int, int], ...]:
        return tuple((second, count) for second, count in self._buckets)


def snapshot_engine(engine, rate: TokenRateWindow) -> LoadSnapshot:
    """Read an `LLMEngine`'s load; call only from the thread that owns the engine."""
    kv = engine.kv_manager
    rate.record(engine.num_generated_tokens)
    return LoadSnapshot(
        num_running=engine.num_running,
        num_waiting=engine.num_waiting,
        num_swapped=engine.scheduler.num_swapped,
        kv_cache_usage=float(engine.kv_usage),
        num_free_blocks=kv.num_free_blocks,
        num_total_blocks=kv.num_blocks,
        num_preemptions=engine.scheduler.num_preemptions,
        prefix_cache_queries=kv.prefix_stats.queries,
        prefix_cache_hits=kv.prefix_stats.hits,
        num_generated_tokens=engine.num_generated_tokens,
        queues=tuple(engine.queue_loads()),
        num_swap_out_blocks=kv.swap_stats.num_swap_out_blocks,
        num_swap_in_blocks=kv.swap_stats.num_swap_in_blocks,
        block_bytes=engine.runner.kv_block_bytes,
        num_used_host_blocks=kv.num_used_host_blocks,
        num_total_host_blocks=kv.num_host_blocks,
        num_sessions=len(engine.sessions),
        scheduler=engine.config.scheduler.policy,
        cost_model=engine.cost_model.as_dict() if engine.cost_model else None,
        token_buckets=rate.buckets(),
        started_at=rate.started_at,
    )
