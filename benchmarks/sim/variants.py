"""Size-blind MLFQ variants studied for the p99 target (benchmarks/scheduling_variants.py).

None of these is a serving policy: they exist so the trade-off between mean and p99 JCT
can be measured on the same job lists as FCFS and the shipped MLFQ. Each keeps
MLFQScheduler's KV placement and changes one thing, stated in its docstring. Like MLFQ,
none looks at output lengths. `param` is the variant's one knob.

Service is counted in "nominal steps" where a variant says so: one base quantum per decode
step a job is in, and its own prefill time for a prefill chunk. That is the job's own work,
whereas MLFQ charges every job the whole step's wall time (which grows with the other jobs'
prefill chunks and contexts).
"""

from __future__ import annotations

from lmfleet.worker.request import Request
from lmfleet.worker.scheduler.base import ScheduledRequest, SchedulerOutput
from lmfleet.worker.scheduler.deadline_lane import DeadlineLane
from lmfleet.worker.scheduler.mlfq import MLFQScheduler


def own_cost_s(scheduler: MLFQScheduler, item: ScheduledRequest) -> float:
    """The job's own share of a step: one base quantum for a decode, its prefill time for a
    prefill chunk."""
    if item.is_decode:
        return scheduler.base_quantum_s
    return scheduler.cost_model.prefill_time(item.num_new_tokens)


class OwnCostMLFQ(MLFQScheduler):
    """MLFQ whose quanta are spent by each job's own work (`own_cost_s`), not by the step's
    wall time. `param` is unused."""

    def __init__(self, *args, param: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)

    def on_step_finished(self, output: SchedulerOutput, elapsed_s: float) -> None:
        for item in output.scheduled:
            if item.request.request_id in self.entries:
                self.charge(item.request, own_cost_s(self, item))


class AttainedStepsMLFQ(MLFQScheduler):
    """MLFQ that also counts each job's total attained service in nominal steps (own work /
    base quantum) and its arrival time, for the variants below that order by them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attained_steps: dict[str, float] = {}
        self.arrival_s: dict[str, float] = {}

    def add(self, request: Request) -> None:
        super().add(request)
        self.attained_steps[request.request_id] = 0.0
        self.arrival_s[request.request_id] = self.clock()

    def finish(self, request: Request, release_kv: bool = True) -> None:
        super().finish(request, release_kv)
        self.attained_steps.pop(request.request_id, None)
        self.arrival_s.pop(request.request_id, None)

    def on_step_finished(self, output: SchedulerOutput, elapsed_s: float) -> None:
        super().on_step_finished(output, elapsed_s)
        for item in output.scheduled:
            if item.request.request_id in self.attained_steps:
                self.attained_steps[item.request.request_id] += (
                    own_cost_s(self, item) / self.base_quantum_s)


class AgingScheduler(AttainedStepsMLFQ):
    """No queues: the job with the smallest `attained - param * age` runs first, where
    attained is in nominal steps and age in seconds since arrival. param 0 is
    least-attained-service first; a large param approaches FCFS (the oldest first). Ageing
    replaces the starvation boost."""

    def __init__(self, *args, param: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rate_steps_per_s = param

    def priority_order(self) -> list[Request]:
        now = self.clock()

        def key(request: Request) -> tuple[float, int]:
            request_id = request.request_id
            aged = self.attained_steps[request_id] - self.rate_steps_per_s * (
                now - self.arrival_s[request_id])
            return aged, self.entries[request_id].position

        return sorted(self.jobs.values(), key=key)

    def promote_starved(self) -> list[Request]:
        return []


class MostAttainedLaneMLFQ(AttainedStepsMLFQ):
    """MLFQ (its quanta spent by the step's wall time, its boost) except that the `param`
    jobs with the most attained service, among those past LANE_MIN_STEPS (long for sure),
    go first: the long jobs furthest along are never preempted."""

    LANE_MIN_STEPS = 64.0

    def __init__(self, *args, param: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lane_size = int(param)

    def priority_order(self) -> list[Request]:
        order = super().priority_order()
        furthest = sorted((r for r in order
                           if self.attained_steps[r.request_id] >= self.LANE_MIN_STEPS),
                          key=lambda r: -self.attained_steps[r.request_id])[:self.lane_size]
        lane = {r.request_id for r in furthest}
        return furthest + [r for r in order if r.request_id not in lane]


class FullBoostMLFQ(MLFQScheduler):
    """MLFQ whose starvation boost lasts `param` x the quantum of the level the job was
    boosted from (MLFQ's boost lasts one Q0 quantum), after which the job is demoted from
    that level. A starved long job thus runs a long stretch instead of one step."""

    def __init__(self, *args, param: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.boost_fraction = param

    def charge(self, request: Request, seconds: float) -> None:
        entry = self.entries[request.request_id]
        if entry.home is None:
            super().charge(request, seconds)
            return
        entry.service_s += seconds
        entry.attained_s += seconds  # as MLFQ's own charge does
        entry.last_run = self.clock()
        home_level = entry.home[0]
        if entry.service_s < self.boost_fraction * self.quantum(home_level):
            return
        entry.level, entry.position, _ = entry.home
        entry.home, entry.service_s = None, 0.0
        if entry.level < self.num_queues - 1:
            entry.level += 1
            entry.position = next(self._back)


class ServiceDeadlineLane(DeadlineLane):
    """The deadline lane as shipped until 2026-12-03: its learnt deadline is the slack times
    the p99 of the service (not the FCFS JCT) of the last 1000 finished jobs."""

    def __init__(self, slack: float, num_servers: int) -> None:
        super().__init__(fixed_deadline_s=None, slack=slack, num_servers=num_servers)
        self.history = 1000

    def job_arrived(self, job_id: str, arrived_s: float) -> None:
        pass  # no FCFS replay

    def job_dropped(self, job_id: str) -> None:
        pass

    def job_finished(self, job_id: str, service_s: float) -> None:
        if self.learns:
            self._learn([service_s])


class ServiceDeadlineMLFQ(MLFQScheduler):
    """MLFQ with the previous deadline lane (ServiceDeadlineLane), `param` its slack."""

    def __init__(self, *args, param: float = 1.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadline_lane = ServiceDeadlineLane(param, num_servers=self.config.max_num_seqs)


# SimConfig.policy names of the variants.
VARIANTS: dict[str, type[MLFQScheduler]] = {
    "mlfq-own-cost": OwnCostMLFQ,
    "mlfq-aging": AgingScheduler,
    "mlfq-full-boost": FullBoostMLFQ,
    "mlfq-lane": MostAttainedLaneMLFQ,
    "mlfq-service-deadline": ServiceDeadlineMLFQ,
}
