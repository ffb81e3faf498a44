"""The scheduler interface: which requests run in the next step, and with how many tokens.

Contract:
- `add(request)` admits a request (status WAITING); `abort(request_id)` removes it.
- `schedule()` returns a `SchedulerOutput`: the requests to run this step with their token
  counts (decodes count 1, prefill chunks their length, within `max_num_batched_tokens`
  and `max_num_seqs`), the requests preempted to make room, and swap lists (empty for
  policies that only recompute). KV blocks for everything scheduled are allocated by the
  time `schedule()` returns; a preempted request holds no blocks.
- `finish(request)` is called by the engine when a request ends; the scheduler releases
  its blocks and forgets it.
- A scheduler never touches tensors; the KV manager keeps block ids, the runner computes.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from lmfleet.worker.config import SchedulerConfig
from lmfleet.worker.kv.manager import KVCacheManager
from lmfleet.worker.request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def is_decode(self) -> bool:
        """Exactly one new token, and it is the latest one: a plain decode step."""
        return self.num_new_tokens == 1 and self.request.num_uncomputed_tokens == 1


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    swapped_out: list[Request] = field(default_factory=list)
    swapped_in: list[Request] = field(default_factory=list)
    # Block copies the runner performs before this step's forward pass, in this order:
    # (device, host) pairs to save, then (host, device) pairs to restore.
    swap_out_blocks: list[tuple[int, int]] = field(default_factory=list)
    swap_in_blocks: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler(abc.ABC):
    # Set by a pipeline-parallel engine: a request whose sampled token is still in flight
    # is not scheduled until it is back (its next step needs that token as input).
    skip_requests_in_flight = False

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv_manager = kv_manager
        self.num_preemptions = 0

    def waits_for_token(self, request: Request) -> bool:
        """Whether the request sits this step out: its last token is in flight (it
        finishes when that arrives), or any token is and steps may not read it."""
        return request.output_is_complete or (
            self.skip_requests_in_flight and request.num_pending_tokens > 0)

    @abc.abstractmethod
    def add(self, request: Request) -> None: ...

    @abc.abstractmethod
    def abort(self, request_id: str) -> Request | None:
        """Remove the request wherever it is and free its blocks; None if unknown."""

    @abc.abstractmethod
    def schedule(self) -> SchedulerOutput: ...

    @abc.abstractmethod
    def finish(self, request: Request, release_kv: bool = True) -> None:
        """Forget a finished request; free its KV unless the caller keeps it (sessions)."""

    def on_step_finished(self, output: SchedulerOutput, elapsed_s: float) -> None:  # noqa: B027
        """Called after the step ran (MLFQ charges its jobs the step's time)."""

    @property
    @abc.abstractmethod
    def num_running(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_waiting(self) -> int: ...

    @property
    def num_swapped(self) -> int:
        return 0

    def has_work(self) -> bool:
        return self.num_running + self.num_waiting + self.num_swapped > 0


def make_scheduler(config: SchedulerConfig, kv_manager: KVCacheManager,
                   cost_model=None) -> Scheduler:
    """The policy named by `config.policy` (validated by SchedulerConfig)."""
    if config.policy == "mlfq":
        from lmfleet.worker.scheduler.mlfq import MLFQScheduler

        return MLFQScheduler(config, kv_manager, cost_model)
    from lmfleet.worker.scheduler.fcfs import FCFSScheduler

    return FCFSScheduler(config, kv_manager)
