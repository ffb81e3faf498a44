"""Discrete-event simulation of the engine's step loop with the real schedulers.

The simulator plays the engine and the model; the policies are the real classes:
`FCFSScheduler` and `MLFQScheduler` (the latter on the simulation's clock), over a real
`KVCacheManager`. Each simulated step: admit the jobs that have arrived, `schedule()`,
advance the clock by the cost model's time for that batch (`workload.step_time`), then do
what `LLMEngine.step` does: advance `num_computed_tokens`, emit a token for every request
that caught up, finish requests at their output length, and report the step's time to
the scheduler (`on_step_finished`, which charges MLFQ's jobs).

Not modelled: swap copies between device and host (taken as free: on a GPU they overlap
the forward pass on a side stream) and sampling. Prefix caching is off (the prompts are
synthetic). Output lengths are known to the simulator only, as to the real benchmark.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# benchmarks/ is on sys.path when scheduling.py runs as a script.
from sim.metrics import JobRecord, summarize
from sim.oracle import OracleSRPTScheduler
from sim.variants import VARIANTS
from sim.workload import Job, step_time

from lmfleet.worker.config import SchedulerConfig
from lmfleet.worker.kv.manager import KVCacheManager
from lmfleet.worker.request import Request
from lmfleet.worker.sampling_params import SamplingParams
from lmfleet.worker.scheduler.cost_model import CostModel
from lmfleet.worker.scheduler.fcfs import FCFSScheduler
from lmfleet.worker.scheduler.mlfq import MLFQScheduler

FAKE_TOKEN = 1
# Policy name of the yardstick that knows output lengths (sim/oracle.py).
ORACLE = "srpt-oracle"


@dataclass(frozen=True)
class SimConfig:
    policy: str  # "fcfs", "mlfq", ORACLE or a key of sim/variants.py's VARIANTS
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int = 1024
    num_host_blocks: int = 4096
    mlfq_base_quantum_s: float | None = None
    mlfq_starvation_s: float = 3.0
    mlfq_num_queues: int = SchedulerConfig.mlfq_num_queues
    mlfq_queue_order: str = SchedulerConfig.mlfq_queue_order
    mlfq_last_queue: str = "fcfs"
    mlfq_deadline_s: float | None = SchedulerConfig.mlfq_deadline_s
    mlfq_deadline_slack: float = SchedulerConfig.mlfq_deadline_slack
    mlfq_bounded_prefill: bool = SchedulerConfig.mlfq_bounded_prefill
    variant_param: float = 0.0  # the one knob of a VARIANTS policy


def _make_scheduler(config: SimConfig, cost: CostModel, clock):
    # The oracle takes MLFQ's settings (it reuses MLFQ's KV placement).
    scheduler_config = SchedulerConfig(
        policy="fcfs" if config.policy == "fcfs" else "mlfq", max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        mlfq_num_queues=config.mlfq_num_queues, mlfq_base_quantum_s=config.mlfq_base_quantum_s,
        mlfq_starvation_s=config.mlfq_starvation_s, mlfq_queue_order=config.mlfq_queue_order,
        mlfq_last_queue=config.mlfq_last_queue, mlfq_deadline_s=config.mlfq_deadline_s,
        mlfq_deadline_slack=config.mlfq_deadline_slack,
        mlfq_bounded_prefill=config.mlfq_bounded_prefill)
    kv = KVCacheManager(config.num_kv_blocks, config.block_size, enable_prefix_caching=False,
                        num_host_blocks=config.num_host_blocks)
    if config.policy == "fcfs":
        return FCFSScheduler(scheduler_config, kv)
    if config.policy == ORACLE:
        return OracleSRPTScheduler(scheduler_config, kv, cost, clock=clock)
    if config.policy in VARIANTS:
        return VARIANTS[config.policy](scheduler_config, kv, cost, clock=clock,
                                       param=config.variant_param)
    if config.policy != "mlfq":
        raise ValueError(f"unknown simulated policy {config.policy!r}")
    return MLFQScheduler(scheduler_config, kv, cost, clock=clock)


def simulate(jobs: list[Job], config: SimConfig, cost: CostModel) -> dict:
    """Run every job to completion; returns the summary plus scheduler counters."""
    now = [0.0]
    scheduler = _make_scheduler(config, cost, clock=lambda: now[0])
    pending = deque(sorted(jobs, key=lambda j: j.arrival_s))
    records = {j.job_id: JobRecord(j.job_id, j.arrival_s, j.output_len, j.is_long)
               for j in jobs}
    targets = {j.job_id: j.output_len for j in jobs}
    num_steps, busy_s, max_jobs = 0, 0.0, 0
    while pending or scheduler.has_work():
        while pending and pending[0].arrival_s <= now[0]:
            job = pending.popleft()
            scheduler.add(Request(job.job_id, [FAKE_TOKEN] * job.prompt_len,
                                  SamplingParams(max_tokens=job.output_len),
                                  arrival_time=job.arrival_s))
        if not scheduler.has_work():
            now[0] = pending[0].arrival_s
            continue
        output = scheduler.schedule()
        if output.is_empty:
            raise RuntimeError("nothing fits in the KV cache: raise num_kv_blocks")
        decodes = [s for s in output.scheduled if s.is_decode]
        num_prefill_tokens = output.num_batched_tokens - len(decodes)
        elapsed = step_time(cost, len(decodes), sum(s.request.num_tokens for s in decodes),
                            num_prefill_tokens)
        now[0] += elapsed
        num_steps += 1
        busy_s += elapsed
        max_jobs = max(max_jobs, scheduler.num_running + scheduler.num_waiting
                       + scheduler.num_swapped)
        for item in output.scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            if request.num_computed_tokens < request.num_tokens:
                continue  # a prefill chunk short of the prompt's end samples nothing
            request.append_output_token(FAKE_TOKEN, None)
            record = records[request.request_id]
            record.on_tokens(now[0], 1)
            if request.num_output_tokens >= targets[request.request_id]:
                record.finish_s = now[0]
                scheduler.finish(request)
        scheduler.on_step_finished(output, elapsed)
    summary = summarize(list(records.values()))
    summary.update(num_steps=num_steps, busy_s=busy_s, makespan_s=now[0],
                   max_jobs_in_system=max_jobs, num_preemptions=scheduler.num_preemptions,
                   swap_out_blocks=scheduler.kv_manager.swap_stats.num_swap_out_blocks)
    return summary
