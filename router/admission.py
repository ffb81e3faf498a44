"""Admission control per model: at most `max_in_flight` requests run, `max_queued` more
wait in FIFO order for a slot, and anything beyond both is refused at once with
OverloadedError (HTTP 503 with Retry-After, gRPC RESOURCE_EXHAUSTED).

One slot is one client request, whatever its `n`. `None` means unlimited. A request that
waits past its deadline gets DeadlineExceededError; a cancelled waiter leaves the queue.
Runs on the event loop only (no locks).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Optional

from lmfleet.router.errors import DeadlineExceededError, OverloadedError

# Seconds a refused client is asked to wait; requests on this small scale finish in seconds.
RETRY_AFTER_SECONDS = 1


class Admission:
    def __init__(self, model: str, max_in_flight: Optional[int] = None,
                 max_queued: Optional[int] = None) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 or unlimited, got {max_in_flight}")
        if max_queued is not None and max_queued < 0:
            raise ValueError(f"max_queued must be >= 0 or unlimited, got {max_queued}")
        self.model = model
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.num_in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def num_queued(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self, timeout: Optional[float] = None) -> AsyncIterator[None]:
        """Hold one slot for the body of the `async with`; see the module doc."""
        await self.acquire(timeout)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, timeout: Optional[float] = None) -> None:
        if self._has_free_slot() and not self._waiters:
            self.num_in_flight += 1
            return
        if self.max_queued is not None and len(self._waiters) >= self.max_queued:
            raise OverloadedError(
                f"model {self.model} is at capacity ({self.num_in_flight} requests in "
                f"flight, {len(self._waiters)} queued); retry later",
                retry_after=RETRY_AFTER_SECONDS)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as error:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(error, asyncio.TimeoutError):
                raise DeadlineExceededError("deadline exceeded while queued for admission") \
                    from None
            raise

    def release(self) -> None:
        """Free a slot: hand it to the oldest waiter, or return it to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves over; num_in_flight is unchanged
                return
        self.num_in_flight -= 1

    def _has_free_slot(self) -> bool:
        return self.max_in_flight is None or self.num_in_flight < self.max_in_flight
