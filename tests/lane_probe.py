"""Make MLFQ's deadline lane deterministic and observable in engine-level exactness tests."""

from __future__ import annotations

import itertools

from lmfleet.worker.scheduler.mlfq import MLFQScheduler


def tick_clock_and_watch_lane(scheduler: MLFQScheduler) -> list[bool]:
    """Give the scheduler a clock that advances one tick per read (about ten a step), so
    ages, and with them the lane's choices, do not depend on wall-clock time; returns a list
    that gets, per priority order made, whether the lane changed it (a test asserts the lane
    really reordered jobs, or it proves nothing about the lane)."""
    ticks = itertools.count()
    scheduler.clock = lambda: float(next(ticks))
    lane_split = scheduler.deadline_lane.split
    reordered: list[bool] = []

    def split(order, **kwargs):
        young, urgent, rest = lane_split(order, **kwargs)
        reordered.append([r.request_id for r in young + urgent + rest]
                         != [r.request_id for r in order])
        return young, urgent, rest

    scheduler.deadline_lane.split = split
    return reordered
