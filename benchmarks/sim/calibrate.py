"""Calibrate the simulator's step times on the real engine, and measure its capacity.

`profile_cost_model` (the engine's start-up profile) times decodes at one context length
(64 tokens), so it misses what attention over longer contexts costs. Here the real
engine runs a saturating burst of the benchmark's own workload (all jobs at t=0) and
every step is recorded: its decodes, their total context and its prefill tokens, all
reconstructed from the step's outputs (a request's first token ends its prefill, later
ones are decodes; prompts fit the token budget, so prefills are never chunked). A
least-squares fit of
    step = decode_base + decode_per_seq * decodes + decode_per_ctx_token * context
           + prefill_per_token * prefill_tokens
over the steps with decodes gives the cost model the simulation uses. The probe's
completion rate while the batch is full is the measured capacity; the fitted model's own
(`workload.capacity_per_s`) is reported beside it as a check of the fit.
"""

from __future__ import annotations

import time

import numpy as np
from sim.workload import Job, capacity_per_s

from lmfleet.worker.scheduler.cost_model import CostModel

WARMUP_STEPS = 3


def run_probe(engine, jobs: list[Job], prompts: dict[str, list[int]]) -> list[tuple]:
    """All jobs at once; returns (decodes, decode_context, prefill_tokens, jobs_in_system,
    seconds, tokens) for each step."""
    from lmfleet.worker.request import Request
    from lmfleet.worker.sampling_params import SamplingParams

    for job in jobs:
        params = SamplingParams(max_tokens=job.output_len, min_tokens=job.output_len,
                                temperature=0)
        engine.add_request(Request(job.job_id, prompts[job.job_id], params))
    steps = []
    while engine.has_work():
        in_system = engine.num_running + engine.num_waiting
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        decodes = context = prefill = 0
        for output in outputs:
            if len(output.output_token_ids) == 1:
                prefill += len(output.prompt_token_ids)
            else:
                decodes += 1
                context += len(output.prompt_token_ids) + len(output.output_token_ids) - 1
        steps.append((decodes, context, prefill, in_system, elapsed, len(outputs)))
    return steps


def fit_cost_model(steps: list[tuple], prefill_base_s: float) -> CostModel:
    """Least squares (coefficients clamped at >= 0), refitted without the slowest 5% of
    residuals: a shared machine adds the odd step slowed by someone else's work."""
    rows = [s for s in steps[WARMUP_STEPS:] if s[0] > 0]
    x = np.array([[1.0, d, c, p] for d, c, p, *_ in rows])
    y = np.array([s[4] for s in rows])
    keep = np.ones(len(y), dtype=bool)
    for _ in range(2):
        coef = np.clip(np.linalg.lstsq(x[keep], y[keep], rcond=None)[0], 0.0, None)
        residual = y - x @ coef
        keep = residual <= np.percentile(residual, 95)
    base, per_seq, per_ctx, per_prefill = (float(v) for v in coef)
    return CostModel(prefill_base_s=prefill_base_s, prefill_per_token_s=per_prefill,
                     decode_base_s=base, decode_per_seq_s=per_seq, decode_per_ctx_token_s=per_ctx)


def probe_summary(steps: list[tuple], cost: CostModel, spec, max_num_seqs: int) -> dict:
    full = [s for s in steps[WARMUP_STEPS:] if s[3] >= max_num_seqs]
    tokens = sum(s[5] for s in full)
    seconds = sum(s[4] for s in full)
    measured = tokens / seconds / spec.mean_output_len if seconds else float("nan")
    return {"num_steps": len(steps), "full_batch_steps": len(full),
            "measured_full_batch_req_per_s": measured,
            "fitted_capacity_req_per_s": capacity_per_s(cost, spec, max_num_seqs),
            "total_s": sum(s[4] for s in steps)}
