"""Graceful stop of the HTTP front door: let running requests finish, then end the rest
with a proper error instead of cutting them.

`Drain.drain(timeout)`: from then on new requests get a JSON 503 (`ShuttingDownError`,
Retry-After); requests already running may finish until `timeout`; at the deadline every
one still running ends cleanly: a stream with an error event and `data: [DONE]`, a
non-streaming request with a JSON 503. (Without this the HTTP server cancels them when
its own shutdown timeout passes: streams stop mid-way with no end, and non-streaming
requests get a plain-text 500.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Optional, TypeVar

from lmfleet.router.errors import ShuttingDownError

T = TypeVar("T")


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        # Created on first use, inside the event loop that serves the requests.
        self._stop_now: Optional[asyncio.Event] = None
        self._idle: Optional[asyncio.Event] = None

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        if self._stop_now is None:
            self._stop_now, self._idle = asyncio.Event(), asyncio.Event()
            self._idle.set()
        return self._stop_now, self._idle

    def check(self) -> None:
        """Refuse a new request once draining."""
        if self.draining:
            raise ShuttingDownError("the router is shutting down; retry on another router")

    def begin(self) -> None:
        """One more running request (`end()` when it is answered or its stream ends)."""
        _, idle = self._events()
        self.in_flight += 1
        idle.clear()

    def end(self) -> None:
        _, idle = self._events()
        self.in_flight -= 1
        if self.in_flight == 0:
            idle.set()

    async def until_stopped(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, or raise ShuttingDownError when the drain deadline passes."""
        stop_now, _ = self._events()
        work = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(stop_now.wait())
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            raise ShuttingDownError("the router shut down before the request finished")
        finally:
            for task in (work, stopper):
                task.cancel()
            await asyncio.gather(work, stopper, return_exceptions=True)

    async def guarded(self, events: AsyncIterator[T]) -> AsyncIterator[T]:
        """`events`, ended by ShuttingDownError at the drain deadline (closing `events`,
        which cancels its worker calls). Takes over one `begin()` of its request: the
        request counts as running until the stream ends."""
        try:
            async with contextlib.aclosing(events) as stream:
                while True:
                    try:
                        event = await self.until_stopped(anext(stream))
                    except StopAsyncIteration:
                        return
                    yield event
        finally:
            self.end()

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, wait up to `timeout` s for running ones, end the rest."""
        stop_now, idle = self._events()
        self.draining = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(idle.wait(), timeout)
        stop_now.set()
