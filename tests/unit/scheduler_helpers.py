"""Shared set-up of the scheduler unit tests: an MLFQ scheduler on a fake clock with no
model, and `plan` / `ids` (used by the FCFS tests too).

Times are in fake seconds chosen so every comparison is exact: prefill costs 1 s per
token, the base quantum is 4 s, so with 4 queues the quanta are 4, 8, 16 and 32 s and a
prompt of n tokens joins Q0 for n <= 4, Q1 for n <= 8, Q2 for n <= 16, else Q3.
`run_step` plays the engine's part: scheduled tokens are computed, full blocks registered,
a request that caught up samples a fake token (7), the clock advances by the step's time
and every scheduled job is charged it.
"""

from __future__ import annotations

from lmfleet.worker.config import SchedulerConfig
from lmfleet.worker.kv.manager import KVCacheManager
from lmfleet.worker.request import Request
from lmfleet.worker.sampling_params import SamplingParams
from lmfleet.worker.scheduler.base import SchedulerOutput
from lmfleet.worker.scheduler.cost_model import CostModel
from lmfleet.worker.scheduler.mlfq import MLFQScheduler

BLOCK_SIZE = 4
FAKE_TOKEN = 7
COST = CostModel(prefill_base_s=0.0, prefill_per_token_s=1.0, decode_base_s=0.5,
                 decode_per_seq_s=0.25, decode_per_ctx_token_s=0.0)


def make_scheduler(num_blocks: int = 16, num_host_blocks: int = 0, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, headroom: int = 0,
                   base_quantum_s: float | None = 4.0, starvation_s: float = 100.0,
                   cost_model: CostModel = COST, last_queue: str = "fcfs",
                   queue_order: str = SchedulerConfig.mlfq_queue_order,
                   deadline_s: float | None = None, num_queues: int = 4,
                   deadline_slack: float = SchedulerConfig.mlfq_deadline_slack,
                   bounded_prefill: bool = SchedulerConfig.mlfq_bounded_prefill,
                   scheduler_class: type[MLFQScheduler] = MLFQScheduler,
                   **class_kwargs) -> tuple[MLFQScheduler, list[float]]:
    """A scheduler (MLFQ or a subclass, given `class_kwargs`) on a fake clock; set
    `now[0]` to move time."""
    config = SchedulerConfig(policy="mlfq", max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             mlfq_num_queues=num_queues, mlfq_base_quantum_s=base_quantum_s,
                             mlfq_starvation_s=starvation_s, kv_headroom_blocks=headroom,
                             mlfq_last_queue=last_queue, mlfq_queue_order=queue_order,
                             mlfq_deadline_s=deadline_s, mlfq_deadline_slack=deadline_slack,
                             mlfq_bounded_prefill=bounded_prefill)
    now = [0.0]
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, num_host_blocks=num_host_blocks)
    return scheduler_class(config, kv, cost_model, clock=lambda: now[0], **class_kwargs), now


def make_request(request_id: str, num_prompt_tokens: int, priority: int = 0) -> Request:
    # Prompts differ by request id, so no two requests share a prefix unless a test says so.
    first = 1000 * sum(map(ord, request_id))
    prompt = list(range(first, first + num_prompt_tokens))
    return Request(request_id, prompt, SamplingParams(), priority=priority)


def play_step(scheduler) -> SchedulerOutput:
    """Schedule one step and play the engine's part for it (any scheduler)."""
    output = scheduler.schedule()
    for item in output.scheduled:
        request = item.request
        request.num_computed_tokens += item.num_new_tokens
        scheduler.kv_manager.cache_computed_blocks(request)
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token(FAKE_TOKEN, None)
    return output


def run_step(scheduler: MLFQScheduler, now: list[float], elapsed_s: float) -> SchedulerOutput:
    output = play_step(scheduler)
    now[0] += elapsed_s
    scheduler.on_step_finished(output, elapsed_s)
    return output


def plan(output: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in output.scheduled]


def ids(requests: list[Request]) -> list[str]:
    return [r.request_id for r in requests]


def level(scheduler: MLFQScheduler, request_id: str) -> int:
    return scheduler.entries[request_id].level


