"""First-come-first-served continuous batching with chunked prefill and recompute preemption.

Each step: running requests first (decodes and unfinished prefill chunks, oldest first),
then waiting requests while the token budget, `max_num_seqs` and free blocks allow. When
a running request cannot get a block, the lowest-priority running request (latest arrival
among equals) is preempted: its blocks are freed (they stay in the prefix cache until
reused, so a resumed request often skips much of its recompute) and it returns to the
front of its priority class in the waiting queue.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Optional

from lmfleet.worker.config import SchedulerConfig
from lmfleet.worker.kv.manager import KVCacheManager, blocks_for_tokens
from lmfleet.worker.request import Request, RequestStatus
from lmfleet.worker.scheduler.base import ScheduledRequest, Scheduler, SchedulerOutput


class FCFSScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        super().__init__(config, kv_manager)
        self._admission_counter = itertools.count()
        self._admission_order: dict[str, int] = {}
        # Kept sorted by _queue_key: higher priority first, then earlier arrival.
        self.waiting: list[Request] = []
        self._waiting_keys: list[tuple] = []
        self.running: list[Request] = []

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) - self.num_swapped

    @property
    def num_swapped(self) -> int:
        return sum(1 for request in self.waiting if request.is_swapped)

    def add(self, request: Request) -> None:
        self._admission_order[request.request_id] = next(self._admission_counter)
        request.status = RequestStatus.WAITING
        self._push_waiting(request)

    def abort(self, request_id: str) -> Optional[Request]:
        for index, request in enumerate(self.waiting):
            if request.request_id == request_id:
                del self.waiting[index]
                del self._waiting_keys[index]
                self._forget(request)
                return request
        for request in self.running:
            if request.request_id == request_id:
                self.finish(request)
                return request
        return None

    def finish(self, request: Request, release_kv: bool = True) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:  # preempted while its last token was in flight
            index = self.waiting.index(request)
            del self.waiting[index]
            del self._waiting_keys[index]
        self._admission_order.pop(request.request_id, None)
        if release_kv:
            self.kv_manager.free(request)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        self.kv_manager.begin_step()
        budget = self.config.max_num_batched_tokens

        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if self.waits_for_token(request):
                continue
            num_new_tokens = min(request.num_uncomputed_tokens, budget)
            while not self.kv_manager.allocate(request, num_new_tokens):
                victim = self._lowest_priority_running()
                self._preempt(victim, output)
                if victim is request:
                    break
                budget += self._unschedule(victim, output)
            else:
                output.scheduled.append(ScheduledRequest(request, num_new_tokens))
                budget -= num_new_tokens

        # Admitting new work in a step that had to preempt would only thrash.
        while (
            not output.preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            if not self._place_waiting(request, budget, output):
                break
            num_new_tokens = output.scheduled[-1].num_new_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = request.num_computed_tokens
            del self.waiting[0]
            del self._waiting_keys[0]
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            budget -= num_new_tokens
        return output

    def _place_waiting(self, request: Request, budget: int, output: SchedulerOutput) -> bool:
        """Give a waiting request device KV for its next chunk (swap-in, a session's KV, or
        a prefix hit plus new blocks) and add it to the output; False if it does not fit."""
        kv = self.kv_manager
        if request.is_swapped:
            num_new_tokens = min(request.num_uncomputed_tokens, budget)
            total = blocks_for_tokens(request.num_computed_tokens + num_new_tokens,
                                      kv.block_size)
            if total > kv.num_free_blocks:
                return False
            output.swap_in_blocks.extend(kv.swap_in(request))
            output.swapped_in.append(request)
            if not kv.allocate(request, num_new_tokens):
                return False  # cannot happen: room was checked above
        else:
            hit = kv.find_prefix_hit(request)
            num_new_tokens = min(request.num_tokens - hit.num_tokens(kv.block_size), budget)
            if not kv.allocate(request, num_new_tokens, hit):
                return False
        output.scheduled.append(ScheduledRequest(request, num_new_tokens))
        return True

    def _queue_key(self, request: Request) -> tuple:
        return (-request.priority, request.arrival_time, self._admission_order[request.request_id])

    def _push_waiting(self, request: Request) -> None:
        key = self._queue_key(request)
        index = bisect.bisect(self._waiting_keys, key)
        self._waiting_keys.insert(index, key)
        self.waiting.insert(index, request)

    def _lowest_priority_running(self) -> Request:
        return max(self.running, key=self._queue_key)

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        self.running.remove(request)
        if self.kv_manager.can_swap_out(request):
            output.swap_out_blocks.extend(self.kv_manager.swap_out(request))
            output.swapped_out.append(request)
        else:
            self.kv_manager.free(request)
            request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.num_preemptions += 1
        output.preempted.append(request)
        self._push_waiting(request)

    @staticmethod
    def _unschedule(request: Request, output: SchedulerOutput) -> int:
        """Drop the request from this step's output; returns the tokens given back."""
        for index, scheduled in enumerate(output.scheduled):
            if scheduled.request is request:
                del output.scheduled[index]
                return scheduled.num_new_tokens
        return 0

    def _forget(self, request: Request) -> None:
        self.kv_manager.free(request)
        self._admission_order.pop(request.request_id, None)
