"""Admission control: in-flight and queue limits, FIFO hand-over, deadlines, cancels."""

from __future__ import annotations

import asyncio

import pytest

from lmfleet.router.admission import RETRY_AFTER_SECONDS, Admission
from lmfleet.router.errors import DeadlineExceededError, OverloadedError


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def settle():
    """Let woken tasks run (a hand-over takes a few event-loop turns)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_requests_beyond_in_flight_and_queue_are_refused_with_retry_after():
    async def scenario():
        admission = Admission("m", max_in_flight=1, max_queued=0)
        await admission.acquire()
        with pytest.raises(OverloadedError) as refused:
            await admission.acquire()
        assert refused.value.retry_after == RETRY_AFTER_SECONDS
        assert refused.value.http_status == 503
        admission.release()
        await admission.acquire()  # the slot is free again
        assert admission.num_in_flight == 1

    run(scenario())


def test_queued_requests_get_slots_in_arrival_order():
    async def scenario():
        admission = Admission("m", max_in_flight=1, max_queued=2)
        await admission.acquire()
        order = []

        async def waiter(name):
            await admission.acquire()
            order.append(name)

        tasks = [asyncio.create_task(waiter("first")), asyncio.create_task(waiter("second"))]
        await settle()
        assert admission.num_queued == 2
        with pytest.raises(OverloadedError):
            await admission.acquire()  # queue full
        admission.release()
        await settle()
        assert order == ["first"]
        admission.release()
        await asyncio.gather(*tasks)
        assert order == ["first", "second"]
        assert admission.num_in_flight == 1 and admission.num_queued == 0

    run(scenario())


def test_a_queued_request_past_its_deadline_leaves_the_queue():
    async def scenario():
        admission = Admission("m", max_in_flight=1, max_queued=1)
        await admission.acquire()
        with pytest.raises(DeadlineExceededError):
            await admission.acquire(timeout=0.01)
        assert admission.num_queued == 0
        admission.release()
        assert admission.num_in_flight == 0

    run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_never_takes_a_slot():
    async def scenario():
        admission = Admission("m", max_in_flight=1, max_queued=1)
        await admission.acquire()
        task = asyncio.create_task(admission.acquire())
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert admission.num_queued == 0
        admission.release()
        assert admission.num_in_flight == 0

    run(scenario())


def test_slot_context_releases_on_error():
    async def scenario():
        admission = Admission("m", max_in_flight=1, max_queued=0)
        with pytest.raises(RuntimeError):
            async with admission.slot():
                raise RuntimeError("boom")
        assert admission.num_in_flight == 0

    run(scenario())


def test_unlimited_admission_never_refuses():
    async def scenario():
        admission = Admission("m")
        for _ in range(100):
            await admission.acquire()
        assert admission.num_in_flight == 100

    run(scenario())


@pytest.mark.parametrize("kwargs", [{"max_in_flight": 0}, {"max_queued": -1}])
def test_limits_are_validated(kwargs):
    with pytest.raises(ValueError):
        Admission("m", **kwargs)
