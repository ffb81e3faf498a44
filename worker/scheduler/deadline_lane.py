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
  `mlfq_deadline_slack` times the 99th percentile of the JCT that FCFS would have given
  the last HISTORY finished jobs, replayed in hindsight (fcfs_replay.py), i.e. the p99 that
  the benchmark's target asks MLFQ not to exceed. The learnt deadline is off until
  MIN_HISTORY jobs have been replayed. (Until 2026-12-03 it was 1.5x the p99 of the
  finished jobs' service, learnt over 1000 jobs. A service time does not grow with the
  load; our reading is that in a long burst many jobs missed that deadline at once.)

Ages are on the scheduler's clock, measured from when the scheduler got the job.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from typing import Optional

from lmfleet.worker.request import Request
from lmfleet.worker.scheduler.fcfs_replay import FCFSReplay

# A job becomes urgent at this fraction of the deadline: a quarter leaves three quarters
# of the deadline for the job to finish once it is urgent (other fractions near it did
# about as well: docs/scheduling.md).
URGENT_FRACTION = 0.25
# Replayed FCFS JCTs the learnt deadline is taken from, and how many there must be before
# it is used (a 99th percentile of fewer is little more than the maximum). The window is
# long because FCFS's p99 is set by rare long bursts, which a short window forgets.
HISTORY = 10_000
MIN_HISTORY = 100
QUANTILE = 0.99


class DeadlineLane:
    """Which jobs are urgent, and the deadline that says so.

    Contract: the scheduler reports every job's arrival (`job_arrived`, in arrival order)
    and its end: `job_finished` with the service it attained, or `job_dropped` if aborted
    (dropped jobs teach nothing). `split` takes the scheduler's priority order and returns
    it as (young, urgent, rest): young + urgent + rest is the order with the lane, the same
    jobs with the urgent, non-young ones moved ahead of the other non-young ones. While
    `deadline_s` is None (lane off, or too few jobs replayed to learn it) the order comes
    back whole as the first part. `num_servers` is the batch size FCFS would run.
    """

    def __init__(self, fixed_deadline_s: Optional[float], slack: float,
                 num_servers: int) -> None:
        self.fixed_deadline_s = fixed_deadline_s
        self.slack = slack
        # Learning only when the deadline is learnt: no replay state otherwise.
        self.learns = fixed_deadline_s is None and slack > 0
        self.history = HISTORY
        self._replay = FCFSReplay(num_servers)
        self._jct_s: deque[float] = deque()  # the last `history`, oldest first
        self._sorted_s: list[float] = []  # the same values, sorted
        self._learnt_s: Optional[float] = None

    @property
    def deadline_s(self) -> Optional[float]:
        if self.fixed_deadline_s is not None:
            return self.fixed_deadline_s
        return self._learnt_s

    def job_arrived(self, job_id: str, arrived_s: float) -> None:
        if self.learns:
            self._learn(self._replay.arrived(job_id, arrived_s))

    def job_finished(self, job_id: str, service_s: float) -> None:
        """A job finished after `service_s` seconds of charged step time."""
        if self.learns:
            self._learn(self._replay.finished(job_id, service_s))

    def job_dropped(self, job_id: str) -> None:
        if self.learns:
            self._learn(self._replay.dropped(job_id))

    def _learn(self, fcfs_jcts_s: list[float]) -> None:
        for jct_s in fcfs_jcts_s:
            # Kept sorted by insertion (a memmove, not a sort per job).
            if len(self._jct_s) == self.history:
                oldest = self._jct_s.popleft()
                del self._sorted_s[bisect.bisect_left(self._sorted_s, oldest)]
            self._jct_s.append(jct_s)
            bisect.insort(self._sorted_s, jct_s)
        if fcfs_jcts_s and len(self._sorted_s) >= MIN_HISTORY:
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
