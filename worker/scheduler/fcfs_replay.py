"""What FCFS would have done with the jobs this scheduler served, replayed in hindsight.

The deadline lane (deadline_lane.py) aims at the tail of job completion time (JCT) that
FCFS would give, so it learns FCFS's JCTs: each finished job, with its arrival time and the
service it attained (the wall time of the steps it was in), goes through a virtual FCFS
queue with `num_servers` servers, one per batch slot: the engine runs up to max_num_seqs
jobs at once, and FCFS would run them in arrival order, each until it finishes. To first
order that is FCFS's schedule; it ignores that a step's time depends on who else is in it.

Output lengths are not looked at: only jobs that have finished are replayed, so this uses
what the scheduler has already seen, as the learnt p99 service did before it.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Optional

# Jobs waiting to be placed, at most: one job that never ends (or runs for hours) would
# otherwise hold every later arrival here. Past it the oldest is given up, as if aborted.
MAX_UNPLACED = 100_000


@dataclass
class _Job:
    job_id: str
    arrived_s: float
    service_s: Optional[float] = None  # set when it finishes
    dropped: bool = False  # aborted: FCFS would not have served it either


class FCFSReplay:
    """A virtual multi-server FCFS queue fed in hindsight.

    Contract: `arrived` is called once per job, in order of arrival time; later exactly one
    of `finished` (with the service the job attained) or `dropped` (aborted). Both return
    the virtual FCFS JCTs, in arrival order, of the jobs that could be placed by then: a job
    is placed once it and every job that arrived before it have finished or been dropped
    (FCFS starts nobody ahead of an earlier arrival). Dropped jobs get no JCT and take no
    server time. `arrived` returns JCTs too when it has to give up the oldest unplaced job
    (more than `max_unplaced` waiting).
    """

    def __init__(self, num_servers: int, max_unplaced: int = MAX_UNPLACED) -> None:
        if num_servers < 1:
            raise ValueError(f"invalid num_servers={num_servers}: must be >= 1")
        self.max_unplaced = max_unplaced
        self._free_at_s = [0.0] * num_servers  # heap: when each virtual server is next free
        self._waiting: deque[_Job] = deque()  # arrived, not placed yet; arrival order
        self._by_id: dict[str, _Job] = {}

    @property
    def num_unplaced(self) -> int:
        return len(self._waiting)

    def arrived(self, job_id: str, arrived_s: float) -> list[float]:
        if job_id in self._by_id:
            return []  # already waiting: its first arrival stands
        job = _Job(job_id, arrived_s)
        self._waiting.append(job)
        self._by_id[job_id] = job
        if len(self._waiting) <= self.max_unplaced:
            return []
        return self.dropped(self._waiting[0].job_id)  # unfinished, or it would be placed

    def finished(self, job_id: str, service_s: float) -> list[float]:
        job = self._by_id.pop(job_id, None)
        if job is None:
            return []  # never arrived here (or already ended): nothing to replay
        job.service_s = service_s
        return self._place_ready()

    def dropped(self, job_id: str) -> list[float]:
        job = self._by_id.pop(job_id, None)
        if job is None:
            return []
        job.dropped = True
        return self._place_ready()

    def _place_ready(self) -> list[float]:
        jcts = []
        while self._waiting and (self._waiting[0].dropped
                                 or self._waiting[0].service_s is not None):
            job = self._waiting.popleft()
            if job.dropped:
                continue
            # The earliest-free server takes the next arrival, no earlier than it arrived.
            start_s = max(heapq.heappop(self._free_at_s), job.arrived_s)
            end_s = start_s + job.service_s
            heapq.heappush(self._free_at_s, end_s)
            jcts.append(end_s - job.arrived_s)
        return jcts
