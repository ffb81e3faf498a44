"""Skip-join multi-level feedback queue scheduling (FastServe, arXiv 2305.05920).

Queues Q0..Q(k-1); the quantum of Qi is `base * 2**i`. A new job joins the highest queue
whose quantum covers its estimated prefill time (the queues above are skipped: it would
be demoted out of them at once); an API `priority` moves that starting queue up (larger
priority) or down. Each step the scheduler walks jobs in priority order (queue, then the
order within it) and runs as many as the token budget, `max_num_seqs` and KV allow. Every
job in a step is charged the step's time; one that has spent its queue's quantum moves to
the next queue. Within a queue (`mlfq_queue_order`), the job with the least service so
far runs first by default ("least_attained"; ties: the one that got there first), or jobs
run in the order they got there ("arrival"). With "arrival", a job in the last queue that
spends its quantum keeps its place (`mlfq_last_queue="fcfs"`: long jobs finish in the
order they got there) or goes to the back ("round_robin"). A job that has not run for
`mlfq_starvation_s` is boosted: it goes to Q0 ahead of every job not boosted (boosted jobs
in the order they were boosted) for one Q0 quantum, then back to the queue, place and
service it had, so a boost guarantees progress without reordering the long jobs.
While a job of a higher queue is in a step, the prefill chunks of lower queues' jobs may
add at most as much time as the higher queues' work in the step takes by the cost model
(`mlfq_bounded_prefill`): a short job's steps then take at most about twice their own time
instead of each carrying a long prompt's full chunk, and the long prompt keeps advancing.
The deadline lane (deadline_lane.py; on by default, its deadline FCFS's p99 JCT replayed
on the finished jobs) moves jobs older than a quarter of the deadline ahead of the deep
queues, oldest first, until their deadline passes: it holds MLFQ's p99 JCT near FCFS's.
Output length is never assumed known.
Preemption happens at step boundaries: a job not chosen keeps its KV where it is unless
memory is needed.

KV under pressure (proactive offload, FastServe §4.3): jobs are evicted from the end of
the priority order (largest estimated next scheduled time) — swapped to the host tier
while it has room, else recomputed later. With a host tier, free device blocks are kept
above a headroom for arrivals, and swapped jobs that come next are swapped in ahead of
need once there is room to spare.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from lmfleet.worker.config import SchedulerConfig
from lmfleet.worker.kv.manager import KVCacheManager, blocks_for_tokens
from lmfleet.worker.request import Request, RequestStatus
from lmfleet.worker.scheduler.base import ScheduledRequest, Scheduler, SchedulerOutput
from lmfleet.worker.scheduler.cost_model import CostModel
from lmfleet.worker.scheduler.deadline_lane import DeadlineLane


@dataclass
class QueueEntry:
    level: int
    position: int  # order of arrival at the level: smaller got there first
    service_s: float = 0.0  # service attained at this level
    attained_s: float = 0.0  # service attained since the job was added
    last_run: float = 0.0  # clock time it last ran (or arrived)
    arrived: float = 0.0  # clock time the scheduler got it (the deadline lane's age)
    # While boosted to Q0 against starvation: the (level, position, service_s) to return to.
    home: Optional[tuple[int, int, float]] = None


class MLFQScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager,
                 cost_model: Optional[CostModel] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, kv_manager)
        self.cost_model = cost_model or CostModel()
        self.clock = clock
        self.num_queues = config.mlfq_num_queues
        self.base_quantum_s = config.mlfq_base_quantum_s or self.cost_model.decode_step_time(
            max(1, config.max_num_seqs // 2), 0)
        self.headroom_blocks = (config.kv_headroom_blocks if config.kv_headroom_blocks
                                is not None else kv_manager.num_blocks // 16)
        self.jobs: dict[str, Request] = {}
        self.entries: dict[str, QueueEntry] = {}
        self._back = itertools.count()
        # Boosted jobs' places: increasing, and below every place `_back` gives out.
        self._boosted = itertools.count(-(2 ** 62))
        self._last_scheduled: list[Request] = []
        self._urgent_ids: set[str] = set()  # the lane's urgent jobs in the last order made
        self.deadline_lane = DeadlineLane(config.mlfq_deadline_s, config.mlfq_deadline_slack,
                                          num_servers=config.max_num_seqs)
        # Jobs at levels below this are young (new or short): the lane never passes them.
        self.young_levels = self.num_queues // 2

    # ---- queue mechanics (pure, tested on a fake clock) --------------------------------
    def quantum(self, level: int) -> float:
        return self.base_quantum_s * (2 ** level)

    def initial_level(self, request: Request) -> int:
        """Skip-join: the first queue whose quantum covers the estimated prefill time."""
        images = sum(span.offset + span.length > request.num_computed_tokens
                     for span in request.image_spans)  # not yet encoded for this request
        prefill_s = self.cost_model.prefill_time(request.num_uncomputed_tokens, images)
        level = 0
        while level < self.num_queues - 1 and self.quantum(level) < prefill_s:
            level += 1
        return min(max(level - request.priority, 0), self.num_queues - 1)

    def charge(self, request: Request, seconds: float) -> None:
        """Account one step of service; demote when the quantum is spent."""
        entry = self.entries[request.request_id]
        entry.service_s += seconds
        entry.attained_s += seconds
        entry.last_run = self.clock()
        if entry.service_s >= self.quantum(entry.level):
            entry.service_s = 0.0
            if entry.home is not None:  # the boost is over: back to where it waited
                entry.level, entry.position, entry.service_s = entry.home
                entry.home = None
            elif entry.level < self.num_queues - 1:  # demote to the back of the next queue
                entry.level += 1
                entry.position = next(self._back)
            elif self.config.mlfq_last_queue == "round_robin":
                entry.position = next(self._back)

    def promote_starved(self) -> list[Request]:
        """Boost jobs that have not run for the starvation bound to Q0, ahead of every job
        not boosted (for one Q0 quantum; see `charge`). Boosted jobs run in the order they
        were boosted, the longest-waiting first among those boosted together, and a job
        still waiting from its boost keeps its place: so a starved job waits at most for
        the boosted jobs ahead of it, not for every later boost too."""
        now = self.clock()
        # Q0 jobs count too: boosted jobs go ahead of them, so under a stream of boosts a
        # job waiting in Q0 would otherwise never run.
        starved = sorted((entry.last_run, entry.level, entry.position, request_id)
                         for request_id, entry in self.entries.items()
                         if now - entry.last_run >= self.config.mlfq_starvation_s)
        promoted = []
        for _, _, _, request_id in starved:
            entry = self.entries[request_id]
            if entry.home is None:
                entry.home = (entry.level, entry.position, entry.service_s)
                entry.level, entry.service_s = 0, 0.0
                entry.position = next(self._boosted)
            entry.last_run = now
            promoted.append(self.jobs[request_id])
        return promoted

    def priority_order(self) -> list[Request]:
        """Every job, the next to run first: by queue, then within a queue by arrival there
        or least attained service (a boosted job goes first in Q0 either way); then the
        deadline lane moves urgent jobs of the deep queues ahead of the others there."""
        if self.config.mlfq_queue_order == "arrival":
            def key(request: Request) -> tuple:
                entry = self.entries[request.request_id]
                return entry.level, entry.position
        else:
            def key(request: Request) -> tuple:
                entry = self.entries[request.request_id]
                if entry.home is not None:  # boosted: the front of Q0, as placed
                    return entry.level, 0, entry.position
                return entry.level, 1, entry.attained_s, entry.position
        young, urgent, rest = self.deadline_lane.split(
            sorted(self.jobs.values(), key=key), is_young=self._is_young,
            arrived_at=lambda r: self.entries[r.request_id].arrived, now=self.clock())
        self._urgent_ids = {r.request_id for r in urgent}
        return young + urgent + rest

    def _is_young(self, request: Request) -> bool:
        """In the top half of the queues, or boosted against starvation (which the lane must
        not undo)."""
        entry = self.entries[request.request_id]
        return entry.level < self.young_levels or entry.home is not None

    def deadline_lane_sizes(self) -> Optional[tuple[int, int]]:
        """(running, waiting) of the jobs the last priority order put in the deadline lane
        (still unfinished); None while the lane is off."""
        if self.deadline_lane.deadline_s is None:
            return None
        urgent = self._urgent_ids & self.jobs.keys()
        running = len(urgent & {r.request_id for r in self._last_scheduled})
        return running, len(urgent) - running

    def queue_sizes(self) -> list[tuple[int, int]]:
        """(running, waiting) per queue level."""
        running = {r.request_id for r in self._last_scheduled}
        sizes = [[0, 0] for _ in range(self.num_queues)]
        for request_id, entry in self.entries.items():
            sizes[entry.level][0 if request_id in running else 1] += 1
        return [tuple(s) for s in sizes]

    # ---- Scheduler interface -------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return sum(1 for r in self._last_scheduled if r.request_id in self.jobs)

    @property
    def num_waiting(self) -> int:
        return len(self.jobs) - self.num_running - self.num_swapped

    @property
    def num_swapped(self) -> int:
        return sum(1 for r in self.jobs.values() if r.is_swapped)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.jobs[request.request_id] = request
        now = self.clock()
        self.entries[request.request_id] = QueueEntry(
            level=self.initial_level(request), position=next(self._back), last_run=now,
            arrived=now)
        self.deadline_lane.job_arrived(request.request_id, now)

    def abort(self, request_id: str) -> Optional[Request]:
        request = self.jobs.get(request_id)
        if request is not None:
            self.deadline_lane.job_dropped(request_id)  # not finished: teaches nothing
            self._forget(request)
        return request

    def finish(self, request: Request, release_kv: bool = True) -> None:
        entry = self.entries.get(request.request_id)
        if entry is not None:
            self.deadline_lane.job_finished(request.request_id, entry.attained_s)
        self._forget(request, release_kv)

    def _forget(self, request: Request, release_kv: bool = True) -> None:
        self.jobs.pop(request.request_id, None)
        self.entries.pop(request.request_id, None)
        if release_kv:
            self.kv_manager.free(request)

    def on_step_finished(self, output: SchedulerOutput, elapsed_s: float) -> None:
        for item in output.scheduled:
            if item.request.request_id in self.entries:
                self.charge(item.request, elapsed_s)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        self.kv_manager.begin_step()
        self.promote_starved()
        order = self.priority_order()
        budget = self.config.max_num_batched_tokens
        chosen: set[str] = set()
        top_level: Optional[int] = None  # the queue of the first job chosen
        num_seqs = num_tokens = 0  # chosen so far
        low_room_s: Optional[float] = None  # left for lower queues' prefill chunks
        for request in order:
            if budget == 0 or len(chosen) >= self.config.max_num_seqs:
                break
            if self.waits_for_token(request):
                continue
            wanted = min(request.num_uncomputed_tokens, budget)
            level = self.entries[request.request_id].level
            top_level = level if top_level is None else top_level
            bounded = (self.config.mlfq_bounded_prefill and level > top_level and wanted > 1
                       and self.cost_model.prefill_per_token_s > 0)
            if bounded:
                if low_room_s is None:  # the higher queues' work, chosen before
                    low_room_s = self._step_time(num_seqs, num_tokens)
                wanted = min(wanted, int(low_room_s / self.cost_model.prefill_per_token_s))
                if wanted < 1:
                    continue  # waits for the higher queues (or its starvation boost)
            # _place returns the tokens actually scheduled: fewer than asked after a
            # prefix hit (num_computed_tokens moved past the cached blocks).
            num_new_tokens = self._place(request, wanted, order, chosen, output)
            if num_new_tokens is None:
                break  # strict priority: nothing below may overtake a job that cannot fit
            chosen.add(request.request_id)
            output.scheduled.append(ScheduledRequest(request, num_new_tokens))
            budget -= num_new_tokens
            num_seqs, num_tokens = num_seqs + 1, num_tokens + num_new_tokens
            if bounded:
                low_room_s -= num_new_tokens * self.cost_model.prefill_per_token_s
        for request in order:
            request.status = (RequestStatus.RUNNING if request.request_id in chosen
                              else RequestStatus.WAITING)
        if self.kv_manager.host_pool is not None:
            self._keep_headroom(order, chosen, output)
            self._prefetch(order, chosen, output)
        self._last_scheduled = [s.request for s in output.scheduled]
        return output

    def _step_time(self, num_seqs: int, num_tokens: int) -> float:
        """The cost model's time of a step of `num_seqs` sequences and `num_tokens` tokens:
        one decode step, plus the tokens beyond one per sequence at the prefill rate."""
        cost = self.cost_model
        return (cost.decode_step_time(num_seqs, 0)
                + cost.prefill_per_token_s * max(num_tokens - num_seqs, 0))

    # ---- KV placement --------------------------------------------------------------------
    def _blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        held = len(request.block_ids) or len(request.host_block_ids)
        total = blocks_for_tokens(request.num_computed_tokens + num_new_tokens,
                                  self.kv_manager.block_size)
        return max(total - held, 0) + len(request.host_block_ids)

    def _place(self, request: Request, num_new_tokens: int, order: list[Request],
               chosen: set[str], output: SchedulerOutput) -> Optional[int]:
        """Get the request's KV onto the device with room for num_new_tokens, evicting
        lower-priority jobs that are not chosen this step if needed. Returns the tokens to
        schedule (fewer after a prefix hit), or None if it does not fit."""
        kv = self.kv_manager
        needed = self._blocks_needed(request, num_new_tokens)
        if kv.num_free_blocks < needed and \
                self._free_blocks_after_evicting_all(order, chosen, request) < needed:
            # Evicting cannot make room: leave everyone's KV in place (evicting anyway
            # would swap a job out and prefetch it back, or discard its KV, every step).
            return None
        while kv.num_free_blocks < needed:
            victim = self._eviction_candidate(order, chosen, exclude=request)
            if victim is None:
                return None
            self._evict(victim, output)
        if request.is_swapped:
            output.swap_in_blocks.extend(kv.swap_in(request))
            output.swapped_in.append(request)
        if request.block_ids or request.num_computed_tokens:
            return num_new_tokens if kv.allocate(request, num_new_tokens) else None
        hit = kv.find_prefix_hit(request)
        num_new_tokens = min(num_new_tokens, request.num_tokens - hit.num_tokens(kv.block_size))
        if not kv.allocate(request, num_new_tokens, hit):
            return None
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = request.num_computed_tokens
        return num_new_tokens

    def _free_blocks_after_evicting_all(self, order: list[Request], chosen: set[str],
                                        exclude: Request) -> int:
        """Free device blocks if every eviction candidate went (a block shared through the
        prefix cache is freed only when all of its holders go)."""
        holders = Counter(block_id for request in order
                          if request is not exclude and request.request_id not in chosen
                          for block_id in request.block_ids)
        pool = self.kv_manager.pool
        return self.kv_manager.num_free_blocks + sum(
            1 for block_id, count in holders.items() if pool.ref_counts[block_id] == count)

    def _eviction_candidate(self, order: list[Request], chosen: set[str],
                            exclude: Request) -> Optional[Request]:
        for request in reversed(order):  # largest estimated next scheduled time first
            if request is exclude or request.request_id in chosen:
                continue
            if request.block_ids:
                return request
        return None

    def _evict(self, request: Request, output: SchedulerOutput) -> None:
        kv = self.kv_manager
        if kv.can_swap_out(request):
            output.swap_out_blocks.extend(kv.swap_out(request))
            output.swapped_out.append(request)
        else:
            kv.free(request)  # recompute later
            request.num_computed_tokens = 0
            output.preempted.append(request)
        request.num_preemptions += 1
        self.num_preemptions += 1

    def _keep_headroom(self, order: list[Request], chosen: set[str],
                       output: SchedulerOutput) -> None:
        kv = self.kv_manager
        for request in reversed(order):
            if kv.num_free_blocks >= self.headroom_blocks:
                return
            if request.request_id not in chosen and request.block_ids \
                    and kv.can_swap_out(request):
                output.swap_out_blocks.extend(kv.swap_out(request))
                output.swapped_out.append(request)

    def _prefetch(self, order: list[Request], chosen: set[str], output: SchedulerOutput):
        """Swap in the swapped jobs that come next, while room beyond the headroom lasts."""
        kv = self.kv_manager
        for request in order:
            if request.request_id in chosen or not request.is_swapped:
                continue
            if kv.num_free_blocks - len(request.host_block_ids) < self.headroom_blocks:
                return
            output.swap_in_blocks.extend(kv.swap_in(request))
            output.swapped_in.append(request)
