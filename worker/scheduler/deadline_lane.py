"""MLFQ's deadline lane: size-blind control of the tail of job completion time (JCT).

MLFQ serves the short jobs first, which is what buys its mean JCT, but the waiting it
saves them lands on the long jobs, which are the whole p99 set: on heavy-tailed output
lengths MLFQ's p99 JCT was 1.1-1.6x FCFS's (benchmarks/scheduling_variants.py, README).
The lane narrows that without knowing any output length:

- A job is *urgent* from age `deadline * URGENT_FRACTION` until its deadline. Urgent jobs
  run ahead of the deep queues (the lower half of the levels), oldest first: every job has
  the same deadline, so that is earliest deadline first. The top queues, where new and
  short jobs are (and jobs boosted against starvation), keep precedence, so short requests
  are not held back.
- A job past its deadline has missed it and drops back to its place in the queues (the
  starvation boost still keeps it moving). Otherwise the few jobs too large for the
  deadline, all of them urgent, would make the on-time ones late too: to keep the number of
  late jobs small one gives up on the largest (Moore and Hodgson's rule), and a job that is
  still running at its deadline is likely one of those.
- The deadline is fixed (`mlfq_deadline_s`, an operator's JCT objective) or learnt:
  `mlfq_deadline_slack` times the 99th percentile of the service (charged step time) that
  the last HISTORY finished jobs needed, i.e. a job as large as the 99th-percentile one may
  take `slack` times its own service time. The learnt deadline is off until MIN_HISTORY
  jobs have finished.

Ages are on the scheduler's clock, measured from when the scheduler got the job.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from typing import Optional

from lmfleet.worker.request import Request

# A job becomes urgent at this fraction of the deadline. 0.1 and 0.4 gave p99s within a
# few percent of a quarter's in simulation (README); a quarter leaves three quarters of the
# deadline for the job to finish once it is urgent.
URGENT_FRACTION = 0.25
# Finished jobs whose service the learnt deadline is taken from, and how many must have
# finished before it is used (a 99th percentile of fewer is little more than the maximum).
HISTORY = 1000
MIN_HISTORY = 100
QUANTILE = 0.99


class DeadlineLane:
    """Which jobs are urgent, and the deadline that says so.

    Contract: `record_finished` is called once per job that finished (not aborted) with the
    service it attained; `split` takes the scheduler's priority order and returns it as
    (young, urgent, rest): young + urgent + rest is the order with the lane, the same jobs
    with the urgent, non-young ones moved ahead of the other non-young ones. While
    `deadline_s` is None (lane off, or too few jobs finished to learn it) the order comes
    back whole as the first part.
    """

    def __init__(self, fixed_deadline_s: Optional[float], slack: float) -> None:
        self.fixed_deadline_s = fixed_deadline_s
        self.slack = slack
        self._service_s: deque[float] = deque()  # the last HISTORY, oldest first
        self._sorted_s: list[float] = []  # the same values, sorted
        self._learnt_s: Optional[float] = None

    @property
    def deadline_s(self) -> Optional[float]:
        if self.fixed_deadline_s is not None:
            return self.fixed_deadline_s
        return self._learnt_s

    def record_finished(self, service_s: float) -> None:
        """Learn from a finished job's attained service (seconds of charged step time)."""
        if self.fixed_deadline_s is not None or self.slack == 0:
            return
        # Kept sorted by insertion (a memmove, not a sort per finished job).
        if len(self._service_s) == HISTORY:
            oldest = self._service_s.popleft()
            del self._sorted_s[bisect.bisect_left(self._sorted_s, oldest)]
        self._service_s.append(service_s)
        bisect.insort(self._sorted_s, service_s)
        if len(self._sorted_s) >= MIN_HISTORY:
            # Nearest rank: the smallest value with at least QUANTILE of the jobs at or below.
            rank = math.ceil(QUANTILE * len(self._sorted_s)) - 1
            self._learnt_s = self.slack * self._sorted_s[rank]

    def is_urgent(self, age_s: float) -> bool:
        deadline = self.deadline_s
        return deadline is not None and deadline * URGENT_FRACTION <= age_s < deadline

    def split(self, order: list[Request], is_young: Callable[[Request], bool],
              arrived_at: Callable[[Request], float], now: float
              ) -> tuple[list[Request], list[Request], list[Request]]:
        """(young jobs in their order, urgent ones oldest first, the rest in their order)."""
        if self.deadline_s is None:
            return order, [], []
        young, urgent, rest = [], [], []
        for request in order:
            if is_young(request):
                young.append(request)
            elif self.is_urgent(now - arrived_at(request)):
                urgent.append(request)
            else:
                rest.append(request)
        urgent.sort(key=arrived_at)  # stable: ties keep the priority order
        return young, urgent, rest
